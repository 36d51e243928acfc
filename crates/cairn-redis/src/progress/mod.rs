//! The progress tree in Redis (docs/contract.md §2): every update is one Lua script call that merges the
//! fields, keeps each parent's running sums Σw and Σw·p, its `_counts` and ordered child index, and
//! walks only the ancestors, so one update costs O(depth) whatever the number of siblings.
//!
//! The scripts are the only writers of progress keys. Applying the same update twice leaves the
//! same sums, counts and fields (deltas are computed against the stored state), so a redelivered
//! message never double counts; with the same `time_ms` the node is identical to the last bit.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use cairn_error::{ErrorKind, ServiceError};
use cairn_progress::view::NodeView;
use cairn_progress::{Key, Update};
use futures::{StreamExt as _, TryStreamExt as _};
use redis::Value;
use serde_json::{Map, Value as Json};

use crate::RedisConnection;
use crate::keys::progress as keys;
use crate::library::{Function, Invocation, LIBRARY};

pub mod feed;

// The store's Lua (common.lua: key layout, node cache, roll-up and `apply_update`; read.lua; one
// file per function) is part of the library (crate::library). The request queue's submit calls
// `apply_update` too, to write a request's first progress state in the same atomic step.
static APPLY: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("progress_apply"));
static READ_MAIN: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("progress_read"));
static DELETE: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("progress_delete"));

/// Largest `depth` a read accepts (docs/contract.md §2).
pub const MAX_DEPTH: u32 = 8;
/// Children per page unless the caller asks otherwise, and the most it may ask for.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis is unavailable: {0}")]
    Redis(redis::RedisError),
    /// Redis ran the call and refused it (a script error): the same call fails again, so it must
    /// not be retried forever.
    #[error("redis refused the call: {0}")]
    Rejected(redis::RedisError),
    #[error("\"after\" = {after:?} is not a child of {key:?}")]
    BadCursor { key: String, after: String },
    #[error("depth must be between 1 and {MAX_DEPTH}, got {0}")]
    BadDepth(u32),
    #[error("limit must be between 1 and {MAX_LIMIT}, got {0}")]
    BadLimit(u32),
    #[error("unexpected reply from the progress script: {0}")]
    Protocol(String),
}

impl ServiceError for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Redis(_) => ErrorKind::Unavailable,
            StoreError::BadCursor { .. } | StoreError::BadDepth(_) | StoreError::BadLimit(_) => {
                ErrorKind::BadRequest
            }
            StoreError::Rejected(_) | StoreError::Protocol(_) => ErrorKind::Internal,
        }
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(error: redis::RedisError) -> Self {
        if crate::is_refusal(&error) { StoreError::Rejected(error) } else { StoreError::Redis(error) }
    }
}

/// One update to apply: where, what, and the time it happened (ms since the epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: Key,
    pub update: Update,
    pub time_ms: i64,
}

/// How to read a node: `depth` levels (1 = the node and its child keys), `limit` children per
/// parent, children after the key `after` (pagination cursor of the top level).
#[derive(Debug, Clone, PartialEq)]
pub struct ReadOptions {
    pub depth: u32,
    pub limit: u32,
    pub after: Option<Key>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self { depth: 1, limit: DEFAULT_LIMIT, after: None }
    }
}

impl ReadOptions {
    pub fn depth(depth: u32) -> Self {
        Self { depth, ..Self::default() }
    }

    fn validate(&self) -> Result<(), StoreError> {
        if !(1..=MAX_DEPTH).contains(&self.depth) {
            return Err(StoreError::BadDepth(self.depth));
        }
        if !(1..=MAX_LIMIT).contains(&self.limit) {
            return Err(StoreError::BadLimit(self.limit));
        }
        Ok(())
    }
}

/// The progress tree of one key prefix.
///
/// On a Redis Cluster ([`RedisConnection::is_cluster`]) every key of a tree carries its root as
/// hash tag, a batch is applied as one call per tree (in order within each tree: one key is in
/// one tree), and the writes outside the tree's slot (the roots index, the notification stream,
/// the stream registry) follow each call as commands of their own (docs/contract.md §8).
#[derive(Clone)]
pub struct ProgressStore {
    conn: RedisConnection,
    prefix: String,
}

impl ProgressStore {
    pub fn new(conn: impl Into<RedisConnection>, prefix: impl Into<String>) -> Self {
        Self { conn: conn.into(), prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Applies changes in order in one atomic script call (a burst, or a batch of messages); on
    /// a cluster one atomic call per tree.
    pub async fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        let invocations: Vec<Invocation> = self
            .by_tree(changes)
            .iter()
            .map(|group| {
                let mut invocation = APPLY.prepare_invoke_with_keys(&[&group.key]);
                push_changes(&mut invocation, &self.prefix, group.indexes.iter().map(|&i| &changes[i]));
                invocation.arg(0).arg(0);
                invocation
            })
            .collect();
        self.call_all(invocations).await?;
        Ok(())
    }

    /// Applies changes in order in one script call (on a cluster one per tree) and returns, for
    /// each, its node as the whole batch left it (read to `depth` 1). Used to group concurrent
    /// callers' updates.
    pub async fn apply_and_read_many(&self, changes: &[Change]) -> Result<Vec<NodeView>, StoreError> {
        let mut out: Vec<Option<NodeView>> = vec![None; changes.len()];
        let groups = self.by_tree(changes);
        let invocations: Vec<Invocation> = groups
            .iter()
            .map(|group| {
                let mut invocation = APPLY.prepare_invoke_with_keys(&[&group.key]);
                push_changes(&mut invocation, &self.prefix, group.indexes.iter().map(|&i| &changes[i]));
                invocation.arg(1).arg(DEFAULT_LIMIT);
                invocation
            })
            .collect();
        let replies = self.call_all(invocations).await?;
        for (group, reply) in groups.iter().zip(replies) {
            let Value::Array(nodes) = reply else { return Err(protocol("updated nodes are not an array")) };
            if nodes.len() != group.indexes.len() {
                return Err(protocol("updated nodes do not match the updates"));
            }
            for (node, &i) in nodes.iter().zip(&group.indexes) {
                out[i] = Some(parse_node(node)?.ok_or_else(|| protocol("updated node missing"))?);
            }
        }
        out.into_iter().map(|node| node.ok_or_else(|| protocol("updated node missing"))).collect()
    }

    /// Whether keys carry their tree's root as hash tag (a Redis Cluster).
    pub(crate) fn tagged(&self) -> bool {
        self.conn.is_cluster()
    }

    /// The node key of `key`'s tree root: the key a call declares, which fixes its slot.
    fn root_key(&self, key: &str) -> String {
        keys::node_in(self.tagged(), &self.prefix, keys::root(key))
    }

    /// The calls a batch takes: one on one Redis (declaring the first change's root), one per
    /// tree on a cluster, each with its changes in batch order.
    fn by_tree(&self, changes: &[Change]) -> Vec<TreeGroup> {
        by_tree(self.tagged(), changes.iter().map(|change| change.key.as_str()))
            .into_iter()
            .map(|(root, indexes)| TreeGroup { key: self.root_key(&root), indexes })
            .collect()
    }

    /// Calls a function that may write outside its tree and, on a cluster, writes what it left
    /// to the caller (`deferred` in common.lua); returns its own result.
    pub(crate) async fn call(&self, invocation: &Invocation) -> Result<Value, StoreError> {
        let reply: Value = invocation.invoke_async(&mut self.conn.clone()).await?;
        if !self.tagged() {
            return Ok(reply);
        }
        write_deferred(&mut self.conn.clone(), &self.prefix, reply).await
    }

    /// [`call`](Self::call)s several functions, each of one tree, and returns their results in
    /// order. On a cluster the calls run concurrently (each tree is its own slot, so their order
    /// does not matter) and what they left to the caller is written once, after all of them.
    async fn call_all(&self, invocations: Vec<Invocation>) -> Result<Vec<Value>, StoreError> {
        if let [invocation] = invocations.as_slice() {
            return Ok(vec![self.call(invocation).await?]);
        }
        // Owned futures, collected first: a stream over a closure borrowing its items would make
        // the caller's future not `Send` for every lifetime.
        let calls: Vec<_> =
            invocations.into_iter().map(|invocation| invoke_owned(invocation, self.conn.clone())).collect();
        let replies: Vec<Value> =
            futures::stream::iter(calls).buffered(CONCURRENT_CALLS).try_collect().await?;
        if !self.tagged() {
            return Ok(replies);
        }
        let mut deferred = Deferred::default();
        let mut results = Vec::with_capacity(replies.len());
        for reply in replies {
            let (result, more) = split_deferred(reply)?;
            deferred.extend(more);
            results.push(result);
        }
        deferred.write(&mut self.conn.clone(), &self.prefix).await?;
        Ok(results)
    }

    /// Reads a node, or `None` when the key has no node.
    pub async fn get(&self, key: &Key, options: &ReadOptions) -> Result<Option<NodeView>, StoreError> {
        options.validate()?;
        let after = options.after.as_ref().map_or("", Key::as_str);
        let reply: Result<Value, redis::RedisError> = READ_MAIN
            .prepare_invoke_with_keys(&[&self.root_key(key.as_str())])
            .arg(&self.prefix)
            .arg(key.as_str())
            .arg(options.depth)
            .arg(options.limit)
            .arg(after)
            .invoke_async(&mut self.conn.clone())
            .await;
        match reply {
            Ok(value) => parse_node(&value),
            // read.lua's own error code for an `after` that is not a child.
            Err(e) if e.code() == Some("CAIRN_BAD_CURSOR") => {
                Err(StoreError::BadCursor { key: key.to_string(), after: after.to_owned() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the subtree at `key` and fixes its ancestors. Returns the number of nodes removed.
    pub async fn delete(&self, key: &Key, time_ms: i64) -> Result<u64, StoreError> {
        let mut invocation = DELETE.prepare_invoke_with_keys(&[&self.root_key(key.as_str())]);
        invocation.arg(&self.prefix).arg(key.as_str()).arg(time_ms);
        let removed = self.call(&invocation).await?;
        as_int(&removed).and_then(|n| u64::try_from(n).ok()).ok_or_else(|| protocol("removed count"))
    }

    /// Tree roots by their latest update, newest first: `(key, update time in ms)`, `count`
    /// from `offset`.
    pub async fn roots(&self, offset: usize, count: usize) -> Result<Vec<(String, f64)>, StoreError> {
        use redis::AsyncCommands as _;
        if count == 0 {
            return Ok(Vec::new());
        }
        let (start, stop) = (offset as isize, (offset + count - 1) as isize);
        Ok(self
            .conn
            .clone()
            .zrevrange_withscores(crate::keys::progress::roots(&self.prefix), start, stop)
            .await?)
    }

    /// A parent's running sums (Σw, Σw·p over its direct children), for checks and diagnostics.
    pub async fn sums(&self, key: &Key) -> Result<Option<(f64, f64)>, StoreError> {
        let state: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(keys::node_in(self.tagged(), &self.prefix, key.as_str()))
            .arg(STATE_FIELD)
            .query_async(&mut self.conn.clone())
            .await?;
        let Some(state) = state else { return Ok(None) };
        decode_state(&state).map(|state| Some(state.sums)).ok_or_else(|| protocol(STATE_FIELD))
    }
}

/// The hash field holding a node's state (common.lua): a kind byte, `l` (leaf) or `Q` (parent;
/// `P` and `p` from earlier versions), then little-endian doubles (NaN: absent): the update time,
/// a parent's Σw and Σw·p, the progress, then what only the maths reads (for `Q` and `P`, the low
/// parts of the compensated sums among them); then the status.
const STATE_FIELD: &str = "_s";

/// What the read path and checks take from a node's state field.
#[derive(Debug, Clone, Copy, PartialEq)]
struct State {
    update_time: i64,
    progress: Option<f64>,
    /// Σw and Σw·p over the direct children; zero for a leaf.
    sums: (f64, f64),
}

/// Decodes the state field, or `None` when it is malformed.
fn decode_state(bytes: &[u8]) -> Option<State> {
    let double = |i: usize| Some(f64::from_le_bytes(bytes.get(1 + 8 * i..9 + 8 * i)?.try_into().ok()?));
    let (sums, progress) = match bytes.first()? {
        b'l' => ((0.0, 0.0), double(1)?),
        // sums kept compensated: the high part, then (after the ETA's rate) the low part
        b'Q' | b'P' => ((double(1)? + double(8)?, double(2)? + double(9)?), double(3)?),
        b'p' => ((double(1)?, double(2)?), double(3)?),
        _ => return None,
    };
    Some(State { update_time: double(0)? as i64, progress: (!progress.is_nan()).then_some(progress), sums })
}

/// One call of a batch: the node key of its tree root (its `KEYS[1]`) and its changes' positions.
struct TreeGroup {
    key: String,
    indexes: Vec<usize>,
}

/// Positions of `keys` grouped by tree root in first-seen order, each group in key order; one
/// group of everything (named by the first root) unless `tagged`.
pub(crate) fn by_tree<'a>(tagged: bool, keys: impl Iterator<Item = &'a str>) -> Vec<(String, Vec<usize>)> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut positions: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, key) in keys.enumerate() {
        let root = keys::root(key);
        if !tagged && let Some(group) = groups.first_mut() {
            group.1.push(i);
            continue;
        }
        match positions.get(root) {
            Some(&g) => groups[g].1.push(i),
            None => {
                positions.insert(root, groups.len());
                groups.push((root.to_owned(), vec![i]));
            }
        }
    }
    groups
}

/// Writes what a call on a cluster left to its caller — `{ result, roots, unroots, notes,
/// streams }` (`deferred` in common.lua) — and returns `result`. The notification goes last, so
/// a reader it wakes finds the roots index and the registry already written. A process that dies
/// before these writes leaves the tree and its feed written but unannounced; the caller was not
/// answered, so the call is made again (a redelivered message, a retried request) and announces
/// it then (docs/contract.md §8).
pub(crate) async fn write_deferred(
    conn: &mut RedisConnection,
    prefix: &str,
    reply: Value,
) -> Result<Value, StoreError> {
    let (result, deferred) = split_deferred(reply)?;
    deferred.write(conn, prefix).await?;
    Ok(result)
}

/// What calls on a cluster left to their caller (`deferred` in common.lua), as command arguments.
#[derive(Debug, Default, PartialEq)]
struct Deferred {
    /// score, root, … for the roots index.
    roots: Vec<String>,
    /// Roots to take out of the index.
    unroots: Vec<String>,
    /// root, feed entry id (or `-`), … for the notification stream.
    notes: Vec<String>,
    /// Streams to register.
    streams: Vec<String>,
}

/// A tagged call's reply `{ result, roots, unroots, notes, streams }` as the result and the rest.
fn split_deferred(reply: Value) -> Result<(Value, Deferred), StoreError> {
    let Value::Array(parts) = reply else { return Err(protocol("a tagged call's reply is not an array")) };
    let Ok([result, roots, unroots, notes, streams]) = <[Value; 5]>::try_from(parts) else {
        return Err(protocol("a tagged call's reply has the wrong number of parts"));
    };
    let texts = |value: &Value| -> Result<Vec<String>, StoreError> {
        match value {
            Value::Array(items) => {
                items.iter().map(|item| as_text(item).ok_or_else(|| protocol("deferred write"))).collect()
            }
            // An empty Lua table comes back as an empty array or, as a map, nil.
            Value::Nil | Value::Map(_) => Ok(Vec::new()),
            _ => Err(protocol("deferred write")),
        }
    };
    let deferred = Deferred {
        roots: texts(&roots)?,
        unroots: texts(&unroots)?,
        notes: texts(&notes)?,
        streams: texts(&streams)?,
    };
    Ok((result, deferred))
}

impl Deferred {
    fn extend(&mut self, other: Deferred) {
        self.roots.extend(other.roots);
        self.unroots.extend(other.unroots);
        self.notes.extend(other.notes);
        self.streams.extend(other.streams);
    }

    /// Writes it: the roots index, the registry, then the notifications.
    async fn write(self, conn: &mut RedisConnection, prefix: &str) -> Result<(), StoreError> {
        let Deferred { roots, unroots, notes, streams } = self;
        let index = keys::roots(prefix);
        for chunk in roots.chunks(2 * DEFERRED_CHUNK) {
            redis::cmd("ZADD").arg(&index).arg(chunk).query_async::<()>(conn).await?;
        }
        for chunk in unroots.chunks(DEFERRED_CHUNK) {
            redis::cmd("ZREM").arg(&index).arg(chunk).query_async::<()>(conn).await?;
        }
        if notes.is_empty() {
            return Ok(());
        }
        let notify = keys::notify(prefix);
        let registry = crate::keys::retention::registry(prefix);
        for chunk in streams.chunks(DEFERRED_CHUNK) {
            redis::cmd("SADD").arg(&registry).arg(chunk).query_async::<()>(conn).await?;
        }
        redis::cmd("SADD").arg(&registry).arg(&notify).query_async::<()>(conn).await?;
        for chunk in notes.chunks(2 * DEFERRED_CHUNK) {
            redis::cmd("XADD")
                .arg(&notify)
                .arg("MAXLEN")
                .arg("~")
                .arg(NOTIFY_MAXLEN)
                .arg("*")
                .arg(chunk)
                .query_async::<()>(conn)
                .await?;
        }
        Ok(())
    }
}

async fn invoke_owned(invocation: Invocation, mut conn: RedisConnection) -> redis::RedisResult<Value> {
    invocation.invoke_async(&mut conn).await
}

/// Calls of one batch in flight at once on a cluster (one per tree).
const CONCURRENT_CALLS: usize = 32;
/// Items per deferred command (as the Lua's `ROOTS_PER_ZADD`).
const DEFERRED_CHUNK: usize = 500;
/// The notification stream's cap (as the Lua's `FEED_MAXLEN`).
const NOTIFY_MAXLEN: usize = 10_000;

fn push_changes<'a>(
    invocation: &mut Invocation,
    prefix: &str,
    changes: impl ExactSizeIterator<Item = &'a Change>,
) {
    invocation.arg(prefix).arg(changes.len());
    for change in changes {
        push_change(invocation, &change.key, change.time_ms, &change.update);
    }
}

/// One change as `apply_update` (common.lua) reads it: key, time_ms, nfields, then each field's
/// name and JSON text.
pub(crate) fn push_change(invocation: &mut Invocation, key: &Key, time_ms: i64, update: &Update) {
    let fields = update.fields();
    invocation.arg(key.as_str()).arg(time_ms).arg(fields.len());
    for (name, value) in fields {
        invocation.arg(name).arg(value.to_string());
    }
}

fn protocol(what: &str) -> StoreError {
    StoreError::Protocol(what.to_owned())
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => as_text(other).and_then(|s| s.parse().ok()),
    }
}

/// Parses `{ key, hgetall, child_count, page, more, tasks }` as the read script returns it.
fn parse_node(value: &Value) -> Result<Option<NodeView>, StoreError> {
    let items = match value {
        Value::Nil => return Ok(None),
        Value::Array(items) => items,
        _ => return Err(protocol("node is not an array")),
    };
    let [key, hash, count, page, more, tasks] = items.as_slice() else {
        return Err(protocol("node has the wrong number of parts"));
    };
    let mut view = NodeView {
        key: as_text(key).ok_or_else(|| protocol("node key"))?,
        child_count: as_int(count).ok_or_else(|| protocol("child count"))?.max(0) as u64,
        ..NodeView::default()
    };
    let Value::Array(hash) = hash else { return Err(protocol("node hash")) };
    apply_hash(&mut view, hash)?;
    if let Value::Array(page) = page {
        view.children = page.iter().filter_map(as_text).collect();
    }
    if as_int(more) == Some(1) {
        view.next_after = view.children.last().cloned();
    }
    if let Value::Array(tasks) = tasks {
        for task in tasks {
            if let Some(child) = parse_node(task)? {
                view.tasks.push(child);
            }
        }
    }
    Ok(Some(view))
}

fn apply_hash(view: &mut NodeView, hash: &[Value]) -> Result<(), StoreError> {
    let mut fields = Map::new();
    let mut counts = BTreeMap::new();
    for pair in hash.chunks_exact(2) {
        let name = as_text(&pair[0]).ok_or_else(|| protocol("hash field"))?;
        if name == STATE_FIELD {
            let Value::BulkString(bytes) = &pair[1] else { return Err(protocol(STATE_FIELD)) };
            let state = decode_state(bytes).ok_or_else(|| protocol(STATE_FIELD))?;
            view.update_time = state.update_time;
            if let Some(progress) = state.progress.and_then(serde_json::Number::from_f64) {
                fields.insert("progress".to_owned(), Json::Number(progress));
            }
            continue;
        }
        let raw = as_text(&pair[1]).ok_or_else(|| protocol("hash field"))?;
        match name.as_str() {
            "_st" => view.start_time = raw.parse().map_err(|_| protocol("_st"))?,
            "_eta" => view.eta = raw.parse().ok(),
            "_lm" => view.last_msg = serde_json::from_str::<String>(&raw).ok(),
            other if other.starts_with("_c:") => {
                let status = serde_json::from_str::<String>(&other[3..]).map_err(|_| protocol("_c"))?;
                let n: u64 = raw.parse().map_err(|_| protocol("count"))?;
                if n > 0 {
                    counts.insert(status, n);
                }
            }
            other if other.starts_with('_') => {}
            _ => {
                // Values are stored as JSON text; anything else is shown as the string it is.
                let value = serde_json::from_str::<Json>(&raw).unwrap_or(Json::String(raw));
                fields.insert(name, value);
            }
        }
    }
    view.fields = fields;
    view.counts = counts;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(kind: u8, xs: &[f64], status: &str) -> Vec<u8> {
        std::iter::once(kind).chain(xs.iter().flat_map(|x| x.to_le_bytes())).chain(status.bytes()).collect()
    }

    #[test]
    fn a_batch_is_one_call_on_one_redis_and_one_per_tree_on_a_cluster() {
        let keys = ["_r.a.x", "b.c", "_r.a", "_r.b.y", "b"];
        assert_eq!(by_tree(false, keys.into_iter()), [("_r.a".to_owned(), vec![0, 1, 2, 3, 4])]);
        assert_eq!(
            by_tree(true, keys.into_iter()),
            [("_r.a".to_owned(), vec![0, 2]), ("b".to_owned(), vec![1, 4]), ("_r.b".to_owned(), vec![3])],
            "trees in first-seen order, each with its changes in batch order"
        );
        assert!(by_tree(true, std::iter::empty()).is_empty());
    }

    #[test]
    fn a_parents_state_holds_its_sums_and_a_leafs_none() {
        let nan = f64::NAN;
        let parent = state(b'p', &[1_796_000_000_123.0, 2.5, 1.25, 0.5, 1.0, nan, nan, nan], "");
        let expected = State { update_time: 1_796_000_000_123, progress: Some(0.5), sums: (2.5, 1.25) };
        assert_eq!(decode_state(&parent), Some(expected));
        assert_eq!(decode_state(&parent[..24]), None, "too short for the progress");
        let compensated = state(b'P', &[7.0, 1e12, 5e11, 0.5, 1.0, nan, nan, nan, 0.25, -0.5], "");
        let expected = State { update_time: 7, progress: Some(0.5), sums: (1e12 + 0.25, 5e11 - 0.5) };
        assert_eq!(decode_state(&compensated), Some(expected));
        let with_rates =
            state(b'Q', &[7.0, 1e12, 5e11, 0.5, 1.0, nan, nan, 1e-3, 0.25, -0.5, 2e-3, 0.0, 2.0], "");
        assert_eq!(decode_state(&with_rates), Some(expected));
        let leaf = state(b'l', &[7.0, nan, 1.0, nan, nan, nan], "\"running\"");
        assert_eq!(decode_state(&leaf), Some(State { update_time: 7, progress: None, sums: (0.0, 0.0) }));
        assert_eq!(decode_state(&state(b'x', &[1.0, 1.0], "")), None, "unknown kind");
        assert_eq!(decode_state(&[]), None);
    }
}
