//! request-processor: runs requests from the consumer group of every partition of the request
//! stream through handlers, on one Redis or a Redis Cluster; keeps their leases alive while they
//! run, stores their outcomes (fenced by lease ownership), reclaims the requests of dead
//! processors and reports every request's lifecycle as progress.

pub mod handler;
pub mod handlers;
pub mod streams;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cairn_amqp::{AmqpConfig, ProgressPublisher, PublisherConfig};
use cairn_error::Retries;
use cairn_redis::requests::{QueueConfig, QueueError, QueueLayout, RequestQueues};
use cairn_redis::{RedisConfig, RedisConnection};
use cairn_requests::{Backoff, LeaseSettings};
use cairn_runtime::{Admin, LogConfig, parse_duration, serve_admin};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use handler::{Context, Handler, HandlerError, HandlerSet, ProgressSink};
pub use streams::{StreamReader, Streams};

/// Settings of the processor: flags, or `CAIRN_*` environment variables.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "request-processor", version, about = "Runs Cairn requests from the Redis stream")]
pub struct Config {
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub log: LogConfig,
    /// Only CAIRN_AUTH_JWT_SECRET matters here: it signs each run's progress token. Give it to
    /// the processor when the other services verify tokens.
    #[command(flatten)]
    pub auth: cairn_auth::AuthConfig,
    /// Admin HTTP listen address (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "CAIRN_PROCESSOR_ADMIN_ADDR", default_value = "0.0.0.0:9092")]
    pub admin_addr: SocketAddr,
    /// Most progress nodes whose latest state waits to be sent while RabbitMQ is away; past it
    /// the oldest are dropped (terminal request states are written to the node by Redis itself).
    #[arg(long, env = "CAIRN_PROGRESS_BUFFER_KEYS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub progress_buffer_keys: u32,
    /// The request stream, its partitions (every processor reads all of them) and the group.
    #[command(flatten)]
    pub queue: QueueConfig,
    /// This processor's consumer name; unique per process (default: host, pid and a random tag).
    #[arg(long, env = "CAIRN_PROCESSOR_NAME")]
    pub name: Option<String>,
    /// Requests run at once, across every partition of the request queue.
    #[arg(long, env = "CAIRN_PROCESSOR_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// How often a running request's lease is renewed (and cancellation checked).
    #[arg(long, env = "CAIRN_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Idle time after which another processor takes a request over.
    #[arg(long, env = "CAIRN_LEASE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub lease_timeout: Duration,
    /// First retry delay cap (exponential, full jitter).
    #[arg(long, env = "CAIRN_RETRY_BACKOFF", default_value = "200ms", value_parser = parse_duration)]
    pub retry_backoff: Duration,
    /// Largest retry delay.
    #[arg(long, env = "CAIRN_RETRY_BACKOFF_MAX", default_value = "30s", value_parser = parse_duration)]
    pub retry_backoff_max: Duration,
    /// Handlers file (TOML); without one the processor offers only `echo`.
    #[arg(long, env = "CAIRN_HANDLERS_FILE")]
    pub handlers: Option<PathBuf>,
    /// Public base URL of the ingress, for the progress URL given to handlers.
    #[arg(long, env = "CAIRN_PUBLIC_URL", default_value = "http://127.0.0.1:8080")]
    pub public_url: String,
    /// How long shutdown waits for in-flight requests to finish.
    #[arg(long, env = "CAIRN_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
}

impl Config {
    pub fn lease(&self) -> anyhow::Result<LeaseSettings> {
        let lease =
            LeaseSettings { heartbeat_interval: self.heartbeat_interval, lease_timeout: self.lease_timeout };
        lease.validate().context("CAIRN_LEASE_TIMEOUT / CAIRN_HEARTBEAT_INTERVAL")?;
        Ok(lease)
    }

    /// The request queue's layout: its stream, group and partitions (every one is read).
    pub fn queue_layout(&self) -> QueueLayout {
        self.queue.layout(&self.redis.prefix)
    }
}

fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{}-{}-{tag}", if host.is_empty() { "processor" } else { host }, std::process::id())
}

/// A built processor, its admin listener bound.
pub struct App {
    config: Config,
    deps: Arc<worker::Deps>,
    redis: RedisConnection,
    admin: TcpListener,
}

impl App {
    /// Builds a processor with the handlers of `CAIRN_HANDLERS_FILE` (or just `echo`).
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let handlers = match &config.handlers {
            Some(path) => handlers::config::load(path)
                .with_context(|| format!("CAIRN_HANDLERS_FILE={}", path.display()))?,
            None => handlers::config::default_handlers(),
        };
        Self::build_with_handlers(config, handlers).await
    }

    /// Builds a processor with your own handlers (see `crates/example-processor`).
    pub async fn build_with_handlers(config: Config, handlers: HandlerSet) -> anyhow::Result<App> {
        cairn_runtime::metrics_handle();
        let lease = config.lease()?;
        // One Redis or a cluster: the queue's keys are tagged by partition on a cluster.
        let redis = config.redis.connection().context("invalid Redis settings")?;
        let queues = RequestQueues::new(redis.clone(), config.queue_layout());
        let amqp = config.amqp.endpoint().context("invalid AMQP settings")?;
        let mut publisher_config = PublisherConfig::new(amqp, config.amqp.exchange.clone());
        publisher_config.max_pending = config.progress_buffer_keys as usize;
        let publisher = ProgressPublisher::start(publisher_config);
        let settings = worker::Settings {
            consumer: config.name.clone().unwrap_or_else(default_consumer_name),
            concurrency: config.concurrency as usize,
            lease,
            backoff: Backoff {
                base: config.retry_backoff,
                max: config.retry_backoff_max,
                ..Backoff::default()
            },
            public_url: config.public_url.clone(),
            minter: config.auth.minter(),
        };
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen on CAIRN_PROCESSOR_ADMIN_ADDR={}", config.admin_addr))?;
        let blobs = cairn_redis::BlobStore::new(redis.clone(), queues.layout());
        let deps = Arc::new(worker::Deps { queues, blobs, handlers, publisher, settings });
        Ok(App { config, deps, redis, admin })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    pub fn consumer(&self) -> &str {
        &self.deps.settings.consumer
    }

    /// Runs until `shutdown` fires; then stops reading, lets in-flight requests finish within
    /// the grace period, and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App { config, deps, redis, admin } = self;
        let admin_router = Admin::new("request-processor")
            .readiness(Arc::new(cairn_redis::RedisReady(redis)))
            .with_shutdown(shutdown.clone())
            .router();
        let admin_stop = CancellationToken::new();
        let admin_server = tokio::spawn(serve_admin(admin, admin_router, admin_stop.clone()));
        let mut retries = Retries::doubling(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            // The partition count must be the queue's and every partition's group must exist
            // before the first read; wait for Redis to come up.
            let delay = match deps.queues.prepare().await {
                Ok(()) => break,
                Err(error @ QueueError::PartitionsChanged { .. }) => {
                    admin_stop.cancel();
                    let _ = admin_server.await;
                    return Err(error.into());
                }
                Err(error) => {
                    let delay = retries.failed();
                    tracing::warn!(%error, retry_in = ?delay, "waiting for redis");
                    delay
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => { admin_stop.cancel(); return Ok(()) }
                () = tokio::time::sleep(delay) => {}
            }
        }
        let layout = deps.queues.layout();
        info!(
            consumer = %deps.settings.consumer,
            stream = %layout.stream,
            partitions = layout.partitions,
            cluster = layout.tagged,
            "request-processor starting"
        );
        worker::run(deps, config.redis.clone(), shutdown, config.grace).await;
        admin_stop.cancel();
        let _ = admin_server.await;
        info!("request-processor stopped");
        Ok(())
    }
}
