//! The retry policy of a run, as pure functions: how an attempt's end becomes what is stored
//! ([`decide`]), what the run does once the store answered ([`after_commit`]), and how the
//! start of the next attempt after a backoff is read ([`after_backoff`]).
//!
//! The store itself (`commit.lua`) is fenced by the lease: a terminal state (`succeeded`,
//! `canceled`, `dead`) is stored, answered and acked in one step, `dead` also goes to the
//! dead-letter stream; `failed` is stored and keeps the lease for the retry, nothing acked. The
//! one decision taken in Redis is `start.lua`'s: an entry reclaimed with no attempts left (its
//! last processor was lost mid-attempt) is dead-lettered there, as no run of it exists.

use cairn_redis::requests::Start;
use cairn_requests::{Failure, Next, RequestRecord, RequestState, next_step};
use serde_json::Value;

use super::registry::Stop;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Attempt {
    /// The handler returned a result.
    Done(Value),
    /// The handler failed (or panicked, or timed out, or does not exist here).
    Failed(Failure),
    /// The run was told to stop before the handler finished.
    Stopped(Stop),
}

/// What to store for an attempt's end.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Verdict {
    /// Store `state` (fenced by the lease).
    Store { state: RequestState, result: Option<Value>, error: Option<String> },
    /// Store nothing: the lease is gone or the process stops. The entry stays pending, so its
    /// new owner (or whoever reclaims it once its lease ran out) decides.
    Abandon(Stop),
}

/// Decides after attempt number `attempt` (1 for the first) out of `max_attempts`.
pub(super) fn decide(attempt: Attempt, attempts_done: u32, max_attempts: u32) -> Verdict {
    match attempt {
        Attempt::Done(value) => {
            Verdict::Store { state: RequestState::Succeeded, result: Some(value), error: None }
        }
        // Still ours to store: cancellation keeps the lease until the outcome is in.
        Attempt::Stopped(Stop::Canceled) => Verdict::Store {
            state: RequestState::Canceled,
            result: None,
            error: Some("canceled while running".into()),
        },
        Attempt::Stopped(reason) => Verdict::Abandon(reason),
        Attempt::Failed(failure) => {
            let state = match next_step(attempts_done, max_attempts, &failure) {
                Next::Dead => RequestState::Dead,
                Next::RetryAfterBackoff => RequestState::Failed,
            };
            Verdict::Store { state, result: None, error: Some(failure.message().to_owned()) }
        }
    }
}

/// How the store answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Committed {
    Stored,
    /// Refused by the fence: another processor owns the entry now.
    Refused,
    /// Redis stayed away while the run was told to stop.
    GaveUp,
}

/// What the run does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Then {
    /// The request ended here with this state.
    Finished(RequestState),
    /// Stored as `failed`: back off (our heartbeats keep the lease), then start the next attempt.
    RetryAfterBackoff,
    /// Nothing (more) is stored or acked by this run.
    Abandoned(Stop),
}

impl Then {
    /// Whether the store acked the entry (it leaves the group's pending list).
    pub(super) fn acked(self) -> bool {
        matches!(self, Then::Finished(_))
    }

    /// Whether the store put the request on the dead-letter stream.
    pub(super) fn dead_lettered(self) -> bool {
        self == Then::Finished(RequestState::Dead)
    }
}

/// What follows storing `state`.
pub(super) fn after_commit(state: RequestState, committed: Committed) -> Then {
    match committed {
        Committed::Refused => Then::Abandoned(Stop::Lost),
        Committed::GaveUp => Then::Abandoned(Stop::Shutdown),
        Committed::Stored if state == RequestState::Failed => Then::RetryAfterBackoff,
        Committed::Stored => Then::Finished(state),
    }
}

/// What `start` answered for the next attempt of a run that backed off.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Restart {
    Run {
        attempt: u32,
        record: Box<RequestRecord>,
    },
    /// `start.lua` ended the request (stored, answered, acked); the run reports it.
    Ended {
        state: RequestState,
        error: Option<String>,
    },
    /// Nothing to do or to report: the entry is gone or no longer ours.
    Gone,
}

pub(super) fn after_backoff(start: Option<Start>) -> Restart {
    match start {
        Some(Start::Run { attempt, record }) => Restart::Run { attempt, record },
        Some(Start::Canceled) => Restart::Ended { state: RequestState::Canceled, error: None },
        Some(Start::Dead { error }) => Restart::Ended { state: RequestState::Dead, error: Some(error) },
        Some(Start::Skip | Start::Lost) | None => Restart::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use RequestState::{Canceled, Dead, Failed, Succeeded};

    fn retryable() -> Attempt {
        Attempt::Failed(Failure::Retryable("upstream answered 503".into()))
    }

    fn permanent() -> Attempt {
        Attempt::Failed(Failure::Permanent("upstream answered 400".into()))
    }

    /// Every way an attempt can end, through both steps: what is stored, what the run does
    /// next, and whether the entry is acked and dead-lettered.
    #[test]
    fn outcome_table() {
        struct Row {
            case: &'static str,
            attempt: Attempt,
            done: u32,
            max: u32,
            committed: Committed,
            stored: Option<(RequestState, Option<&'static str>)>,
            then: Then,
            acked: bool,
            dead_lettered: bool,
        }
        let rows = [
            Row {
                case: "success",
                attempt: Attempt::Done(json!({"ok": 1})),
                done: 1,
                max: 3,
                committed: Committed::Stored,
                stored: Some((Succeeded, None)),
                then: Then::Finished(Succeeded),
                acked: true,
                dead_lettered: false,
            },
            Row {
                case: "retryable, attempts left",
                attempt: retryable(),
                done: 2,
                max: 3,
                committed: Committed::Stored,
                stored: Some((Failed, Some("upstream answered 503"))),
                then: Then::RetryAfterBackoff,
                acked: false,
                dead_lettered: false,
            },
            Row {
                case: "retryable, attempts exhausted",
                attempt: retryable(),
                done: 3,
                max: 3,
                committed: Committed::Stored,
                stored: Some((Dead, Some("upstream answered 503"))),
                then: Then::Finished(Dead),
                acked: true,
                dead_lettered: true,
            },
            Row {
                case: "permanent, attempts left",
                attempt: permanent(),
                done: 1,
                max: 3,
                committed: Committed::Stored,
                stored: Some((Dead, Some("upstream answered 400"))),
                then: Then::Finished(Dead),
                acked: true,
                dead_lettered: true,
            },
            Row {
                case: "canceled while running",
                attempt: Attempt::Stopped(Stop::Canceled),
                done: 1,
                max: 3,
                committed: Committed::Stored,
                stored: Some((Canceled, Some("canceled while running"))),
                then: Then::Finished(Canceled),
                acked: true,
                dead_lettered: false,
            },
            Row {
                case: "lease lost while running",
                attempt: Attempt::Stopped(Stop::Lost),
                done: 1,
                max: 3,
                committed: Committed::Stored,
                stored: None,
                then: Then::Abandoned(Stop::Lost),
                acked: false,
                dead_lettered: false,
            },
            Row {
                case: "shutdown while running",
                attempt: Attempt::Stopped(Stop::Shutdown),
                done: 3,
                max: 3,
                committed: Committed::Stored,
                stored: None,
                then: Then::Abandoned(Stop::Shutdown),
                acked: false,
                dead_lettered: false,
            },
            Row {
                case: "success, commit refused (lease lost meanwhile)",
                attempt: Attempt::Done(json!(null)),
                done: 1,
                max: 3,
                committed: Committed::Refused,
                stored: Some((Succeeded, None)),
                then: Then::Abandoned(Stop::Lost),
                acked: false,
                dead_lettered: false,
            },
            Row {
                case: "retryable, commit refused",
                attempt: retryable(),
                done: 1,
                max: 3,
                committed: Committed::Refused,
                stored: Some((Failed, Some("upstream answered 503"))),
                then: Then::Abandoned(Stop::Lost),
                acked: false,
                dead_lettered: false,
            },
            Row {
                case: "attempts exhausted, commit refused",
                attempt: retryable(),
                done: 3,
                max: 3,
                committed: Committed::Refused,
                stored: Some((Dead, Some("upstream answered 503"))),
                then: Then::Abandoned(Stop::Lost),
                acked: false,
                dead_lettered: false,
            },
            Row {
                case: "canceled, redis away while stopping",
                attempt: Attempt::Stopped(Stop::Canceled),
                done: 1,
                max: 1,
                committed: Committed::GaveUp,
                stored: Some((Canceled, Some("canceled while running"))),
                then: Then::Abandoned(Stop::Shutdown),
                acked: false,
                dead_lettered: false,
            },
        ];
        for row in rows {
            let verdict = decide(row.attempt, row.done, row.max);
            let then = match &verdict {
                Verdict::Store { state, result, error } => {
                    let expected = row.stored.unwrap_or_else(|| panic!("{}: stores {verdict:?}", row.case));
                    assert_eq!((*state, error.as_deref()), expected, "{}", row.case);
                    assert_eq!(result.is_some(), *state == Succeeded, "{}: result only on success", row.case);
                    after_commit(*state, row.committed)
                }
                Verdict::Abandon(reason) => {
                    assert_eq!(row.stored, None, "{}: stores nothing", row.case);
                    Then::Abandoned(*reason)
                }
            };
            assert_eq!(then, row.then, "{}", row.case);
            assert_eq!(then.acked(), row.acked, "{}: acked", row.case);
            assert_eq!(then.dead_lettered(), row.dead_lettered, "{}: dead-lettered", row.case);
        }
    }

    #[test]
    fn a_backed_off_run_follows_what_start_decided() {
        let record =
            RequestRecord::queued("r".into(), cairn_requests::Submission::new("echo", json!({})), 3, 0);
        let run = Start::Run { attempt: 2, record: Box::new(record.clone()) };
        assert_eq!(after_backoff(Some(run)), Restart::Run { attempt: 2, record: Box::new(record) });
        assert_eq!(after_backoff(Some(Start::Canceled)), Restart::Ended { state: Canceled, error: None });
        assert_eq!(
            after_backoff(Some(Start::Dead { error: "attempt 3 never finished".into() })),
            Restart::Ended { state: Dead, error: Some("attempt 3 never finished".into()) }
        );
        assert_eq!(after_backoff(Some(Start::Lost)), Restart::Gone);
        assert_eq!(after_backoff(Some(Start::Skip)), Restart::Gone);
        assert_eq!(after_backoff(None), Restart::Gone);
    }
}
