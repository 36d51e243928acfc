//! The request queue in Redis (docs/contract.md §3): records, the request stream and its consumer group.
//!
//! A request is a hash `P:req:<id>` plus an entry in the stream whose consumer group's pending
//! list holds the leases: the consumer that owns an entry owns the request. Every state change
//! is one Lua step that first checks that ownership, so a processor that lost its lease (paused,
//! partitioned, reclaimed by another) can neither store a result nor ack — the fence of docs/contract.md §3.
//! Blocking reads take a dedicated connection (see [`crate::RedisConfig::dedicated`]).
//!
//! The queue is split in partitions ([`QueueLayout`], `CAIRN_REQUEST_PARTITIONS`): a
//! [`RequestQueue`] is one partition, [`RequestQueues`] all of them, routing a request to its
//! partition by id and merging what is listed across them. On a Redis Cluster each partition is
//! one slot ([`crate::keys::requests`]) and what a request function would write elsewhere (the
//! request's progress node, the submitting replica's reply stream) it returns, and the queue
//! writes right after the call: a process that dies in between leaves the request stored and
//! acked but its node not yet terminal and its waiter unanswered; the waiter's polling fallback
//! reads the record, and the processor's own lifecycle report reaches the node.

use std::collections::HashMap;
use std::sync::LazyLock;

use cairn_progress::{Key, Update};
use cairn_requests::{RequestRecord, RequestState};
use redis::aio::ConnectionLike;
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, FromRedisValue, RedisResult, Value};

use crate::keys;
use crate::library::{Function, Invocation, LIBRARY};
use crate::progress::{Change, ProgressStore, push_change};
use crate::{RedisConnection, StoreError};

// The queue's Lua (common.lua, and one file per function) is part of the library
// (crate::library); submit also applies the request's first progress update.
static SUBMIT: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_submit"));
static START: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_start"));
static HEARTBEAT: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_heartbeat"));
static COMMIT: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_commit"));
static CANCEL: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_cancel"));
static RETRY_DEAD: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("requests_retry_dead"));

/// Writes a call on a Redis Cluster left to the queue that failed (`write`: `node` or `reply`).
pub const DEFERRED_FAILED: &str = "cairn_requests_deferred_failed_total";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis is unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stored request {id} is unreadable: {detail}")]
    Record { id: String, detail: String },
    #[error("unexpected reply from a request script: {0}")]
    Protocol(String),
    /// A terminal state could not be shown on the request's progress node (a Redis Cluster,
    /// where the node is written after the request's own step).
    #[error("cannot write the request's progress node: {0}")]
    Progress(#[from] StoreError),
    /// `CAIRN_REQUEST_PARTITIONS` differs from the number the queue was made with while requests
    /// are unfinished: with another number, their ids would lead to other partitions.
    #[error(
        "CAIRN_REQUEST_PARTITIONS={configured}, but the request queue {stream:?} was made with \
         CAIRN_REQUEST_PARTITIONS={recorded} and {unfinished} of its requests are not finished: \
         set it to {recorded} in every service, or change it once they have finished"
    )]
    PartitionsChanged { stream: String, configured: u16, recorded: u16, unfinished: u64 },
}

impl cairn_error::ServiceError for QueueError {
    fn kind(&self) -> cairn_error::ErrorKind {
        match self {
            QueueError::Redis(e) => crate::error_kind(e),
            QueueError::Record { .. } | QueueError::Protocol(_) | QueueError::PartitionsChanged { .. } => {
                cairn_error::ErrorKind::Internal
            }
            QueueError::Progress(e) => e.kind(),
        }
    }
}

/// The request queue's settings, the same for ingress, the processors and the trimmer.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Request stream (key `{prefix}:{stream}`; partitions past the first `{prefix}:{stream}:{n}`,
    /// on a Redis Cluster `{prefix}:{stream}{p<n>}`).
    #[arg(
        long = "request-stream",
        alias = "stream",
        env = "CAIRN_REQUEST_STREAM",
        default_value = "requests"
    )]
    pub stream: String,
    /// Consumer group of the processors.
    #[arg(
        long = "request-group",
        alias = "group",
        env = "CAIRN_REQUEST_GROUP",
        default_value = "processors"
    )]
    pub group: String,
    /// Partitions of the request stream, each read by every processor (on a Redis Cluster each
    /// its own slot). Every service must use the same number; another one than the queue was
    /// made with is refused while requests are unfinished ([`RequestQueues::check_partitions`]).
    #[arg(long = "request-partitions", env = "CAIRN_REQUEST_PARTITIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,
}

impl QueueConfig {
    /// The layout under `prefix` (tagged later, by the connection it is used on).
    pub fn layout(&self, prefix: &str) -> QueueLayout {
        QueueLayout::new(prefix, &self.stream, &self.group).with_partitions(self.partitions)
    }
}

/// How the request queue is laid out: its stream and group, how many partitions, and whether
/// its keys carry hash tags (a Redis Cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLayout {
    pub prefix: String,
    /// The stream's name in config (`CAIRN_REQUEST_STREAM`), without prefix or partition.
    pub stream: String,
    pub group: String,
    /// `CAIRN_REQUEST_PARTITIONS`, at least 1.
    pub partitions: u16,
    /// Hash-tagged keys, one slot per partition (a Redis Cluster).
    pub tagged: bool,
}

impl QueueLayout {
    /// One partition on one Redis: the layout every earlier version had.
    pub fn new(prefix: &str, stream: &str, group: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            stream: stream.to_owned(),
            group: group.to_owned(),
            partitions: 1,
            tagged: false,
        }
    }

    pub fn with_partitions(mut self, partitions: u16) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    pub fn tagged(mut self, tagged: bool) -> Self {
        self.tagged = tagged;
        self
    }

    /// The names of partition `partition`.
    pub fn partition(&self, partition: u16) -> QueueNames {
        let tag = if self.tagged { keys::requests::partition_tag(partition) } else { String::new() };
        QueueNames {
            prefix: self.prefix.clone(),
            stream: keys::requests::stream_in(&self.prefix, &self.stream, &tag, partition),
            group: self.group.clone(),
            partition,
            tag,
        }
    }

    /// Every partition's names, in order.
    pub fn all(&self) -> Vec<QueueNames> {
        (0..self.partitions).map(|p| self.partition(p)).collect()
    }

    /// The partition a request id (or an idempotency key) belongs to.
    pub fn partition_of(&self, key: &str) -> u16 {
        keys::requests::partition_of(key, self.partitions)
    }

    /// A new request id: a UUID v4, in the partition of `idempotency_key` when there is one (so
    /// the key's claim and the request it names are in one slot), else wherever it falls.
    pub fn new_id(&self, idempotency_key: Option<&str>) -> String {
        self.new_id_in(idempotency_key.map(|key| self.partition_of(key)))
    }

    /// A new request id (a UUID v4) in partition `partition`, or wherever it falls.
    pub fn new_id_in(&self, partition: Option<u16>) -> String {
        let target = partition.map(|p| p % self.partitions);
        loop {
            let id = cairn_requests::new_request_id();
            if target.is_none_or(|p| self.partition_of(&id) == p) {
                return id;
            }
        }
    }
}

/// Names of one partition's keys, all under the key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    pub prefix: String,
    /// The request stream's key.
    pub stream: String,
    pub group: String,
    /// Which partition (0 with one).
    pub partition: u16,
    /// The partition's hash tag on a Redis Cluster; empty on one Redis.
    pub tag: String,
}

impl QueueNames {
    /// `stream` and `group` as configured, one partition on one Redis; the stream key gets the
    /// prefix.
    pub fn new(prefix: &str, stream: &str, group: &str) -> Self {
        QueueLayout::new(prefix, stream, group).partition(0)
    }

    pub fn record(&self, id: &str) -> String {
        keys::requests::record_in(&self.prefix, &self.tag, id)
    }

    /// The dead-letter stream (shared by the partitions of one Redis).
    pub fn dead(&self) -> String {
        keys::requests::dead_in(&self.prefix, &self.tag)
    }

    /// The index of finished requests the trimmer purges from.
    pub fn finished(&self) -> String {
        keys::requests::finished_in(&self.prefix, &self.tag)
    }

    /// An idempotency key's claim.
    pub fn idem(&self, key: &str) -> String {
        keys::requests::idem_in(&self.prefix, &self.tag, key)
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
    /// written at the request's own key ([`crate::BlobStore::stream_key`]).
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

/// One partition of the request queue of one key prefix.
#[derive(Clone)]
pub struct RequestQueue {
    conn: RedisConnection,
    names: QueueNames,
    /// Writes what a call on a cluster leaves to its caller: terminal states on progress nodes.
    progress: ProgressStore,
}

impl RequestQueue {
    /// A partition on `conn`; its names must be tagged exactly when `conn` is a cluster's
    /// ([`QueueLayout::tagged`]).
    pub fn new(conn: impl Into<RedisConnection>, names: QueueNames) -> Self {
        let conn = conn.into();
        let progress = ProgressStore::new(conn.clone(), names.prefix.clone());
        Self { conn, names, progress }
    }

    pub fn names(&self) -> &QueueNames {
        &self.names
    }

    /// Whether this partition's keys carry its hash tag (a Redis Cluster).
    fn tagged(&self) -> bool {
        !self.names.tag.is_empty()
    }

    fn invocation(&self, function: &Function) -> Invocation {
        let mut invocation = function.prepare_invoke_with_keys(&[&self.names.stream]);
        invocation.arg(&self.names.prefix).arg(&self.names.stream).arg(&self.names.group);
        invocation
    }

    /// Calls a request function; on a cluster also writes what it left to its caller (`answer`
    /// in common.lua): first the terminal states on progress nodes, then the replies, so a
    /// replica woken by its reply reads the node as final, and last the acks of the entries those
    /// belong to.
    async fn call<T: FromRedisValue>(&self, invocation: &Invocation) -> Result<T, QueueError> {
        let reply: Value = invocation.invoke_async(&mut self.conn.clone()).await?;
        if !self.tagged() {
            return parse(reply);
        }
        let Value::Array(parts) = reply else {
            return Err(protocol("a tagged call's reply is not an array"));
        };
        let Ok([result, nodes, replies, acks]) = <[Value; 4]>::try_from(parts) else {
            return Err(protocol("a tagged call's reply has the wrong number of parts"));
        };
        // The call's own step is stored: what follows is told, never undone, and a failure is
        // logged, not returned, so no caller repeats a step that happened. Entries stay pending
        // until what they left is written: if that fails (or this process dies first), the
        // processor that reclaims one tells it again (`retell` in common.lua).
        let (nodes, replies) = (texts(nodes)?, texts(replies)?);
        let acks: Vec<String> =
            redis::from_redis_value(acks).map_err(|_| protocol("a tagged call's acks"))?;
        let mut told = true;
        if !nodes.is_empty()
            && let Err(error) = self.show_on_nodes(&nodes).await
        {
            tracing::warn!(%error, nodes = nodes.len(), "cannot show request states on their progress nodes");
            metrics::counter!(DEFERRED_FAILED, "write" => "node").increment(1);
            told = false;
        }
        if !replies.is_empty()
            && let Err(error) = self.send_replies(&replies).await
        {
            tracing::warn!(%error, replies = replies.len(), "cannot send replies; waiters poll instead");
            metrics::counter!(DEFERRED_FAILED, "write" => "reply").increment(1);
            told = false;
        }
        if told
            && !acks.is_empty()
            && let Err(error) = self.ack(&acks).await
        {
            tracing::warn!(%error, entries = acks.len(), "cannot ack finished entries; a reclaim acks them");
            metrics::counter!(DEFERRED_FAILED, "write" => "ack").increment(1);
        }
        parse(result)
    }

    /// Acks entries of this partition's stream.
    async fn ack(&self, entries: &[String]) -> Result<(), QueueError> {
        let _: u64 = self.conn.clone().xack(&self.names.stream, &self.names.group, entries).await?;
        Ok(())
    }

    /// Applies terminal states `{ key, time, name, JSON, … }` a call left for progress nodes.
    async fn show_on_nodes(&self, nodes: &[Vec<String>]) -> Result<(), QueueError> {
        let changes = nodes.iter().map(|node| node_change(node)).collect::<Result<Vec<_>, _>>()?;
        self.progress.apply(&changes).await?;
        Ok(())
    }

    /// Sends `{ reply stream, id, state, time }` replies as common.lua's `reply` does on one Redis:
    /// a capped stream that expires with its replica, registered for the trimmer.
    async fn send_replies(&self, replies: &[Vec<String>]) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let mut streams: Vec<&str> = Vec::new();
        for reply in replies {
            let [to, id, state, time] = reply.as_slice() else { return Err(protocol("a deferred reply")) };
            let _: String = redis::cmd("XADD")
                .arg(to)
                .arg("MAXLEN")
                .arg("~")
                .arg(10_000)
                .arg("*")
                .arg(&[("id", id), ("state", state), ("time", time)])
                .query_async(&mut conn)
                .await?;
            if !streams.contains(&to.as_str()) {
                streams.push(to);
            }
        }
        for stream in streams {
            let _: () = conn.pexpire(stream, 3_600_000).await?;
            let _: () = conn.sadd(self.names.registry(), stream).await?;
        }
        Ok(())
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
        if self.tagged() {
            // One Redis registers its dead-letter stream when it first dead-letters; a
            // partition's own cannot be written by the call that does (another slot).
            let _: () = conn.sadd(self.names.registry(), self.names.dead()).await?;
        }
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
        // On a cluster the node is in its tree's slot: written after a 'created' instead.
        match progress.filter(|_| !self.tagged()) {
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
        let (outcome, id, entry_id): (String, String, String) = self.call(&invocation).await?;
        match outcome.as_str() {
            "created" => {
                if let Some(update) = progress.filter(|_| self.tagged()) {
                    let change = Change {
                        key: record.progress_key.clone(),
                        update: update.clone(),
                        time_ms: record.created_ms,
                    };
                    // Queued is stored: a node that cannot be written now shows the request
                    // from the processor's first report on.
                    if let Err(error) = self.progress.apply(&[change]).await {
                        tracing::warn!(%error, request = %record.id, "cannot write a new request's progress node");
                        metrics::counter!(DEFERRED_FAILED, "write" => "node").increment(1);
                    }
                }
                Ok(SubmitOutcome::Created { entry_id })
            }
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
        let existing: Option<String> = conn.get(self.names.idem(key)).await?;
        let Some(existing) = existing else { return Ok(None) };
        let known: Option<String> = conn.hget(self.names.record(&existing), "fingerprint").await?;
        Ok(known.map(|known| (existing, known == fingerprint)))
    }

    /// New entries for `consumer`, waiting up to `block_ms` (0: answers at once, never
    /// `BLOCK 0`). Give it a dedicated connection.
    pub async fn read_new<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        consumer: &str,
        count: usize,
        block_ms: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        let mut options = StreamReadOptions::default().group(&self.names.group, consumer).count(count);
        if block_ms > 0 {
            options = options.block(block_ms);
        }
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
        let rows: Vec<StartRow> = self.call(&invocation).await?;
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
        let rows: Vec<String> = self.call(&invocation).await?;
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
        let stored: Vec<i64> = self.call(&invocation).await?;
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
            self.call(self.invocation(&CANCEL).arg(id).arg(now_ms)).await?;
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
            self.call(self.invocation(&RETRY_DEAD).arg(id).arg(now_ms)).await?;
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
        match self.group_info().await? {
            GroupState::Group(group) => Ok(group.lag),
            GroupState::NoStream | GroupState::NoGroup => Ok(None),
        }
    }

    /// How many requests of this partition are not done yet: pending for the group (running,
    /// or waiting for a retry) plus not yet delivered. Where Redis cannot tell the lag (entries
    /// deleted behind the group's position), any entry after the last delivered one counts as 1.
    pub async fn unfinished(&self) -> Result<u64, QueueError> {
        let group = match self.group_info().await? {
            GroupState::NoStream => return Ok(0),
            GroupState::NoGroup => return Ok(self.conn.clone().xlen(&self.names.stream).await?),
            GroupState::Group(group) => group,
        };
        let undelivered = match group.lag {
            Some(lag) => lag,
            None => {
                let after: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&self.names.stream)
                    .arg(format!("({}", group.last_delivered))
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut self.conn.clone())
                    .await?;
                after.ids.len() as u64
            }
        };
        Ok(group.pending + undelivered)
    }

    /// This queue's group as `XINFO GROUPS` shows it.
    async fn group_info(&self) -> Result<GroupState, QueueError> {
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
            return Ok(GroupState::NoStream);
        }
        let Value::Array(groups) = groups? else { return Ok(GroupState::NoGroup) };
        for group in groups {
            let fields = match group {
                Value::Array(items) => items,
                Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => continue,
            };
            let mut name = None;
            let mut found = GroupInfo { pending: 0, lag: None, last_delivered: "0-0".to_owned() };
            for pair in fields.chunks_exact(2) {
                let key: Option<String> = redis::from_redis_value(pair[0].clone()).ok();
                let value = pair[1].clone();
                match key.as_deref() {
                    Some("name") => name = redis::from_redis_value::<String>(value).ok(),
                    Some("lag") => found.lag = redis::from_redis_value::<Option<u64>>(value).ok().flatten(),
                    Some("pending") => found.pending = redis::from_redis_value(value).unwrap_or(0),
                    Some("last-delivered-id") => {
                        found.last_delivered = redis::from_redis_value(value).unwrap_or_else(|_| "0-0".into())
                    }
                    _ => {}
                }
            }
            if name.as_deref() == Some(self.names.group.as_str()) {
                return Ok(GroupState::Group(found));
            }
        }
        Ok(GroupState::NoGroup)
    }
}

/// A partition's stream and group, as [`RequestQueue::group_info`] finds them.
enum GroupState {
    NoStream,
    NoGroup,
    Group(GroupInfo),
}

struct GroupInfo {
    pending: u64,
    /// `None` when Redis cannot tell.
    lag: Option<u64>,
    last_delivered: String,
}

/// Every partition of the request queue: routes a request to its partition by id, and lists
/// across partitions newest first.
#[derive(Clone)]
pub struct RequestQueues {
    layout: QueueLayout,
    partitions: Vec<RequestQueue>,
}

impl RequestQueues {
    /// The queue of `layout` on `conn`; its keys are tagged exactly when `conn` is a cluster's.
    pub fn new(conn: impl Into<RedisConnection>, layout: QueueLayout) -> Self {
        let conn = conn.into();
        let layout = layout.tagged(conn.is_cluster());
        let partitions =
            layout.all().into_iter().map(|names| RequestQueue::new(conn.clone(), names)).collect();
        Self { layout, partitions }
    }

    pub fn layout(&self) -> &QueueLayout {
        &self.layout
    }

    /// Each partition, in order.
    pub fn partitions(&self) -> &[RequestQueue] {
        &self.partitions
    }

    /// The partition a request id (or an idempotency key) belongs to.
    pub fn of(&self, id: &str) -> &RequestQueue {
        &self.partitions[usize::from(self.layout.partition_of(id))]
    }

    /// A new request id ([`QueueLayout::new_id`]).
    pub fn new_id(&self, idempotency_key: Option<&str>) -> String {
        self.layout.new_id(idempotency_key)
    }

    /// A new request id in `partition` ([`QueueLayout::new_id_in`]).
    pub fn new_id_in(&self, partition: Option<u16>) -> String {
        self.layout.new_id_in(partition)
    }

    /// Checks the configured number of partitions against the one the queue was made with
    /// (`{prefix}:{stream}:partitions`), recording it if none is. Another number is taken (and
    /// recorded) only when no request of the recorded partitions is unfinished
    /// ([`RequestQueue::unfinished`]); else [`QueueError::PartitionsChanged`], for the service to
    /// stop on: ids map to partitions by their number, so a queued or running request would be
    /// looked for, cancelled or read in the wrong partition. Answers the recorded number it
    /// replaced, if any.
    pub async fn check_partitions(&self) -> Result<Option<u16>, QueueError> {
        let key = keys::requests::partitions(&self.layout.prefix, &self.layout.stream);
        let configured = self.layout.partitions;
        let mut conn = self.partitions[0].conn.clone();
        let recorded: Option<String> =
            redis::cmd("SET").arg(&key).arg(configured).arg("NX").arg("GET").query_async(&mut conn).await?;
        let Some(recorded) = recorded else { return Ok(None) };
        let recorded: u16 = recorded.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
            QueueError::Protocol(format!("{key} holds {recorded:?}, not a partition count"))
        })?;
        if recorded == configured {
            return Ok(None);
        }
        let before = RequestQueues::new(
            self.partitions[0].conn.clone(),
            self.layout.clone().with_partitions(recorded),
        );
        let mut unfinished = 0;
        for queue in before.partitions() {
            unfinished += queue.unfinished().await?;
        }
        if unfinished > 0 {
            return Err(QueueError::PartitionsChanged {
                stream: keys::requests::stream(&self.layout.prefix, &self.layout.stream),
                configured,
                recorded,
                unfinished,
            });
        }
        let _: () = redis::cmd("SET").arg(&key).arg(configured).query_async(&mut conn).await?;
        Ok(Some(recorded))
    }

    /// What a service does before it uses the queue: [`Self::check_partitions`] (a refusal,
    /// [`QueueError::PartitionsChanged`], is for it to stop on), then [`Self::ensure_groups`].
    pub async fn prepare(&self) -> Result<(), QueueError> {
        if let Some(recorded) = self.check_partitions().await? {
            tracing::info!(
                stream = %self.layout.stream,
                from = recorded,
                to = self.layout.partitions,
                "the request queue changes its number of partitions: none of its requests is unfinished"
            );
        }
        self.ensure_groups().await
    }

    /// Every partition's group and registration ([`RequestQueue::ensure_group`]).
    pub async fn ensure_groups(&self) -> Result<(), QueueError> {
        for queue in &self.partitions {
            queue.ensure_group().await?;
        }
        Ok(())
    }

    /// The request an idempotency key names ([`RequestQueue::idempotent`]), in the key's
    /// partition.
    pub async fn idempotent(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<(String, bool)>, QueueError> {
        self.of(key).idempotent(key, fingerprint).await
    }

    pub async fn record(&self, id: &str) -> Result<Option<RequestRecord>, QueueError> {
        self.of(id).record(id).await
    }

    /// The records of `ids`, in order: one pipelined round trip per partition they fall in.
    pub async fn records(&self, ids: &[&str]) -> Result<Vec<Option<RequestRecord>>, QueueError> {
        let mut out: Vec<Option<RequestRecord>> = vec![None; ids.len()];
        for (p, queue) in self.partitions.iter().enumerate() {
            let mine: Vec<usize> =
                (0..ids.len()).filter(|&i| usize::from(self.layout.partition_of(ids[i])) == p).collect();
            if mine.is_empty() {
                continue;
            }
            let wanted: Vec<&str> = mine.iter().map(|&i| ids[i]).collect();
            for (i, record) in mine.into_iter().zip(queue.records(&wanted).await?) {
                out[i] = record;
            }
        }
        Ok(out)
    }

    /// One field of a request's record ([`RequestQueue::record_field`]).
    pub async fn record_field(&self, id: &str, field: &str) -> Result<Option<String>, QueueError> {
        self.of(id).record_field(id, field).await
    }

    pub async fn cancel(&self, id: &str, now_ms: i64) -> Result<CancelOutcome, QueueError> {
        self.of(id).cancel(id, now_ms).await
    }

    pub async fn retry_dead(&self, id: &str, now_ms: i64) -> Result<RetryOutcome, QueueError> {
        self.of(id).retry_dead(id, now_ms).await
    }

    /// Up to `count` entries of all partitions' streams, newest first by entry id, before
    /// `before` ([`RequestQueue::newest`]).
    pub async fn newest(&self, before: Option<&str>, count: usize) -> Result<Vec<Entry>, QueueError> {
        let mut all = Vec::new();
        for queue in &self.partitions {
            all.extend(queue.newest(before, count).await?);
        }
        Ok(newest_first(all, |entry| &entry.entry_id, count))
    }

    /// Dead letters of every partition older than `after`, newest first
    /// ([`RequestQueue::dead_letters`]); on one Redis the partitions share one dead-letter stream.
    pub async fn dead_letters(&self, after: &str, count: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let streams = if self.layout.tagged { &self.partitions[..] } else { &self.partitions[..1] };
        let mut all = Vec::new();
        for queue in streams {
            all.extend(queue.dead_letters(after, count).await?);
        }
        Ok(newest_first(all, |letter| &letter.entry_id, count))
    }

    /// The group's lag summed over partitions; `None` when no partition can tell
    /// ([`RequestQueue::lag`]).
    pub async fn lag(&self) -> Result<Option<u64>, QueueError> {
        let mut total = None;
        for queue in &self.partitions {
            if let Some(lag) = queue.lag().await? {
                total = Some(total.unwrap_or(0) + lag);
            }
        }
        Ok(total)
    }
}

/// `items` ordered newest first by their stream entry id (`<ms>-<seq>`), the first `count`.
fn newest_first<T>(mut items: Vec<T>, id: impl Fn(&T) -> &str, count: usize) -> Vec<T> {
    items.sort_by_key(|item| std::cmp::Reverse(entry_order(id(item))));
    items.truncate(count);
    items
}

/// An entry id as the pair of numbers it orders by; an unreadable one sorts last.
fn entry_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// A reply as `T`; a reply of another shape is a protocol error.
fn parse<T: FromRedisValue>(value: Value) -> Result<T, QueueError> {
    redis::from_redis_value(value).map_err(|e| QueueError::Protocol(e.to_string()))
}

fn protocol(what: &str) -> QueueError {
    QueueError::Protocol(what.to_owned())
}

/// A list of lists of texts (an empty Lua table may come back as nil or an empty map).
fn texts(value: Value) -> Result<Vec<Vec<String>>, QueueError> {
    match value {
        Value::Nil | Value::Map(_) => Ok(Vec::new()),
        other => parse(other),
    }
}

/// A terminal state `{ key, time, name, JSON, … }` a call left for a progress node.
fn node_change(node: &[String]) -> Result<Change, QueueError> {
    let [key, time, fields @ ..] = node else { return Err(protocol("a deferred node update")) };
    let key = Key::parse(key).map_err(|e| QueueError::Protocol(format!("deferred node key: {e}")))?;
    let time_ms = time.parse().map_err(|_| protocol("a deferred node update's time"))?;
    let mut object = serde_json::Map::new();
    for pair in fields.chunks_exact(2) {
        let value = serde_json::from_str(&pair[1]).map_err(|_| protocol("a deferred node field"))?;
        object.insert(pair[0].clone(), value);
    }
    let update = Update::from_json(&serde_json::Value::Object(object))
        .map_err(|e| QueueError::Protocol(format!("deferred node update: {e}")))?;
    Ok(Change { key, update, time_ms })
}

fn entries(ids: impl IntoIterator<Item = redis::streams::StreamId>) -> Vec<Entry> {
    ids.into_iter()
        .filter_map(|entry| {
            let request_id: String = entry.get("id")?;
            Some(Entry { entry_id: entry.id, request_id })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_merge_newest_first_by_entry_id_not_by_text() {
        let ids = vec!["9-0", "10-0", "10-2", "1700000000000-1", "bad"];
        let merged = newest_first(ids, |id| id, 4);
        assert_eq!(merged, vec!["1700000000000-1", "10-2", "10-0", "9-0"]);
    }

    #[test]
    fn an_idempotency_key_and_the_id_it_gets_share_a_partition() {
        let layout = QueueLayout::new("c", "requests", "g").with_partitions(8).tagged(true);
        for key in ["a", "order-17", "x/y"] {
            let id = layout.new_id(Some(key));
            assert_eq!(layout.partition_of(&id), layout.partition_of(key), "{key} → {id}");
            let names = layout.partition(layout.partition_of(key));
            assert_eq!(names.idem(key), format!("c:idem:{}{key}", names.tag));
            assert_eq!(names.record(&id), format!("c:req:{}{id}", names.tag));
        }
        assert_eq!(QueueLayout::new("c", "requests", "g").with_partitions(0).partitions, 1);
    }

    #[test]
    fn one_redis_keeps_one_dead_letter_stream_and_the_first_stream_name() {
        let layout = QueueLayout::new("c", "requests", "g").with_partitions(3);
        let names = layout.all();
        assert_eq!(names[0].stream, "c:requests");
        assert_eq!(names[2].stream, "c:requests:2");
        assert!(names.iter().all(|n| n.dead() == "c:dead" && n.record("r") == "c:req:r"));
    }
}
