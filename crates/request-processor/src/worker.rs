//! The processing loop: read entries from the consumer group, run them through handlers, keep
//! their leases alive, store outcomes, and reclaim the entries of dead processors.
//!
//! Invariants: an entry is acked only by the commit step that stores its outcome (one fenced Lua
//! call); a run whose lease was lost stops without storing anything; at most `concurrency` runs
//! are in flight, and nothing is read that cannot start at once, so shutdown leaves nothing of
//! ours pending once in-flight runs finish.
//!
//! This file is the loop; each concern is a submodule: `intake` (reader connection, its
//! backoff, permits, read errors), `step` (one attempt of one entry, and a run's retries),
//! `outcome` (the retry policy as pure functions), `attempt` (the handler task), `commit`
//! (group commit), `heartbeat` (lease renewal), `registry` (in-flight runs), `report`
//! (lifecycle progress).

mod attempt;
mod commit;
mod heartbeat;
mod intake;
mod outcome;
mod registry;
mod report;
mod step;

use cairn_progress::now_ms;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_amqp::ProgressPublisher;
use cairn_redis::RedisConfig;
use cairn_redis::requests::{Entry, RequestQueue, Start};
use cairn_requests::{Backoff, LeaseSettings};
use redis::aio::MultiplexedConnection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, info, info_span, warn};

pub use commit::Committer;

use crate::handler::HandlerSet;
use intake::{READ_SLACK, Reconnect};
use registry::{Registry, Stop};

/// How the processor runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This processor's consumer name in the group; unique per process.
    pub consumer: String,
    pub concurrency: usize,
    pub lease: LeaseSettings,
    pub backoff: Backoff,
    /// Base URL of the ingress, for the progress URL handed to handlers.
    pub public_url: String,
    /// Signs each run's progress token (auth on, with CAIRN_AUTH_JWT_SECRET).
    pub minter: Option<cairn_auth::Minter>,
}

/// Everything the loop needs.
pub struct Deps {
    pub queue: RequestQueue,
    /// Where requests' data streams are read.
    pub blobs: cairn_redis::BlobStore,
    pub handlers: HandlerSet,
    pub publisher: ProgressPublisher,
    pub settings: Settings,
    pub committer: Committer,
}

/// Runs until `shutdown` fires, then stops intake, lets in-flight runs finish within `grace`,
/// stops the rest (they stay pending; their leases run out and another processor takes them).
pub async fn run(deps: Arc<Deps>, redis: RedisConfig, shutdown: CancellationToken, grace: Duration) {
    let registry = Registry::default();
    let permits = Arc::new(Semaphore::new(deps.settings.concurrency));
    let tasks = TaskTracker::new();
    let heartbeats_stop = CancellationToken::new();
    let heartbeats =
        tokio::spawn(heartbeat::heartbeat_loop(deps.clone(), registry.clone(), heartbeats_stop.clone()));
    info!(consumer = %deps.settings.consumer, concurrency = deps.settings.concurrency, "processing requests");

    let lease_ms = deps.settings.lease.lease_timeout.as_millis() as u64;
    let reclaim_every = deps.settings.lease.reclaim_interval();
    let block_ms = reclaim_every.min(Duration::from_secs(1)).as_millis().max(1) as usize;
    let mut next_reclaim = Instant::now();
    let mut reconnect = Reconnect::default();
    // The blocking reader has a connection of its own, made again whenever it breaks.
    let mut reader: Option<MultiplexedConnection> = None;
    while !shutdown.is_cancelled() {
        let conn = match reader.as_mut() {
            Some(conn) => conn,
            None => match redis.dedicated().await {
                Ok(conn) => reader.insert(conn),
                Err(error) => {
                    let delay = reconnect.failed();
                    warn!(%error, retry_in = ?delay, "cannot connect the request reader");
                    if !Reconnect::wait(delay, &shutdown).await {
                        break;
                    }
                    continue;
                }
            },
        };
        // Read only what can start now: shutdown then never strands read-but-unstarted entries.
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore open"),
        };
        let batch = intake::take_permits(&permits, first);
        // Reclaiming shares the permits with reading: one loop owns them, so neither starves.
        if Instant::now() >= next_reclaim {
            next_reclaim = Instant::now() + reclaim_every;
            match deps.queue.reclaim(&deps.settings.consumer, lease_ms, batch.len()).await {
                Ok(entries) if !entries.is_empty() => {
                    info!(entries = entries.len(), "reclaimed requests whose lease ran out");
                    metrics::counter!("cairn_requests_reclaimed_total").increment(entries.len() as u64);
                    dispatch(&deps, &registry, &tasks, entries, batch).await;
                    continue;
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "cannot reclaim expired leases"),
            }
        }
        // The reader's connection has no response timeout (BLOCK must wait), so a Redis that
        // stops answering (paused, a half-open connection) is noticed here: past its block time
        // and some slack the read counts as failed and the connection is made again.
        let bounded = tokio::time::timeout(
            Duration::from_millis(block_ms as u64) + READ_SLACK,
            deps.queue.read_new(conn, &deps.settings.consumer, batch.len(), block_ms),
        );
        let read = tokio::select! {
            () = shutdown.cancelled() => break,
            read = bounded => read.unwrap_or_else(|_| Err(intake::read_timed_out())),
        };
        match read {
            Ok(entries) => {
                reconnect.succeeded();
                dispatch(&deps, &registry, &tasks, entries, batch).await;
            }
            Err(error) => {
                reader = None;
                if intake::group_missing(&error) {
                    // Redis came back without our data (no persistence): make the group again.
                    let _ = deps.queue.ensure_group().await;
                }
                let delay = reconnect.failed();
                warn!(%error, retry_in = ?delay, "cannot read requests");
                if !Reconnect::wait(delay, &shutdown).await {
                    break;
                }
            }
        }
    }

    info!(in_flight = registry.len(), grace = ?grace, "stopping: no new requests are read");
    tasks.close();
    if !cairn_runtime::drain("request-processor", grace, tasks.wait()).await {
        registry.signal_all(Stop::Shutdown);
        tasks.wait().await;
    }
    heartbeats_stop.cancel();
    let _ = heartbeats.await;
    if let Err(error) = deps.publisher.close(Duration::from_secs(5)).await {
        warn!(%error, "progress reports not delivered before exit");
    }
}

/// Starts what was read or reclaimed and spawns a run for each entry that may run.
async fn dispatch(
    deps: &Arc<Deps>,
    registry: &Registry,
    tasks: &TaskTracker,
    entries: Vec<Entry>,
    mut permits: Vec<OwnedSemaphorePermit>,
) {
    // An entry this process still runs comes back when its lease ran out meanwhile (Redis away
    // for longer than the lease, say) and it reclaims its own entry: never run it twice.
    let entries: Vec<Entry> = entries.into_iter().filter(|entry| !registry.contains(entry)).collect();
    if entries.is_empty() {
        return;
    }
    let starts = match deps.queue.start(&deps.settings.consumer, &entries, now_ms()).await {
        Ok(starts) => starts,
        Err(error) => {
            // They stay in our pending list; once their lease runs out they are reclaimed.
            warn!(%error, entries = entries.len(), "cannot start requests; they will be reclaimed");
            return;
        }
    };
    for (entry, start) in entries.into_iter().zip(starts) {
        match start {
            Start::Run { attempt, record } => {
                let Some(permit) = permits.pop() else {
                    warn!(entry = %entry.entry_id, "more entries than permits; left for reclaim");
                    continue;
                };
                let (deps, registry) = (deps.clone(), registry.clone());
                // The request's span continues the trace its submission started (stored with it).
                let span = info_span!(
                    "process request",
                    otel.kind = "consumer",
                    cairn.request_id = %record.id,
                    cairn.handler = %record.handler,
                );
                cairn_runtime::telemetry::continue_trace(&span, record.traceparent.as_deref());
                tasks.spawn(async move {
                    let signals = registry.insert(&entry, &record.progress_key);
                    step::run_request(&deps, &entry, *record, attempt, signals).instrument(span).await;
                    registry.remove(&entry);
                    drop(permit);
                });
            }
            // start.lua wrote these to the request's own node, in the step that stored them.
            Start::Canceled | Start::Dead { .. } | Start::Skip | Start::Lost => {}
        }
    }
}
