//! Stream retention in Redis (docs/contract.md §4): the registry of every stream Cairn creates, safe
//! trimming, idle-consumer clean-up, the purge of finished request records and progress trees,
//! and the lease that lets one trimmer replica act at a time.
//!
//! Trimming never removes an entry some consumer group has not both received and acknowledged.
//! Redis 7.0 has no `XTRIM … ACKED`, and `MAXLEN`/`MINID` alone would cut pending entries (their
//! ids then dangle in the PEL and `XAUTOCLAIM` drops them), so [`Streams::safe_trim`] computes
//! the safe point — the minimum over groups of the oldest pending id and the successor of the
//! last delivered id — and trims to the lower of it and the policy's target, all in one script.
//!
//! On a Redis Cluster every retention call touches one key's slot: a stream, a finished index
//! (one per request partition, [`Purger::partitions`]), a tree, the lease. What lies in another
//! slot — the registry when a stream has vanished, the roots index of a purged tree — is written
//! by commands of their own right after the call (docs/contract.md §8).

pub mod lease;
pub mod purge;

use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;

pub use lease::{Lease, LeaseState};
pub use purge::{Purger, RequestPurge};

use crate::library::{Function, LIBRARY};
use crate::{RedisConnection, keys};

// Retention's Lua (retention/*.lua) is part of the library (crate::library).
static SAFE_TRIM: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("retention_safe_trim"));
static IDLE_CONSUMERS: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("retention_idle_consumers"));

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("redis is unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("registered key {0:?} is not a stream")]
    WrongType(String),
    #[error("unexpected reply from a stream script: {0}")]
    Protocol(String),
}

/// The registry set of a key prefix: every stream Cairn creates is added to it (request stream,
/// dead letters, reply streams), so retention never needs `SCAN`. Same key as
/// [`crate::requests::QueueNames::registry`].
pub fn registry_key(prefix: &str) -> String {
    keys::retention::registry(prefix)
}

/// How much of a stream to keep. Both bounds may apply; the stricter one wins. Safety (see the
/// module docs) can still keep more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrimPolicy {
    /// Entries older than this (by their id's time part) go.
    pub max_age: Option<Duration>,
    /// At most this many entries stay.
    pub max_len: Option<u64>,
    /// Exact trims to the entry; approximate (`~`) removes whole macro nodes only, which is
    /// much cheaper and keeps a few more entries — never fewer.
    pub exact: bool,
}

impl TrimPolicy {
    /// Keeps everything.
    pub fn keeps_all(&self) -> bool {
        self.max_age.is_none() && self.max_len.is_none()
    }

    /// The MINID the age bound gives at `now_ms`: ids below it are older than `max_age`.
    fn age_target(&self, now_ms: i64) -> Option<String> {
        let age = i64::try_from(self.max_age?.as_millis()).unwrap_or(i64::MAX);
        Some(format!("{}-0", now_ms.saturating_sub(age).max(0)))
    }
}

/// One consumer group of a stream, as `XINFO GROUPS` and `XPENDING` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub name: String,
    pub consumers: u64,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
    pub last_delivered: String,
    pub oldest_pending: Option<String>,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell (after `XDEL`s).
    pub lag: Option<u64>,
}

/// What [`Streams::safe_trim`] did to one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimOutcome {
    pub trimmed: u64,
    /// Length after trimming.
    pub length: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    /// The MINID the policy asked for (`None`: the policy keeps everything there is).
    pub target: Option<String>,
    /// The lowest MINID no group objects to (`None`: no groups, anything may go).
    pub safe: Option<String>,
    /// The MINID trimmed to: the lower of the two.
    pub applied: Option<String>,
    /// Safety kept entries the policy would have removed.
    pub capped: bool,
    pub groups: Vec<GroupState>,
}

/// A registered stream as `cairn streams` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub key: String,
    pub length: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    pub groups: Vec<GroupState>,
}

/// A consumer [`Streams::remove_idle_consumers`] deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedConsumer {
    pub group: String,
    pub consumer: String,
    pub idle_ms: u64,
}

/// The streams of one key prefix, on one Redis or on a Redis Cluster.
#[derive(Clone)]
pub struct Streams {
    conn: RedisConnection,
    prefix: String,
}

impl Streams {
    pub fn new(conn: impl Into<RedisConnection>, prefix: impl Into<String>) -> Self {
        Self { conn: conn.into(), prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn registry(&self) -> String {
        registry_key(&self.prefix)
    }

    /// A stream key's name under the prefix (`cairn:replies:a` → `replies:a`), which policies
    /// match; `None` for a key outside the prefix.
    pub fn name_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.prefix.as_str())?.strip_prefix(':')
    }

    /// The registered stream keys, sorted.
    pub async fn registered(&self) -> Result<Vec<String>, StreamError> {
        let mut keys: Vec<String> =
            redis::cmd("SMEMBERS").arg(self.registry()).query_async(&mut self.conn.clone()).await?;
        keys.sort();
        Ok(keys)
    }

    /// Adds `key` to the registry (whoever makes a stream registers it; this is for a stream made
    /// by a call that could not, in another slot of a Redis Cluster).
    pub async fn register(&self, key: &str) -> Result<(), StreamError> {
        let _: () =
            redis::cmd("SADD").arg(self.registry()).arg(key).query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Trims `key` by `policy` as far as every consumer group allows (see the module docs).
    /// `Ok(None)` when the stream no longer exists; it is then removed from the registry.
    ///
    /// On one Redis the script removes it, in the call that finds it gone. On a cluster the
    /// registry is in another slot: it is removed right after, then the stream is looked for
    /// once more, because whoever makes a stream writes it before registering it. One made again
    /// in between (a reply stream, the feed of a reused tree root) is registered again and
    /// trimmed as it is now, so a live stream never stays out of the registry.
    pub async fn safe_trim(
        &self,
        key: &str,
        policy: &TrimPolicy,
        now_ms: i64,
    ) -> Result<Option<TrimOutcome>, StreamError> {
        let trimmed = self.trim_call(key, policy, now_ms).await?;
        if trimmed.is_some() || !self.conn.is_cluster() {
            return Ok(trimmed);
        }
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("SREM").arg(self.registry()).arg(key).query_async(&mut conn).await?;
        let exists: bool = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await?;
        if !exists {
            return Ok(None);
        }
        self.register(key).await?;
        self.trim_call(key, policy, now_ms).await
    }

    /// One call of `retention/safe_trim.lua`; with the registry as its second key on one Redis.
    async fn trim_call(
        &self,
        key: &str,
        policy: &TrimPolicy,
        now_ms: i64,
    ) -> Result<Option<TrimOutcome>, StreamError> {
        let registry = self.registry();
        let keys: &[&str] = if self.conn.is_cluster() { &[key] } else { &[key, &registry] };
        let reply: Value = SAFE_TRIM
            .prepare_invoke_with_keys(keys)
            .arg(policy.age_target(now_ms).unwrap_or_default())
            .arg(policy.max_len.map(|n| n.to_string()).unwrap_or_default())
            .arg(if policy.exact { "1" } else { "0" })
            .invoke_async(&mut self.conn.clone())
            .await?;
        let items = array(reply, "safe_trim reply")?;
        let status = items.first().and_then(text).ok_or_else(|| protocol("safe_trim status"))?;
        match status.as_str() {
            "missing" => return Ok(None),
            "wrongtype" => return Err(StreamError::WrongType(key.to_owned())),
            "ok" => {}
            other => return Err(protocol(&format!("safe_trim answered {other:?}"))),
        }
        let mut items = items.into_iter().skip(1);
        let mut next = || items.next().ok_or_else(|| protocol("safe_trim reply too short"));
        let trimmed = uint(&next()?, "trimmed")?;
        let length = uint(&next()?, "length")?;
        let first = id(&next()?);
        let last = id(&next()?);
        let target = id(&next()?);
        let safe = id(&next()?);
        let applied = id(&next()?);
        let capped = uint(&next()?, "capped")? == 1;
        let groups = groups(next()?)?;
        Ok(Some(TrimOutcome { trimmed, length, first, last, target, safe, applied, capped, groups }))
    }

    /// Length, first and last ids and groups of `key`; `None` when it does not exist.
    pub async fn info(&self, key: &str) -> Result<Option<StreamInfo>, StreamError> {
        let mut conn = self.conn.clone();
        let kind: String = redis::cmd("TYPE").arg(key).query_async(&mut conn).await?;
        match kind.as_str() {
            "none" => return Ok(None),
            "stream" => {}
            _ => return Err(StreamError::WrongType(key.to_owned())),
        }
        let (length, first, last, groups): (u64, Value, Value, Value) = redis::pipe()
            .cmd("XLEN")
            .arg(key)
            .cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(key)
            .query_async(&mut conn)
            .await?;
        let mut states = Vec::new();
        for group in array(groups, "XINFO GROUPS")? {
            let fields = pairs(group)?;
            let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            let name = field("name").and_then(text).ok_or_else(|| protocol("group name"))?;
            let pending = field("pending").and_then(as_u64).unwrap_or(0);
            let oldest_pending = if pending > 0 {
                let summary: Value =
                    redis::cmd("XPENDING").arg(key).arg(&name).query_async(&mut conn).await?;
                array(summary, "XPENDING")?.get(1).and_then(text)
            } else {
                None
            };
            states.push(GroupState {
                consumers: field("consumers").and_then(as_u64).unwrap_or(0),
                pending,
                last_delivered: field("last-delivered-id").and_then(text).unwrap_or_default(),
                oldest_pending,
                lag: field("lag").and_then(as_u64),
                name,
            });
        }
        Ok(Some(StreamInfo {
            key: key.to_owned(),
            length,
            first: first_entry_id(first),
            last: first_entry_id(last),
            groups: states,
        }))
    }

    /// Deletes the consumers of every group of `key` that own no pending entry and have been
    /// idle longer than `max_idle`; a consumer that owns entries is never removed.
    pub async fn remove_idle_consumers(
        &self,
        key: &str,
        max_idle: Duration,
    ) -> Result<Vec<RemovedConsumer>, StreamError> {
        let rows: Vec<(String, String, u64)> = IDLE_CONSUMERS
            .prepare_invoke_with_keys(&[key])
            .arg(u64::try_from(max_idle.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(rows
            .into_iter()
            .map(|(group, consumer, idle_ms)| RemovedConsumer { group, consumer, idle_ms })
            .collect())
    }
}

fn protocol(what: &str) -> StreamError {
    StreamError::Protocol(what.to_owned())
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

fn as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

fn uint(value: &Value, what: &str) -> Result<u64, StreamError> {
    as_u64(value).ok_or_else(|| protocol(what))
}

/// An id, or `None` for the scripts' `''`.
fn id(value: &Value) -> Option<String> {
    text(value).filter(|s| !s.is_empty())
}

fn array(value: Value, what: &str) -> Result<Vec<Value>, StreamError> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        _ => Err(protocol(what)),
    }
}

/// A flat `[name, value, …]` array (RESP2) or a map (RESP3) as pairs.
fn pairs(value: Value) -> Result<Vec<(String, Value)>, StreamError> {
    let flat = match value {
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        other => array(other, "field list")?,
    };
    Ok(flat.chunks_exact(2).filter_map(|pair| Some((text(&pair[0])?, pair[1].clone()))).collect())
}

/// The id of the single entry an `XRANGE … COUNT 1` returned.
fn first_entry_id(value: Value) -> Option<String> {
    let entries = array(value, "range").ok()?;
    let Value::Array(entry) = entries.into_iter().next()? else { return None };
    entry.first().and_then(text)
}

/// `{name, consumers, pending, last_delivered, oldest_pending, lag}` rows of `retention/safe_trim.lua`.
fn groups(value: Value) -> Result<Vec<GroupState>, StreamError> {
    array(value, "groups")?
        .into_iter()
        .map(|row| {
            let row = array(row, "group row")?;
            let [name, consumers, pending, last, oldest, lag] = row.as_slice() else {
                return Err(protocol("group row has the wrong number of parts"));
            };
            Ok(GroupState {
                name: text(name).ok_or_else(|| protocol("group name"))?,
                consumers: uint(consumers, "consumers")?,
                pending: uint(pending, "pending")?,
                last_delivered: text(last).ok_or_else(|| protocol("last delivered id"))?,
                oldest_pending: id(oldest),
                lag: as_i64(lag).and_then(|n| u64::try_from(n).ok()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requests::QueueNames;

    #[test]
    fn registry_is_the_queues_registry() {
        assert_eq!(registry_key("cairn"), QueueNames::new("cairn", "requests", "processors").registry());
    }

    #[test]
    fn age_target_is_a_minid_and_never_negative() {
        let policy = TrimPolicy { max_age: Some(Duration::from_secs(60)), ..TrimPolicy::default() };
        assert_eq!(policy.age_target(100_000).as_deref(), Some("40000-0"));
        assert_eq!(policy.age_target(10).as_deref(), Some("0-0"));
        assert_eq!(TrimPolicy::default().age_target(100_000), None);
        assert!(TrimPolicy::default().keeps_all());
    }
}
