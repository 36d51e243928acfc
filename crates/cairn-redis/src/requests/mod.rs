//! The request queue in Redis (docs/contract.md §3): records, the request stream and its consumer group.
//!
//! A request is a hash `P:req:<id>` plus an entry in the stream whose consumer group's pending
//! list holds the leases: the consumer that owns an entry owns the request. Every state change
//! is one Lua step that first checks that ownership, so a processor that lost its lease (paused,
//! partitioned, reclaimed by another) can neither store a result nor ack — the fence of docs/contract.md §3.
//! Blocking reads take a dedicated connection (see [`crate::RedisConfig::dedicated`]).

use std::collections::HashMap;
use std::sync::LazyLock;

use cairn_progress::Update;
use cairn_requests::{RequestRecord, RequestState};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, RedisResult, Value};

use crate::keys;
use crate::library::{Function, Invocation, LIBRARY};
use crate::progress::push_change;

// The queue's Lua (common.lua, and one file per function) is part of the library
// (crate::library); submit also applies the request's first progress update.
static SUBMIT: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_submit"));
static START: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_start"));
static HEARTBEAT: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_heartbeat"));
static COMMIT: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_commit"));
static CANCEL: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_cancel"));
static RETRY_DEAD: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_retry_dead"));

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis is unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stored request {id} is unreadable: {detail}")]
    Record { id: String, detail: String },
    #[error("unexpected reply from a request script: {0}")]
    Protocol(String),
}

impl cairn_error::ServiceError for QueueError {
    fn kind(&self) -> cairn_error::ErrorKind {
        match self {
            QueueError::Redis(e) => crate::error_kind(e),
            QueueError::Record { .. } | QueueError::Protocol(_) => cairn_error::ErrorKind::Internal,
        }
    }
}

/// Names of the queue's keys, all under the key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    pub prefix: String,
    /// The request stream's key.
    pub stream: String,
    pub group: String,
}

impl QueueNames {
    /// `stream` and `group` as configured; the stream key gets the prefix.
    pub fn new(prefix: &str, stream: &str, group: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            stream: keys::requests::stream(prefix, stream),
            group: group.to_owned(),
        }
    }

    pub fn record(&self, id: &str) -> String {
        keys::requests::record(&self.prefix, id)
    }

    pub fn dead(&self) -> String {
        keys::requests::dead(&self.prefix)
    }

    /// The reply stream of one ingress replica.
    pub fn replies(&self, replica: &str) -> String {
        keys::requests::replies(&self.prefix, replica)
    }

    /// The set of every stream Cairn creates, for the trimmer (no `SCAN`).
    pub fn registry(&self) -> String {
        keys::retention::registry(&self.prefix)
    }
}

/// One delivery from the stream: its entry id and the request it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub entry_id: String,
    pub request_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    Created {
        entry_id: String,
    },
    /// The idempotency key was used before with the same body: that request.
    Existing {
        id: String,
    },
    /// The idempotency key was used before with a different body.
    Conflict {
        id: String,
    },
    /// A stream names an upload that does not exist (expired, deleted, used by a request).
    StreamMissing {
        name: String,
    },
    /// A stream names an upload that has not received all its bytes (`detail`: offset/length).
    StreamIncomplete {
        name: String,
        detail: String,
    },
}

/// Where a data stream of a new request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSource {
    pub name: String,
    /// The base key of a finished upload the request takes over; `None` for a stream already
    /// written at the request's own key ([`crate::blobs::stream_key`]).
    pub upload: Option<String>,
}

/// What `start` decided for one entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Run attempt number `attempt` (the record, as stored now, says `running`).
    Run { attempt: u32, record: Box<RequestRecord> },
    /// Already finished or unknown: acked, nothing to do.
    Skip,
    /// Canceled before it ran: stored, answered and acked.
    Canceled,
    /// No attempts left (the last one's processor was lost): dead-lettered.
    Dead { error: String },
    /// Another consumer owns the entry now.
    Lost,
}

/// A running entry whose lease a heartbeat renews, with the progress the heartbeat carries: the
/// handler's own latest report for the request's node, if any (stored in the record).
#[derive(Debug, Clone, PartialEq)]
pub struct Renewal {
    pub entry: Entry,
    pub progress: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    Renewed,
    /// Renewed, and cancellation was requested.
    CancelRequested,
    Lost,
}

/// An outcome to store. `Failed` keeps the lease for a retry; the others end the request.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub entry: Entry,
    pub state: RequestState,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    Missing,
    AlreadyFinished(String),
    /// It had not started and never will.
    Canceled,
    /// It is running: its processor stops it at its next heartbeat.
    Signaled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    Missing,
    NotDead(String),
    Queued { entry_id: String },
}

/// One dead letter: which request, why, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub entry_id: String,
    pub request_id: String,
    pub error: String,
    pub time_ms: i64,
}

/// One row of `start.lua`'s answer: entry, verdict, attempts, error, record hash.
type StartRow = (String, String, u32, String, HashMap<String, String>);

/// The request queue of one key prefix.
#[derive(Clone)]
pub struct RequestQueue {
    conn: ConnectionManager,
    names: QueueNames,
}

impl RequestQueue {
    pub fn new(conn: ConnectionManager, names: QueueNames) -> Self {
        Self { conn, names }
    }

    pub fn names(&self) -> &QueueNames {
        &self.names
    }

    fn invocation(&self, function: &Function) -> Invocation {
        let mut invocation = function.prepare_invoke();
        invocation.arg(&self.names.prefix).arg(&self.names.stream).arg(&self.names.group);
        invocation
    }

    /// Creates the consumer group (reading from the stream's start, so nothing added before it
    /// is missed) unless it exists, and registers the stream.
    pub async fn ensure_group(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let created: Result<(), redis::RedisError> =
            conn.xgroup_create_mkstream(&self.names.stream, &self.names.group, "0").await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => return Err(e.into()),
            _ => {}
        }
        let _: () = conn.sadd(self.names.registry(), &self.names.stream).await?;
        Ok(())
    }

    /// Stores a new request and queues it, atomically; honours its idempotency key. With
    /// `progress`, the same step applies that update at the request's `progress_key` (at
    /// `created_ms`), so the node exists before any processor can see the request, and a
    /// repeated or conflicting submission writes no node at all.
    pub async fn submit(
        &self,
        record: &RequestRecord,
        reply_to: Option<&str>,
        idempotency_ttl_ms: u64,
        progress: Option<&Update>,
    ) -> Result<SubmitOutcome, QueueError> {
        self.submit_with_streams(record, reply_to, idempotency_ttl_ms, progress, &[]).await
    }

    /// [`Self::submit`] with data streams: in the same step, each finished upload named is
    /// renamed to the request's stream key and every stream loses its expiry. An idempotent
    /// repeat is answered before the uploads are looked at.
    pub async fn submit_with_streams(
        &self,
        record: &RequestRecord,
        reply_to: Option<&str>,
        idempotency_ttl_ms: u64,
        progress: Option<&Update>,
        streams: &[StreamSource],
    ) -> Result<SubmitOutcome, QueueError> {
        let mut invocation = self.invocation(&SUBMIT);
        invocation
            .arg(&record.id)
            .arg(record.idempotency_key.as_deref().unwrap_or(""))
            .arg(&record.fingerprint)
            .arg(idempotency_ttl_ms)
            .arg(self.names.registry());
        match progress {
            Some(update) => push_change(&mut invocation, &record.progress_key, record.created_ms, update),
            None => {
                invocation.arg("").arg(0).arg(0);
            }
        }
        invocation.arg(streams.len());
        for stream in streams {
            invocation.arg(&stream.name).arg(stream.upload.as_deref().unwrap_or(""));
        }
        for (name, value) in record.to_fields() {
            invocation.arg(name).arg(value);
        }
        if let Some(reply_to) = reply_to {
            invocation.arg("reply_to").arg(reply_to);
        }
        let (outcome, id, entry_id): (String, String, String) =
            invocation.invoke_async(&mut self.conn.clone()).await?;
        match outcome.as_str() {
            "created" => Ok(SubmitOutcome::Created { entry_id }),
            "existing" => Ok(SubmitOutcome::Existing { id }),
            "conflict" => Ok(SubmitOutcome::Conflict { id }),
            "stream_missing" => Ok(SubmitOutcome::StreamMissing { name: id }),
            "stream_incomplete" => Ok(SubmitOutcome::StreamIncomplete { name: id, detail: entry_id }),
            other => Err(QueueError::Protocol(format!("submit answered {other:?}"))),
        }
    }

    /// The request an idempotency key names, if any, and whether it was submitted with
    /// `fingerprint`. A read ahead of [`Self::submit_with_streams`] (which decides again, in its
    /// own step), so a repeat is answered before its uploads are looked for.
    pub async fn idempotent(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<(String, bool)>, QueueError> {
        let mut conn = self.conn.clone();
        let existing: Option<String> = conn.get(format!("{}:idem:{key}", self.names.prefix)).await?;
        let Some(existing) = existing else { return Ok(None) };
        let known: Option<String> = conn.hget(self.names.record(&existing), "fingerprint").await?;
        Ok(known.map(|known| (existing, known == fingerprint)))
    }

    /// New entries for `consumer`, waiting up to `block_ms`. Give it a dedicated connection.
    pub async fn read_new<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        consumer: &str,
        count: usize,
        block_ms: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        let options =
            StreamReadOptions::default().group(&self.names.group, consumer).count(count).block(block_ms);
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg(&options)
            .arg("STREAMS")
            .arg(&self.names.stream)
            .arg(">")
            .query_async(conn)
            .await?;
        Ok(reply.map(|r| entries(r.keys.into_iter().flat_map(|k| k.ids))).unwrap_or_default())
    }

    /// The replies on an ingress replica's reply stream `stream` after entry `after`, waiting up
    /// to `block_ms`: `(entry id, request id)`, oldest first. The commit script writes them; give
    /// this a dedicated connection.
    pub async fn read_replies<C: ConnectionLike + Send>(
        conn: &mut C,
        stream: &str,
        after: &str,
        count: usize,
        block_ms: usize,
    ) -> Result<Vec<(String, String)>, QueueError> {
        let options = StreamReadOptions::default().count(count).block(block_ms);
        let reply: Option<StreamReadReply> =
            redis::cmd("XREAD").arg(&options).arg("STREAMS").arg(stream).arg(after).query_async(conn).await?;
        let entries = reply.into_iter().flat_map(|reply| reply.keys).flat_map(|key| key.ids);
        Ok(entries
            .map(|entry| {
                let request_id: String = entry.get("id").unwrap_or_default();
                (entry.id, request_id)
            })
            .collect())
    }

    /// Removes an ingress replica's reply stream (at its shutdown); replies still on their way
    /// make it again, and it expires by itself.
    pub async fn drop_replies(&self, stream: &str) -> Result<(), QueueError> {
        let _: () = self.conn.clone().del(stream).await?;
        Ok(())
    }

    /// Takes over entries whose lease ran out (idle longer than `min_idle_ms`).
    pub async fn reclaim(
        &self,
        consumer: &str,
        min_idle_ms: u64,
        count: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        let mut conn = self.conn.clone();
        let mut cursor = "0-0".to_owned();
        let mut claimed = Vec::new();
        loop {
            let reply: StreamAutoClaimReply = conn
                .xautoclaim_options(
                    &self.names.stream,
                    &self.names.group,
                    consumer,
                    min_idle_ms,
                    &cursor,
                    StreamAutoClaimOptions::default().count(count),
                )
                .await?;
            if !reply.deleted_ids.is_empty() {
                tracing::error!(
                    deleted = reply.deleted_ids.len(),
                    "pending request entries were trimmed away"
                );
                metrics::counter!("cairn_requests_pending_trimmed_total")
                    .increment(reply.deleted_ids.len() as u64);
            }
            claimed.extend(entries(reply.claimed));
            if reply.next_stream_id == "0-0" || claimed.len() >= count {
                return Ok(claimed);
            }
            cursor = reply.next_stream_id;
        }
    }

    /// Starts attempts for entries just delivered to `consumer`.
    pub async fn start(
        &self,
        consumer: &str,
        batch: &[Entry],
        now_ms: i64,
    ) -> Result<Vec<Start>, QueueError> {
        let mut invocation = self.invocation(&START);
        invocation.arg(consumer).arg(now_ms);
        for entry in batch {
            invocation.arg(&entry.entry_id).arg(&entry.request_id);
        }
        let rows: Vec<StartRow> = invocation.invoke_async(&mut self.conn.clone()).await?;
        rows.into_iter()
            .map(|(_, verdict, attempt, error, hash)| match verdict.as_str() {
                "run" => {
                    let record = RequestRecord::from_hash(&hash).map_err(|e| QueueError::Record {
                        id: hash.get("id").cloned().unwrap_or_default(),
                        detail: e.to_string(),
                    })?;
                    Ok(Start::Run { attempt, record: Box::new(record) })
                }
                "skip" => Ok(Start::Skip),
                "canceled" => Ok(Start::Canceled),
                "dead" => Ok(Start::Dead { error }),
                "lost" => Ok(Start::Lost),
                other => Err(QueueError::Protocol(format!("start answered {other:?}"))),
            })
            .collect()
    }

    /// Renews the leases of running entries, stores the heartbeat time and the progress each
    /// renewal carries in the records, and reports cancellation requests.
    pub async fn heartbeat(
        &self,
        consumer: &str,
        running: &[Renewal],
        now_ms: i64,
    ) -> Result<Vec<Heartbeat>, QueueError> {
        if running.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.invocation(&HEARTBEAT);
        invocation.arg(consumer).arg(now_ms);
        for renewal in running {
            let progress = renewal.progress.filter(|p| (0.0..=1.0).contains(p));
            invocation
                .arg(&renewal.entry.entry_id)
                .arg(&renewal.entry.request_id)
                .arg(progress.map_or_else(String::new, |p| p.to_string()));
        }
        let rows: Vec<String> = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(rows
            .iter()
            .map(|r| match r.as_str() {
                "ok" => Heartbeat::Renewed,
                "cancel" => Heartbeat::CancelRequested,
                _ => Heartbeat::Lost,
            })
            .collect())
    }

    /// Stores outcomes; `false` for each one refused because the lease was lost.
    pub async fn commit(
        &self,
        consumer: &str,
        commits: &[Commit],
        now_ms: i64,
    ) -> Result<Vec<bool>, QueueError> {
        if commits.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.invocation(&COMMIT);
        invocation.arg(consumer).arg(now_ms);
        for commit in commits {
            let result = commit.result.as_ref().map(serde_json::Value::to_string).unwrap_or_default();
            invocation
                .arg(&commit.entry.entry_id)
                .arg(&commit.entry.request_id)
                .arg(commit.state.to_string())
                .arg(result)
                .arg(commit.error.as_deref().unwrap_or(""));
        }
        let stored: Vec<i64> = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(stored.into_iter().map(|s| s == 1).collect())
    }

    pub async fn record(&self, id: &str) -> Result<Option<RequestRecord>, QueueError> {
        let hash: HashMap<String, String> = self.conn.clone().hgetall(self.names.record(id)).await?;
        if hash.is_empty() {
            return Ok(None);
        }
        RequestRecord::from_hash(&hash)
            .map(Some)
            .map_err(|e| QueueError::Record { id: id.to_owned(), detail: e.to_string() })
    }

    /// The records of `ids` in one pipelined round trip, in order; `None` for a record that is
    /// gone, or unreadable (logged).
    pub async fn records(&self, ids: &[&str]) -> Result<Vec<Option<RequestRecord>>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hgetall(self.names.record(id));
        }
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(hashes
            .into_iter()
            .zip(ids)
            .map(|(hash, id)| {
                if hash.is_empty() {
                    return None;
                }
                RequestRecord::from_hash(&hash)
                    .inspect_err(|error| tracing::warn!(request = %id, %error, "skipping an unreadable request record"))
                    .ok()
            })
            .collect())
    }

    /// One field of a request's record (`cairn_requests::fields`), `None` without the record.
    pub async fn record_field(&self, id: &str, field: &str) -> Result<Option<String>, QueueError> {
        Ok(self.conn.clone().hget(self.names.record(id), field).await?)
    }

    /// Up to `count` entries of the request stream, newest first, before the entry id `before`
    /// (from the newest without one). An entry without a request id has an empty one.
    pub async fn newest(&self, before: Option<&str>, count: usize) -> Result<Vec<Entry>, QueueError> {
        let end = before.map_or_else(|| "+".to_owned(), |id| format!("({id}"));
        let page: redis::streams::StreamRangeReply =
            self.conn.clone().xrevrange_count(&self.names.stream, end, "-", count).await?;
        Ok(page
            .ids
            .into_iter()
            .map(|entry| {
                let request_id: String = entry.get("id").unwrap_or_default();
                Entry { entry_id: entry.id, request_id }
            })
            .collect())
    }

    pub async fn cancel(&self, id: &str, now_ms: i64) -> Result<CancelOutcome, QueueError> {
        let (outcome, state): (String, String) =
            self.invocation(&CANCEL).arg(id).arg(now_ms).invoke_async(&mut self.conn.clone()).await?;
        match outcome.as_str() {
            "missing" => Ok(CancelOutcome::Missing),
            "terminal" => Ok(CancelOutcome::AlreadyFinished(state)),
            "canceled" => Ok(CancelOutcome::Canceled),
            "signaled" => Ok(CancelOutcome::Signaled),
            other => Err(QueueError::Protocol(format!("cancel answered {other:?}"))),
        }
    }

    pub async fn retry_dead(&self, id: &str, now_ms: i64) -> Result<RetryOutcome, QueueError> {
        let (outcome, detail): (String, String) =
            self.invocation(&RETRY_DEAD).arg(id).arg(now_ms).invoke_async(&mut self.conn.clone()).await?;
        match outcome.as_str() {
            "missing" => Ok(RetryOutcome::Missing),
            "not_dead" => Ok(RetryOutcome::NotDead(detail)),
            "queued" => Ok(RetryOutcome::Queued { entry_id: detail }),
            other => Err(QueueError::Protocol(format!("retry answered {other:?}"))),
        }
    }

    /// Dead letters older than the entry id `after` (`"-"`: from the newest), newest first.
    pub async fn dead_letters(&self, after: &str, count: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let end = if after == "-" { "+".to_owned() } else { format!("({after}") };
        let reply: redis::streams::StreamRangeReply =
            self.conn.clone().xrevrange_count(self.names.dead(), end, "-", count).await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| DeadLetter {
                request_id: entry.get("id").unwrap_or_default(),
                error: entry.get("error").unwrap_or_default(),
                time_ms: entry.get("time").unwrap_or_default(),
                entry_id: entry.id,
            })
            .collect())
    }

    /// How many entries the group has not yet received (`XINFO GROUPS` lag; Redis ≥ 7). `None`
    /// when Redis cannot tell (it then counts the stream length minus delivered entries itself),
    /// or when the stream or the group does not exist (Redis lost its data, or the stream was
    /// never made).
    pub async fn lag(&self) -> Result<Option<u64>, QueueError> {
        // One transaction, so "no stream" is read from EXISTS, never from XINFO's error text.
        let (exists, groups): (RedisResult<bool>, RedisResult<Value>) = redis::pipe()
            .atomic()
            .ignore_errors()
            .exists(&self.names.stream)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.names.stream)
            .query_async(&mut self.conn.clone())
            .await?;
        if !exists? {
            return Ok(None);
        }
        let groups = groups?;
        let Value::Array(groups) = groups else { return Ok(None) };
        for group in groups {
            let fields = match group {
                Value::Array(items) => items,
                Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => continue,
            };
            let mut name = None;
            let mut lag = None;
            for pair in fields.chunks_exact(2) {
                let key: Option<String> = redis::from_redis_value(pair[0].clone()).ok();
                match key.as_deref() {
                    Some("name") => name = redis::from_redis_value::<String>(pair[1].clone()).ok(),
                    Some("lag") => {
                        lag = redis::from_redis_value::<Option<u64>>(pair[1].clone()).ok().flatten()
                    }
                    _ => {}
                }
            }
            if name.as_deref() == Some(self.names.group.as_str()) {
                return Ok(lag);
            }
        }
        Ok(None)
    }
}

fn entries(ids: impl IntoIterator<Item = redis::streams::StreamId>) -> Vec<Entry> {
    ids.into_iter()
        .filter_map(|entry| {
            let request_id: String = entry.get("id")?;
            Some(Entry { entry_id: entry.id, request_id })
        })
        .collect()
}
