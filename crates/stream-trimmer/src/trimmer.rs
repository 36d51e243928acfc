//! The trimmer's one step, [`trim_once`], and the thin loop around it.
//!
//! A run acts only while this instance holds the lease: then it trims every registered stream
//! as far as its policy and its consumer groups allow, removes idle consumers that own nothing,
//! and purges finished request records and progress trees past their retention — each purge
//! bounded per run so a run never holds Redis for long.
//!
//! The request queue's partitions are retained alike: a partition's stream (`requests:2` on one
//! Redis, `requests{p2}` and `dead{p2}` on a Redis Cluster) gets the policy of the stream it is
//! a partition of unless a rule names it, and finished requests are purged from every
//! partition's index in turn, sharing the run's purge limit.

use cairn_progress::now_ms;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_redis::streams::{
    Lease, LeaseState, Purger, RemovedConsumer, StreamError, Streams, TrimOutcome, TrimPolicy,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::policy::Policies;

/// Records purged per script call, which keeps each call short (about a millisecond); a run
/// makes several calls up to its limit.
const REQUEST_CHUNK: usize = 250;
/// Progress roots read per page while looking for finished trees.
const ROOTS_PAGE: usize = 100;
/// A run looks at most this many times its purge limit of old roots, and at most
/// [`ROOTS_SCAN_EXTRA`] beyond the limit, so a crowd of unfinished old trees cannot make one run
/// long; the next run continues where this one stopped.
const ROOTS_SCAN_FACTOR: usize = 10;
const ROOTS_SCAN_EXTRA: usize = 20_000;

/// Retention settings of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Finished request records older than this are deleted.
    pub request_retention: Duration,
    /// Dead requests are deleted this long after they died; `None`: kept until retried or
    /// deleted.
    pub dead_retention: Option<Duration>,
    /// Finished progress trees not updated for this long are deleted.
    pub progress_retention: Duration,
    /// Consumers idle this long that own no entry are removed from their group.
    pub consumer_idle: Duration,
    /// At most this many records, and this many trees, are purged per run.
    pub purge_limit: usize,
}

/// What a run needs.
pub struct Deps {
    pub streams: Streams,
    pub purger: Purger,
    pub lease: Lease,
    pub policies: Policies,
    pub settings: Settings,
    /// The stream keys of the request queue's partitions, each with the name of the stream it
    /// is a partition of (`requests`, `dead`), whose policy it gets.
    partition_streams: HashMap<String, String>,
    /// Position in the old progress roots where the last run stopped looking.
    roots_offset: Mutex<usize>,
}

impl Deps {
    pub fn new(
        streams: Streams,
        purger: Purger,
        lease: Lease,
        policies: Policies,
        settings: Settings,
    ) -> Self {
        let layout = purger.layout();
        let dead = cairn_redis::keys::requests::dead(&layout.prefix);
        let dead = streams.name_of(&dead).unwrap_or("dead").to_owned();
        let mut partition_streams = HashMap::new();
        for names in layout.all() {
            partition_streams.insert(names.stream.clone(), layout.stream.clone());
            partition_streams.insert(names.dead(), dead.clone());
        }
        Self { streams, purger, lease, policies, settings, partition_streams, roots_offset: Mutex::new(0) }
    }

    /// The policy of the stream `key`, named `name` under the prefix.
    fn policy(&self, key: &str, name: &str) -> TrimPolicy {
        match self.partition_streams.get(key) {
            Some(base) => *self.policies.for_partition(name, base),
            None => *self.policies.for_stream(name),
        }
    }
}

/// One stream after a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// The stream's name under the prefix (`requests`, `replies:<replica>`), as policies match it.
    pub stream: String,
    pub key: String,
    pub policy: TrimPolicy,
    pub outcome: TrimOutcome,
}

/// A consumer removed for being idle without entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerReport {
    pub stream: String,
    pub removed: RemovedConsumer,
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimReport {
    /// The lease as this run found it; nothing else was done unless it is held.
    pub lease: LeaseState,
    pub streams: Vec<StreamReport>,
    /// Registered streams that no longer exist; they left the registry.
    pub unregistered: Vec<String>,
    pub records_purged: u64,
    pub trees_purged: u64,
    /// Progress nodes removed with those trees.
    pub nodes_purged: u64,
    pub consumers_removed: Vec<ConsumerReport>,
    /// What failed; the rest of the run went on.
    pub errors: Vec<String>,
}

impl TrimReport {
    fn idle(lease: LeaseState) -> Self {
        Self {
            lease,
            streams: Vec::new(),
            unregistered: Vec::new(),
            records_purged: 0,
            trees_purged: 0,
            nodes_purged: 0,
            consumers_removed: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Whether this run held the lease and did the work.
    pub fn acted(&self) -> bool {
        self.lease.is_held()
    }

    /// Entries trimmed from every stream.
    pub fn trimmed(&self) -> u64 {
        self.streams.iter().map(|s| s.outcome.trimmed).sum()
    }

    /// Streams where safety kept entries their policy would have removed.
    pub fn capped(&self) -> Vec<&str> {
        self.streams.iter().filter(|s| s.outcome.capped).map(|s| s.stream.as_str()).collect()
    }

    pub fn stream(&self, name: &str) -> Option<&StreamReport> {
        self.streams.iter().find(|s| s.stream == name)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One run at time `now_ms`. `Err` only when the lease cannot be checked (Redis away); any
/// later failure is logged, listed in the report and leaves the rest of the run going.
pub async fn trim_once(deps: &Deps, now_ms: i64) -> Result<TrimReport, StreamError> {
    let lease = deps.lease.acquire_or_renew().await?;
    metrics::gauge!("cairn_trimmer_lease_held").set(if lease.is_held() { 1.0 } else { 0.0 });
    match &lease {
        LeaseState::Acquired => info!(instance = deps.lease.instance(), "took the trimmer lease"),
        LeaseState::Renewed => {}
        LeaseState::HeldBy(holder) => {
            debug!(%holder, "another trimmer holds the lease; nothing to do this run");
            return Ok(TrimReport::idle(lease));
        }
    }
    let mut report = TrimReport::idle(lease);
    check_partitions(deps, &mut report).await;
    trim_streams(deps, now_ms, &mut report).await;
    purge_requests(deps, now_ms, &mut report).await;
    purge_progress(deps, now_ms, &mut report).await;
    metrics::gauge!("cairn_trimmer_last_run_timestamp_seconds").set(now_ms as f64 / 1000.0);
    Ok(report)
}

/// Reports a `CAIRN_REQUEST_PARTITIONS` other than the count the request queue records: the
/// run goes on (trimming what it knows beats trimming nothing), but the finished requests of
/// partitions it does not know are not purged and their streams get the default policy.
async fn check_partitions(deps: &Deps, report: &mut TrimReport) {
    let configured = deps.purger.layout().partitions;
    match deps.purger.recorded_partitions().await {
        Ok(Some(recorded)) if recorded != configured => {
            let problem = format!(
                "CAIRN_REQUEST_PARTITIONS={configured}, but the request queue records {recorded} partitions: \
                 set it to {recorded} (finished requests of partitions this trimmer does not know are not purged)"
            );
            warn!(configured, recorded, "{problem}");
            report.errors.push(problem);
        }
        Ok(_) => {}
        Err(error) => debug!(%error, "cannot read the request queue's partition count"),
    }
}

/// Trims the registered streams and the request queue's own: those are known from its layout,
/// and on a Redis Cluster a partition's dead-letter stream is made by a call that cannot
/// register it (another slot), so it is trimmed whether or not it is registered.
async fn trim_streams(deps: &Deps, now_ms: i64, report: &mut TrimReport) {
    let registered = match deps.streams.registered().await {
        Ok(keys) => keys,
        Err(error) => {
            warn!(%error, "cannot read the stream registry");
            report.errors.push(format!("stream registry: {error}"));
            return;
        }
    };
    let mut keys: Vec<String> = deps.partition_streams.keys().cloned().collect();
    keys.extend(registered.iter().cloned());
    keys.sort();
    keys.dedup();
    for key in keys {
        let Some(name) = deps.streams.name_of(&key).map(str::to_owned) else {
            warn!(%key, prefix = deps.streams.prefix(), "registered stream is outside the key prefix; skipped");
            report.errors.push(format!("{key}: outside the key prefix"));
            continue;
        };
        let policy = deps.policy(&key, &name);
        match deps.streams.safe_trim(&key, &policy, now_ms).await {
            Ok(Some(outcome)) => {
                if registered.binary_search(&key).is_err() {
                    // Made by a call that could not register it: registered now, so `cairn
                    // streams` lists it.
                    if let Err(error) = deps.streams.register(&key).await {
                        warn!(stream = %name, %error, "cannot register stream");
                        report.errors.push(format!("{name} registration: {error}"));
                    }
                }
                record_stream(&name, &outcome);
                report.streams.push(StreamReport { stream: name.clone(), key: key.clone(), policy, outcome });
            }
            Ok(None) => {
                // A partition's stream not made yet is no news.
                if registered.binary_search(&key).is_ok() {
                    debug!(stream = %name, "registered stream is gone; unregistered");
                    report.unregistered.push(name);
                }
                continue;
            }
            Err(error) => {
                warn!(stream = %name, %error, "cannot trim stream");
                report.errors.push(format!("{name}: {error}"));
                continue;
            }
        }
        match deps.streams.remove_idle_consumers(&key, deps.settings.consumer_idle).await {
            Ok(removed) => {
                for consumer in removed {
                    info!(stream = %name, group = %consumer.group, consumer = %consumer.consumer,
                          idle_ms = consumer.idle_ms, "removed idle consumer without pending entries");
                    metrics::counter!("cairn_trimmer_purged_total", "kind" => "consumer").increment(1);
                    report.consumers_removed.push(ConsumerReport { stream: name.clone(), removed: consumer });
                }
            }
            Err(error) => {
                warn!(stream = %name, %error, "cannot remove idle consumers");
                report.errors.push(format!("{name} consumers: {error}"));
            }
        }
    }
}

fn record_stream(name: &str, outcome: &TrimOutcome) {
    let stream = name.to_owned();
    metrics::gauge!("cairn_stream_length", "stream" => stream.clone()).set(outcome.length as f64);
    metrics::counter!("cairn_trimmer_trimmed_total", "stream" => stream.clone()).increment(outcome.trimmed);
    for group in &outcome.groups {
        let labels = [("stream", stream.clone()), ("group", group.name.clone())];
        metrics::gauge!("cairn_stream_group_pending", &labels).set(group.pending as f64);
        if let Some(lag) = group.lag {
            metrics::gauge!("cairn_stream_group_lag", &labels).set(lag as f64);
        }
    }
    if outcome.trimmed > 0 {
        debug!(stream = name, trimmed = outcome.trimmed, length = outcome.length, "trimmed stream");
    }
    if outcome.capped {
        metrics::counter!("cairn_trimmer_capped_total", "stream" => stream).increment(1);
        warn!(
            stream = name,
            target = outcome.target.as_deref().unwrap_or(""),
            safe = outcome.safe.as_deref().unwrap_or(""),
            length = outcome.length,
            "trimming capped: a consumer group has not yet received or acknowledged older entries"
        );
    }
}

/// Purges finished requests from every partition's index, a chunk of each in turn, so that a
/// busy partition cannot use the whole purge limit of a run while another's finished requests
/// wait.
async fn purge_requests(deps: &Deps, now_ms: i64, report: &mut TrimReport) {
    let cutoff = now_ms.saturating_sub(millis(deps.settings.request_retention));
    let dead_cutoff = deps.settings.dead_retention.map(|retention| now_ms.saturating_sub(millis(retention)));
    let mut budget = deps.settings.purge_limit;
    // Partitions whose index may still hold requests past the cutoff.
    let mut pending = deps.purger.partitions();
    while budget > 0 && !pending.is_empty() {
        let mut next = Vec::with_capacity(pending.len());
        for partition in pending {
            if budget == 0 {
                break;
            }
            let chunk = budget.min(REQUEST_CHUNK);
            match deps.purger.purge_requests(&partition, cutoff, dead_cutoff, chunk).await {
                Ok(done) => {
                    report.records_purged += done.purged;
                    budget -= (done.examined as usize).min(budget);
                    if done.examined as usize >= chunk {
                        next.push(partition);
                    }
                }
                Err(error) => {
                    warn!(partition = partition.partition, %error, "cannot purge finished requests");
                    report
                        .errors
                        .push(format!("request purge of partition {}: {error}", partition.partition));
                }
            }
        }
        pending = next;
    }
    if report.records_purged > 0 {
        metrics::counter!("cairn_trimmer_purged_total", "kind" => "request").increment(report.records_purged);
        info!(records = report.records_purged, "purged finished requests past retention");
    }
}

async fn purge_progress(deps: &Deps, now_ms: i64, report: &mut TrimReport) {
    let cutoff = now_ms.saturating_sub(millis(deps.settings.progress_retention));
    let limit = deps.settings.purge_limit;
    let mut offset = *deps.roots_offset.lock().expect("roots offset lock");
    let scan_budget = limit.saturating_mul(ROOTS_SCAN_FACTOR).min(limit.saturating_add(ROOTS_SCAN_EXTRA));
    let mut examined = 0;
    'pages: while report.trees_purged < limit as u64 && examined < scan_budget {
        let page = ROOTS_PAGE.min(scan_budget - examined);
        let roots = match deps.purger.old_roots(cutoff, offset, page).await {
            Ok(roots) => roots,
            Err(error) => {
                warn!(%error, "cannot list old progress trees");
                report.errors.push(format!("progress purge: {error}"));
                break;
            }
        };
        if roots.is_empty() {
            // At the end: the next run starts from the oldest again.
            offset = 0;
            break;
        }
        for root in roots {
            examined += 1;
            match deps.purger.purge_tree(&root, now_ms, cutoff).await {
                Ok(Some(nodes)) => {
                    report.trees_purged += 1;
                    report.nodes_purged += nodes;
                }
                // Unfinished (or updated meanwhile): it stays, and stays in the range.
                Ok(None) => offset += 1,
                Err(error) => {
                    warn!(%root, %error, "cannot purge progress tree");
                    report.errors.push(format!("progress tree {root}: {error}"));
                    break 'pages;
                }
            }
            if report.trees_purged >= limit as u64 {
                break 'pages;
            }
        }
    }
    *deps.roots_offset.lock().expect("roots offset lock") = offset;
    if report.trees_purged > 0 {
        metrics::counter!("cairn_trimmer_purged_total", "kind" => "progress_tree")
            .increment(report.trees_purged);
        info!(
            trees = report.trees_purged,
            nodes = report.nodes_purged,
            "purged finished progress trees past retention"
        );
    }
}

/// Runs [`trim_once`] every `interval` until `shutdown` fires, publishing each report; then
/// hands the lease back so another replica takes over at its next run.
pub async fn run(
    deps: Arc<Deps>,
    interval: Duration,
    reports: broadcast::Sender<Arc<TrimReport>>,
    shutdown: CancellationToken,
) {
    // Runs start every `interval` (not `interval` after the previous one ended); a run that
    // overran delays the next instead of bunching them up.
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        match trim_once(&deps, now_ms()).await {
            Ok(report) => {
                if report.acted() {
                    debug!(
                        streams = report.streams.len(),
                        trimmed = report.trimmed(),
                        records = report.records_purged,
                        trees = report.trees_purged,
                        "trim run done"
                    );
                }
                // Nobody listening is fine.
                let _ = reports.send(Arc::new(report));
            }
            Err(error) => warn!(%error, "trim run skipped: cannot check the lease"),
        }
    }
    match deps.lease.release().await {
        Ok(true) => info!("released the trimmer lease"),
        Ok(false) => {}
        Err(error) => warn!(%error, "cannot release the trimmer lease; it expires by itself"),
    }
}
