//! The processing loop: read entries from the consumer group, run them through handlers, keep
//! their leases alive, store outcomes, and reclaim the entries of dead processors.
//!
//! Invariants: an entry is acked only by the commit step that stores its outcome (one fenced Lua
//! call); a run whose lease was lost stops without storing anything; at most `concurrency` runs
//! are in flight, and nothing is read that cannot start at once, so shutdown leaves nothing of
//! ours pending once in-flight runs finish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_amqp::ProgressPublisher;
use cairn_progress::{Key, Update};
use cairn_redis::RedisConfig;
use cairn_redis::requests::{Commit, Entry, Heartbeat, QueueError, Renewal, RequestQueue, Start};
use cairn_requests::{Backoff, Failure, LeaseSettings, Next, RequestRecord, RequestState, next_step};
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::handler::{Context, HandlerError, HandlerSet, LastProgress};

/// How long past its block time a read of the request stream may take before the reader counts
/// Redis as gone.
const READ_SLACK: Duration = Duration::from_secs(5);

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
    pub handlers: HandlerSet,
    pub publisher: ProgressPublisher,
    pub settings: Settings,
    pub committer: Committer,
}

type CommitReply = oneshot::Sender<Result<bool, String>>;

/// Group commit: outcomes finished at about the same time go to Redis in one fenced script
/// call instead of one round trip each. Each caller still learns whether its own was stored.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<(Commit, CommitReply)>,
}

impl Committer {
    /// Most outcomes stored in one script call.
    const BATCH: usize = 256;

    pub fn start(queue: RequestQueue, consumer: String) -> Committer {
        let (tx, mut rx) = mpsc::channel::<(Commit, CommitReply)>(4 * Self::BATCH);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(Self::BATCH);
            while rx.recv_many(&mut batch, Self::BATCH).await > 0 {
                let (commits, replies): (Vec<Commit>, Vec<CommitReply>) = batch.drain(..).unzip();
                match queue.commit(&consumer, &commits, now_ms()).await {
                    Ok(stored) => {
                        for (reply, ok) in replies.into_iter().zip(stored) {
                            let _ = reply.send(Ok(ok));
                        }
                    }
                    Err(error) => {
                        for reply in replies {
                            let _ = reply.send(Err(error.to_string()));
                        }
                    }
                }
            }
        });
        Committer { tx }
    }

    /// Stores one outcome: `Ok(false)` when the lease was lost, `Err` when Redis failed.
    async fn commit(&self, commit: Commit) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((commit, reply)).await.map_err(|_| "committer stopped".to_owned())?;
        answer.await.map_err(|_| "committer stopped".to_owned())?
    }
}

/// Why a run was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Canceled,
    Lost,
    Shutdown,
}

struct Running {
    request_id: String,
    progress_key: Key,
    signals: RunSignals,
}

/// What a run shares with the registry: how it is told to stop, and where its handler's
/// progress is left for the heartbeats.
#[derive(Clone)]
struct RunSignals {
    cancel: CancellationToken,
    stop: Arc<Mutex<Option<Stop>>>,
    progress: Arc<LastProgress>,
}

impl RunSignals {
    /// Tells the run to stop, keeping the first reason it was given.
    fn stop(&self, reason: Stop) {
        self.stop.lock().expect("stop lock").get_or_insert(reason);
        self.cancel.cancel();
    }
}

/// The in-flight runs, by entry id.
#[derive(Default, Clone)]
struct Registry(Arc<Mutex<HashMap<String, Running>>>);

impl Registry {
    fn insert(&self, entry: &Entry, progress_key: &Key) -> RunSignals {
        let signals = RunSignals {
            cancel: CancellationToken::new(),
            stop: Arc::new(Mutex::new(None)),
            progress: Arc::new(LastProgress::new()),
        };
        let running = Running {
            request_id: entry.request_id.clone(),
            progress_key: progress_key.clone(),
            signals: signals.clone(),
        };
        self.0.lock().expect("registry lock").insert(entry.entry_id.clone(), running);
        signals
    }

    fn contains(&self, entry: &Entry) -> bool {
        self.0.lock().expect("registry lock").contains_key(&entry.entry_id)
    }

    fn remove(&self, entry: &Entry) {
        self.0.lock().expect("registry lock").remove(&entry.entry_id);
    }

    /// Every run's lease renewal, with the progress its handler last reported, and its node.
    fn renewals(&self) -> Vec<(Renewal, Key)> {
        let map = self.0.lock().expect("registry lock");
        map.iter()
            .map(|(e, r)| {
                let entry = Entry { entry_id: e.clone(), request_id: r.request_id.clone() };
                (Renewal { entry, progress: r.signals.progress.get() }, r.progress_key.clone())
            })
            .collect()
    }

    fn signal(&self, entry: &Entry, reason: Stop) {
        if let Some(running) = self.0.lock().expect("registry lock").get(&entry.entry_id) {
            running.signals.stop(reason);
        }
    }

    fn signal_all(&self, reason: Stop) {
        for running in self.0.lock().expect("registry lock").values() {
            running.signals.stop(reason);
        }
    }

    fn len(&self) -> usize {
        self.0.lock().expect("registry lock").len()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Runs until `shutdown` fires, then stops intake, lets in-flight runs finish within `grace`,
/// stops the rest (they stay pending; their leases run out and another processor takes them).
pub async fn run(deps: Arc<Deps>, redis: RedisConfig, shutdown: CancellationToken, grace: Duration) {
    let registry = Registry::default();
    let permits = Arc::new(Semaphore::new(deps.settings.concurrency));
    let tasks = TaskTracker::new();
    let heartbeats_stop = CancellationToken::new();
    let heartbeats = tokio::spawn(heartbeat_loop(deps.clone(), registry.clone(), heartbeats_stop.clone()));
    info!(consumer = %deps.settings.consumer, concurrency = deps.settings.concurrency, "processing requests");

    let lease_ms = deps.settings.lease.lease_timeout.as_millis() as u64;
    let reclaim_every = deps.settings.lease.reclaim_interval();
    let block_ms = reclaim_every.min(Duration::from_secs(1)).as_millis().max(1) as usize;
    let mut next_reclaim = Instant::now();
    let mut failures = 0u32;
    // The blocking reader has a connection of its own, made again whenever it breaks.
    let mut reader: Option<MultiplexedConnection> = None;
    while !shutdown.is_cancelled() {
        let conn = match reader.as_mut() {
            Some(conn) => conn,
            None => match redis.dedicated().await {
                Ok(conn) => reader.insert(conn),
                Err(error) => {
                    failures += 1;
                    let delay = Duration::from_millis(100 * u64::from(failures.min(20)));
                    warn!(%error, retry_in = ?delay, "cannot connect the request reader");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        // Read only what can start now: shutdown then never strands read-but-unstarted entries.
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore open"),
        };
        let mut batch = vec![first];
        while let Ok(permit) = permits.clone().try_acquire_owned() {
            batch.push(permit);
            if batch.len() >= 256 {
                break;
            }
        }
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
            read = bounded => read.unwrap_or_else(|_| {
                Err(QueueError::Redis(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "redis did not answer a blocking read in time",
                ))))
            }),
        };
        match read {
            Ok(entries) => {
                failures = 0;
                dispatch(&deps, &registry, &tasks, entries, batch).await;
            }
            Err(error) => {
                failures += 1;
                reader = None;
                if matches!(&error, QueueError::Redis(e) if e.code() == Some("NOGROUP")) {
                    // Redis came back without our data (no persistence): make the group again.
                    let _ = deps.queue.ensure_group().await;
                }
                let delay = Duration::from_millis(100 * u64::from(failures.min(20)));
                warn!(%error, retry_in = ?delay, "cannot read requests");
                tokio::time::sleep(delay).await;
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
                tasks.spawn(async move {
                    let signals = registry.insert(&entry, &record.progress_key);
                    run_request(&deps, &entry, *record, attempt, signals).await;
                    registry.remove(&entry);
                    drop(permit);
                });
            }
            // start.lua wrote these to the request's own node, in the step that stored them.
            Start::Canceled | Start::Dead { .. } | Start::Skip | Start::Lost => {}
        }
    }
}

/// Reports a request's lifecycle to its progress node (coalesced; never blocks the work).
fn report(deps: &Deps, record: &RequestRecord, state: RequestState, error: Option<&str>) {
    let key = record.progress_key.clone();
    let mut update = state
        .progress_update()
        .field("attempts", json!(record.attempts))
        .field("handler", json!(record.handler));
    if state == RequestState::Succeeded {
        update = update.progress(1.0);
    }
    if let Some(error) = error {
        update = update.msg(truncate(error, 1024));
    }
    deps.publisher.publish(key, update);
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// How one attempt ended.
enum Attempt {
    Done(Value),
    Failed(Failure),
    Stopped(Stop),
}

/// Runs a request's attempts until it ends here, or stops because its lease or the process ends.
async fn run_request(
    deps: &Arc<Deps>,
    entry: &Entry,
    mut record: RequestRecord,
    mut attempt: u32,
    signals: RunSignals,
) {
    let RunSignals { cancel, stop, .. } = &signals;
    loop {
        record.attempts = attempt;
        report(deps, &record, RequestState::Running, None);
        let started = Instant::now();
        let outcome = run_attempt(deps, &record, attempt, &signals).await;
        metrics::histogram!("cairn_request_attempt_seconds").record(started.elapsed().as_secs_f64());
        let (state, result, error) = match outcome {
            Attempt::Done(value) => (RequestState::Succeeded, Some(value), None),
            Attempt::Stopped(Stop::Canceled) => {
                (RequestState::Canceled, None, Some("canceled while running".into()))
            }
            Attempt::Stopped(reason) => {
                debug!(request = %entry.request_id, ?reason, "run stopped without an outcome");
                return;
            }
            Attempt::Failed(failure) => match next_step(attempt, record.max_attempts, &failure) {
                Next::Dead => (RequestState::Dead, None, Some(failure.message().to_owned())),
                Next::RetryAfterBackoff => (RequestState::Failed, None, Some(failure.message().to_owned())),
            },
        };
        let commit = Commit { entry: entry.clone(), state, result, error: error.clone() };
        if !commit_with_retry(deps, &commit, cancel).await {
            return;
        }
        metrics::counter!("cairn_requests_finished_total", "state" => state.as_str()).increment(1);
        report(deps, &record, state, error.as_deref());
        if state != RequestState::Failed {
            return;
        }
        // Retry here after a backoff; our heartbeats keep the lease meanwhile.
        let delay = deps.settings.backoff.delay_with_rng(attempt, &mut rand::rng());
        tokio::select! {
            () = cancel.cancelled() => {
                if *stop.lock().expect("stop lock") != Some(Stop::Canceled) {
                    return;
                }
            }
            () = tokio::time::sleep(delay) => {}
        }
        match deps.queue.start(&deps.settings.consumer, std::slice::from_ref(entry), now_ms()).await {
            Ok(mut starts) => match starts.pop() {
                Some(Start::Run { attempt: next, record: stored }) => {
                    attempt = next;
                    record = *stored;
                }
                Some(Start::Canceled) => {
                    report(deps, &record, RequestState::Canceled, None);
                    return;
                }
                Some(Start::Dead { error }) => {
                    report(deps, &record, RequestState::Dead, Some(&error));
                    return;
                }
                _ => return,
            },
            Err(error) => {
                warn!(%error, request = %entry.request_id, "cannot start the next attempt; it will be reclaimed");
                return;
            }
        }
    }
}

async fn run_attempt(
    deps: &Arc<Deps>,
    record: &RequestRecord,
    attempt: u32,
    signals: &RunSignals,
) -> Attempt {
    let RunSignals { cancel, stop, progress } = signals;
    let Some(handler) = deps.handlers.get(&record.handler) else {
        let known: Vec<&str> = deps.handlers.names().collect();
        let message =
            format!("no handler named {:?} on this processor (it has: {})", record.handler, known.join(", "));
        return Attempt::Failed(Failure::Permanent(message));
    };
    let run_cancel = cancel.child_token();
    let ctx = Context {
        request_id: record.id.clone(),
        handler: record.handler.clone(),
        payload: record.payload.clone(),
        attempt,
        progress_key: record.progress_key.clone(),
        progress_url: format!(
            "{}/status/{}",
            deps.settings.public_url.trim_end_matches('/'),
            record.progress_key
        ),
        progress_token: deps.settings.minter.as_ref().map(|minter| {
            // Valid for the run's timeout and a minute more to report its end; a day without one.
            let ttl = record.timeout_ms.map_or(24 * 3600, |ms| ms.div_ceil(1000) + 60);
            minter.progress_token(&format!("request:{}", record.id), record.progress_key.as_str(), ttl)
        }),
        traceparent: record.traceparent.clone(),
        cancel: run_cancel.clone(),
        publisher: deps.publisher.clone(),
        last_progress: progress.clone(),
    };
    // Its own task, so a panic fails this request only.
    let mut task = tokio::spawn(async move { handler.handle(&ctx).await });
    let timeout = record.timeout_ms.map_or(Duration::MAX, Duration::from_millis);
    let stopped = tokio::select! {
        joined = &mut task => return attempt_from(joined),
        () = cancel.cancelled() => stop.lock().expect("stop lock").unwrap_or(Stop::Shutdown),
        () = tokio::time::sleep(timeout) => {
            run_cancel.cancel();
            finish_or_abort(task).await;
            return Attempt::Failed(Failure::Retryable(format!("timed out after {} ms", timeout.as_millis())));
        }
    };
    finish_or_abort(task).await;
    Attempt::Stopped(stopped)
}

/// Gives a told-to-stop handler a moment to clean up (kill its process), then aborts it.
async fn finish_or_abort(mut task: tokio::task::JoinHandle<Result<Value, HandlerError>>) {
    if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
        task.abort();
    }
}

fn attempt_from(joined: Result<Result<Value, HandlerError>, tokio::task::JoinError>) -> Attempt {
    match joined {
        Ok(Ok(value)) => Attempt::Done(value),
        Ok(Err(HandlerError::Retryable(message))) => Attempt::Failed(Failure::Retryable(message)),
        Ok(Err(HandlerError::Permanent(message))) => Attempt::Failed(Failure::Permanent(message)),
        Err(error) if error.is_panic() => {
            let payload = error.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Attempt::Failed(Failure::Retryable(format!("handler panicked: {message}")))
        }
        Err(_) => Attempt::Stopped(Stop::Shutdown),
    }
}

/// Stores an outcome, retrying while Redis is away. `false` when it must not or cannot be
/// stored: the lease is gone (another processor owns the request now) or we are stopping.
async fn commit_with_retry(deps: &Deps, commit: &Commit, cancel: &CancellationToken) -> bool {
    let mut delay = Duration::from_millis(50);
    loop {
        match deps.committer.commit(commit.clone()).await {
            Ok(true) => return true,
            Ok(false) => {
                metrics::counter!("cairn_requests_commit_refused_total").increment(1);
                warn!(request = %commit.entry.request_id, "outcome refused: the lease was lost to another processor");
                return false;
            }
            Err(error) => {
                warn!(%error, retry_in = ?delay, request = %commit.entry.request_id, "cannot store outcome")
            }
        }
        // A canceled run's outcome (canceled) is still worth storing; a lost one is refused anyway.
        if cancel.is_cancelled() && commit.state != RequestState::Canceled && delay > Duration::from_secs(1) {
            return false;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Renews the leases of every in-flight run each `heartbeat_interval`; tells runs that lost
/// theirs or whose cancellation was requested to stop.
async fn heartbeat_loop(deps: Arc<Deps>, registry: Registry, stop: CancellationToken) {
    let mut tick = tokio::time::interval(deps.settings.lease.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (running, keys): (Vec<Renewal>, Vec<Key>) = registry.renewals().into_iter().unzip();
        if running.is_empty() {
            continue;
        }
        let now = now_ms();
        match deps.queue.heartbeat(&deps.settings.consumer, &running, now).await {
            Ok(beats) => {
                for ((renewal, key), beat) in running.iter().zip(keys).zip(beats) {
                    let entry = &renewal.entry;
                    match beat {
                        Heartbeat::Renewed => {}
                        Heartbeat::CancelRequested => registry.signal(entry, Stop::Canceled),
                        Heartbeat::Lost => {
                            warn!(request = %entry.request_id, "lease lost to another processor; stopping the run");
                            registry.signal(entry, Stop::Lost);
                            continue;
                        }
                    }
                    // a renewal shows on the node too (coalesced with the run's reports)
                    deps.publisher.publish(key, Update::new().field("heartbeat_ms", now));
                }
            }
            Err(error) => warn!(%error, running = running.len(), "cannot renew leases"),
        }
    }
}
