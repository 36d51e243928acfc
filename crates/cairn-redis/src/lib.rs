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
//! With `CAIRN_REDIS_CLUSTER=true` the stores share a [`RedisConnection`] to a Redis Cluster
//! instead ([`RedisConfig::connection`]).

pub mod blobs;
mod connection;
pub mod keys;
mod library;
pub mod progress;
pub mod requests;
pub mod streams;

use std::path::PathBuf;
use std::time::Duration;

use cairn_error::ErrorKind;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, TlsCertificates};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub use blobs::{BlobError, BlobStore};
pub use connection::RedisConnection;
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

/// The kind of a Redis error: a refusal ([`is_refusal`]) is ours to fix, anything else is Redis
/// being away for a while.
pub fn error_kind(error: &redis::RedisError) -> ErrorKind {
    if is_refusal(error) { ErrorKind::Internal } else { ErrorKind::Unavailable }
}

/// Where Redis is and how Cairn names its keys there.
#[derive(clap::Args, Debug, Clone)]
pub struct RedisConfig {
    /// Redis URL (`redis://[user:pass@]host:port/db`; `rediss://` for TLS); with
    /// `CAIRN_REDIS_CLUSTER=true` a comma-separated list of seed node URLs.
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
    /// Whether `url` names the seed nodes of a Redis Cluster (docs/contract.md §8).
    #[arg(
        id = "redis-cluster",
        long = "redis-cluster",
        env = "CAIRN_REDIS_CLUSTER",
        default_value = "false",
        value_parser = parse_bool,
        action = clap::ArgAction::Set
    )]
    pub cluster: bool,
}

impl RedisConfig {
    /// One Redis at `url`.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self { url: url.into(), prefix: prefix.into(), tls_ca_file: None, cluster: false }
    }

    /// A Redis Cluster reached through `seeds`, comma-separated node URLs.
    pub fn cluster(seeds: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self { url: seeds.into(), prefix: prefix.into(), tls_ca_file: None, cluster: true }
    }

    /// The connection the stores share: [`manager`](Self::manager) for one Redis, a cluster
    /// connection (connecting in the background, with the same timeouts) for a cluster.
    pub fn connection(&self) -> Result<RedisConnection, redis::RedisError> {
        if !self.cluster {
            return self.manager().map(RedisConnection::from);
        }
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(10));
        let client = self.cluster_client()?;
        let conn = client.get_pending_async_connection_with_config(config);
        Ok(RedisConnection::Cluster(conn, Some(std::sync::Arc::new(client))))
    }

    /// A connection of its own for one blocking reader, to one Redis or to a cluster (where each
    /// command goes to the master of its key), without a response timeout.
    pub async fn dedicated_connection(&self) -> Result<RedisConnection, redis::RedisError> {
        if !self.cluster {
            return self.dedicated().await.map(RedisConnection::from);
        }
        let config = redis::cluster::ClusterConfig::new().set_connection_timeout(Duration::from_secs(2));
        Ok(self.cluster_client()?.get_async_connection_with_config(config).await?.into())
    }

    fn single_only(&self) -> Result<(), redis::RedisError> {
        if self.cluster {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "CAIRN_REDIS_CLUSTER=true: this needs one Redis, not a Redis Cluster \
                 (docs/contract.md §8)",
            )));
        }
        Ok(())
    }

    fn cluster_client(&self) -> Result<redis::cluster::ClusterClient, redis::RedisError> {
        let seeds: Vec<&str> = self.url.split(',').map(str::trim).filter(|url| !url.is_empty()).collect();
        if seeds.is_empty() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "CAIRN_REDIS_URL names no seed node of the cluster",
            )));
        }
        let builder = redis::cluster::ClusterClient::builder(seeds.clone()).retries(3);
        if !seeds.iter().any(|url| url.starts_with("rediss://")) {
            return builder.build();
        }
        install_crypto_provider();
        match self.tls_ca_pem()? {
            Some(pem) => builder.certs(TlsCertificates { client_tls: None, root_cert: Some(pem) }).build(),
            None => builder.build(),
        }
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
        let Some(pem) = self.tls_ca_pem()? else {
            return Client::open(self.url.as_str());
        };
        let certificates = TlsCertificates { client_tls: None, root_cert: Some(pem) };
        Client::build_with_tls(self.url.as_str(), certificates).map_err(|e| {
            let path = self.tls_ca_file.as_deref().unwrap_or_else(|| std::path::Path::new(""));
            invalid_tls(format!("CAIRN_REDIS_TLS_CA_FILE={}: {e}", path.display()))
        })
    }

    /// The PEM of `CAIRN_REDIS_TLS_CA_FILE`, checked to hold a certificate; `None` when unset.
    /// Refused with a `redis://` URL (on a cluster: when no seed is `rediss://`).
    fn tls_ca_pem(&self) -> Result<Option<Vec<u8>>, redis::RedisError> {
        let Some(path) = &self.tls_ca_file else { return Ok(None) };
        if !self.url.split(',').any(|url| url.trim().starts_with("rediss://")) {
            return Err(invalid_tls(format!(
                "CAIRN_REDIS_TLS_CA_FILE={} is set but CAIRN_REDIS_URL does not start with rediss://",
                path.display()
            )));
        }
        let pem = std::fs::read(path).map_err(|e| {
            invalid_tls(format!("cannot read CAIRN_REDIS_TLS_CA_FILE={}: {e}", path.display()))
        })?;
        let certificates = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>();
        if !certificates.as_ref().is_ok_and(|c| !c.is_empty()) {
            let reason = certificates
                .map_or_else(|e| e.to_string(), |_| "no -----BEGIN CERTIFICATE----- block".into());
            return Err(invalid_tls(format!(
                "CAIRN_REDIS_TLS_CA_FILE={} holds no PEM certificate: {reason}",
                path.display()
            )));
        }
        Ok(Some(pem))
    }

    /// The shared, reconnecting connection for short commands and scripts. Connects lazily, so a
    /// service starts (and reports not-ready) while Redis is away. One Redis only: with
    /// `CAIRN_REDIS_CLUSTER=true` it is refused, naming the variable; the services take
    /// [`connection`](Self::connection), which works on both.
    pub fn manager(&self) -> Result<ConnectionManager, redis::RedisError> {
        self.single_only()?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // A burst script may touch thousands of keys; 500 ms (the default) is too tight.
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_lazy_with_config(self.client()?, config)
    }

    /// A connection of its own for one blocking reader: no response timeout, so `BLOCK n` waits.
    /// One Redis only: on a cluster, blocking readers use
    /// [`dedicated_connection`](Self::dedicated_connection).
    pub async fn dedicated(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        self.single_only()?;
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

fn invalid_tls(detail: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "invalid TLS settings", detail))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("invalid boolean {s:?}: use true or false")),
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
pub async fn ping(conn: &mut impl redis::aio::ConnectionLike) -> Result<(), String> {
    // A hung Redis (paused, half-open connection) must read as not ready, not as a slow probe.
    let pong = tokio::time::timeout(PING_TIMEOUT, redis::cmd("PING").query_async::<String>(conn)).await;
    match pong {
        Ok(pong) => pong.map(drop).map_err(|e| format!("redis: {e}")),
        Err(_) => Err(format!("redis: no answer to PING within {PING_TIMEOUT:?}")),
    }
}

/// The readiness check of a service that needs Redis: [`RedisConnection::ready`] on its shared
/// connection (one Redis, or a cluster, where PING goes to every master).
pub struct RedisReady(pub RedisConnection);

impl cairn_runtime::Readiness for RedisReady {
    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(self.0.ready())
    }

    fn name(&self) -> &str {
        "redis"
    }
}

/// How long a readiness probe waits for Redis's answer.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_mode_is_named_and_single_redis_connections_refuse_it() {
        assert_eq!(parse_bool("TRUE"), Ok(true));
        assert_eq!(parse_bool("0"), Ok(false));
        assert!(parse_bool("maybe").unwrap_err().contains("invalid boolean"));
        let cluster = RedisConfig::cluster("redis://127.0.0.1:7000,redis://127.0.0.1:7001", "c");
        let refused = cluster.manager().expect_err("a cluster is refused").to_string();
        assert!(refused.contains("CAIRN_REDIS_CLUSTER=true"), "{refused}");
        let none = RedisConfig::cluster(" , ", "c").cluster_client().expect_err("no seed").to_string();
        assert!(none.contains("no seed node"), "{none}");
    }

    #[test]
    fn prefix_rejects_spaces_and_empty() {
        assert!(parse_prefix("cairn").is_ok());
        assert!(parse_prefix("t:ab12").is_ok());
        assert!(parse_prefix("").unwrap_err().contains("invalid key prefix"));
        assert!(parse_prefix("a b").is_err());
    }
}
