//! RabbitMQ for Cairn: connection settings, the progress topology, and the coalescing burst
//! [`publisher`] that producers use to report progress.
//!
//! Topology (docs/contract.md §2): publishers send to the durable topic exchange `progress` with the progress
//! key as routing key. With `shards > 1`, a consistent-hash exchange (`{exchange}.shards`, plugin
//! `rabbitmq_consistent_hash_exchange`) spreads routing keys over `shards` durable queues
//! `{queue}.{i}`; each queue has a single active consumer, so every routing key is applied by one
//! aggregator at a time, in publish order, while other replicas stand by. With `shards = 1` one
//! queue is bound to the topic exchange directly and no plugin is needed. Messages that cannot be
//! applied go to the dead-letter exchange `{queue}.dead` (fanout) and its queue of the same name.
//!
//! Every connection Cairn opens goes through [`Endpoint::connect`]: an `amqps://` URL connects
//! over TLS (rustls), trusting the system's roots and, with `CAIRN_AMQP_TLS_CA_FILE`, the CA in
//! that PEM file.

pub mod publisher;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_error::Retries;
use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

pub use publisher::{ProgressPublisher, PublisherConfig};

/// Where RabbitMQ is and the name of the progress exchange.
#[derive(clap::Args, Debug, Clone)]
pub struct AmqpConfig {
    /// AMQP URL (`amqp://user:pass@host:port/vhost`, `%2f` for the default vhost; `amqps://` for
    /// TLS).
    #[arg(
        id = "amqp-url",
        long = "amqp-url",
        env = "CAIRN_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub url: String,
    /// Durable topic exchange that progress updates are published to.
    #[arg(
        id = "progress-exchange",
        long = "progress-exchange",
        env = "CAIRN_PROGRESS_EXCHANGE",
        default_value = "progress"
    )]
    pub exchange: String,
    /// PEM file of the CA that signs RabbitMQ's certificate (`amqps://` only), trusted besides
    /// the system's root certificates.
    #[arg(id = "amqp-tls-ca-file", long = "amqp-tls-ca-file", env = "CAIRN_AMQP_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
}

impl AmqpConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), exchange: "progress".into(), tls_ca_file: None }
    }

    /// Where to connect, with the CA file read and checked.
    pub fn endpoint(&self) -> Result<Endpoint, EndpointError> {
        let endpoint = Endpoint::new(self.url.clone());
        match &self.tls_ca_file {
            Some(path) => endpoint.with_ca_file(path),
            None => Ok(endpoint),
        }
    }
}

/// How to reach RabbitMQ: the URL and, for `amqps://`, the CA certificates to trust besides the
/// system's roots. [`Endpoint::connect`] is how every Cairn service connects.
#[derive(Clone)]
pub struct Endpoint {
    url: String,
    ca_pem: Option<String>,
}

/// Why the TLS settings of an [`Endpoint`] are unusable.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot read CAIRN_AMQP_TLS_CA_FILE={path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("CAIRN_AMQP_TLS_CA_FILE={path} holds no PEM certificate: {reason}")]
    NoCertificate { path: PathBuf, reason: String },
    #[error("CAIRN_AMQP_TLS_CA_FILE={path} is set but CAIRN_AMQP_URL does not start with amqps://")]
    NotTls { path: PathBuf },
}

impl Endpoint {
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), ca_pem: None }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Also trusts the CA certificates in the PEM file at `path` (read now, so a bad file fails
    /// at start, naming it).
    pub fn with_ca_file(mut self, path: &Path) -> Result<Self, EndpointError> {
        if !self.url.starts_with("amqps://") {
            return Err(EndpointError::NotTls { path: path.to_owned() });
        }
        let pem = std::fs::read_to_string(path)
            .map_err(|source| EndpointError::Read { path: path.to_owned(), source })?;
        let no_certificate = |reason: String| EndpointError::NoCertificate { path: path.to_owned(), reason };
        let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| no_certificate(e.to_string()))?;
        if certificates.is_empty() {
            return Err(no_certificate("no -----BEGIN CERTIFICATE----- block".into()));
        }
        self.ca_pem = Some(pem);
        Ok(self)
    }

    /// Opens a connection: plain TCP for `amqp://`, TLS for `amqps://`.
    pub async fn connect(&self, properties: ConnectionProperties) -> Result<Connection, lapin::Error> {
        let tls = OwnedTLSConfig { identity: None, cert_chain: self.ca_pem.clone() };
        Connection::connect_with_config(&self.url, properties, tls, lapin::runtime::default_runtime()?).await
    }
}

impl From<String> for Endpoint {
    fn from(url: String) -> Self {
        Self::new(url)
    }
}

impl From<&str> for Endpoint {
    fn from(url: &str) -> Self {
        Self::new(url)
    }
}

/// Without the URL's password.
impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match (self.url.find("://"), self.url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &self.url[..scheme + 3], &self.url[at..])
            }
            _ => self.url.clone(),
        };
        f.debug_struct("Endpoint").field("url", &url).field("ca", &self.ca_pem.is_some()).finish()
    }
}

/// The kind of queue the aggregator declares (`CAIRN_AMQP_QUEUE_TYPE`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Classic queues: one broker node holds each (the default).
    #[default]
    Classic,
    /// Quorum queues, replicated over a clustered broker: a message redelivered more than
    /// [`QUORUM_DELIVERY_LIMIT`] times (a message that keeps crashing its consumer) is
    /// dead-lettered to `{queue}.dead` rather than retried forever or dropped.
    Quorum,
}

/// Deliveries of one message to a quorum queue's consumers before it is dead-lettered.
pub const QUORUM_DELIVERY_LIMIT: i64 = 20;

/// The exchanges and queues the aggregator consumes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    pub shards: u16,
    pub queue_type: QueueType,
}

impl Topology {
    pub fn shard_exchange(&self) -> String {
        format!("{}.shards", self.exchange)
    }

    pub fn shard_queue(&self, shard: u16) -> String {
        format!("{}.{shard}", self.queue)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Declares everything (idempotent: run again after every reconnect).
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(name(&self.exchange), ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        let dead = self.dead_letter_exchange();
        channel.exchange_declare(name(&dead), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
        let queue_options = QueueDeclareOptions { durable: true, ..Default::default() };
        let mut dead_args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            dead_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        channel.queue_declare(name(&dead), queue_options, dead_args).await?;
        channel
            .queue_bind(
                name(&dead),
                name(&dead),
                name(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut args = FieldTable::default();
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        if self.queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(QUORUM_DELIVERY_LIMIT));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(dead.clone().into()));
        }
        if self.shards <= 1 {
            let queue = self.shard_queue(0);
            channel.queue_declare(name(&queue), queue_options, args).await?;
            channel
                .queue_bind(
                    name(&queue),
                    name(&self.exchange),
                    name("#"),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            return Ok(());
        }
        let hash = self.shard_exchange();
        channel
            .exchange_declare(
                name(&hash),
                ExchangeKind::Custom("x-consistent-hash".into()),
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_bind(
                name(&hash),
                name(&self.exchange),
                name("#"),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for shard in 0..self.shards {
            let queue = self.shard_queue(shard);
            channel.queue_declare(name(&queue), queue_options, args.clone()).await?;
            // The binding key of a consistent-hash exchange is the queue's weight on the ring.
            channel
                .queue_bind(
                    name(&queue),
                    name(&hash),
                    name("1"),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// The queues one aggregator consumes.
    pub fn queues(&self) -> Vec<String> {
        (0..self.shards.max(1)).map(|s| self.shard_queue(s)).collect()
    }
}

pub fn name(s: &str) -> ShortString {
    s.into()
}

/// Explains the errors of declaring the topology that have a known cause, so the log says what
/// to do. Told apart by the broker's reply code, never its text.
pub fn explain(error: &lapin::Error) -> String {
    let text = error.to_string();
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else { return text };
    match amqp.kind() {
        // 406 PRECONDITION_FAILED: a queue or exchange of this name has other arguments.
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => format!(
            "{text} (a queue of this name exists with other settings, such as another CAIRN_AMQP_QUEUE_TYPE: \
             drain and delete it, or use another CAIRN_PROGRESS_QUEUE)"
        ),
        // 503 COMMAND_INVALID on a declaration: an exchange type the broker does not know.
        AMQPErrorKind::Hard(AMQPHardError::COMMANDINVALID) => format!(
            "{text} (enable the plugin: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange, or use one shard)"
        ),
        _ => text,
    }
}

/// Connects, retrying with capped exponential backoff until it succeeds or `cancel` fires.
pub async fn connect_with_retry(endpoint: &Endpoint, cancel: &CancellationToken) -> Option<Connection> {
    let mut retries = Retries::doubling(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let delay = match endpoint.connect(ConnectionProperties::default()).await {
            Ok(conn) => return Some(conn),
            Err(e) => {
                let delay = retries.failed();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot connect to rabbitmq");
                delay
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    fn broker_error(kind: AMQPErrorKind, message: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(kind, message.into())).into()
    }

    #[test]
    fn explains_by_reply_code() {
        let inequivalent = broker_error(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'",
        );
        assert!(explain(&inequivalent).contains("CAIRN_AMQP_QUEUE_TYPE"));
        let plugin = broker_error(
            AMQPErrorKind::Hard(AMQPHardError::COMMANDINVALID),
            "COMMAND_INVALID - invalid exchange type 'x-consistent-hash'",
        );
        assert!(explain(&plugin).contains("rabbitmq_consistent_hash_exchange"));
        let other = broker_error(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND), "NOT_FOUND - no queue 'q'");
        assert_eq!(explain(&other), other.to_string());
    }
}
