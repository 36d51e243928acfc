//! The lifecycle of a request.
//!
//! ```text
//! queued ──► running ──► succeeded
//!              │  ▲
//!              ▼  │ (backoff elapsed)
//!            failed ──► dead          any non-terminal state ──► canceled
//! ```
//!
//! `failed` means one attempt failed and another is scheduled; `dead` is the terminal failure
//! (attempts exhausted or a permanent error), after which the request sits in the dead-letter
//! stream.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a request is in its life. Serializes, displays and parses as the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    /// Accepted and in the stream, not yet picked up by a processor.
    Queued,
    /// A processor holds the lease and runs an attempt.
    Running,
    /// An attempt failed with a retryable error; another attempt is scheduled after a backoff.
    Failed,
    Succeeded,
    /// Canceled by a client before it finished.
    Canceled,
    /// Failed for good: out of attempts or a permanent error. Kept in the dead-letter stream.
    Dead,
}

impl RequestState {
    pub const ALL: [RequestState; 6] = [
        RequestState::Queued,
        RequestState::Running,
        RequestState::Failed,
        RequestState::Succeeded,
        RequestState::Canceled,
        RequestState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Queued => "queued",
            RequestState::Running => "running",
            RequestState::Failed => "failed",
            RequestState::Succeeded => "succeeded",
            RequestState::Canceled => "canceled",
            RequestState::Dead => "dead",
        }
    }

    /// True once nothing will happen to the request any more; a waiting client gets its answer.
    pub fn is_terminal(self) -> bool {
        matches!(self, RequestState::Succeeded | RequestState::Canceled | RequestState::Dead)
    }

    /// The status its progress node shows, one of the progress tree's well-known statuses. A
    /// failed attempt with a retry ahead still shows `running`: the work is not over.
    pub fn progress_status(self) -> &'static str {
        match self {
            RequestState::Queued => "waiting",
            RequestState::Running | RequestState::Failed => "running",
            RequestState::Succeeded => "finished",
            RequestState::Canceled => "canceled",
            RequestState::Dead => "failed",
        }
    }

    /// The update that shows this state on the request's progress node: its `status` and a
    /// `state` field.
    pub fn progress_update(self) -> cairn_progress::Update {
        cairn_progress::Update::new().status(self.progress_status()).field("state", self.as_str())
    }
}

impl fmt::Display for RequestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`RequestState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown request state {:?}; expected one of queued, running, failed, succeeded, canceled, dead",
    .value
)]
pub struct ParseStateError {
    pub value: String,
}

impl FromStr for RequestState {
    type Err = ParseStateError;

    /// Exact lowercase names only, as they are stored.
    fn from_str(s: &str) -> Result<RequestState, ParseStateError> {
        RequestState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseStateError { value: s.chars().take(64).collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let names = ["queued", "running", "failed", "succeeded", "canceled", "dead"];
        for (state, name) in RequestState::ALL.into_iter().zip(names) {
            assert_eq!(state.to_string(), name);
            assert_eq!(name.parse::<RequestState>().unwrap(), state);
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<RequestState>(&format!("\"{name}\"")).unwrap(), state);
        }
    }

    #[test]
    fn rejects_unknown_names() {
        let err = "Queued".parse::<RequestState>().unwrap_err();
        assert_eq!(err, ParseStateError { value: "Queued".into() });
        assert_eq!(
            err.to_string(),
            "unknown request state \"Queued\"; expected one of queued, running, failed, succeeded, canceled, dead"
        );
        assert!("".parse::<RequestState>().is_err());
        assert!("finished".parse::<RequestState>().is_err());
        assert!(serde_json::from_str::<RequestState>("\"done\"").is_err());
        let long = "x".repeat(1000);
        assert_eq!(long.parse::<RequestState>().unwrap_err().value.len(), 64);
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = RequestState::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, [RequestState::Succeeded, RequestState::Canceled, RequestState::Dead]);
    }

    #[test]
    fn the_progress_update_carries_status_and_state() {
        let update = RequestState::Failed.progress_update();
        assert_eq!(update, cairn_progress::Update::new().status("running").field("state", "failed"));
    }

    #[test]
    fn progress_statuses_are_well_known() {
        let statuses: Vec<_> = RequestState::ALL.into_iter().map(RequestState::progress_status).collect();
        assert_eq!(statuses, ["waiting", "running", "running", "finished", "canceled", "failed"]);
        for status in statuses {
            assert!(cairn_progress::WELL_KNOWN_STATUSES.contains(&status), "{status}");
        }
    }
}
