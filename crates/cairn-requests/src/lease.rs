//! Lease timings. While a request runs, its processor renews its claim on the stream entry
//! every `heartbeat_interval`; an entry idle for longer than `lease_timeout` is taken over by
//! another processor (`XAUTOCLAIM`). The timeout must leave room for at least one missed
//! heartbeat, or a busy but healthy processor would lose its work to a retry.

use std::time::Duration;

/// Shortest pause between two reclaim sweeps, however short the lease.
pub const MIN_RECLAIM_INTERVAL: Duration = Duration::from_millis(100);

/// Why lease settings cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("heartbeat_interval must be greater than zero")]
    ZeroHeartbeat,
    #[error(
        "lease_timeout ({lease_timeout:?}) must be at least twice heartbeat_interval \
         ({heartbeat_interval:?}), so one late heartbeat does not lose the lease"
    )]
    TimeoutTooShort { lease_timeout: Duration, heartbeat_interval: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// How often a running request's claim is renewed. Also bounds how long a cancellation
    /// takes to reach the handler.
    pub heartbeat_interval: Duration,
    /// Idle time after which an entry counts as abandoned and is reclaimed.
    pub lease_timeout: Duration,
}

impl Default for LeaseSettings {
    fn default() -> LeaseSettings {
        LeaseSettings { heartbeat_interval: Duration::from_secs(5), lease_timeout: Duration::from_secs(30) }
    }
}

impl LeaseSettings {
    /// Checks the settings once at start; the message names both settings and their values.
    pub fn validate(&self) -> Result<(), LeaseError> {
        if self.heartbeat_interval.is_zero() {
            return Err(LeaseError::ZeroHeartbeat);
        }
        match self.heartbeat_interval.checked_mul(2) {
            Some(twice) if self.lease_timeout >= twice => Ok(()),
            _ => Err(LeaseError::TimeoutTooShort {
                lease_timeout: self.lease_timeout,
                heartbeat_interval: self.heartbeat_interval,
            }),
        }
    }

    /// How often to look for abandoned entries: half the lease timeout, so an abandoned entry
    /// waits at most 1.5 × `lease_timeout`, but never more often than [`MIN_RECLAIM_INTERVAL`].
    pub fn reclaim_interval(&self) -> Duration {
        (self.lease_timeout / 2).max(MIN_RECLAIM_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(heartbeat_ms: u64, timeout_ms: u64) -> LeaseSettings {
        LeaseSettings {
            heartbeat_interval: Duration::from_millis(heartbeat_ms),
            lease_timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let s = LeaseSettings::default();
        assert_eq!(s, settings(5_000, 30_000));
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.reclaim_interval(), Duration::from_secs(15));
    }

    #[test]
    fn timeout_must_cover_two_heartbeats() {
        assert_eq!(settings(5_000, 10_000).validate(), Ok(()));
        let err = settings(6_000, 10_000).validate().unwrap_err();
        assert_eq!(
            err,
            LeaseError::TimeoutTooShort {
                lease_timeout: Duration::from_secs(10),
                heartbeat_interval: Duration::from_secs(6)
            }
        );
        assert_eq!(
            err.to_string(),
            "lease_timeout (10s) must be at least twice heartbeat_interval (6s), so one late heartbeat \
             does not lose the lease"
        );
        assert_eq!(
            settings(1_500, 2_000).validate().unwrap_err().to_string(),
            "lease_timeout (2s) must be at least twice heartbeat_interval (1.5s), so one late heartbeat \
             does not lose the lease"
        );
        let huge = LeaseSettings { heartbeat_interval: Duration::MAX, lease_timeout: Duration::MAX };
        assert!(matches!(huge.validate(), Err(LeaseError::TimeoutTooShort { .. })));
    }

    #[test]
    fn heartbeat_must_be_positive() {
        let err = settings(0, 30_000).validate().unwrap_err();
        assert_eq!(err, LeaseError::ZeroHeartbeat);
        assert_eq!(err.to_string(), "heartbeat_interval must be greater than zero");
    }

    #[test]
    fn reclaim_interval_is_half_the_timeout_with_a_floor() {
        assert_eq!(settings(1_000, 3_000).reclaim_interval(), Duration::from_millis(1_500));
        assert_eq!(settings(50, 150).reclaim_interval(), Duration::from_millis(100));
        assert_eq!(settings(10, 0).reclaim_interval(), MIN_RECLAIM_INTERVAL);
    }
}
