//! stream-trimmer: owns retention in Redis (docs/contract.md §4). It trims every registered stream by its
//! policy without ever removing an entry a consumer group has not received and acknowledged,
//! removes idle consumers that own nothing, purges finished request records and progress trees
//! past their retention, and reports stream lengths, group lag and pending counts as metrics.
//! Several replicas may run; a lease in Redis lets one act at a time. It runs on one Redis or on
//! a Redis Cluster, per partition of the request queue (`CAIRN_REQUEST_PARTITIONS`, the same as
//! every other service's).

pub mod policy;
pub mod trimmer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cairn_redis::requests::{QueueConfig, QueueLayout};
use cairn_redis::streams::{Lease, Purger, Streams, TrimPolicy};
use cairn_redis::{RedisConfig, RedisConnection};
use cairn_runtime::{Admin, LogConfig, parse_duration, serve_admin};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use policy::{Policies, PolicyRule};
pub use trimmer::{Deps, Settings, TrimReport, trim_once};

/// Reports kept for slow subscribers of [`App::subscribe`]; older ones are dropped for them.
const REPORTS_BUFFER: usize = 64;

/// Settings of the trimmer: flags, or `CAIRN_*` environment variables.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "stream-trimmer",
    version,
    about = "Keeps Cairn's Redis bounded: safe stream trimming and retention of finished work"
)]
pub struct Config {
    #[command(flatten)]
    pub redis: RedisConfig,
    /// The request queue's stream, group and partitions: whose finished requests are purged,
    /// and which streams are its partitions (each gets the policy of the stream's name).
    #[command(flatten)]
    pub queue: QueueConfig,
    #[command(flatten)]
    pub log: LogConfig,
    /// Admin HTTP listen address (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "CAIRN_TRIMMER_ADMIN_ADDR", default_value = "0.0.0.0:9093")]
    pub admin_addr: SocketAddr,
    /// Time between runs. The lease lasts three intervals.
    #[arg(long, env = "CAIRN_TRIM_INTERVAL", default_value = "30s", value_parser = parse_interval)]
    pub interval: Duration,
    /// A stream's policy, `PATTERN=SPEC` (repeat the flag; in the variable separate rules with
    /// `;`). PATTERN is the stream's name under the key prefix, `*` matching anything:
    /// `requests=maxlen:10000`, `replies:*=maxage:1h`, `dead=maxage:7d,maxlen:100000,exact`,
    /// `audit=keep`. Exact names win over patterns; among patterns the first one wins.
    #[arg(long = "policy", env = "CAIRN_TRIM_POLICIES", value_delimiter = ';', value_parser = policy::parse_rule)]
    pub policies: Vec<PolicyRule>,
    /// Policy of every registered stream no `--policy` matches.
    #[arg(long, env = "CAIRN_TRIM_DEFAULT_POLICY", default_value = "maxlen:10000", value_parser = policy::parse_spec)]
    pub default_policy: TrimPolicy,
    /// Finished requests (succeeded, canceled, dead) are deleted this long after they finished.
    #[arg(long, env = "CAIRN_REQUEST_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub request_retention: Duration,
    /// Dead requests (and the dead-letter stream's entries) are deleted this long after they
    /// died; `forever` (the default) keeps them until retried or deleted.
    #[arg(long, env = "CAIRN_DEAD_RETENTION", default_value = "forever", value_parser = parse_retention)]
    pub dead_retention: Retention,
    /// Finished progress trees (root finished, failed or canceled) are deleted this long after
    /// their last update.
    #[arg(long, env = "CAIRN_PROGRESS_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub progress_retention: Duration,
    /// Consumers idle this long that own no pending entry leave their group.
    #[arg(long, env = "CAIRN_CONSUMER_IDLE", default_value = "1h", value_parser = parse_duration)]
    pub consumer_idle: Duration,
    /// Most request records, and most progress trees, purged per run. Records go in script calls
    /// of at most 250 and trees one per call, so Redis is never held for long whatever this is;
    /// it bounds a run's length, and must exceed what finishes in one interval.
    #[arg(long, env = "CAIRN_TRIM_PURGE_LIMIT", default_value_t = 50_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub purge_limit: u32,
    /// This replica's name in the lease; unique per process (default: host, pid and a random tag).
    #[arg(long, env = "CAIRN_TRIMMER_NAME")]
    pub name: Option<String>,
    /// How long shutdown waits for a run in progress.
    #[arg(long, env = "CAIRN_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let interval = parse_duration(s)?;
    if interval < Duration::from_millis(10) {
        return Err(format!("interval {s:?} is too short: use at least 10ms"));
    }
    Ok(interval)
}

/// How long something is kept: a duration, or for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

fn parse_retention(s: &str) -> Result<Retention, String> {
    match s.trim() {
        "forever" | "never" | "keep" => Ok(Retention(None)),
        other => {
            parse_duration(other).map(|d| Retention(Some(d))).map_err(|e| format!("{e}, or \"forever\""))
        }
    }
}

impl Config {
    /// The policies given; for the dead-letter stream, unless one is given for it, the dead
    /// retention: `keep`, or `maxage` of it; and for the live change feed (docs/contract.md §2 Live: 10 000
    /// entries per tree and one hour; `pf:<root>` per tree, `pfeed` the notifications), unless
    /// rules for those names are given.
    pub fn policies(&self) -> Policies {
        let mut rules = self.policies.clone();
        if !rules.iter().any(|rule| rule.pattern == "dead") {
            let spec = match self.dead_retention.0 {
                None => "keep".to_owned(),
                Some(retention) => format!("maxage:{}ms", retention.as_millis()),
            };
            rules.push(policy::parse_rule(&format!("dead={spec}")).expect("a valid dead-letter policy"));
        }
        let feed =
            TrimPolicy { max_len: Some(10_000), max_age: Some(Duration::from_secs(3600)), exact: false };
        for pattern in ["pf:*", "pfeed"] {
            if !rules.iter().any(|rule| rule.pattern == pattern) {
                rules.push(PolicyRule { pattern: pattern.to_owned(), policy: feed });
            }
        }
        Policies::new(rules, self.default_policy)
    }

    pub fn settings(&self) -> Settings {
        Settings {
            request_retention: self.request_retention,
            dead_retention: self.dead_retention.0,
            progress_retention: self.progress_retention,
            consumer_idle: self.consumer_idle,
            purge_limit: self.purge_limit as usize,
        }
    }

    /// The lease outlives two missed runs, so one slow run does not hand it over.
    pub fn lease_ttl(&self) -> Duration {
        self.interval * 3
    }

    /// The lease key of a prefix: one active trimmer per prefix.
    pub fn lease_key(&self) -> String {
        cairn_redis::keys::retention::lease(&self.redis.prefix)
    }

    /// The request queue's layout under the key prefix (tagged later, by the connection).
    pub fn queue_layout(&self) -> QueueLayout {
        self.queue.layout(&self.redis.prefix)
    }
}

fn default_instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{}-{}-{tag}", if host.is_empty() { "trimmer" } else { host }, std::process::id())
}

/// A built trimmer, its admin listener bound.
pub struct App {
    config: Config,
    deps: Arc<Deps>,
    redis: RedisConnection,
    admin: TcpListener,
    reports: broadcast::Sender<Arc<TrimReport>>,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        cairn_runtime::metrics_handle();
        let redis = config.redis.connection().context("invalid Redis settings")?;
        let instance = config.name.clone().unwrap_or_else(default_instance_name);
        let lease = Lease::new(redis.clone(), config.lease_key(), instance, config.lease_ttl());
        let deps = Arc::new(Deps::new(
            Streams::new(redis.clone(), config.redis.prefix.clone()),
            Purger::for_layout(redis.clone(), &config.queue_layout()),
            lease,
            config.policies(),
            config.settings(),
        ));
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen on CAIRN_TRIMMER_ADMIN_ADDR={}", config.admin_addr))?;
        let (reports, _) = broadcast::channel(REPORTS_BUFFER);
        Ok(App { config, deps, redis, admin, reports })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    /// This replica's name in the lease.
    pub fn instance(&self) -> &str {
        self.deps.lease.instance()
    }

    /// What a run uses, to call [`trim_once`] directly.
    pub fn deps(&self) -> Arc<Deps> {
        self.deps.clone()
    }

    /// The report of every run from now on, also of runs that did nothing (lease held elsewhere).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TrimReport>> {
        self.reports.subscribe()
    }

    /// Runs until `shutdown` fires; then finishes the run in progress within the grace period,
    /// releases the lease and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App { config, deps, redis, admin, reports } = self;
        info!(
            admin = %admin.local_addr()?,
            instance = deps.lease.instance(),
            interval = ?config.interval,
            "stream-trimmer starting"
        );
        let admin_router = Admin::new("stream-trimmer")
            .readiness(Arc::new(cairn_redis::RedisReady(redis)))
            .with_shutdown(shutdown.clone())
            .router();
        let admin_stop = CancellationToken::new();
        let admin_server = tokio::spawn(serve_admin(admin, admin_router, admin_stop.clone()));
        let worker = tokio::spawn(trimmer::run(deps, config.interval, reports, shutdown.clone()));
        shutdown.cancelled().await;
        info!(grace = ?config.grace, "stream-trimmer shutting down");
        let drained = cairn_runtime::drain("stream-trimmer", config.grace, async {
            let _ = worker.await;
        })
        .await;
        admin_stop.cancel();
        let _ = admin_server.await;
        if drained {
            info!("stream-trimmer stopped");
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
        let config = Config::try_parse_from(["stream-trimmer"]).unwrap();
        assert_eq!(config.admin_addr.port(), 9093);
        assert_eq!(config.interval, Duration::from_secs(30));
        assert_eq!(config.lease_ttl(), Duration::from_secs(90));
        assert_eq!(config.request_retention, Duration::from_secs(24 * 3600));
        assert_eq!(config.progress_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(config.consumer_idle, Duration::from_secs(3600));
        assert_eq!(config.default_policy, TrimPolicy { max_len: Some(10_000), ..TrimPolicy::default() });
        assert!(config.policies.is_empty());
        assert_eq!(config.lease_key(), "cairn:trimmer:lease");
        assert_eq!(
            config.queue_layout(),
            cairn_redis::requests::QueueLayout::new("cairn", "requests", "processors")
        );
        let partitioned = Config::try_parse_from(["stream-trimmer", "--request-partitions=3"]).unwrap();
        assert_eq!(partitioned.queue_layout().all()[2].stream, "cairn:requests:2");
        assert!(Config::try_parse_from(["stream-trimmer", "--request-partitions=0"]).is_err());
    }

    #[test]
    fn policy_flags_repeat_and_split_on_semicolons() {
        let config = Config::try_parse_from([
            "stream-trimmer",
            "--policy",
            "requests=maxlen:5",
            "--policy=replies:*=maxage:1h;dead=maxlen:7,exact",
        ])
        .unwrap();
        let patterns: Vec<&str> = config.policies.iter().map(|r| r.pattern.as_str()).collect();
        assert_eq!(patterns, ["requests", "replies:*", "dead"]);
        let policies = config.policies();
        assert!(policies.for_stream("dead").exact);
        assert_eq!(policies.for_stream("other").max_len, Some(10_000));
        assert_eq!(policies.for_stream("other").max_age, None);
        let feed = policies.for_stream("pf:_portal.job1");
        assert_eq!((feed.max_len, feed.max_age), (Some(10_000), Some(Duration::from_secs(3600))));
        assert_eq!(policies.for_stream("pfeed"), feed);
        let own =
            Config::try_parse_from(["stream-trimmer", "--policy", "pf:*=maxlen:50"]).unwrap().policies();
        assert_eq!(own.for_stream("pf:x").max_len, Some(50), "a configured rule wins");
    }

    #[test]
    fn bad_values_are_refused_naming_the_part() {
        let error =
            cairn_runtime::try_parse_from::<Config, _, _>(["stream-trimmer", "--policy", "dead=maxage:7x"])
                .unwrap_err();
        assert!(error.contains("maxage:7x"), "{error}");
        assert!(Config::try_parse_from(["stream-trimmer", "--interval", "0s"]).is_err());
        assert!(Config::try_parse_from(["stream-trimmer", "--default-policy", "exact"]).is_err());
        assert!(Config::try_parse_from(["stream-trimmer", "--purge-limit", "0"]).is_err());
    }
}
