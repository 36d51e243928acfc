//! The request side of the ingress (docs/contract.md §3), free of HTTP: submission with validation,
//! backpressure and idempotency, waiting for an outcome, reads, cancellation and dead letters.
//! Every Redis call is bounded by [`REDIS_TIMEOUT`], so a Redis that is away or stalled becomes
//! [`RequestsError::Unavailable`] within seconds, never a hang.

use cairn_progress::now_ms;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cairn_auth::Grant;
use cairn_error::{ErrorKind, ServiceError};
use cairn_progress::{Key, Update};
use cairn_redis::BlobStore;
use cairn_redis::ProgressStore;
use cairn_redis::blobs::{Claim, upload_claimant};
use cairn_redis::progress::{Change, ReadOptions};
use cairn_redis::requests::{
    CancelOutcome, DeadLetter, RequestQueues, RetryOutcome, StreamSource, SubmitOutcome,
};
use cairn_requests::{RequestRecord, RequestState, StreamInfo, Submission, SubmitError};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::replies::{Waiter, Waiters};

/// Bound on every Redis call made while answering a client.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between two re-reads of a waited-on request (see `wait_terminal`).
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(4);
/// Oldest group lag a backpressure decision may use.
const LAG_MAX_AGE: Duration = Duration::from_millis(500);

/// Why a request operation failed; each is of one [`ErrorKind`], which `crate::error` answers.
#[derive(Debug, thiserror::Error)]
pub enum RequestsError {
    /// The submission is invalid (or too large: [`SubmitError::is_too_large`]).
    #[error(transparent)]
    Invalid(#[from] SubmitError),
    /// The caller's token does not reach what the request names.
    #[error(transparent)]
    Denied(#[from] cairn_auth::Denied),
    #[error("unknown handler {name:?}; this deployment has: {known}")]
    UnknownHandler { name: String, known: String },
    #[error(
        "too many requests are waiting to be processed ({lag} queued, the limit is {max}); retry shortly"
    )]
    Overloaded { lag: u64, max: u64 },
    #[error("too many large submissions are being read at once; retry shortly")]
    Busy,
    #[error("idempotency key {key:?} was already used with a different request body")]
    IdempotencyConflict { key: String },
    #[error("data stream {name:?} is larger than {max} bytes (CAIRN_MAX_STREAM_BYTES)")]
    StreamTooLarge { name: String, max: u64 },
    #[error(
        "the request's data streams pass {max} bytes in all at stream {name:?} (CAIRN_MAX_REQUEST_STREAM_BYTES)"
    )]
    StreamsTooLarge { name: String, max: u64 },
    #[error(
        "data stream {name:?} names upload {upload}, which does not exist: it expired, was deleted or was used by another request"
    )]
    UploadMissing { name: String, upload: String },
    #[error("data stream {name:?} names upload {upload}, which is not finished ({detail} bytes)")]
    UploadIncomplete { name: String, upload: String, detail: String },
    /// A multipart submission that is not as documented; the message says what is wrong.
    #[error("{0}")]
    BadStreams(String),
    #[error("no request {id}")]
    Missing { id: String },
    #[error("request {id} already finished: it is {state}")]
    AlreadyFinished { id: String, state: String },
    #[error("request {id} is not a dead letter: it is {state}")]
    NotDeadLetter { id: String, state: RequestState },
    #[error("request {id} is not dead (it is {state}); only dead requests can be retried")]
    NotDead { id: String, state: String },
    /// Redis did not answer, or not in time; details are logged where it happened.
    #[error("the request queue is unavailable; retry shortly")]
    Unavailable,
    /// A stored record or a script reply made no sense; details are logged.
    #[error("internal error")]
    Internal,
}

impl ServiceError for RequestsError {
    fn kind(&self) -> ErrorKind {
        match self {
            RequestsError::Invalid(e) => e.kind(),
            RequestsError::Denied(denied) => denied.kind(),
            RequestsError::UnknownHandler { .. }
            | RequestsError::UploadMissing { .. }
            | RequestsError::BadStreams(_) => ErrorKind::BadRequest,
            RequestsError::StreamTooLarge { .. } | RequestsError::StreamsTooLarge { .. } => {
                ErrorKind::TooLarge
            }
            // Backpressure is a dependency's capacity, not this caller's rate.
            RequestsError::Overloaded { .. } | RequestsError::Busy => ErrorKind::Unavailable,
            RequestsError::IdempotencyConflict { .. }
            | RequestsError::UploadIncomplete { .. }
            | RequestsError::AlreadyFinished { .. }
            | RequestsError::NotDead { .. } => ErrorKind::Conflict,
            RequestsError::Missing { .. } | RequestsError::NotDeadLetter { .. } => ErrorKind::NotFound,
            RequestsError::Unavailable => ErrorKind::Unavailable,
            RequestsError::Internal => ErrorKind::Internal,
        }
    }
}

impl RequestsError {
    /// The `reason` label of `cairn_requests_rejected_total` for a refused submission.
    fn rejection_reason(&self) -> &'static str {
        match self {
            RequestsError::Denied(_) => "denied",
            RequestsError::Invalid(e) if e.is_too_large() => "too_large",
            RequestsError::StreamTooLarge { .. } | RequestsError::StreamsTooLarge { .. } => "too_large",
            RequestsError::UploadMissing { .. }
            | RequestsError::UploadIncomplete { .. }
            | RequestsError::BadStreams(_) => "invalid",
            RequestsError::Invalid(_) => "invalid",
            RequestsError::UnknownHandler { .. } => "unknown_handler",
            RequestsError::Overloaded { .. } | RequestsError::Busy => "backpressure",
            RequestsError::IdempotencyConflict { .. } => "conflict",
            RequestsError::Unavailable => "unavailable",
            _ => "internal",
        }
    }
}

/// Counts a refused submission.
pub fn record_rejection(reason: &'static str) {
    metrics::counter!("cairn_requests_rejected_total", "reason" => reason).increment(1);
}

/// Tunables of the request API.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Attempts a request gets when it names none.
    pub default_max_attempts: u32,
    /// Backpressure: above this many undelivered entries in the group, submissions get 503.
    pub max_lag: u64,
    pub idempotency_ttl: Duration,
    /// Longest `Prefer: wait` honoured.
    pub max_wait: Duration,
    /// How often a waiter re-reads its record in case a reply was missed.
    pub poll_interval: Duration,
    /// This replica's reply stream.
    pub reply_stream: String,
    /// Largest data stream.
    pub max_stream_bytes: u64,
    /// Most bytes of data streams in one request.
    pub max_request_stream_bytes: u64,
    /// How long a data stream being received may stay in Redis if its request is never stored
    /// (the ingress died mid-body); the upload expiry.
    pub stream_expiry: Duration,
}

/// The progress a request's view shows, from its node (`progress`, `update_time`) and its record:
/// the node's, unless the processor's last heartbeat carried a progress the node has not heard of
/// (its reports over AMQP lag or are away: the heartbeat came after the node's last update) or
/// the node has none. A node without progress shows 0; no node and no heartbeat progress, none.
fn shown_progress(node: Option<(Option<f64>, i64)>, record: &RequestRecord) -> Option<f64> {
    let beat = record.heartbeat_progress.zip(record.heartbeat_ms);
    match (node, beat) {
        (Some((Some(progress), updated)), Some((beat, at))) => {
            Some(if at > updated { beat } else { progress })
        }
        (Some((Some(progress), _)), None) => Some(progress),
        (_, Some((beat, _))) => Some(beat),
        (Some((None, _)), None) => Some(0.0),
        (None, None) => None,
    }
}

/// A request as a client sees it: the record's public view and its progress.
#[derive(Debug, Clone)]
pub struct RequestView {
    pub record: RequestRecord,
    /// `progress` of the request's progress node (0 until some is reported), or what the
    /// processor's last heartbeat carried when that is newer or there is no node; `None` when
    /// there is neither. Always 1 once the request succeeded.
    pub progress: Option<f64>,
}

impl RequestView {
    /// `record.to_json()` plus `progress` and `progress_url`.
    pub fn to_json(&self) -> Value {
        let mut view = self.record.to_json();
        if let Value::Object(map) = &mut view {
            map.insert("progress".into(), json!(self.progress));
            map.insert("progress_url".into(), json!(progress_url(&self.record.progress_key)));
        }
        view
    }
}

/// Where the progress of a request is read: the ingress's own progress API.
pub fn progress_url(key: &Key) -> String {
    format!("/status/{key}")
}

/// What a submission led to.
#[derive(Debug)]
pub enum Submitted {
    /// A new request, queued (and, when the client waited, not finished in time).
    Queued(RequestRecord),
    /// A request that is finished, or one the idempotency key already named: shown in full.
    Known(RequestView),
}

/// What a cancellation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canceled {
    /// It had not started and never will.
    Queued,
    /// It is running; its processor stops it within one heartbeat interval.
    Signaled,
}

/// The request core: queue (all its partitions), progress store, waiters and the group-lag cache
/// of one replica.
pub struct Requests {
    queues: RequestQueues,
    store: ProgressStore,
    blobs: BlobStore,
    waiters: Arc<Waiters>,
    handlers: BTreeSet<String>,
    settings: Settings,
    lag: tokio::sync::Mutex<Option<LagSample>>,
    /// Fires when the replica starts draining; waits end early then.
    draining: CancellationToken,
    /// KiB of large bodies being parsed at once (see [`PARSE_BUDGET_KIB`]).
    parsing: tokio::sync::Semaphore,
}

/// Bodies larger than this are parsed only within [`PARSE_BUDGET_KIB`].
const LARGE_BODY: usize = 64 * 1024;
/// How many KiB of large submission bodies one replica parses at once. A JSON document takes
/// several times its size once parsed, so without a bound a thousand concurrent 2 MiB bodies
/// would take tens of GB; with it, the parsed bodies stay within a few hundred MB and a body
/// beyond the budget waits [`PARSE_WAIT`], then gets a 503 with `Retry-After`.
const PARSE_BUDGET_KIB: usize = 64 * 1024;
const PARSE_WAIT: Duration = Duration::from_secs(1);

/// The group's lag as last read (`Err` when Redis did not answer), and when.
#[derive(Debug, Clone, Copy)]
struct LagSample {
    at: Instant,
    lag: Result<u64, ()>,
}

impl Requests {
    pub fn new(
        queues: RequestQueues,
        store: ProgressStore,
        blobs: BlobStore,
        waiters: Arc<Waiters>,
        handlers: BTreeSet<String>,
        settings: Settings,
        draining: CancellationToken,
    ) -> Requests {
        Requests {
            queues,
            store,
            blobs,
            waiters,
            handlers,
            settings,
            lag: tokio::sync::Mutex::new(None),
            draining,
            parsing: tokio::sync::Semaphore::new(PARSE_BUDGET_KIB),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The request queue, every partition.
    pub fn queues(&self) -> &RequestQueues {
        &self.queues
    }

    /// Creates the consumer group of every partition unless it exists.
    pub async fn ensure_group(&self) -> Result<(), RequestsError> {
        bounded("ensure_group", self.queues.ensure_groups()).await
    }

    /// Whether `grant` may see (read, watch, cancel) request `id`: it must read the request's
    /// progress key. Costs a read only when the grant is limited.
    pub async fn check_access(&self, id: &str, grant: &Grant) -> Result<(), RequestsError> {
        if grant.is_admin() {
            return Ok(());
        }
        let record = self.record(id).await?;
        grant.read(record.progress_key.as_str())?;
        Ok(())
    }

    /// Validates and queues a submission body, then waits up to `wait` for its outcome.
    ///
    /// The request's progress node (`status: waiting`) is written in the same atomic step that
    /// stores and queues the request, so it exists as soon as the client has an answer, no
    /// processor report can be overwritten by it, and a submission that repeats an earlier one
    /// (same idempotency key) writes nothing.
    ///
    /// `traceparent` is stored with the request: its processing continues that trace.
    pub async fn submit(
        &self,
        body: &[u8],
        wait: Option<Duration>,
        traceparent: Option<String>,
        grant: &Grant,
    ) -> Result<Submitted, RequestsError> {
        let submitted = self.try_submit(body, wait, traceparent, grant).await;
        if let Err(error) = &submitted {
            record_rejection(error.rejection_reason());
        }
        submitted
    }

    async fn try_submit(
        &self,
        body: &[u8],
        wait: Option<Duration>,
        traceparent: Option<String>,
        grant: &Grant,
    ) -> Result<Submitted, RequestsError> {
        // A large body parses only within the budget, and keeps its share until it is stored.
        let _parsing = self.parse_budget(body.len()).await?;
        let submission = Submission::from_slice(body)?;
        match self.prepare(submission, wait, grant).await? {
            Prepared::Answered(submitted) => Ok(*submitted),
            Prepared::New(new) => self.queue_new(*new, Vec::new(), wait, traceparent).await,
        }
    }

    /// A share of the parse budget for a body of `len` bytes (none needed for small ones).
    pub(crate) async fn parse_budget(
        &self,
        len: usize,
    ) -> Result<Option<tokio::sync::SemaphorePermit<'_>>, RequestsError> {
        if len <= LARGE_BODY {
            return Ok(None);
        }
        let kib = u32::try_from(len.div_ceil(1024).min(PARSE_BUDGET_KIB)).unwrap_or(u32::MAX);
        match tokio::time::timeout(PARSE_WAIT, self.parsing.acquire_many(kib)).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(RequestsError::Busy),
        }
    }

    /// Everything decided before a request is stored: handler, backpressure, an idempotent
    /// repeat (answered at once, before its uploads are looked for: the first submission may
    /// have used them), the uploads its streams name and their sizes.
    pub(crate) async fn prepare(
        &self,
        submission: Submission,
        wait: Option<Duration>,
        grant: &Grant,
    ) -> Result<Prepared, RequestsError> {
        grant.submit(&submission.handler)?;
        if let Some(key) = &submission.progress_key {
            grant.write(key.as_str())?;
        }
        self.check_handler(&submission.handler)?;
        self.check_backpressure().await?;
        if let Some(key) = &submission.idempotency_key {
            let fingerprint = submission.fingerprint();
            match bounded("idempotency", self.queues.idempotent(key, &fingerprint)).await? {
                Some((existing, true)) => {
                    return Ok(Prepared::Answered(Box::new(self.known(&existing, wait).await?)));
                }
                Some((_, false)) => return Err(RequestsError::IdempotencyConflict { key: key.clone() }),
                None => {}
            }
        }
        let mut uploads = Vec::new();
        let mut total = 0u64;
        for (name, upload) in &submission.streams {
            let info = bounded("upload info", self.blobs.info(&self.blobs.upload_key(upload))).await?;
            let Some(info) = info else {
                return Err(RequestsError::UploadMissing { name: name.clone(), upload: upload.clone() });
            };
            if !info.is_complete() {
                let detail = format!("{} of {}", info.offset, info.length.unwrap_or(0));
                return Err(RequestsError::UploadIncomplete {
                    name: name.clone(),
                    upload: upload.clone(),
                    detail,
                });
            }
            if info.offset > self.settings.max_stream_bytes {
                return Err(RequestsError::StreamTooLarge {
                    name: name.clone(),
                    max: self.settings.max_stream_bytes,
                });
            }
            total += info.offset;
            if total > self.settings.max_request_stream_bytes {
                let max = self.settings.max_request_stream_bytes;
                return Err(RequestsError::StreamsTooLarge { name: name.clone(), max });
            }
            uploads.push((StreamInfo { name: name.clone(), bytes: info.offset }, upload.clone()));
        }
        let id = self.new_id(submission.idempotency_key.as_deref(), &uploads);
        let record = RequestRecord::queued(id, submission, self.settings.default_max_attempts, now_ms());
        if !uploads.is_empty() {
            stream_node(&record.progress_key, &uploads[0].0.name)?;
        }
        Ok(Prepared::New(Box::new(NewRequest { record, uploads, upload_bytes: total })))
    }

    /// Stores and queues a prepared request with its streams: `inline` ones already written at
    /// the request's stream keys (a multipart body's parts), and the uploads it names. Inline
    /// streams are removed again if the request is not stored.
    ///
    /// The submission's own step takes an upload over (renames it to the request's stream key)
    /// when both are in one slot: always on one Redis, and on a Redis Cluster for an upload of
    /// the request's partition. An upload of another partition (a request with several uploads,
    /// or with an idempotency key) is copied to the request's stream key first, expiring like an
    /// inline stream until the request is stored, and deleted once it is.
    pub(crate) async fn queue_new(
        &self,
        new: NewRequest,
        mut inline: Vec<StreamInfo>,
        wait: Option<Duration>,
        traceparent: Option<String>,
    ) -> Result<Submitted, RequestsError> {
        let NewRequest { mut record, uploads, .. } = new;
        record.traceparent = traceparent;
        let id = record.id.clone();
        let (taken, copied): (Vec<_>, Vec<_>) =
            uploads.into_iter().partition(|(_, upload)| !self.must_copy(&id, upload));
        let claimant = upload_claimant(&id, record.idempotency_key.as_deref());
        for (info, upload) in &copied {
            let copy = async {
                self.claim_upload(&info.name, upload, &claimant).await?;
                crate::streams::copy_upload(self, &id, &info.name, upload).await
            };
            match copy.await {
                Ok(()) => inline.push(info.clone()),
                Err(error) => {
                    self.release_uploads(&copied, &claimant).await;
                    self.drop_streams(&id, &record.progress_key, &inline).await;
                    return match (error, record.idempotency_key.as_deref()) {
                        // Another submission with this key took the upload meanwhile: its repeat.
                        (error @ RequestsError::UploadMissing { .. }, Some(key)) => {
                            match bounded("idempotency", self.queues.idempotent(key, &record.fingerprint))
                                .await?
                            {
                                Some((existing, true)) => self.known(&existing, wait).await,
                                Some((_, false)) => {
                                    Err(RequestsError::IdempotencyConflict { key: key.to_owned() })
                                }
                                None => Err(error),
                            }
                        }
                        (error, _) => Err(error),
                    };
                }
            }
        }
        let mut sources: Vec<StreamSource> =
            inline.iter().map(|s| StreamSource { name: s.name.clone(), upload: None }).collect();
        let mut streams = inline.clone();
        for (info, upload) in &taken {
            sources
                .push(StreamSource { name: info.name.clone(), upload: Some(self.blobs.upload_key(upload)) });
            streams.push(info.clone());
        }
        streams.sort_by(|a, b| a.name.cmp(&b.name));
        record.streams = streams;
        // An upload's bytes all arrived before the request: its stream node says so first.
        for (info, _) in taken.iter().chain(&copied) {
            self.report_stream(&record.progress_key, &info.name, info.bytes, Some(info.bytes)).await;
        }
        let progress_key = record.progress_key.clone();
        let copied_uploads: Vec<&str> = copied.iter().map(|(_, upload)| upload.as_str()).collect();
        let outcome = self.store_record(record, wait, &sources, &copied_uploads).await;
        let stored = match &outcome {
            Ok(Submitted::Queued(_)) => true,
            Ok(Submitted::Known(view)) => view.record.id == id,
            Err(_) => false,
        };
        if !stored {
            self.release_uploads(&copied, &claimant).await;
            self.drop_streams(&id, &progress_key, &inline).await;
        }
        outcome
    }

    /// Claims an upload this submission copies ([`BlobStore::claim`]) until its copy is stored
    /// or expires: one held by another submission is [`RequestsError::UploadMissing`].
    async fn claim_upload(&self, name: &str, upload: &str, claimant: &str) -> Result<(), RequestsError> {
        let hold_ms = u64::try_from(self.settings.stream_expiry.as_millis()).unwrap_or(u64::MAX / 2);
        let key = self.blobs.upload_key(upload);
        match bounded("claim upload", self.blobs.claim(&key, claimant, hold_ms)).await? {
            Claim::Taken => Ok(()),
            Claim::Missing | Claim::Held(_) => {
                Err(RequestsError::UploadMissing { name: name.to_owned(), upload: upload.to_owned() })
            }
        }
    }

    /// Gives up this submission's claims on the uploads it was to copy (a failed submission).
    async fn release_uploads(&self, uploads: &[(StreamInfo, String)], claimant: &str) {
        for (_, upload) in uploads {
            let key = self.blobs.upload_key(upload);
            if let Err(error) = bounded("release upload", self.blobs.release(&key, claimant)).await {
                warn!(%upload, %error, "cannot release an upload's claim; it lapses");
            }
        }
    }

    /// Whether upload `upload` is in another slot than the request `id`'s streams, so the
    /// submission cannot take it over itself: on a Redis Cluster, in another partition.
    fn must_copy(&self, id: &str, upload: &str) -> bool {
        let layout = self.queues.layout();
        layout.tagged && layout.partition_of(upload) != layout.partition_of(id)
    }

    /// Removes streams written for a request that was not stored, and their progress nodes
    /// when they are in the request's own tree (`_requests.{id}`, which nothing else uses; a
    /// progress key the client chose may hold another request's nodes).
    pub(crate) async fn drop_streams(&self, id: &str, progress_key: &Key, streams: &[StreamInfo]) {
        for stream in streams {
            let _ = bounded("drop stream", self.blobs.delete(&self.blobs.stream_key(id, &stream.name))).await;
        }
        if *progress_key == cairn_requests::default_progress_key(id) {
            let _ = bounded("drop stream nodes", self.store.delete(progress_key, now_ms())).await;
        }
    }

    /// Writes received bytes to `{progress_key}.streams.{name}` (weight 1); with `total`, the
    /// stream is whole. A failure is logged, never the client's problem.
    pub(crate) async fn report_stream(&self, progress_key: &Key, name: &str, bytes: u64, total: Option<u64>) {
        let Ok(key) = stream_node(progress_key, name) else { return };
        let update = match total {
            Some(total) => crate::uploads::bytes_update(bytes, total, true),
            None => Update::new().status("running").field("bytes", bytes),
        };
        if let Err(error) = self.report(&key, update.weight(1.0)).await {
            debug!(%error, stream = name, "cannot report a stream's received bytes");
        }
    }

    /// Stores a new record (with its streams) and answers as a submission does. Once it is
    /// stored, before any wait, the uploads in `copied` (copied into its streams) are deleted.
    async fn store_record(
        &self,
        record: RequestRecord,
        wait: Option<Duration>,
        streams: &[StreamSource],
        copied: &[&str],
    ) -> Result<Submitted, RequestsError> {
        let id = record.id.clone();
        let waiter = wait.map(|_| self.waiters.register(&id));
        let ttl_ms = u64::try_from(self.settings.idempotency_ttl.as_millis()).unwrap_or(u64::MAX);
        let waiting = RequestState::Queued
            .progress_update()
            .field("request_id", record.id.as_str())
            .field("handler", record.handler.as_str());
        let reply_to = Some(self.settings.reply_stream.as_str());
        let outcome = bounded(
            "submit",
            self.queues.of(&id).submit_with_streams(&record, reply_to, ttl_ms, Some(&waiting), streams),
        )
        .await?;
        match outcome {
            SubmitOutcome::Created { entry_id } => {
                info!(request = %id, handler = %record.handler, entry = %entry_id, streams = record.streams.len(), "request queued");
                metrics::counter!("cairn_requests_submitted_total").increment(1);
                for upload in copied {
                    let key = self.blobs.upload_key(upload);
                    if let Err(error) = bounded("delete upload", self.blobs.delete(&key)).await {
                        warn!(request = %id, %upload, %error, "cannot delete an upload the request copied; it expires");
                    }
                }
                let record = match (wait, &waiter) {
                    (Some(wait), Some(waiter)) => self.wait_terminal(record, waiter, wait).await,
                    _ => record,
                };
                if record.state.is_terminal() {
                    Ok(Submitted::Known(self.view(record).await))
                } else {
                    Ok(Submitted::Queued(record))
                }
            }
            SubmitOutcome::Existing { id: existing } => {
                debug!(request = %existing, "idempotent submission answered with the earlier request");
                self.known(&existing, wait).await
            }
            SubmitOutcome::Conflict { .. } => {
                let key = record.idempotency_key.unwrap_or_default();
                Err(RequestsError::IdempotencyConflict { key })
            }
            SubmitOutcome::StreamMissing { name } => {
                let upload = upload_of(&record.streams, streams, &name);
                Err(RequestsError::UploadMissing { name, upload })
            }
            SubmitOutcome::StreamIncomplete { name, detail } => {
                let upload = upload_of(&record.streams, streams, &name);
                Err(RequestsError::UploadIncomplete { name, upload, detail: detail.replace('/', " of ") })
            }
        }
    }

    /// An earlier request an idempotent repeat names, waited on as the client asked.
    async fn known(&self, existing: &str, wait: Option<Duration>) -> Result<Submitted, RequestsError> {
        let waiter = wait.map(|_| self.waiters.register(existing));
        let stored = self.record(existing).await?;
        let stored = match (wait, &waiter) {
            (Some(wait), Some(waiter)) => self.wait_terminal(stored, waiter, wait).await,
            _ => stored,
        };
        Ok(Submitted::Known(self.view(stored).await))
    }

    /// The blob store of streams and uploads.
    pub(crate) fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// A new request's id, from the queue's layout: in the partition of its idempotency key (the
    /// key's claim and the request share a slot), else in the partition of its first upload (on a
    /// Redis Cluster the submission then takes that upload over in its own step), else wherever
    /// it falls.
    fn new_id(&self, idempotency_key: Option<&str>, uploads: &[(StreamInfo, String)]) -> String {
        match (idempotency_key, uploads.first()) {
            (None, Some((_, upload))) => {
                self.queues.new_id_in(Some(self.queues.layout().partition_of(upload)))
            }
            (key, _) => self.queues.new_id(key),
        }
    }

    fn check_handler(&self, name: &str) -> Result<(), RequestsError> {
        if self.handlers.contains(name) {
            return Ok(());
        }
        let known = self.handlers.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
        Err(RequestsError::UnknownHandler { name: name.to_owned(), known })
    }

    /// Refuses work while the group's lag is above the bound. The lag is read at most every
    /// [`LAG_MAX_AGE`]; a failed read is remembered as long, so a stalled Redis costs one
    /// bounded call per interval rather than one per submission.
    async fn check_backpressure(&self) -> Result<(), RequestsError> {
        let mut sample = self.lag.lock().await;
        let lag = match *sample {
            Some(LagSample { at, lag }) if at.elapsed() <= LAG_MAX_AGE => lag,
            _ => {
                let lag = self.read_lag().await.map_err(drop);
                *sample = Some(LagSample { at: Instant::now(), lag });
                lag
            }
        };
        drop(sample);
        match lag {
            Err(()) => Err(RequestsError::Unavailable),
            Ok(lag) if lag > self.settings.max_lag => {
                debug!(lag, max = self.settings.max_lag, "refusing a submission: the queue is too long");
                Err(RequestsError::Overloaded { lag, max: self.settings.max_lag })
            }
            Ok(_) => Ok(()),
        }
    }

    /// The group's lag. A stream or group that does not exist (Redis lost its data, or started
    /// after this replica) is made again, with no lag.
    async fn read_lag(&self) -> Result<u64, RequestsError> {
        if let Some(lag) = bounded("lag", self.queues.lag()).await? {
            return Ok(lag);
        }
        debug!("the request group's lag is unknown; making sure the group exists");
        self.ensure_group().await?;
        Ok(0)
    }

    async fn report(&self, key: &Key, update: Update) -> Result<(), RequestsError> {
        let change = Change { key: key.clone(), update, time_ms: now_ms() };
        bounded("progress apply", self.store.apply(std::slice::from_ref(&change))).await
    }

    /// Waits until the request is terminal, `wait` has passed or the replica drains; the record
    /// as last read. Woken by replies; re-reads on a timer too, for a reply that was missed (the
    /// reader reconnecting) or that went to another replica (a long-poll `GET` of a request
    /// submitted elsewhere). The timer starts at `poll_interval` and doubles up to
    /// [`MAX_POLL_INTERVAL`], so ten thousand long waits cost a few reads a second, not twenty
    /// thousand.
    async fn wait_terminal(
        &self,
        mut record: RequestRecord,
        waiter: &Waiter,
        wait: Duration,
    ) -> RequestRecord {
        let deadline = Instant::now() + wait;
        let mut interval = self.settings.poll_interval;
        loop {
            let now = Instant::now();
            if record.state.is_terminal() || now >= deadline || self.draining.is_cancelled() {
                return record;
            }
            let nap = interval.min(deadline - now);
            interval = (interval * 2).min(MAX_POLL_INTERVAL.max(self.settings.poll_interval));
            tokio::select! {
                () = waiter.notified() => {}
                () = tokio::time::sleep(nap) => {}
                () = self.draining.cancelled() => return record,
            }
            match bounded("record", self.queues.record(&record.id)).await {
                Ok(Some(latest)) => record = latest,
                // Purged while we waited: what we have is all there is.
                Ok(None) => return record,
                // Keep waiting: Redis may be back before the deadline.
                Err(_) => {}
            }
        }
    }

    async fn record(&self, id: &str) -> Result<RequestRecord, RequestsError> {
        bounded("record", self.queues.record(id))
            .await?
            .ok_or_else(|| RequestsError::Missing { id: id.to_owned() })
    }

    /// The record with its progress; a progress read that fails shows as no progress.
    async fn view(&self, record: RequestRecord) -> RequestView {
        // Done is done: the processor's last report (progress 1) reaches the node over AMQP a
        // little later, and showing the node's older value until then would contradict the
        // state. It also spares the answer to `Prefer: wait` a Redis round trip.
        if record.state == RequestState::Succeeded {
            return RequestView { record, progress: Some(1.0) };
        }
        let node =
            bounded("progress get", self.store.get(&record.progress_key, &ReadOptions::default())).await;
        let node = node.ok().flatten().map(|node| (node.progress(), node.update_time));
        let progress = shown_progress(node, &record);
        RequestView { record, progress }
    }

    /// A request by id; with `wait`, once it is terminal or `wait` has passed.
    pub async fn get(&self, id: &str, wait: Option<Duration>) -> Result<RequestView, RequestsError> {
        let waiter = wait.map(|_| self.waiters.register(id));
        let mut record = self.record(id).await?;
        if let (Some(wait), Some(waiter)) = (wait, &waiter) {
            record = self.wait_terminal(record, waiter, wait).await;
        }
        Ok(self.view(record).await)
    }

    /// Cancels a request: a queued one never runs (its progress node says so at once), a running
    /// one is signalled to its processor.
    pub async fn cancel(&self, id: &str) -> Result<Canceled, RequestsError> {
        match bounded("cancel", self.queues.cancel(id, now_ms())).await? {
            CancelOutcome::Missing => Err(RequestsError::Missing { id: id.to_owned() }),
            CancelOutcome::AlreadyFinished(state) => {
                Err(RequestsError::AlreadyFinished { id: id.to_owned(), state })
            }
            CancelOutcome::Signaled => {
                info!(request = %id, "cancellation signalled to the running request");
                Ok(Canceled::Signaled)
            }
            CancelOutcome::Canceled => {
                info!(request = %id, "queued request canceled");
                // No processor will report on it: the processor that receives it only acks it.
                let reported = async {
                    let record = self.record(id).await?;
                    let update = RequestState::Canceled.progress_update().msg("canceled before it ran");
                    self.report(&record.progress_key, update).await
                };
                if let Err(error) = reported.await {
                    warn!(request = %id, %error, "cannot mark the canceled request's progress node");
                }
                Ok(Canceled::Queued)
            }
        }
    }

    /// Up to `limit` dead letters older than the entry id `after` (`-`: from the newest), newest
    /// first across partitions. A page ends after every letter that shares its last entry id
    /// ([`through_ties`]), so it may hold a few more than `limit`.
    pub async fn dead_letters(&self, after: &str, limit: usize) -> Result<Vec<DeadLetter>, RequestsError> {
        let layout = self.queues.layout();
        // One Redis keeps one dead-letter stream; a cluster one per partition.
        let streams = if layout.tagged { usize::from(layout.partitions) } else { 1 };
        let letters = bounded("dead letters", self.queues.dead_letters(after, limit + streams - 1)).await?;
        Ok(through_ties(letters, limit, |letter| &letter.entry_id))
    }

    /// A dead request; any other state is [`RequestsError::NotDeadLetter`].
    pub async fn dead_letter(&self, id: &str) -> Result<RequestView, RequestsError> {
        let record = self.record(id).await?;
        if record.state != RequestState::Dead {
            return Err(RequestsError::NotDeadLetter { id: id.to_owned(), state: record.state });
        }
        Ok(self.view(record).await)
    }

    /// Queues a dead request again with fresh attempts; its progress node shows it waiting.
    pub async fn retry_dead(&self, id: &str) -> Result<(), RequestsError> {
        let record = self.record(id).await?;
        if record.state != RequestState::Dead {
            return Err(RequestsError::NotDead { id: id.to_owned(), state: record.state.to_string() });
        }
        // Before the retry, so the processor's report of the new run comes after it.
        let update = RequestState::Queued.progress_update().msg("queued again from the dead letters");
        self.report(&record.progress_key, update).await?;
        match bounded("retry dead", self.queues.retry_dead(id, now_ms())).await? {
            RetryOutcome::Queued { entry_id } => {
                info!(request = %id, entry = %entry_id, "dead request queued again");
                Ok(())
            }
            RetryOutcome::Missing => Err(RequestsError::Missing { id: id.to_owned() }),
            RetryOutcome::NotDead(state) => Err(RequestsError::NotDead { id: id.to_owned(), state }),
        }
    }

    /// Removes this replica's reply stream (at shutdown); replies still on their way recreate it
    /// and it expires on its own.
    pub async fn drop_reply_stream(&self) {
        let Some(queue) = self.queues.partitions().first() else { return };
        if bounded("drop replies", queue.drop_replies(&self.settings.reply_stream)).await.is_err() {
            debug!(stream = %self.settings.reply_stream, "reply stream not removed at shutdown");
        }
    }
}

/// A request prepared for storing, or the answer an idempotent repeat already has.
pub(crate) enum Prepared {
    New(Box<NewRequest>),
    Answered(Box<Submitted>),
}

/// A request about to be stored: its record and the finished uploads its streams take.
pub(crate) struct NewRequest {
    pub record: RequestRecord,
    /// Each named upload as its stream, with the upload's id.
    pub uploads: Vec<(StreamInfo, String)>,
    /// Bytes of those uploads, all together.
    pub upload_bytes: u64,
}

/// The progress node of a request's data stream, `{progress_key}.streams.{name}`.
pub(crate) fn stream_node(progress_key: &Key, name: &str) -> Result<Key, RequestsError> {
    Key::parse(&format!("{progress_key}.streams.{name}")).map_err(|e| {
        RequestsError::BadStreams(format!(
            "data stream {name:?} cannot report under progress_key {progress_key:?}: {e}"
        ))
    })
}

fn upload_of(_streams: &[StreamInfo], sources: &[StreamSource], name: &str) -> String {
    sources
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| s.upload.as_deref())
        .and_then(|key| key.rsplit(':').next())
        .unwrap_or_default()
        .to_owned()
}

/// The first `n` of `items` (newest first by stream entry id) and those right after them that
/// share the `n`th one's entry id. The streams of different partitions can give two entries one
/// id, and a page that ended between them would lose the rest to a cursor that continues with
/// the entries older than that id.
pub(crate) fn through_ties<T>(mut items: Vec<T>, n: usize, id: impl Fn(&T) -> &str) -> Vec<T> {
    if n == 0 || items.len() <= n {
        return items;
    }
    let end = n + items[n..].iter().take_while(|item| id(item) == id(&items[n - 1])).count();
    items.truncate(end);
    items
}

/// An error of the Redis layers by its kind: Redis being away (retryable) versus a reply that
/// makes no sense or a call Redis refused.
fn classify(call: &'static str, e: impl ServiceError) -> RequestsError {
    if e.kind().is_retryable() {
        warn!(call, error = %e, "redis call failed");
        RequestsError::Unavailable
    } else {
        error!(call, error = %e, "redis call answered something unexpected");
        RequestsError::Internal
    }
}

fn timed_out(call: &'static str) -> RequestsError {
    warn!(call, timeout = ?REDIS_TIMEOUT, "redis did not answer in time");
    RequestsError::Unavailable
}

/// Runs one Redis call within [`REDIS_TIMEOUT`].
async fn bounded<T, E: ServiceError>(
    call: &'static str,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, RequestsError> {
    match tokio::time::timeout(REDIS_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(classify(call, e)),
        Err(_) => Err(timed_out(call)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_adds_progress_and_its_url() {
        let record = RequestRecord::queued(
            "0190f5c2-7b8e-4c3d-9a2b-123456789abc".into(),
            Submission::new("echo", json!({"x": 1})),
            3,
            7,
        );
        let view = RequestView { record: record.clone(), progress: Some(0.5) }.to_json();
        assert_eq!(view["progress"], json!(0.5));
        assert_eq!(view["progress_url"], "/status/_requests.0190f5c2-7b8e-4c3d-9a2b-123456789abc");
        assert_eq!(view["state"], "queued");
        assert!(view.get("payload").is_none(), "the payload is not shown");
        let none = RequestView { record, progress: None }.to_json();
        assert!(none.as_object().unwrap().contains_key("progress") && none["progress"].is_null());
    }

    #[test]
    fn heartbeat_progress_shows_when_the_node_has_not_heard_of_it() {
        let mut record = RequestRecord::queued("r1".into(), Submission::new("echo", json!(1)), 3, 7);
        assert_eq!(shown_progress(None, &record), None);
        assert_eq!(shown_progress(Some((None, 100)), &record), Some(0.0), "a node without progress");
        assert_eq!(shown_progress(Some((Some(0.3), 100)), &record), Some(0.3));
        record.heartbeat_progress = Some(0.6);
        record.heartbeat_ms = Some(200);
        assert_eq!(shown_progress(Some((Some(0.3), 100)), &record), Some(0.6), "the node lags behind");
        assert_eq!(shown_progress(Some((Some(0.7), 250)), &record), Some(0.7), "the node is newer");
        assert_eq!(shown_progress(Some((None, 250)), &record), Some(0.6), "the node has no progress");
        assert_eq!(shown_progress(None, &record), Some(0.6), "no node at all");
    }

    #[test]
    fn a_page_never_ends_between_entries_sharing_an_id() {
        let ids = ["9-0", "8-0", "8-0", "8-0", "7-1", "7-0"];
        let page = |n| through_ties(ids.to_vec(), n, |id| id);
        assert_eq!(page(1), ["9-0"]);
        assert_eq!(page(2), ["9-0", "8-0", "8-0", "8-0"], "ties of the last one come along");
        assert_eq!(page(4), ["9-0", "8-0", "8-0", "8-0"]);
        assert_eq!(page(5), ["9-0", "8-0", "8-0", "8-0", "7-1"]);
        assert_eq!(page(9), ids, "short of n: all of it");
    }

    #[test]
    fn rejections_have_bounded_reasons() {
        let too_large = RequestsError::Invalid(SubmitError::BodyTooLarge { bytes: 3, max: 2 });
        assert_eq!(too_large.rejection_reason(), "too_large");
        assert_eq!(RequestsError::Invalid(SubmitError::NotAnObject).rejection_reason(), "invalid");
        let unknown = RequestsError::UnknownHandler { name: "x".into(), known: "echo".into() };
        assert_eq!(unknown.rejection_reason(), "unknown_handler");
        assert_eq!(unknown.to_string(), "unknown handler \"x\"; this deployment has: echo");
        assert_eq!(RequestsError::Overloaded { lag: 5, max: 3 }.rejection_reason(), "backpressure");
        let conflict = RequestsError::IdempotencyConflict { key: "k".into() };
        assert_eq!(
            conflict.to_string(),
            "idempotency key \"k\" was already used with a different request body"
        );
    }
}
