//! A lease in Redis that lets one replica of a service act at a time: `SET key instance NX PX
//! ttl` to take it, a compare-and-extend to keep it, a compare-and-delete to hand it back. The
//! holder renews well within the ttl; a holder that dies loses it when the ttl runs out.

use std::sync::LazyLock;
use std::time::Duration;

use super::StreamError;
use crate::RedisConnection;
use crate::library::{Function, LIBRARY};

/// Renews the lease if this instance holds it, takes it if nobody does, else names the holder
/// (retention/lease_acquire.lua): one call, so a lease that just expired cannot be taken twice.
static ACQUIRE_OR_RENEW: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("retention_lease_acquire"));
static RELEASE: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("retention_lease_release"));

/// Whether this instance may act now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Taken just now (nobody held it).
    Acquired,
    /// Held already, and extended by another ttl.
    Renewed,
    /// Another instance holds it.
    HeldBy(String),
}

impl LeaseState {
    pub fn is_held(&self) -> bool {
        matches!(self, LeaseState::Acquired | LeaseState::Renewed)
    }
}

/// One instance's handle on a named lease.
#[derive(Clone)]
pub struct Lease {
    conn: RedisConnection,
    key: String,
    instance: String,
    ttl: Duration,
}

impl Lease {
    /// `key` is the full Redis key; `instance` must be unique among the contenders.
    pub fn new(
        conn: impl Into<RedisConnection>,
        key: impl Into<String>,
        instance: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        Self { conn: conn.into(), key: key.into(), instance: instance.into(), ttl }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Takes or extends the lease for another ttl.
    pub async fn acquire_or_renew(&self) -> Result<LeaseState, StreamError> {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let (state, holder): (String, String) = ACQUIRE_OR_RENEW
            .prepare_invoke_with_keys(&[&self.key])
            .arg(&self.instance)
            .arg(ttl_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match state.as_str() {
            "acquired" => Ok(LeaseState::Acquired),
            "renewed" => Ok(LeaseState::Renewed),
            "held" => Ok(LeaseState::HeldBy(holder)),
            other => Err(StreamError::Protocol(format!("lease script answered {other:?}"))),
        }
    }

    /// Hands the lease back if this instance holds it, so another replica takes over at once
    /// instead of after the ttl. Returns whether it was held.
    pub async fn release(&self) -> Result<bool, StreamError> {
        let deleted: i64 = RELEASE
            .prepare_invoke_with_keys(&[&self.key])
            .arg(&self.instance)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(deleted == 1)
    }
}
