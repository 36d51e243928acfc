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
use redis::Value;
use redis::aio::ConnectionManager;
use serde_json::{Map, Value as Json};

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
#[derive(Clone)]
pub struct ProgressStore {
    conn: ConnectionManager,
    prefix: String,
}

impl ProgressStore {
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self { conn, prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Applies changes in order in one atomic script call (a burst, or a batch of messages).
    pub async fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut invocation = APPLY.prepare_invoke();
        push_changes(&mut invocation, &self.prefix, changes);
        invocation.arg(0).arg(0);
        let _: Value = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Applies changes in order in one script call and returns, for each, its node as the
    /// whole batch left it (read to `depth` 1). Used to group concurrent callers' updates.
    pub async fn apply_and_read_many(&self, changes: &[Change]) -> Result<Vec<NodeView>, StoreError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = APPLY.prepare_invoke();
        push_changes(&mut invocation, &self.prefix, changes);
        invocation.arg(1).arg(DEFAULT_LIMIT);
        let reply: Value = invocation.invoke_async(&mut self.conn.clone()).await?;
        let Value::Array(nodes) = reply else { return Err(protocol("updated nodes are not an array")) };
        nodes
            .iter()
            .map(|node| parse_node(node)?.ok_or_else(|| StoreError::Protocol("updated node missing".into())))
            .collect()
    }

    /// Reads a node, or `None` when the key has no node.
    pub async fn get(&self, key: &Key, options: &ReadOptions) -> Result<Option<NodeView>, StoreError> {
        options.validate()?;
        let after = options.after.as_ref().map_or("", Key::as_str);
        let reply: Result<Value, redis::RedisError> = READ_MAIN
            .prepare_invoke()
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
            Err(e) if crate::error_code(&e) == Some("CAIRN_BAD_CURSOR") => {
                Err(StoreError::BadCursor { key: key.to_string(), after: after.to_owned() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the subtree at `key` and fixes its ancestors. Returns the number of nodes removed.
    pub async fn delete(&self, key: &Key, time_ms: i64) -> Result<u64, StoreError> {
        let removed: u64 = DELETE
            .prepare_invoke()
            .arg(&self.prefix)
            .arg(key.as_str())
            .arg(time_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(removed)
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
            .arg(crate::keys::progress::node(&self.prefix, key.as_str()))
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

fn push_changes(invocation: &mut Invocation, prefix: &str, changes: &[Change]) {
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
