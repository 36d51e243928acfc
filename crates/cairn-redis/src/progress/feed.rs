//! The progress tree's change feed (docs/contract.md §2 Live), as the Lua library writes it in the same call
//! as every change: per tree root a capped stream `P:pf:<root>` whose entries name the changed
//! node keys and deleted subtrees (their ids are the live event ids), and one capped
//! notification stream `P:pfeed` naming, per call, each changed root and its new entry id.
//!
//! Readers: [`Feed`] reads a tree's entries, a snapshot together with the feed position it
//! shows, and the newest state of a set of nodes; [`NotificationReader`] tails `P:pfeed` on a
//! dedicated connection (its blocking read must not hold up the shared one).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use cairn_progress::Key;
use cairn_progress::view::NodeView;
use redis::Value;

use super::{ReadOptions, StoreError, as_text, by_tree, parse_node, protocol};
use crate::RedisConnection;
use crate::keys::progress as keys;
use crate::library::{Function, LIBRARY};

static SNAPSHOT: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("progress_snapshot"));
static READ_NODES: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("progress_read_nodes"));
static SINCE: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("progress_feed_since"));

/// A change feed entry id (`<ms>-<seq>`), ordered as Redis orders stream ids. `0-0` is the
/// position of a feed that has no entry yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FeedId {
    pub ms: u64,
    pub seq: u64,
}

impl FeedId {
    pub const ZERO: FeedId = FeedId { ms: 0, seq: 0 };
}

impl Ord for FeedId {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ms, self.seq).cmp(&(other.ms, other.seq))
    }
}

impl PartialOrd for FeedId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for FeedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event id {0:?} is not of the form <ms>-<seq> (two integers), as the server sends them")]
pub struct BadFeedId(pub String);

impl FromStr for FeedId {
    type Err = BadFeedId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadFeedId(s.chars().take(64).collect());
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(FeedId { ms: ms.parse().map_err(|_| bad())?, seq: seq.parse().map_err(|_| bad())? })
    }
}

/// One entry of a tree's change feed: what one call changed in the tree.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEntry {
    pub id: FeedId,
    /// Nodes written (updated, created, or ancestors whose sums moved), unordered.
    pub changed: Vec<String>,
    /// Keys whose whole subtrees were removed.
    pub deleted: Vec<String>,
}

/// What a notification on `P:pfeed` says about one tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The tree's feed has a new entry with this id.
    Entry(FeedId),
    /// The tree was purged and its feed with it.
    Dropped,
}

/// The answer of [`Feed::since`].
#[derive(Debug, Clone, PartialEq)]
pub enum Since {
    /// Every entry after the id, oldest first.
    Entries(Vec<FeedEntry>),
    /// The feed no longer holds everything after the id: only a fresh snapshot is exact.
    Gap,
}

/// Reads the change feed and node states of one key prefix (short calls on the shared connection).
#[derive(Clone)]
pub struct Feed {
    conn: RedisConnection,
    prefix: String,
}

impl Feed {
    pub fn new(conn: impl Into<RedisConnection>, prefix: impl Into<String>) -> Self {
        Self { conn: conn.into(), prefix: prefix.into() }
    }

    fn tagged(&self) -> bool {
        self.conn.is_cluster()
    }

    /// The node key of a tree's root, the key a call on that tree declares.
    fn root_key(&self, root: &str) -> String {
        keys::node_in(self.tagged(), &self.prefix, root)
    }

    /// The notification stream's key.
    pub fn notifications_key(&self) -> String {
        keys::notify(&self.prefix)
    }

    /// The subtree at `key` (as [`crate::ProgressStore::get`] reads it) and the id of the newest
    /// feed entry of its tree, read atomically: entries after that id are what it does not show.
    pub async fn snapshot(
        &self,
        key: &Key,
        options: &ReadOptions,
    ) -> Result<(FeedId, Option<NodeView>), StoreError> {
        options.validate()?;
        let root = key.root();
        let reply: Value = SNAPSHOT
            .prepare_invoke_with_keys(&[&self.root_key(root.as_str())])
            .arg(&self.prefix)
            .arg(key.as_str())
            .arg(options.depth)
            .arg(options.limit)
            .arg(root.as_str())
            .invoke_async(&mut self.conn.clone())
            .await?;
        let Value::Array(items) = reply else { return Err(protocol("snapshot is not an array")) };
        let [id, node] = items.as_slice() else {
            return Err(protocol("snapshot has the wrong number of parts"));
        };
        Ok((parse_id(id)?, parse_node(node)?))
    }

    /// The newest state of each key (read to depth 1 with `limit` child keys), `None` for a
    /// key with no node, in the order given; one call (on a cluster, one per tree).
    pub async fn read_nodes(&self, keys: &[String], limit: u32) -> Result<Vec<Option<NodeView>>, StoreError> {
        let mut out = vec![None; keys.len()];
        for (root, indexes) in by_tree(self.tagged(), keys.iter().map(String::as_str)) {
            let mut invocation = READ_NODES.prepare_invoke_with_keys(&[&self.root_key(&root)]);
            invocation.arg(&self.prefix).arg(limit);
            for &i in &indexes {
                invocation.arg(keys[i].as_str());
            }
            let reply: Value = invocation.invoke_async(&mut self.conn.clone()).await?;
            let Value::Array(nodes) = reply else { return Err(protocol("nodes are not an array")) };
            if nodes.len() != indexes.len() {
                return Err(protocol("nodes do not match the keys"));
            }
            for (node, i) in nodes.iter().zip(indexes) {
                out[i] = parse_node(node)?;
            }
        }
        Ok(out)
    }

    /// Entries of `root`'s feed after `after`, or [`Since::Gap`] when some may be gone.
    pub async fn since(&self, root: &str, after: FeedId) -> Result<Since, StoreError> {
        let reply: Value = SINCE
            .prepare_invoke_with_keys(&[&keys::feed_in(self.tagged(), &self.prefix, root)])
            .arg(&self.prefix)
            .arg(root)
            .arg(after.to_string())
            .invoke_async(&mut self.conn.clone())
            .await?;
        let Value::Array(items) = reply else { return Err(protocol("feed reply is not an array")) };
        match items.as_slice() {
            [status] if as_text(status).as_deref() == Some("gap") => Ok(Since::Gap),
            [_, entries] => Ok(Since::Entries(parse_entries(entries)?)),
            _ => Err(protocol("feed reply has the wrong number of parts")),
        }
    }

    /// Entries of `root`'s feed after `after`, at most `count`, oldest first (the live path:
    /// what a notification announced).
    pub async fn entries_after(
        &self,
        root: &str,
        after: FeedId,
        count: usize,
    ) -> Result<Vec<FeedEntry>, StoreError> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(keys::feed_in(self.tagged(), &self.prefix, root))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn.clone())
            .await?;
        parse_entries(&reply)
    }
}

/// Tails `P:pfeed` from the moment it starts, on a connection of its own.
pub struct NotificationReader {
    conn: RedisConnection,
    key: String,
    last: FeedId,
}

/// One read of [`NotificationReader::next`]: notices in feed order, and whether the reader may
/// have missed notices (it fell further behind than `P:pfeed` keeps) so every tree must be
/// re-read from its own feed.
#[derive(Debug, Default)]
pub struct Notices {
    pub notices: Vec<(String, Notice)>,
    pub lost: bool,
}

impl NotificationReader {
    /// Starts after the newest notification there is now.
    pub async fn start(conn: impl Into<RedisConnection>, feed: &Feed) -> Result<Self, StoreError> {
        let mut reader =
            NotificationReader { conn: conn.into(), key: feed.notifications_key(), last: FeedId::ZERO };
        let newest: Value = redis::cmd("XREVRANGE")
            .arg(&reader.key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut reader.conn)
            .await?;
        if let Some(entry) = stream_entries(&newest)?.first() {
            reader.last = parse_id(&entry.0)?;
        }
        Ok(reader)
    }

    /// Waits up to `block_ms` for notifications and returns those that arrived (maybe none).
    pub async fn next(&mut self, block_ms: u64, count: usize) -> Result<Notices, StoreError> {
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(self.last.to_string())
            .query_async(&mut self.conn)
            .await?;
        let mut out = Notices::default();
        let entries = match reply {
            Value::Nil => return Ok(out),
            Value::Array(streams) => match streams.into_iter().next() {
                Some(Value::Array(mut stream)) if stream.len() == 2 => stream.pop().unwrap_or(Value::Nil),
                _ => return Err(protocol("XREAD reply")),
            },
            Value::Map(streams) => streams.into_iter().next().map(|(_, v)| v).unwrap_or(Value::Nil),
            _ => return Err(protocol("XREAD reply")),
        };
        let entries = stream_entries(&entries)?;
        if entries.len() >= count {
            out.lost = self.trimmed_past().await?;
        }
        for (id, fields) in entries {
            self.last = parse_id(&id)?;
            for pair in fields.chunks_exact(2) {
                let root = as_text(&pair[0]).ok_or_else(|| protocol("notice root"))?;
                let value = as_text(&pair[1]).ok_or_else(|| protocol("notice id"))?;
                let notice = if value == "-" {
                    Notice::Dropped
                } else {
                    Notice::Entry(value.parse().map_err(|_| protocol("notice id"))?)
                };
                out.notices.push((root, notice));
            }
        }
        Ok(out)
    }

    /// Whether `P:pfeed` has been trimmed past the last notice read.
    async fn trimmed_past(&mut self) -> Result<bool, StoreError> {
        let first: Value = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn)
            .await?;
        Ok(match stream_entries(&first)?.first() {
            Some((id, _)) => parse_id(id)? > self.last && self.last != FeedId::ZERO,
            None => false,
        })
    }
}

fn parse_id(value: &Value) -> Result<FeedId, StoreError> {
    as_text(value).and_then(|s| s.parse().ok()).ok_or_else(|| protocol("feed id"))
}

/// `[[id, [field, value, …]], …]` as (id, fields).
fn stream_entries(value: &Value) -> Result<Vec<(Value, Vec<Value>)>, StoreError> {
    let Value::Array(entries) = value else {
        return if matches!(value, Value::Nil) { Ok(Vec::new()) } else { Err(protocol("stream entries")) };
    };
    entries
        .iter()
        .map(|entry| match entry {
            Value::Array(parts) if parts.len() == 2 => {
                let fields = match &parts[1] {
                    Value::Array(fields) => fields.clone(),
                    Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect(),
                    _ => return Err(protocol("stream entry fields")),
                };
                Ok((parts[0].clone(), fields))
            }
            _ => Err(protocol("stream entry")),
        })
        .collect()
}

fn parse_entries(value: &Value) -> Result<Vec<FeedEntry>, StoreError> {
    stream_entries(value)?
        .into_iter()
        .map(|(id, fields)| {
            let mut entry = FeedEntry { id: parse_id(&id)?, changed: Vec::new(), deleted: Vec::new() };
            for pair in fields.chunks_exact(2) {
                let keys = as_text(&pair[1]).ok_or_else(|| protocol("feed keys"))?;
                let keys = keys.split(' ').filter(|k| !k.is_empty()).map(str::to_owned);
                match as_text(&pair[0]).as_deref() {
                    Some("k") => entry.changed.extend(keys),
                    Some("d") => entry.deleted.extend(keys),
                    _ => {}
                }
            }
            Ok(entry)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_print_and_order_as_redis_does() {
        let a: FeedId = "1796000000000-2".parse().unwrap();
        assert_eq!(a, FeedId { ms: 1_796_000_000_000, seq: 2 });
        assert_eq!(a.to_string(), "1796000000000-2");
        assert!("1796000000000-10".parse::<FeedId>().unwrap() > a, "numeric, not text order");
        assert!("1796000000001-0".parse::<FeedId>().unwrap() > a);
        for bad in ["", "12", "a-1", "1-b", "1-2-3", "-1"] {
            let err = bad.parse::<FeedId>().unwrap_err();
            assert!(err.to_string().contains("<ms>-<seq>"), "{bad}: {err}");
        }
    }

    #[test]
    fn entries_split_changed_and_deleted_keys() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("5-1"),
            Value::Array(vec![bulk("k"), bulk("_t.a _t.a.b"), bulk("d"), bulk("_t.a.c")]),
        ])]);
        let entries = parse_entries(&reply).unwrap();
        assert_eq!(
            entries,
            vec![FeedEntry {
                id: FeedId { ms: 5, seq: 1 },
                changed: vec!["_t.a".into(), "_t.a.b".into()],
                deleted: vec!["_t.a.c".into()],
            }]
        );
    }
}
