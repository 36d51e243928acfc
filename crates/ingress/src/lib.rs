//! ingress: the public REST face of Cairn. It owns the HTTP routes clients call and adapts them
//! onto the services behind it: SCA's progress API (`/status/{key}`, `/health`), where every
//! progress read and write is a `cairn.v1.Progress` call to the progress aggregator, and the
//! request API (`/v1/requests`, `/v1/dead-letters`), which submits requests to the Redis request
//! queue (each to its partition, `CAIRN_REQUEST_PARTITIONS`; one Redis or a Redis Cluster) and
//! answers waiting clients from this replica's own reply stream. Ingress keeps no
//! state of its own beyond those waiters, so it scales freely. It answers `/healthz` and
//! `/readyz` on its public port too, where load balancers probe; `/metrics` only on its admin
//! port.

mod aggregator;
mod auth;
mod browse_api;
mod error;
mod handler_names;
mod http_metrics;
mod listener;
mod live;
mod openapi;
mod progress_api;
mod replies;
mod requests;
mod requests_api;
mod streams;
mod ui;
mod uploads;
mod uploads_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::Context as _;
use axum::Router;
use cairn_error::Retries;
use cairn_redis::requests::{QueueConfig, QueueError, QueueLayout, QueueNames, RequestQueues};
use cairn_redis::{ProgressStore, RedisConfig, RedisConnection};
use cairn_requests::{DEFAULT_MAX_ATTEMPTS, MAX_MAX_ATTEMPTS};
use cairn_runtime::{Admin, LogConfig, parse_duration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use tracing::{info, warn};

pub use crate::aggregator::{Aggregator, Read, UrlError};
pub use crate::error::ApiError;
pub use crate::handler_names::{DEFAULT_HANDLERS, HandlersFileError};
pub use crate::live::LiveConfig;
pub use crate::openapi::ApiDoc;
pub use crate::requests::RequestsError;

/// Settings of the ingress: flags, or `CAIRN_*` environment variables.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "ingress", version, about = "Cairn's public REST API")]
pub struct Config {
    /// HTTP listen address (the API, the UI, `/healthz` and `/readyz`).
    #[arg(long, env = "CAIRN_INGRESS_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,
    /// Admin HTTP listen address (`/healthz`, `/readyz`, `/metrics`), apart from the public port.
    #[arg(long, env = "CAIRN_INGRESS_ADMIN_ADDR", default_value = "127.0.0.1:9090")]
    pub admin_addr: SocketAddr,
    /// gRPC URL of the progress aggregator (`http://host:port`).
    #[arg(long, env = "CAIRN_AGGREGATOR_URL", default_value = "http://127.0.0.1:50051")]
    pub aggregator_url: String,
    /// Longest a call to the aggregator may take before the client gets a 504.
    #[arg(long, env = "CAIRN_INGRESS_REQUEST_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub request_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "CAIRN_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub live: LiveConfig,
    #[command(flatten)]
    pub auth: cairn_auth::AuthConfig,
    /// Per-client rate limit in requests a second (by token subject with auth on, else by peer
    /// address); over it a client gets 429 with Retry-After. Off unless set.
    #[arg(long, env = "CAIRN_RATE_LIMIT", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit: Option<u32>,
    /// Requests a client may make at once above CAIRN_RATE_LIMIT (default: one second's worth).
    #[arg(long, env = "CAIRN_RATE_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_burst: Option<u32>,
    /// The request stream, its partitions and the processors' group (whose lag is the
    /// backpressure signal), as the processors read them.
    #[command(flatten)]
    pub queue: QueueConfig,
    /// Attempts a request gets when it names no `max_attempts`.
    #[arg(long, env = "CAIRN_DEFAULT_MAX_ATTEMPTS", default_value_t = DEFAULT_MAX_ATTEMPTS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_MAX_ATTEMPTS)))]
    pub default_max_attempts: u32,
    /// Backpressure: submissions get 503 while more requests than this wait undelivered.
    #[arg(long, env = "CAIRN_MAX_LAG", default_value_t = 100_000)]
    pub max_lag: u64,
    /// This replica's name, which names its reply stream; unique per replica (default: a random
    /// tag).
    #[arg(long, env = "CAIRN_INGRESS_REPLICA", value_parser = parse_replica)]
    pub replica: Option<String>,
    /// How long an idempotency key keeps naming its request.
    #[arg(long, env = "CAIRN_IDEMPOTENCY_TTL", default_value = "24h", value_parser = positive_duration)]
    pub idempotency_ttl: Duration,
    /// Longest `Prefer: wait` honoured; longer waits are cut to it.
    #[arg(long, env = "CAIRN_MAX_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub max_wait: Duration,
    /// First pause before a waiting client's request is re-read in case its reply was missed or
    /// went to another replica; it doubles after each re-read, up to 4 s.
    #[arg(long, env = "CAIRN_REPLY_POLL_INTERVAL", default_value = "500ms", value_parser = positive_duration)]
    pub reply_poll_interval: Duration,
    /// The processors' handlers file (TOML); only its `[handlers.NAME]` names are read. Without
    /// one the known handlers are the processor's default: `echo`.
    #[arg(long = "handlers", env = "CAIRN_HANDLERS_FILE")]
    pub handlers: Option<PathBuf>,
    /// A client must send a request's headers within this time (an idle keep-alive connection
    /// that starts no request within it is closed too).
    #[arg(long, env = "CAIRN_HEADER_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_timeout: Duration,
    /// A connection with no request in flight that moves no byte for this long is closed.
    #[arg(long, env = "CAIRN_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub idle_timeout: Duration,
    /// A request body must arrive whole within this time, or the request is answered 408.
    #[arg(long, env = "CAIRN_BODY_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub body_timeout: Duration,
    /// Most connections open at once; more wait to be accepted.
    #[arg(long, env = "CAIRN_MAX_CONNECTIONS", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Most requests answered at once (long-polls and live streams count apart); more wait up to
    /// CAIRN_CONCURRENCY_WAIT for a slot, then get 503.
    #[arg(long, env = "CAIRN_MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,
    /// How long a request waits for a slot when CAIRN_MAX_CONCURRENT_REQUESTS are running.
    #[arg(long, env = "CAIRN_CONCURRENCY_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub concurrency_wait: Duration,
    /// Most long-polls (`Prefer: wait`) at once; more get 503 with Retry-After.
    #[arg(long, env = "CAIRN_MAX_WAITERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waiters: u32,
    /// Largest data stream, and largest resumable upload (bytes; `Tus-Max-Size`).
    #[arg(long, env = "CAIRN_MAX_STREAM_BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_stream_bytes: u64,
    /// Most bytes of data streams one request may carry, all streams together.
    #[arg(long, env = "CAIRN_MAX_REQUEST_STREAM_BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_stream_bytes: u64,
    /// A resumable upload untouched for this long expires, with its bytes (Redis TTL).
    #[arg(long, env = "CAIRN_UPLOAD_EXPIRY", default_value = "24h", value_parser = positive_duration)]
    pub upload_expiry: Duration,
}

impl Config {
    pub fn queue_layout(&self) -> QueueLayout {
        self.queue.layout(&self.redis.prefix)
    }

    pub fn queue_names(&self) -> QueueNames {
        self.queue_layout().partition(0)
    }

    fn rate_limit(&self) -> Option<auth::RateLimit> {
        let rate = std::num::NonZeroU32::new(self.rate_limit?)?;
        let burst = self.rate_burst.and_then(std::num::NonZeroU32::new).unwrap_or(rate);
        Some(auth::RateLimit { rate, burst })
    }

    fn limits(&self) -> listener::Limits {
        listener::Limits {
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            body_timeout: self.body_timeout,
            max_connections: self.max_connections as usize,
            max_concurrent: self.max_concurrent_requests as usize,
            concurrency_wait: self.concurrency_wait,
            max_waiters: self.max_waiters as usize,
        }
    }
}

fn parse_replica(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!("invalid replica name {s:?}: use 1-64 characters of A-Z a-z 0-9 _ - ."))
    }
}

fn random_replica() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("invalid duration {s:?}: must be more than 0")),
        d => Ok(d),
    }
}

/// A built ingress, its listener bound (so tests can use port 0 and ask the address).
pub struct App {
    config: Config,
    listener: TcpListener,
    admin: TcpListener,
    aggregator: Aggregator,
    redis: RedisConnection,
    requests: Arc<requests::Requests>,
    uploads: Arc<uploads::Uploads>,
    waiters: Arc<replies::Waiters>,
    replica: String,
    live: cairn_live::Live,
    gate: auth::Gate,
    /// Cancelled when shutdown begins, ending every live stream (they would hold the graceful
    /// shutdown open forever).
    live_stop: CancellationToken,
    /// Cancelled when shutdown begins, so `/readyz` answers 503 while requests drain and waiting
    /// clients get their answer.
    draining: CancellationToken,
}

impl App {
    /// Binds the listener, reads the handler names and prepares the aggregator channel and the
    /// Redis connection (one Redis, or a Redis Cluster with `CAIRN_REDIS_CLUSTER=true`). Both
    /// connect lazily, so the ingress starts (and reports not-ready) while either is away.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        // Install the recorder before the first request records anything.
        cairn_runtime::metrics_handle();
        let aggregator = Aggregator::connect_lazy(&config.aggregator_url, config.request_timeout)
            .with_context(|| format!("invalid CAIRN_AGGREGATOR_URL={:?}", config.aggregator_url))?;
        let verifier =
            cairn_auth::verifier_or_warn(&config.auth, "ingress").context("invalid auth settings")?;
        let gate = auth::Gate::new(verifier, config.rate_limit(), config.live.allowed_origins.clone());
        let handlers =
            handler_names::load(config.handlers.as_deref()).context("invalid CAIRN_HANDLERS_FILE")?;
        let redis = config.redis.connection().context("invalid Redis settings")?;
        let replica = config.replica.clone().unwrap_or_else(random_replica);
        let names = config.queue_names();
        let queues = RequestQueues::new(redis.clone(), config.queue_layout());
        let settings = requests::Settings {
            default_max_attempts: config.default_max_attempts,
            max_lag: config.max_lag,
            idempotency_ttl: config.idempotency_ttl,
            max_wait: config.max_wait,
            poll_interval: config.reply_poll_interval,
            reply_stream: names.replies(&replica),
            max_stream_bytes: config.max_stream_bytes,
            max_request_stream_bytes: config.max_request_stream_bytes,
            stream_expiry: config.upload_expiry,
        };
        let waiters = Arc::new(replies::Waiters::default());
        let draining = CancellationToken::new();
        let requests = Arc::new(requests::Requests::new(
            queues,
            ProgressStore::new(redis.clone(), config.redis.prefix.clone()),
            cairn_redis::BlobStore::new(redis.clone(), &config.queue_layout()),
            waiters.clone(),
            handlers,
            settings,
            draining.clone(),
        ));
        let uploads = Arc::new(uploads::Uploads::new(
            cairn_redis::BlobStore::new(redis.clone(), &config.queue_layout()),
            ProgressStore::new(redis.clone(), config.redis.prefix.clone()),
            uploads::UploadSettings { max_bytes: config.max_stream_bytes, expiry: config.upload_expiry },
        ));
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on CAIRN_INGRESS_ADDR={}", config.addr))?;
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen on CAIRN_INGRESS_ADMIN_ADDR={}", config.admin_addr))?;
        let live_stop = CancellationToken::new();
        let live = cairn_live::Live::start(
            config.redis.clone(),
            redis.clone(),
            config.live.live.settings(),
            live_stop.clone(),
        );
        Ok(App {
            config,
            listener,
            admin,
            aggregator,
            redis,
            requests,
            uploads,
            waiters,
            replica,
            live,
            gate,
            live_stop,
            draining,
        })
    }

    /// This replica's name (its reply stream is `{prefix}:replies:{replica}`).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Where `/metrics` (with `/healthz` and `/readyz`) is served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    fn admin(&self) -> Admin {
        Admin::new("ingress")
            .readiness(Arc::new(self.aggregator.clone()))
            // `/readyz` needs Redis, which holds the request queue.
            .readiness(Arc::new(cairn_redis::RedisReady(self.redis.clone())))
            .with_shutdown(self.draining.clone())
    }

    /// Every route of the public port, with its metrics and tracing layers (`/metrics` is on
    /// the admin port only).
    pub fn router(&self) -> Router {
        let admin = self.admin().probes_router();
        progress_api::router(self.aggregator.clone(), self.config.live.live.stall_after)
            .merge(live::router(self.live.clone(), &self.config.live, self.gate.verifier().cloned()))
            .merge(requests_api::router(self.requests.clone()))
            .merge(uploads_api::router(self.uploads.clone()))
            .merge(admin)
            .merge(browse_api::router(
                self.requests.queues().clone(),
                ProgressStore::new(self.redis.clone(), self.config.redis.prefix.clone()),
            ))
            .merge(ui::router())
            .merge(openapi::router())
            .fallback(error::route_not_found)
            .method_not_allowed_fallback(error::method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(self.gate.clone(), auth::authenticate))
            .layer(axum::middleware::from_fn(http_metrics::record))
            .layer(TraceLayer::new_for_http())
    }

    /// Serves until `shutdown` fires, then reports not-ready, ends client waits, stops accepting
    /// connections and lets in-flight requests finish within the grace period. The consumer group
    /// is created in the background, retried until Redis answers: a Redis that is away never
    /// fails the start.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let router = self.router();
        let admin_router = self.admin().router();
        let App { config, listener, admin, requests, waiters, replica, draining, live_stop, .. } = self;
        info!(
            addr = %listener.local_addr()?,
            admin = %admin.local_addr()?,
            aggregator = %config.aggregator_url,
            redis = %cairn_runtime::redact_url(&config.redis.url),
            prefix = %config.redis.prefix,
            replica = %replica,
            "ingress starting"
        );
        let background = CancellationToken::new();
        let (refused, mut refusal) = tokio::sync::oneshot::channel();
        let group = tokio::spawn(prepare_queue(requests.clone(), refused, background.clone()));
        let reader = tokio::spawn(replies::run_reader(
            config.redis.clone(),
            requests.settings().reply_stream.clone(),
            waiters,
            background.clone(),
        ));
        let stop = CancellationToken::new();
        // The admin port stays up while the public one drains, so probes see /readyz turn 503.
        let admin_stop = CancellationToken::new();
        let admin_server = tokio::spawn(cairn_runtime::serve_admin(admin, admin_router, admin_stop.clone()));
        let mut server = tokio::spawn(listener::serve(listener, router, config.limits(), stop.clone()));
        tokio::select! {
            result = &mut server => {
                background.cancel();
                live_stop.cancel();
                admin_stop.cancel();
                result.context("ingress server task failed")?;
                anyhow::bail!("ingress server stopped by itself");
            }
            Ok(error) = &mut refusal => {
                background.cancel();
                live_stop.cancel();
                stop.cancel();
                admin_stop.cancel();
                let _ = tokio::join!(server, reader, admin_server);
                return Err(error.into());
            }
            () = shutdown.cancelled() => {}
        }
        draining.cancel();
        live_stop.cancel();
        stop.cancel();
        info!(grace = ?config.grace, "ingress shutting down");
        let drained = cairn_runtime::drain("ingress", config.grace, &mut server).await;
        if !drained {
            warn!("ingress closed connections that were still open after the grace period");
            server.abort();
        }
        background.cancel();
        admin_stop.cancel();
        let _ = tokio::join!(group, reader, admin_server);
        requests.drop_reply_stream().await;
        info!("ingress stopped");
        Ok(())
    }
}

/// Prepares the request queue ([`RequestQueues::prepare`]), retrying with backoff until Redis
/// answers or `stop` fires; a partition count the queue refuses goes to `refused`, for `run` to
/// stop on.
async fn prepare_queue(
    requests: Arc<requests::Requests>,
    refused: tokio::sync::oneshot::Sender<QueueError>,
    stop: CancellationToken,
) {
    let mut retries = Retries::doubling(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let prepared = tokio::time::timeout(requests::REDIS_TIMEOUT, requests.queues().prepare()).await;
        let delay = match prepared {
            Ok(Ok(())) => return,
            Ok(Err(error @ QueueError::PartitionsChanged { .. })) => {
                let _ = refused.send(error);
                return;
            }
            Ok(Err(error)) => {
                let delay = retries.failed();
                warn!(%error, retry_in = ?delay, "cannot create the request group yet");
                delay
            }
            Err(_) => {
                let delay = retries.failed();
                warn!(retry_in = ?delay, "cannot create the request group yet: redis did not answer");
                delay
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_work_on_localhost() {
        let config = Config::try_parse_from(["ingress"]).unwrap();
        assert_eq!(config.addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.aggregator_url, "http://127.0.0.1:50051");
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.grace, Duration::from_secs(10));
        assert_eq!(config.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(config.queue_names(), QueueNames::new("cairn", "requests", "processors"));
        assert_eq!(config.default_max_attempts, 3);
        assert_eq!(config.max_lag, 100_000);
        assert_eq!(config.replica, None);
        assert_eq!(config.idempotency_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(config.max_wait, Duration::from_secs(60));
        assert_eq!(config.reply_poll_interval, Duration::from_millis(500));
        assert_eq!(config.handlers, None);
    }

    #[test]
    fn request_settings_are_checked() {
        let err = |args: &[&str]| {
            let mut argv = vec!["ingress"];
            argv.extend_from_slice(args);
            Config::try_parse_from(argv).unwrap_err().to_string()
        };
        assert!(err(&["--default-max-attempts", "0"]).contains("--default-max-attempts"));
        assert!(err(&["--default-max-attempts", "101"]).contains("--default-max-attempts"));
        assert!(err(&["--replica", "a b"]).contains("invalid replica name"));
        assert!(err(&["--idempotency-ttl", "0s"]).contains("must be more than 0"));
        assert!(err(&["--max-lag", "lots"]).contains("--max-lag"));
        let config = Config::try_parse_from([
            "ingress",
            "--replica",
            "pod-1",
            "--max-wait",
            "5s",
            "--request-stream",
            "s",
            "--request-group",
            "g",
        ])
        .unwrap();
        assert_eq!(config.replica.as_deref(), Some("pod-1"));
        assert_eq!(config.max_wait, Duration::from_secs(5));
        assert_eq!(config.queue_names().replies("pod-1"), "cairn:replies:pod-1");
        assert_eq!(config.queue_names().stream, "cairn:s");
        assert_eq!(random_replica().len(), 8);
    }

    #[test]
    fn zero_request_timeout_is_refused() {
        let err = Config::try_parse_from(["ingress", "--request-timeout", "0s"]).unwrap_err().to_string();
        assert!(err.contains("must be more than 0"), "{err}");
        let config = Config::try_parse_from(["ingress", "--request-timeout", "250ms"]).unwrap();
        assert_eq!(config.request_timeout, Duration::from_millis(250));
    }
}
