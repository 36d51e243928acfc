//! Every Redis key name Cairn uses, built in this one place, by owner.
//!
//! A key is `<prefix><family><rest>`: the prefix from config, a family suffix below, and for
//! per-item families the item (a node key, a request id, a root). The Lua never spells a
//! family: the library's top level gets them from `lua_layout` as `KEY_*` locals, and a
//! function gets its fixed keys (a stream, the registry, an index, a lease) as `KEYS` where the
//! Rust side knows them. Only per-item keys a function discovers itself (ancestors, children,
//! the records of an index) are built in Lua, as `P .. KEY_NODE .. k`.

/// `(Lua name, suffix)` of each key family; the Rust builders below use the same suffixes.
const FAMILIES: [(&str, &str); 12] = [
    ("KEY_NODE", progress::NODE),
    ("KEY_CHILDREN", progress::CHILDREN),
    ("KEY_FEED", progress::FEED),
    ("KEY_ROOTS", progress::ROOTS),
    ("KEY_NOTIFY", progress::NOTIFY),
    ("KEY_RECORD", requests::RECORD),
    ("KEY_FINISHED", requests::FINISHED),
    ("KEY_IDEM", requests::IDEM),
    ("KEY_DEAD", requests::DEAD),
    ("KEY_REPLIES", requests::REPLIES),
    ("KEY_STREAMS", retention::REGISTRY),
    ("KEY_LEASE", retention::LEASE),
];

/// The Lua that declares every family suffix as a top-level local of the library.
pub(crate) fn lua_layout() -> String {
    let names: Vec<&str> = FAMILIES.iter().map(|(name, _)| *name).collect();
    let values: Vec<String> = FAMILIES.iter().map(|(_, suffix)| format!("'{suffix}'")).collect();
    format!("local {} = {}\n", names.join(", "), values.join(", "))
}

/// The progress tree's keys.
pub mod progress {
    pub(crate) const NODE: &str = ":pn:";
    pub(crate) const CHILDREN: &str = ":pc:";
    pub(crate) const FEED: &str = ":pf:";
    pub(crate) const ROOTS: &str = ":proots";
    pub(crate) const NOTIFY: &str = ":pfeed";

    /// A node's hash.
    pub fn node(prefix: &str, key: &str) -> String {
        format!("{prefix}{NODE}{key}")
    }

    /// A node's ordered child index (zset scored by start time).
    pub fn children(prefix: &str, key: &str) -> String {
        format!("{prefix}{CHILDREN}{key}")
    }

    /// A tree's change feed (a capped stream).
    pub fn feed(prefix: &str, root: &str) -> String {
        format!("{prefix}{FEED}{root}")
    }

    /// The tree roots, scored by their latest update time.
    pub fn roots(prefix: &str) -> String {
        format!("{prefix}{ROOTS}")
    }

    /// The notification stream every ingress replica tails.
    pub fn notify(prefix: &str) -> String {
        format!("{prefix}{NOTIFY}")
    }

    /// A node's key in the layout of a Redis Cluster (`tagged`) or of one Redis.
    pub fn node_in(tagged: bool, prefix: &str, key: &str) -> String {
        if tagged { format!("{prefix}{NODE}{}", tag(key)) } else { node(prefix, key) }
    }

    /// A node's child index in either layout.
    pub fn children_in(tagged: bool, prefix: &str, key: &str) -> String {
        if tagged { format!("{prefix}{CHILDREN}{}", tag(key)) } else { children(prefix, key) }
    }

    /// A tree's change feed in either layout.
    pub fn feed_in(tagged: bool, prefix: &str, root: &str) -> String {
        if tagged { format!("{prefix}{FEED}{{{root}}}") } else { feed(prefix, root) }
    }

    /// A progress key as the cluster layout writes it: its tree's root as the hash tag, then the
    /// rest of the key (`{_job.1}.step`), so a tree lives in one slot. The Lua's `item` is the same.
    pub fn tag(key: &str) -> String {
        let root = root(key);
        format!("{{{root}}}{}", &key[root.len()..])
    }

    /// The root of a key's tree: the key without its last segments up to a namespace boundary
    /// (as `cairn_progress::Key::root`, on any text).
    pub fn root(key: &str) -> &str {
        let mut root = key;
        while let Some(dot) = root.rfind('.') {
            let parent = &root[..dot];
            let last = parent.rsplit('.').next().unwrap_or(parent);
            if last.starts_with('_') {
                break;
            }
            root = parent;
        }
        root
    }
}

/// The request queue's keys.
///
/// The queue is split in `CAIRN_REQUEST_PARTITIONS` partitions, each a stream of its own; a
/// request belongs to the partition [`partition_of`](requests::partition_of) its id (or its idempotency key) gives. On a
/// Redis Cluster every key of a partition carries the partition's hash tag ([`partition_tag`](requests::partition_tag),
/// `{p3}`), so the stream, the records of its requests, their data streams, the idempotency
/// claims, the finished index and the dead letters of a partition share one slot and each
/// request function touches one slot. On one Redis the tag is empty and every key keeps the
/// layout existing data has; only partitions past the first get a stream of their own
/// (`{prefix}:{stream}:{n}`), and the other keys are shared by all partitions.
pub mod requests {
    pub(crate) const RECORD: &str = ":req:";
    pub(crate) const FINISHED: &str = ":req:finished";
    pub(crate) const IDEM: &str = ":idem:";
    pub(crate) const DEAD: &str = ":dead";
    pub(crate) const REPLIES: &str = ":replies:";

    /// The hash tag of a partition's keys on a Redis Cluster.
    pub fn partition_tag(partition: u16) -> String {
        format!("{{p{partition}}}")
    }

    /// The partition of `partitions` that an id (or an idempotency key) belongs to: FNV-1a of
    /// its bytes, so every service and every version agrees without asking Redis.
    pub fn partition_of(key: &str, partitions: u16) -> u16 {
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        (hash % u64::from(partitions.max(1))) as u16
    }

    /// The request stream, named `stream` in config (its first partition on one Redis).
    pub fn stream(prefix: &str, stream: &str) -> String {
        format!("{prefix}:{stream}")
    }

    /// How many partitions the request queue named `stream` was made with (a string), so that a
    /// service configured with another number can tell before it loses sight of requests.
    pub fn partitions(prefix: &str, stream: &str) -> String {
        format!("{prefix}:{stream}:partitions")
    }

    /// The stream of partition `partition` in the layout of `tag` (empty on one Redis).
    pub fn stream_in(prefix: &str, stream: &str, tag: &str, partition: u16) -> String {
        match (tag.is_empty(), partition) {
            (true, 0) => format!("{prefix}:{stream}"),
            (true, n) => format!("{prefix}:{stream}:{n}"),
            (false, _) => format!("{prefix}:{stream}{tag}"),
        }
    }

    /// A request's record (a hash).
    pub fn record(prefix: &str, id: &str) -> String {
        record_in(prefix, "", id)
    }

    /// A request's record in its partition's layout.
    pub fn record_in(prefix: &str, tag: &str, id: &str) -> String {
        format!("{prefix}{RECORD}{tag}{id}")
    }

    /// The index of finished requests: a zset of ids scored by `finished_ms`.
    pub fn finished(prefix: &str) -> String {
        finished_in(prefix, "")
    }

    /// A partition's index of finished requests.
    pub fn finished_in(prefix: &str, tag: &str) -> String {
        format!("{prefix}{FINISHED}{tag}")
    }

    /// An idempotency key's claim (the id of the request it submitted).
    pub fn idem(prefix: &str, key: &str) -> String {
        idem_in(prefix, "", key)
    }

    /// An idempotency key's claim in its partition's layout.
    pub fn idem_in(prefix: &str, tag: &str, key: &str) -> String {
        format!("{prefix}{IDEM}{tag}{key}")
    }

    /// The dead-letter stream.
    pub fn dead(prefix: &str) -> String {
        dead_in(prefix, "")
    }

    /// A partition's dead-letter stream (on one Redis, the one all partitions share).
    pub fn dead_in(prefix: &str, tag: &str) -> String {
        format!("{prefix}{DEAD}{tag}")
    }

    /// One ingress replica's reply stream.
    pub fn replies(prefix: &str, replica: &str) -> String {
        format!("{prefix}{REPLIES}{replica}")
    }
}

/// The retention keys (the stream-trimmer's).
pub mod retention {
    pub(crate) const REGISTRY: &str = ":streams";
    pub(crate) const LEASE: &str = ":trimmer:lease";

    /// The registry set of every stream Cairn creates, so retention never needs `SCAN`.
    pub fn registry(prefix: &str) -> String {
        format!("{prefix}{REGISTRY}")
    }

    /// The lease that lets one trimmer replica act at a time.
    pub fn lease(prefix: &str) -> String {
        format!("{prefix}{LEASE}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_has_its_own_suffix_and_lua_name() {
        let mut suffixes: Vec<&str> = FAMILIES.iter().map(|(_, s)| *s).collect();
        suffixes.sort_unstable();
        suffixes.dedup();
        assert_eq!(suffixes.len(), FAMILIES.len());
        let layout = lua_layout();
        assert!(layout.starts_with("local KEY_NODE, KEY_CHILDREN,"), "{layout}");
        assert!(layout.contains("= ':pn:', ':pc:',"), "{layout}");
        assert_eq!(layout.matches("KEY_").count(), FAMILIES.len());
    }

    #[test]
    fn keys_keep_the_layout_existing_data_has() {
        assert_eq!(progress::node("c", "a.b"), "c:pn:a.b");
        assert_eq!(progress::children("c", "a"), "c:pc:a");
        assert_eq!(progress::feed("c", "a"), "c:pf:a");
        assert_eq!(progress::roots("c"), "c:proots");
        assert_eq!(progress::notify("c"), "c:pfeed");
        assert_eq!(requests::stream("c", "requests"), "c:requests");
        assert_eq!(requests::record("c", "r1"), "c:req:r1");
        assert_eq!(requests::finished("c"), "c:req:finished");
        assert_eq!(requests::idem("c", "k"), "c:idem:k");
        assert_eq!(requests::dead("c"), "c:dead");
        assert_eq!(requests::replies("c", "i1"), "c:replies:i1");
        assert_eq!(retention::registry("c"), "c:streams");
        assert_eq!(retention::lease("c"), "c:trimmer:lease");
    }

    #[test]
    fn the_cluster_layout_tags_every_key_of_a_tree_with_its_root() {
        assert_eq!(progress::root("a.b.c"), "a");
        assert_eq!(progress::root("_job.x.s"), "_job.x");
        assert_eq!(progress::root("_r._y.z"), "_r._y.z", "a namespace parent: the key is a root");
        assert_eq!(progress::root("_job"), "_job");
        assert_eq!(progress::tag("a.b.c"), "{a}.b.c");
        assert_eq!(progress::tag("_job.x"), "{_job.x}");
        assert_eq!(progress::node_in(true, "c", "_job.x.s"), "c:pn:{_job.x}.s");
        assert_eq!(progress::children_in(true, "c", "a.b"), "c:pc:{a}.b");
        assert_eq!(progress::feed_in(true, "c", "a"), "c:pf:{a}");
        assert_eq!(progress::node_in(false, "c", "a.b"), "c:pn:a.b");
        assert_eq!(progress::feed_in(false, "c", "a"), "c:pf:a");
    }

    #[test]
    fn request_partitions_keep_one_slot_each_on_a_cluster_and_the_old_layout_on_one_redis() {
        use requests::*;
        assert_eq!(stream_in("c", "requests", "", 0), "c:requests");
        assert_eq!(stream_in("c", "requests", "", 2), "c:requests:2");
        let tag = partition_tag(2);
        assert_eq!(tag, "{p2}");
        assert_eq!(stream_in("c", "requests", &tag, 2), "c:requests{p2}");
        assert_eq!(record_in("c", &tag, "r1"), "c:req:{p2}r1");
        assert_eq!(finished_in("c", &tag), "c:req:finished{p2}");
        assert_eq!(idem_in("c", &tag, "k"), "c:idem:{p2}k");
        assert_eq!(dead_in("c", &tag), "c:dead{p2}");
        assert_eq!(record_in("c", "", "r1"), record("c", "r1"));
    }

    #[test]
    fn partition_of_is_stable_and_spreads_ids() {
        use requests::partition_of;
        assert_eq!(partition_of("anything", 1), 0);
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c: fixed, so a change of the hash is caught.
        assert_eq!(partition_of("a", 7), (0xaf63_dc4c_8601_ec8c_u64 % 7) as u16);
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[usize::from(partition_of(&format!("req-{i}"), 4))] += 1;
        }
        assert!(counts.iter().all(|&n| n > 800), "{counts:?}");
    }

    /// The Lua spells no family itself: every key it builds goes through a `KEY_*` local.
    #[test]
    fn the_lua_spells_no_key_family() {
        let code = crate::library::LIBRARY.code();
        let body = code.split_once(&lua_layout()).expect("the layout is part of the library").1;
        for (_, suffix) in FAMILIES {
            assert!(!body.contains(&format!("'{suffix}")), "the Lua spells {suffix:?}");
        }
    }
}
