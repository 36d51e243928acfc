//! Redis for Cairn: connection settings, the key layout ([`keys`]) and the function library that
//! owns the progress tree, the request queue and retention.
//!
//! Every Redis key Cairn writes starts with a configurable prefix, so tests and tenants can share a
//! server. Blocking commands never go through the shared [`ConnectionManager`]; callers that block
//! (`XREADGROUP … BLOCK`) open their own connection with [`RedisConfig::dedicated`].
//!
//! [`RedisConfig`] is the one place that builds Redis clients: a `rediss://` URL connects over
//! TLS (rustls), trusting the system's roots or, with `CAIRN_REDIS_TLS_CA_FILE`, the CA in that
//! PEM file.

pub mod blobs;
pub mod keys;
mod library;
pub mod progress;
pub mod requests;
pub mod streams;

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, ErrorKind, TlsCertificates};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

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

/// Where Redis is and how Cairn names its keys there.
#[derive(clap::Args, Debug, Clone)]
pub struct RedisConfig {
    /// Redis URL (`redis://[user:pass@]host:port/db`; `rediss://` for TLS).
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
    /// PEM file of the CA that signs the Redis server's certificate (`rediss://` only), trusted
    /// instead of the system's root certificates.
    #[arg(id = "redis-tls-ca-file", long = "redis-tls-ca-file", env = "CAIRN_REDIS_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self { url: url.into(), prefix: prefix.into(), tls_ca_file: None }
    }

    /// The same settings, trusting the CA in `ca_file` for a `rediss://` URL.
    pub fn with_tls_ca_file(mut self, ca_file: impl Into<PathBuf>) -> Self {
        self.tls_ca_file = Some(ca_file.into());
        self
    }

    /// The client every connection comes from: plain for `redis://`, rustls for `rediss://`
    /// (with the configured CA, if any). The CA file is read here, so a missing or unreadable
    /// file is an error naming it rather than a failed handshake later.
    pub fn client(&self) -> Result<Client, redis::RedisError> {
        if self.url.starts_with("rediss://") {
            install_crypto_provider();
        }
        let Some(path) = &self.tls_ca_file else {
            return Client::open(self.url.as_str());
        };
        let invalid = |detail: String| {
            redis::RedisError::from((ErrorKind::InvalidClientConfig, "invalid TLS settings", detail))
        };
        if !self.url.starts_with("rediss://") {
            return Err(invalid(format!(
                "CAIRN_REDIS_TLS_CA_FILE={} is set but CAIRN_REDIS_URL does not start with rediss://",
                path.display()
            )));
        }
        let pem = std::fs::read(path)
            .map_err(|e| invalid(format!("cannot read CAIRN_REDIS_TLS_CA_FILE={}: {e}", path.display())))?;
        let certificates = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>();
        if !certificates.as_ref().is_ok_and(|c| !c.is_empty()) {
            let reason = certificates
                .map_or_else(|e| e.to_string(), |_| "no -----BEGIN CERTIFICATE----- block".into());
            return Err(invalid(format!(
                "CAIRN_REDIS_TLS_CA_FILE={} holds no PEM certificate: {reason}",
                path.display()
            )));
        }
        let certificates = TlsCertificates { client_tls: None, root_cert: Some(pem) };
        Client::build_with_tls(self.url.as_str(), certificates)
            .map_err(|e| invalid(format!("CAIRN_REDIS_TLS_CA_FILE={}: {e}", path.display())))
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

/// Installs rustls's process-wide crypto provider (ring, the one this crate's `rustls` features
/// enable) unless one is installed already: redis-rs builds its TLS settings from that default.
/// (Deprecated only for lacking post-quantum key exchange; ring is the provider deny.toml's one
/// TLS stack builds on, where aws-lc-rs would need a C toolchain.)
#[allow(deprecated)]
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
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

/// How long a readiness probe waits for Redis's answer.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rejects_spaces_and_empty() {
        assert!(parse_prefix("cairn").is_ok());
        assert!(parse_prefix("t:ab12").is_ok());
        assert!(parse_prefix("").unwrap_err().contains("invalid key prefix"));
        assert!(parse_prefix("a b").is_err());
    }
}
