//! The processing loop: read entries from the consumer group of every partition of the request
//! queue, run them through handlers, keep their leases alive, store outcomes, and reclaim the
//! entries of dead processors.
//!
//! Each partition is worked on its own (`Partition`): a reader with its own blocking
//! connection, its own reclaim (`XAUTOCLAIM`), heartbeats and group commit, and its own registry
//! of in-flight runs (entry ids are unique only within a partition's stream). What the
//! partitions share is one concurrency limit: `concurrency` permits, each held by a run or by a
//! reader about to read what it can start.
//!
//! Invariants: an entry is acked only by the commit step that stores its outcome (one fenced Lua
//! call); a run whose lease was lost stops without storing anything; at most `concurrency` runs
//! are in flight, and nothing is read that cannot start at once, so shutdown leaves nothing of
//! ours pending once in-flight runs finish. A reader waiting on an idle partition holds at most
//! one permit when there are several (`intake::Holding`), so idle partitions never starve a
//! busy one.
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
use cairn_redis::requests::{Entry, QueueError, RequestQueue, RequestQueues, Start};
use cairn_redis::{RedisConfig, RedisConnection};
use cairn_requests::{Backoff, LeaseSettings};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, error, info, info_span, warn};

pub use commit::Committer;

use crate::handler::HandlerSet;
use intake::{Holding, READ_SLACK, Reconnect};
use registry::{Registry, Stop};

/// How the processor runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This processor's consumer name in the group; unique per process.
    pub consumer: String,
    /// Requests run at once, across every partition.
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
    /// Every partition of the request queue, each read by a reader of its own.
    pub queues: RequestQueues,
    /// Where requests' data streams are read (built with the queue's layout).
    pub blobs: cairn_redis::BlobStore,
    pub handlers: HandlerSet,
    pub publisher: ProgressPublisher,
    pub settings: Settings,
}

/// One partition as this processor works it: its queue, the group commit of its outcomes and
/// its in-flight runs, keyed by entry id (two partitions' streams can hand out the same ids).
struct Partition {
    queue: RequestQueue,
    committer: Committer,
    registry: Registry,
}

/// What the readers of every partition share.
struct Readers {
    deps: Arc<Deps>,
    redis: RedisConfig,
    /// The one concurrency limit: a permit per run, or per entry a reader is about to read.
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    holding: Holding,
    shutdown: CancellationToken,
}

/// Runs until `shutdown` fires, then stops every partition's intake, lets in-flight runs finish
/// within `grace`, stops the rest (they stay pending; their leases run out and another processor
/// takes them) and closes the progress publisher.
pub async fn run(deps: Arc<Deps>, redis: RedisConfig, shutdown: CancellationToken, grace: Duration) {
    let consumer = deps.settings.consumer.clone();
    let partitions: Vec<Arc<Partition>> = deps
        .queues
        .partitions()
        .iter()
        .map(|queue| {
            Arc::new(Partition {
                queue: queue.clone(),
                committer: Committer::start(queue.clone(), consumer.clone()),
                registry: Registry::default(),
            })
        })
        .collect();
    let readers = Arc::new(Readers {
        deps: deps.clone(),
        redis,
        permits: Arc::new(Semaphore::new(deps.settings.concurrency)),
        tasks: TaskTracker::new(),
        holding: Holding::of(partitions.len()),
        shutdown,
    });
    let heartbeats_stop = CancellationToken::new();
    let mut heartbeats = JoinSet::new();
    let mut reading = JoinSet::new();
    for partition in &partitions {
        heartbeats.spawn(heartbeat::heartbeat_loop(deps.clone(), partition.clone(), heartbeats_stop.clone()));
        reading.spawn(read_partition(readers.clone(), partition.clone()));
    }
    info!(
        consumer = %consumer,
        concurrency = deps.settings.concurrency,
        partitions = partitions.len(),
        "processing requests"
    );
    while let Some(ended) = reading.join_next().await {
        if let Err(join) = ended {
            error!(error = %join, "a request reader stopped unexpectedly");
        }
    }

    let in_flight: usize = partitions.iter().map(|p| p.registry.len()).sum();
    info!(in_flight, grace = ?grace, "stopping: no new requests are read");
    let tasks = &readers.tasks;
    tasks.close();
    if !cairn_runtime::drain("request-processor", grace, tasks.wait()).await {
        for partition in &partitions {
            partition.registry.signal_all(Stop::Shutdown);
        }
        tasks.wait().await;
    }
    heartbeats_stop.cancel();
    while heartbeats.join_next().await.is_some() {}
    if let Err(error) = deps.publisher.close(Duration::from_secs(5)).await {
        warn!(%error, "progress reports not delivered before exit");
    }
}

/// One partition's intake until shutdown: reclaims its expired leases, reads its new entries
/// with a blocking connection of its own, and starts what it got.
async fn read_partition(readers: Arc<Readers>, partition: Arc<Partition>) {
    let Readers { deps, redis, permits, tasks, holding, shutdown } = &*readers;
    let queue = &partition.queue;
    let index = queue.names().partition;
    let consumer = deps.settings.consumer.as_str();
    let lease_ms = deps.settings.lease.lease_timeout.as_millis() as u64;
    let reclaim_every = deps.settings.lease.reclaim_interval();
    let block_ms = reclaim_every.min(Duration::from_secs(1)).as_millis().max(1) as usize;
    let mut next_reclaim = Instant::now();
    let mut reconnect = Reconnect::default();
    // The blocking reader has a connection of its own, made again whenever it breaks.
    let mut reader: Option<RedisConnection> = None;
    while !shutdown.is_cancelled() {
        let conn = match reader.as_mut() {
            Some(conn) => conn,
            None => match redis.dedicated_connection().await {
                Ok(conn) => reader.insert(conn),
                Err(error) => {
                    let delay = reconnect.failed();
                    warn!(%error, partition = index, retry_in = ?delay, "cannot connect the request reader");
                    if !Reconnect::wait(delay, shutdown).await {
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
        let mut batch = intake::take_permits(permits, first);
        // Reclaiming shares the permits with reading: one loop owns them, so neither starves.
        if Instant::now() >= next_reclaim {
            next_reclaim = Instant::now() + reclaim_every;
            match queue.reclaim(consumer, lease_ms, batch.len()).await {
                Ok(entries) if !entries.is_empty() => {
                    info!(
                        partition = index,
                        entries = entries.len(),
                        "reclaimed requests whose lease ran out"
                    );
                    metrics::counter!("cairn_requests_reclaimed_total").increment(entries.len() as u64);
                    dispatch(deps, &partition, tasks, entries, batch).await;
                    continue;
                }
                Ok(_) => {}
                Err(error) => warn!(%error, partition = index, "cannot reclaim expired leases"),
            }
        }
        batch.truncate(holding.while_blocked(batch.len()));
        let read = tokio::select! {
            () = shutdown.cancelled() => break,
            read = bounded_read(queue, conn, consumer, batch.len(), block_ms) => read,
        };
        let mut entries = match read {
            Ok(entries) => entries,
            Err(error) => {
                reader = None;
                if !recover(queue, error, &mut reconnect, shutdown).await {
                    break;
                }
                continue;
            }
        };
        let mut failed = None;
        if holding.reads_more(entries.len()) {
            // Work arrived: read what else can start with the permits free now, without waiting.
            intake::top_up(permits, &mut batch);
            let more = batch.len().saturating_sub(entries.len());
            if more > 0 {
                match bounded_read(queue, conn, consumer, more, 0).await {
                    Ok(rest) => entries.extend(rest),
                    Err(error) => failed = Some(error),
                }
            }
        }
        dispatch(deps, &partition, tasks, entries, batch).await;
        match failed {
            None => reconnect.succeeded(),
            Some(error) => {
                reader = None;
                if !recover(queue, error, &mut reconnect, shutdown).await {
                    break;
                }
            }
        }
    }
}

/// Reads up to `count` new entries of `queue`, waiting up to `block_ms` (0: not at all).
///
/// The reader's connection has no response timeout (BLOCK must wait), so a Redis that stops
/// answering (paused, a half-open connection) is noticed here: past its block time and some
/// slack the read counts as failed and the connection is made again.
async fn bounded_read(
    queue: &RequestQueue,
    conn: &mut RedisConnection,
    consumer: &str,
    count: usize,
    block_ms: usize,
) -> Result<Vec<Entry>, QueueError> {
    let limit = Duration::from_millis(block_ms as u64) + READ_SLACK;
    tokio::time::timeout(limit, queue.read_new(conn, consumer, count, block_ms))
        .await
        .unwrap_or_else(|_| Err(intake::read_timed_out()))
}

/// After a failed read: waits out the reconnection backoff (`false` when shutdown came first);
/// a group gone with Redis's data (no persistence) is made again.
async fn recover(
    queue: &RequestQueue,
    error: QueueError,
    reconnect: &mut Reconnect,
    shutdown: &CancellationToken,
) -> bool {
    if intake::group_missing(&error) {
        let _ = queue.ensure_group().await;
    }
    let delay = reconnect.failed();
    warn!(%error, partition = queue.names().partition, retry_in = ?delay, "cannot read requests");
    Reconnect::wait(delay, shutdown).await
}

/// Starts what was read or reclaimed from `partition` and spawns a run for each entry that may
/// run; permits left over are released.
async fn dispatch(
    deps: &Arc<Deps>,
    partition: &Arc<Partition>,
    tasks: &TaskTracker,
    entries: Vec<Entry>,
    mut permits: Vec<OwnedSemaphorePermit>,
) {
    // An entry this process still runs comes back when its lease ran out meanwhile (Redis away
    // for longer than the lease, say) and it reclaims its own entry: never run it twice.
    let entries: Vec<Entry> =
        entries.into_iter().filter(|entry| !partition.registry.contains(entry)).collect();
    if entries.is_empty() {
        return;
    }
    let starts = match partition.queue.start(&deps.settings.consumer, &entries, now_ms()).await {
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
                let (deps, partition) = (deps.clone(), partition.clone());
                // The request's span continues the trace its submission started (stored with it).
                let span = info_span!(
                    "process request",
                    otel.kind = "consumer",
                    cairn.request_id = %record.id,
                    cairn.handler = %record.handler,
                );
                cairn_runtime::telemetry::continue_trace(&span, record.traceparent.as_deref());
                tasks.spawn(async move {
                    let signals = partition.registry.insert(&entry, &record.progress_key);
                    step::run_request(&deps, &partition, &entry, *record, attempt, signals)
                        .instrument(span)
                        .await;
                    partition.registry.remove(&entry);
                    drop(permit);
                });
            }
            // start.lua wrote these to the request's own node, in the step that stored them.
            Start::Canceled | Start::Dead { .. } | Start::Skip | Start::Lost => {}
        }
    }
}
