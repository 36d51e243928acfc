//! The worker's step: one attempt of one entry, run, decided and stored ([`handle_attempt`]),
//! and the thin loop of a run around it ([`run_request`]): back off, start the next attempt,
//! step again.

use std::time::{Duration, Instant};

use cairn_redis::requests::{Commit, Entry};
use cairn_requests::{RequestRecord, RequestState};
use tracing::{debug, warn};

use super::attempt::run_attempt;
use super::commit::commit_with_retry;
use super::outcome::{Restart, Then, Verdict, after_backoff, after_commit, decide};
use super::registry::{RunSignals, Stop};
use super::report::report;
use super::{Deps, Partition};
use cairn_progress::now_ms;

/// Runs attempt number `attempt` of `entry` (of `partition`) and stores its outcome (fenced by
/// our lease).
pub(super) async fn handle_attempt(
    deps: &Deps,
    partition: &Partition,
    entry: &Entry,
    record: &mut RequestRecord,
    attempt: u32,
    signals: &RunSignals,
) -> Then {
    record.attempts = attempt;
    report(&deps.publisher, record, RequestState::Running, None);
    let started = Instant::now();
    let ended = run_attempt(deps, record, attempt, signals).await;
    metrics::histogram!("cairn_request_attempt_seconds").record(started.elapsed().as_secs_f64());
    let (state, result, error) = match decide(ended, attempt, record.max_attempts) {
        Verdict::Store { state, result, error } => (state, result, error),
        Verdict::Abandon(reason) => {
            debug!(request = %entry.request_id, ?reason, "run stopped without an outcome");
            return Then::Abandoned(reason);
        }
    };
    let commit = Commit { entry: entry.clone(), state, result, error };
    let then = after_commit(state, commit_with_retry(&partition.committer, &commit, &signals.cancel).await);
    if !matches!(then, Then::Abandoned(_)) {
        debug!(
            request = %entry.request_id,
            state = state.as_str(),
            acked = then.acked(),
            dead_lettered = then.dead_lettered(),
            "outcome stored"
        );
        metrics::counter!("cairn_requests_finished_total", "state" => state.as_str()).increment(1);
        report(&deps.publisher, record, state, commit.error.as_deref());
    }
    then
}

/// Runs a request's attempts until it ends here, or stops because its lease or the process ends.
pub(super) async fn run_request(
    deps: &Deps,
    partition: &Partition,
    entry: &Entry,
    mut record: RequestRecord,
    mut attempt: u32,
    signals: RunSignals,
) {
    // From here on the request's trace context names this processor's span as the parent: it
    // goes to the handler (header or variable) and with the progress reports.
    let trace =
        cairn_runtime::telemetry::traceparent(&tracing::Span::current(), record.traceparent.as_deref());
    loop {
        record.traceparent.clone_from(&trace);
        if handle_attempt(deps, partition, entry, &mut record, attempt, &signals).await
            != Then::RetryAfterBackoff
        {
            return;
        }
        let delay = deps.settings.backoff.delay_with_rng(attempt, &mut rand::rng());
        if let Err(reason) = back_off(delay, &signals).await {
            debug!(request = %entry.request_id, ?reason, "run stopped while backing off");
            return;
        }
        let started =
            partition.queue.start(&deps.settings.consumer, std::slice::from_ref(entry), now_ms()).await;
        match started.map(|mut starts| after_backoff(starts.pop())) {
            Ok(Restart::Run { attempt: next, record: stored }) => {
                attempt = next;
                record = *stored;
            }
            Ok(Restart::Ended { state, error }) => {
                report(&deps.publisher, &record, state, error.as_deref());
                return;
            }
            Ok(Restart::Gone) => return,
            Err(error) => {
                warn!(%error, request = %entry.request_id, "cannot start the next attempt; it will be reclaimed");
                return;
            }
        }
    }
}

/// Waits out a retry's backoff while our heartbeats keep the lease. A cancellation request
/// cuts it short (the next start stores `canceled`); a lost lease or shutdown ends the run.
async fn back_off(delay: Duration, signals: &RunSignals) -> Result<(), Stop> {
    tokio::select! {
        () = signals.cancel.cancelled() => match signals.reason().unwrap_or(Stop::Shutdown) {
            Stop::Canceled => Ok(()),
            reason => Err(reason),
        },
        () = tokio::time::sleep(delay) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn back_off_waits_the_whole_delay() {
        let signals = RunSignals::new();
        let start = Instant::now();
        assert_eq!(back_off(Duration::from_secs(7), &signals).await, Ok(()));
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn back_off_ends_early_when_told_to_stop() {
        for (reason, expected) in
            [(Stop::Canceled, Ok(())), (Stop::Lost, Err(Stop::Lost)), (Stop::Shutdown, Err(Stop::Shutdown))]
        {
            let signals = RunSignals::new();
            let start = Instant::now();
            let stopper = {
                let signals = signals.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    signals.stop(reason);
                })
            };
            assert_eq!(back_off(Duration::from_secs(30), &signals).await, expected, "{reason:?}");
            assert_eq!(start.elapsed(), Duration::from_secs(2), "{reason:?}");
            stopper.await.unwrap();
        }
    }
}
