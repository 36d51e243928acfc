//! Redis for Cairn: connection settings, the key layout ([`keys`]) and the function library that
//! owns the progress tree, the request queue and retention.
//!
//! Every Redis key Cairn writes starts with a configurable prefix, so tests and tenants can share a
//! server. Blocking commands never go through the shared [`ConnectionManager`]; callers that block
//! (`XREADGROUP … BLOCK`) open their own connection with [`RedisConfig::dedicated`].

pub mod blobs;
pub mod keys;
mod library;
pub mod progress;
pub mod requests;
pub mod streams;

use std::time::Duration;

use cairn_error::ErrorKind;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client};

pub use blobs::{BlobError, BlobStore};
pub use progress::{ProgressStore, StoreError};

/// The Redis function library holding Cairn's Lua (progress tree and request queue), as
/// `FUNCTION LOAD` takes it. Cairn loads it by itself; this is for profiling and inspection.
pub fn function_library() -> &'static str {
    library::LIBRARY.code()
}

/// Whether Redis received a call and refused it as such (a script error, `WRONGTYPE`, a wrong
/// argument), so that sending the same call again fails again. The connection, a timeout and the
/// server states that pass by themselves (`LOADING`, `BUSY`, `OOM`, `READONLY`, `MASTERDOWN`, a
/// failover, a function library still to load) are not refusals.
pub fn is_refusal(error: &redis::RedisError) -> bool {
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
    {
        return false;
    }
    const PASSING: &[&str] = &[
        "LOADING",
        "BUSY",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "MASTERDOWN",
        "READONLY",
        "OOM",
        "NOSCRIPT",
        "MOVED",
        "ASK",
        "NOREPLICAS",
        "MISCONF",
        "UNBLOCKED",
    ];
    error.code().is_some_and(|code| !PASSING.contains(&code))
}

/// The error code a script raised with `redis.error_reply(CODE …)`, or Redis's own code. A bare
/// `error_reply('CODE')` reaches the client as `ERR CODE` (Redis adds a code to a reply that has
/// none), so a one-word detail of capitals after `ERR` is taken as the script's code.
pub fn error_code(error: &redis::RedisError) -> Option<&str> {
    let code = error.code()?;
    let is_code = |word: &str| !word.is_empty() && word.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    match error.detail() {
        Some(detail) if code == "ERR" && is_code(detail) => Some(detail),
        _ => Some(code),
    }
}

/// The kind of a Redis error: a refusal ([`is_refusal`]) is ours to fix, anything else is Redis
/// being away for a while.
pub fn error_kind(error: &redis::RedisError) -> ErrorKind {
    if is_refusal(error) { ErrorKind::Internal } else { ErrorKind::Unavailable }
}

/// Where Redis is and how Cairn names its keys there.
#[derive(clap::Args, Debug, Clone)]
pub struct RedisConfig {
    /// Redis URL (`redis://[user:pass@]host:port/db`).
    #[arg(
        id = "redis-url",
        long = "redis-url",
        env = "CAIRN_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub url: String,
    /// Prefix of every Redis key Cairn writes.
    #[arg(id = "key-prefix", long = "key-prefix", env = "CAIRN_KEY_PREFIX", default_value = "cairn", value_parser = parse_prefix)]
    pub prefix: String,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self { url: url.into(), prefix: prefix.into() }
    }

    fn client(&self) -> Result<Client, redis::RedisError> {
        Client::open(self.url.as_str())
    }

    /// The shared, reconnecting connection for short commands and scripts. Connects lazily, so a
    /// service starts (and reports not-ready) while Redis is away.
    pub fn manager(&self) -> Result<ConnectionManager, redis::RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // A burst script may touch thousands of keys; 500 ms (the default) is too tight.
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_lazy_with_config(self.client()?, config)
    }

    /// A connection of its own for one blocking reader: no response timeout, so `BLOCK n` waits.
    pub async fn dedicated(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(None);
        self.client()?.get_multiplexed_async_connection_with_config(&config).await
    }
}

fn parse_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("invalid key prefix {s:?}: use 1-64 characters of A-Z a-z 0-9 _ - : ."))
    }
}

/// Answers whether Redis responds, for readiness probes.
pub async fn ping(conn: &mut ConnectionManager) -> Result<(), String> {
    // A hung Redis (paused, half-open connection) must read as not ready, not as a slow probe.
    let pong = tokio::time::timeout(PING_TIMEOUT, redis::cmd("PING").query_async::<String>(conn)).await;
    match pong {
        Ok(pong) => pong.map(drop).map_err(|e| format!("redis: {e}")),
        Err(_) => Err(format!("redis: no answer to PING within {PING_TIMEOUT:?}")),
    }
}

/// The readiness check of a service that needs Redis: [`ping`] on its shared connection.
pub struct RedisReady(pub ConnectionManager);

impl cairn_runtime::Readiness for RedisReady {
    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { ping(&mut self.0.clone()).await })
    }

    fn name(&self) -> &str {
        "redis"
    }
}

/// How long a readiness probe waits for Redis's answer.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_codes_are_read_with_or_without_a_message() {
        let bare = redis::make_extension_error("ERR".into(), Some("CAIRN_BAD_CURSOR".into()));
        assert_eq!(error_code(&bare), Some("CAIRN_BAD_CURSOR"));
        let coded = redis::make_extension_error("CAIRN_BAD_CURSOR".into(), Some("after x".into()));
        assert_eq!(error_code(&coded), Some("CAIRN_BAD_CURSOR"));
        let prose = redis::make_extension_error("ERR".into(), Some("no such key".into()));
        assert_eq!(error_code(&prose), Some("ERR"));
        let io = redis::RedisError::from(std::io::Error::other("reset"));
        assert_eq!(error_code(&io), None);
    }

    #[test]
    fn prefix_rejects_spaces_and_empty() {
        assert!(parse_prefix("cairn").is_ok());
        assert!(parse_prefix("t:ab12").is_ok());
        assert!(parse_prefix("").unwrap_err().contains("invalid key prefix"));
        assert!(parse_prefix("a b").is_err());
    }
}
