//! What happens after a failed attempt: another one after a backoff, or the dead-letter stream.
//!
//! The delay before another attempt is a full-jitter [`Backoff`] (it lives in `cairn-error`, with
//! the other loops' retries), which spreads the retries of many requests that failed together,
//! e.g. when an upstream came back, instead of sending them all at once again.

use std::fmt;

pub use cairn_error::Backoff;

/// How an attempt failed, as the handler classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Might work next time: a timeout, a 5xx, a lost connection.
    Retryable(String),
    /// Will fail the same way again: a 4xx, a payload the handler cannot use.
    Permanent(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Retryable(message) | Failure::Permanent(message) => message,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Failure::Retryable(_))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// What to do with a request after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Schedule another attempt after [`Backoff::delay`]; the state becomes `failed`.
    RetryAfterBackoff,
    /// Give up: the state becomes `dead` and the request goes to the dead-letter stream.
    Dead,
}

/// Decides after `attempts_done` attempts (the failed one included) out of `max_attempts`.
pub fn next_step(attempts_done: u32, max_attempts: u32, failure: &Failure) -> Next {
    match failure {
        Failure::Permanent(_) => Next::Dead,
        Failure::Retryable(_) if attempts_done >= max_attempts => Next::Dead,
        Failure::Retryable(_) => Next::RetryAfterBackoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_step_decides() {
        let retryable = Failure::Retryable("upstream answered 503".into());
        let permanent = Failure::Permanent("upstream answered 400".into());
        assert_eq!(next_step(1, 3, &retryable), Next::RetryAfterBackoff);
        assert_eq!(next_step(2, 3, &retryable), Next::RetryAfterBackoff);
        assert_eq!(next_step(3, 3, &retryable), Next::Dead);
        assert_eq!(next_step(4, 3, &retryable), Next::Dead);
        assert_eq!(next_step(1, 1, &retryable), Next::Dead);
        assert_eq!(next_step(1, 3, &permanent), Next::Dead);
        assert_eq!(next_step(0, 100, &permanent), Next::Dead);
        assert!(retryable.is_retryable());
        assert!(!permanent.is_retryable());
        assert_eq!(permanent.message(), "upstream answered 400");
        assert_eq!(retryable.to_string(), "upstream answered 503");
    }
}
