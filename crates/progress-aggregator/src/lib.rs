//! progress-aggregator: owns the progress tree. It consumes progress updates from RabbitMQ and
//! applies them to Redis (acking only after they are stored), and serves the tree over gRPC
//! (`cairn.v1.Progress`, `grpc.health.v1`, server reflection) and its admin port.

pub mod consumer;
pub mod grpc;
pub mod grpc_metrics;
pub mod shards;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use cairn_amqp::{AmqpConfig, QueueType, Topology};
use cairn_proto::v1::progress_server::ProgressServer;
use cairn_redis::RedisConnection;
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_runtime::{Admin, LogConfig, Readiness, parse_duration, serve_admin};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::consumer::{ConsumerSettings, Stalls};
use crate::grpc::ProgressService;
use crate::shards::ShardLeases;

/// Settings of the aggregator: flags, or `CAIRN_*` environment variables.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "progress-aggregator",
    version,
    about = "Applies progress updates and serves the tree over gRPC"
)]
pub struct Config {
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub auth: cairn_auth::AuthConfig,
    /// gRPC listen address.
    #[arg(long, env = "CAIRN_AGGREGATOR_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Admin HTTP listen address (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "CAIRN_AGGREGATOR_ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    pub admin_addr: SocketAddr,
    /// Name of the aggregator's queues: `{queue}.{shard}`, dead letters in `{queue}.dead`.
    #[arg(long, env = "CAIRN_PROGRESS_QUEUE", default_value = "progress")]
    pub queue: String,
    /// Number of shard queues (1 = no consistent-hash exchange, no plugin needed). Every replica
    /// must use the same number.
    #[arg(long, env = "CAIRN_PROGRESS_SHARDS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub shards: u16,
    /// Kind of queues to declare: `classic`, or `quorum` for a clustered broker (with a delivery
    /// limit, past which a message is dead-lettered). Every replica must use the same.
    #[arg(long, env = "CAIRN_AMQP_QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,
    /// How long a replica's hold on a shard lasts without renewal: a replica that dies hands its
    /// shards to the others this long after (renewed every third of it).
    #[arg(long, env = "CAIRN_AGGREGATOR_LEASE_TTL", default_value = "10s", value_parser = parse_lease_ttl)]
    pub lease_ttl: Duration,
    /// This replica's name among the aggregators sharing the shards; unique per process
    /// (default: host, pid and a random tag).
    #[arg(long = "name", env = "CAIRN_AGGREGATOR_NAME")]
    pub name: Option<String>,
    /// Unacknowledged messages RabbitMQ may hand each shard consumer.
    #[arg(long, env = "CAIRN_AGGREGATOR_PREFETCH", default_value_t = 2000,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Most messages applied to Redis in one batch.
    #[arg(long, env = "CAIRN_AGGREGATOR_BATCH", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    #[command(flatten)]
    pub live: cairn_live::LiveArgs,
    /// How long shutdown waits for in-flight batches and calls.
    #[arg(long, env = "CAIRN_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
}

fn parse_lease_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl < Duration::from_millis(300) {
        return Err(format!("the lease ttl must be at least 300ms, got {text}"));
    }
    Ok(ttl)
}

impl Config {
    pub fn topology(&self) -> Topology {
        Topology {
            exchange: self.amqp.exchange.clone(),
            queue: self.queue.clone(),
            shards: self.shards,
            queue_type: self.queue_type,
        }
    }
}

/// Ready when Redis answers and the AMQP consumers are running.
struct Ready {
    redis: RedisConnection,
    amqp: Arc<AtomicBool>,
    stalls: Arc<Stalls>,
}

impl Readiness for Ready {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        async move {
            self.redis.ready().await?;
            if !self.amqp.load(Ordering::SeqCst) {
                return Err("rabbitmq: not consuming".into());
            }
            match self.stalls.count() {
                0 => Ok(()),
                n => Err(format!("{n} progress shard(s) cannot store their batch in redis")),
            }
        }
        .boxed()
    }
}

/// A built aggregator, its listeners bound (so tests can use port 0 and ask the address).
pub struct App {
    config: Config,
    store: ProgressStore,
    redis: RedisConnection,
    grpc: TcpListener,
    admin: TcpListener,
    verifier: Option<cairn_auth::Verifier>,
    amqp: cairn_amqp::Endpoint,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let redis = config.redis.connection().context("invalid Redis settings")?;
        let amqp = config.amqp.endpoint().context("invalid AMQP settings")?;
        let verifier = cairn_auth::verifier_or_warn(&config.auth, "progress-aggregator")
            .context("invalid auth settings")?;
        let store = ProgressStore::new(redis.clone(), config.redis.prefix.clone());
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on CAIRN_AGGREGATOR_GRPC_ADDR={}", config.grpc_addr))?;
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen on CAIRN_AGGREGATOR_ADMIN_ADDR={}", config.admin_addr))?;
        Ok(App { config, store, redis, grpc, admin, verifier, amqp })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    /// Runs until `shutdown` fires: then reports not-ready, stops intake, finishes in-flight
    /// batches and calls within the grace period, and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App { config, store, redis, grpc, admin, verifier, amqp } = self;
        let live_conn = redis.clone();
        info!(grpc = %grpc.local_addr()?, admin = %admin.local_addr()?, shards = config.shards, "progress-aggregator starting");
        let connected = Arc::new(AtomicBool::new(false));
        let settings = ConsumerSettings {
            endpoint: amqp,
            topology: config.topology(),
            prefetch: config.prefetch,
            batch: config.batch as usize,
        };
        let stalls = Arc::new(Stalls::default());
        let topology = config.topology();
        let leases = ShardLeases::new(
            redis.clone(),
            &config.redis.prefix,
            &topology.queue,
            &topology.queues(),
            config.name.clone().unwrap_or_else(shards::default_instance_name),
            config.lease_ttl,
        );
        let consumers = tokio::spawn(consumer::run(
            store.clone(),
            settings,
            leases,
            connected.clone(),
            stalls.clone(),
            shutdown.clone(),
        ));

        let ready = Arc::new(Ready { redis, amqp: connected, stalls });
        let admin_router = Admin::new("progress-aggregator")
            .readiness(ready.clone())
            .with_shutdown(shutdown.clone())
            .router();
        // The admin port outlives the drain, so probes see /readyz turn 503 while it runs.
        let admin_stop = CancellationToken::new();
        let admin_server = tokio::spawn(serve_admin(admin, admin_router, admin_stop.clone()));

        let (health, health_service) = tonic_health::server::health_reporter();
        // grpc.health.v1 tells what /readyz tells: SERVING only while Redis answers and the
        // shards consume and store.
        let health_task = tokio::spawn({
            let (health, ready, shutdown) = (health.clone(), ready.clone(), shutdown.clone());
            async move {
                let mut ticks = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        _ = ticks.tick() => {}
                    }
                    let status = match ready.check().await {
                        Ok(()) => tonic_health::ServingStatus::Serving,
                        Err(_) => tonic_health::ServingStatus::NotServing,
                    };
                    health.set_service_status("", status).await;
                    health.set_service_status(cairn_proto::v1::progress_server::SERVICE_NAME, status).await;
                }
            }
        });
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(cairn_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // Both protocol versions: stock tools still differ in which one they ask for.
        let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
        let reflection_v1alpha = reflection().build_v1alpha().context("building reflection v1alpha")?;
        let grpc_shutdown = shutdown.clone();
        // Watch streams end when shutdown begins, so they never hold the grace period.
        let live = cairn_live::Live::start(
            config.redis.clone(),
            live_conn,
            config.live.settings(),
            shutdown.child_token(),
        );
        let grpc_server = tokio::spawn(
            tonic::transport::Server::builder()
                .timeout(Duration::from_secs(30))
                .layer(grpc_metrics::GrpcMetricsLayer)
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(ProgressServer::with_interceptor(
                    ProgressService::new(store, live),
                    grpc::authenticate(verifier),
                ))
                .serve_with_incoming_shutdown(
                    // Small request/response pairs: without TCP_NODELAY, Nagle and delayed ACKs
                    // add ~40 ms to a call.
                    tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                    async move {
                        grpc_shutdown.cancelled().await;
                        health.set_not_serving::<ProgressServer<ProgressService>>().await;
                        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                    },
                ),
        );

        shutdown.cancelled().await;
        info!(grace = ?config.grace, "progress-aggregator shutting down");
        let drained = cairn_runtime::drain("progress-aggregator", config.grace, async {
            let _ = consumers.await;
            let _ = health_task.await;
            let _ = grpc_server.await;
        })
        .await;
        admin_stop.cancel();
        let _ = admin_server.await;
        if drained {
            info!("progress-aggregator stopped");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn config_is_consistent_and_defaults_work_on_localhost() {
        Config::command().debug_assert();
        let config = Config::try_parse_from(["progress-aggregator"]).unwrap();
        assert_eq!(config.grpc_addr.port(), 50051);
        assert_eq!(config.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(config.topology().queues().len(), 4);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Config::try_parse_from(["progress-aggregator", "--shards", "0"]).is_err());
        assert!(Config::try_parse_from(["progress-aggregator", "--key-prefix", "a b"]).is_err());
        assert!(Config::try_parse_from(["progress-aggregator", "--grace", "soon"]).is_err());
        assert!(Config::try_parse_from(["progress-aggregator", "--lease-ttl", "10ms"]).is_err());
    }
}
