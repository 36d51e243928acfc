//! `cairn-bench progress`: runs the selected measurements in order (a to f, whatever order
//! `--only` names them in), each in its own Redis key prefix and RabbitMQ vhost, and assembles one
//! JSON report with the issue's targets judged (reported, never asserted).
//!
//! The services run in this process, as in the integration tests, so `bench_cores` in the CPU
//! figures counts the aggregator and ingress together with the benchmark's own clients.

mod broker;
mod grpc;
mod queue;
mod read;
mod siblings;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use cairn_progress::Key;
use cairn_redis::progress::ReadOptions;
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_testkit::{AmqpVhost, RedisNamespace};
use clap::Parser as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One measurement of the report, by the letter the issue gives it.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Measurement {
    /// Broker ceiling: a no-op consumer draining a pre-filled queue.
    A,
    /// Single-update messages applied per second by one aggregator.
    B,
    /// Burst messages: updates applied per second.
    C,
    /// gRPC `Update` from concurrent callers.
    D,
    /// One update under a parent with few versus many siblings.
    E,
    /// `GET /status/{key}?depth=2` through the ingress, and gRPC `Get`.
    F,
}

/// Sizes of the progress benchmark. The defaults finish in about two minutes on 2 cores.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Measurements to run, comma-separated: a,b,c,d,e,f.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "a,b,c,d,e,f")]
    pub only: Vec<Measurement>,
    /// Single-update messages pre-filled for (a) and (b).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,
    /// Most published messages awaiting their broker confirm while pre-filling.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub confirm_window: u64,
    /// Prefetch of (a)'s no-op consumer (the aggregator's `--prefetch` by default too).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// (a)'s consumer acks (`multiple`) every this many deliveries.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub ack_every: u64,
    /// Total updates sent as bursts in (c).
    #[arg(long, default_value_t = 500_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub burst_updates: u64,
    /// Updates per burst message in (c) (at most 4096, the burst limit).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub burst_size: u64,
    /// Producers in (c): burst `j` goes to routing key `_bench.c{j % producers}`.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub burst_producers: u64,
    /// How long (d) calls `Update`, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub grpc_seconds: f64,
    /// Concurrent callers in (d).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub grpc_callers: u64,
    /// gRPC channels (HTTP/2 connections) the callers of (d) share.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub grpc_channels: u64,
    /// Children of the large parent in (e).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub siblings: u64,
    /// Timed updates per parent in (e).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub sibling_updates: u64,
    /// Updates per round in (e); rounds alternate A B B A … to cancel drift.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub sibling_round: u64,
    /// Children of the parent read in (f).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub read_children: u64,
    /// Timed reads per interface in (f).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub reads: u64,
    /// Untimed reads before the timed ones in (f).
    #[arg(long, default_value_t = 50)]
    pub read_warmup: u64,
    /// Most seconds (f) spends timing one interface; past it, fewer than `--reads` are taken
    /// (the report says how many), so a slow read path cannot stretch the run without end.
    #[arg(long, default_value_t = 20.0)]
    pub read_budget_seconds: f64,
    /// The aggregator's `--batch` (messages per batch); its default when unset.
    #[arg(long)]
    pub aggregator_batch: Option<u32>,
    /// Aggregator replicas that drain (c)'s backlog together, sharing the shard queues; the
    /// CPU per update shows what a replica costs. (b) and the others always use one.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub aggregators: u16,
    /// Shard queues (the aggregators' `--shards`); at least `--aggregators`, or replicas idle.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub shards: u16,
}

/// Where pre-filled messages go: the aggregator's exchange (its default name).
const EXCHANGE: &str = "progress";
/// The dead-letter queue; shard queues are `progress.{n}`.
const DEAD_LETTER_QUEUE: &str = "progress.dead";
/// Published after the pre-filled messages; once it is applied, all before it are.
const MARKER_KEY: &str = "_bench.done";
const MARKER_BODY: &[u8] = br#"{"progress":1}"#;
/// Longest a drain may take before the run is declared stuck.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);
/// How often a drain polls Redis for the marker.
const MARKER_POLL: Duration = Duration::from_millis(2);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(args: Args) -> anyhow::Result<Value> {
    ensure!(
        args.shards >= args.aggregators,
        "--aggregators {} needs --shards {} or more: a replica without a shard only stands by",
        args.aggregators,
        args.aggregators
    );
    for (flag, seconds) in
        [("--grpc-seconds", args.grpc_seconds), ("--read-budget-seconds", args.read_budget_seconds)]
    {
        ensure!(
            seconds.is_finite() && seconds > 0.0,
            "{flag} must be a positive number of seconds, got {seconds}"
        );
    }
    let mut only = args.only.clone();
    only.sort();
    only.dedup();
    let started = Instant::now();
    let mut report = Map::new();
    report.insert("machine".into(), crate::system::machine(&redis_url()).await);
    for measurement in &only {
        let phase = Instant::now();
        eprintln!("cairn-bench: measuring ({measurement:?})");
        let fields = match measurement {
            Measurement::A => broker::measure(&args).await,
            Measurement::B => queue::measure_single(&args).await,
            Measurement::C => queue::measure_bursts(&args).await,
            Measurement::D => grpc::measure(&args).await,
            Measurement::E => siblings::measure(&args).await,
            Measurement::F => read::measure(&args).await,
        }
        .with_context(|| format!("measurement ({measurement:?}) failed"))?;
        report.extend(fields);
        eprintln!("cairn-bench: ({measurement:?}) done in {:.1} s", phase.elapsed().as_secs_f64());
    }
    if let (Some(a), Some(b)) = (
        report.get("a_broker_msgs_per_s").and_then(Value::as_f64),
        report.get("b_single_updates_per_s").and_then(Value::as_f64),
    ) {
        report.insert("b_ratio_to_broker".into(), json!(round(b / a, 3)));
    }
    report.insert("targets".into(), targets(&report));
    report.insert("params".into(), params(&args, &only));
    report.insert("total_s".into(), json!(round(started.elapsed().as_secs_f64(), 1)));
    Ok(Value::Object(report))
}

/// The issue's targets for this 2-core machine, judged against the figures measured.
fn targets(report: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    let mut judge = |field: &str, target: &str, met: fn(f64) -> bool| {
        if let Some(value) = report.get(field).and_then(Value::as_f64) {
            out.insert(field.into(), json!({"value": value, "target": target, "met": met(value)}));
        }
    };
    judge("b_ratio_to_broker", ">= 0.9", |v| v >= 0.9);
    judge("c_burst_updates_per_s", ">= 50000", |v| v >= 50_000.0);
    judge("d_grpc_updates_per_s", ">= 20000", |v| v >= 20_000.0);
    judge("e_ratio", "<= 1.2", |v| v <= 1.2);
    judge("f_rest_get_depth2_p50_ms", "<= 5", |v| v <= 5.0);
    Value::Object(out)
}

fn params(args: &Args, only: &[Measurement]) -> Value {
    let only: Vec<String> = only.iter().map(|m| format!("{m:?}").to_lowercase()).collect();
    json!({
        "only": only,
        "messages": args.messages,
        "confirm_window": args.confirm_window,
        "prefetch": args.prefetch,
        "ack_every": args.ack_every,
        "aggregator_batch": args.aggregator_batch,
        "aggregators": args.aggregators,
        "shards": args.shards,
        "burst_updates": args.burst_updates,
        "burst_size": args.burst_size,
        "burst_producers": args.burst_producers,
        "grpc_seconds": args.grpc_seconds,
        "grpc_callers": args.grpc_callers,
        "grpc_channels": args.grpc_channels,
        "siblings": args.siblings,
        "sibling_updates": args.sibling_updates,
        "sibling_round": args.sibling_round,
        "read_children": args.read_children,
        "reads": args.reads,
        "read_warmup": args.read_warmup,
        "read_budget_seconds": args.read_budget_seconds,
    })
}

/// `x` rounded to `digits` decimals, for a readable report.
use crate::stats::round;

fn rate(count: u64, elapsed: Duration) -> f64 {
    round(count as f64 / elapsed.as_secs_f64(), 0)
}

pub(crate) use crate::stats::percentile_ms;

fn key(raw: &str) -> anyhow::Result<Key> {
    Key::parse(raw).with_context(|| format!("benchmark key {raw:?} is invalid"))
}

/// The Redis the testkit uses (`CAIRN_TEST_REDIS_URL`, default the local one).
fn redis_url() -> String {
    std::env::var("CAIRN_TEST_REDIS_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// A store of its own (own Redis connection) on the namespace, so the benchmark's reads and
/// builds never queue behind the aggregator's scripts on the aggregator's connection.
fn store(ns: &RedisNamespace) -> anyhow::Result<ProgressStore> {
    let config = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
    Ok(ProgressStore::new(
        config.manager().context("invalid Redis URL (CAIRN_TEST_REDIS_URL)")?,
        ns.prefix.clone(),
    ))
}

/// Polls `key` every 2 ms until it has a node; the time it took.
async fn wait_for_key(store: &ProgressStore, key: &Key, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if store.get(key, &ReadOptions::default()).await?.is_some() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("key {key} was not applied within {timeout:?}");
        }
        tokio::time::sleep(MARKER_POLL).await;
    }
}

/// An in-process progress aggregator on a namespace and vhost, stopped on [`Aggregator::stop`]
/// (or cancelled when dropped).
struct Aggregator {
    grpc: SocketAddr,
    admin: SocketAddr,
    cancel: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Aggregator {
    /// Builds and starts one with `--shards 1` on port 0 ([`Aggregator::start_replica`] for more); it is not waited for (see
    /// [`Aggregator::wait_ready`]), so a timed drain includes its start.
    async fn start(ns: &RedisNamespace, vhost: &AmqpVhost, args: &Args) -> anyhow::Result<Aggregator> {
        Aggregator::start_replica(ns, vhost, args, 1, 0).await
    }

    /// Replica `index` of aggregators sharing `shards` shard queues.
    async fn start_replica(
        ns: &RedisNamespace,
        vhost: &AmqpVhost,
        args: &Args,
        shards: u16,
        index: u16,
    ) -> anyhow::Result<Aggregator> {
        let mut flags = vec![
            "progress-aggregator".to_owned(),
            "--grpc-addr=127.0.0.1:0".to_owned(),
            "--admin-addr=127.0.0.1:0".to_owned(),
            format!("--redis-url={}", ns.url),
            format!("--key-prefix={}", ns.prefix),
            format!("--amqp-url={}", vhost.url),
            format!("--shards={shards}"),
            format!("--name=bench-{index}"),
            format!("--prefetch={}", args.prefetch),
            "--grace=10s".to_owned(),
        ];
        if let Some(batch) = args.aggregator_batch {
            flags.push(format!("--batch={batch}"));
        }
        let config = progress_aggregator::Config::try_parse_from(&flags).context("aggregator flags")?;
        let app = progress_aggregator::App::build(config).await.context("building the aggregator")?;
        let (grpc, admin) = (app.grpc_addr(), app.admin_addr());
        let cancel = CancellationToken::new();
        let task = Some(tokio::spawn(app.run(cancel.clone())));
        Ok(Aggregator { grpc, admin, cancel, task })
    }

    /// Waits until `/readyz` answers 200: Redis answers and the AMQP consumers (and so the
    /// topology) are in place.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let url = format!("http://{}/readyz", self.admin);
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("the aggregator was not ready within {READY_TIMEOUT:?} ({url})");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        match self.task.take() {
            Some(task) => task.await.context("aggregator task panicked")?,
            None => Ok(()),
        }
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {url} (CAIRN_TEST_AMQP_URL)"))
}

/// Ready messages in `queue` (passive declare: current, unlike the management API's statistics).
async fn queue_len(channel: &Channel, queue: &str) -> anyhow::Result<u64> {
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("queue {queue} does not exist"))?;
    Ok(u64::from(declared.message_count()))
}

/// Properties of every pre-filled message, as Cairn's publishers send them: JSON, persistent.
fn properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2)
}

/// Publishes with confirms, keeping at most `window` messages unconfirmed; every message must
/// be acked by the broker.
struct Publisher {
    channel: Channel,
    window: usize,
    pending: VecDeque<PublisherConfirm>,
}

impl Publisher {
    async fn new(conn: &Connection, window: u64) -> anyhow::Result<Publisher> {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher { channel, window: usize::try_from(window)?.max(1), pending: VecDeque::new() })
    }

    async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .with_context(|| format!("publishing to exchange {exchange:?}"))?;
        self.pending.push_back(confirm);
        while self.pending.len() >= self.window {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    async fn settle_oldest(&mut self) -> anyhow::Result<()> {
        if let Some(confirm) = self.pending.pop_front() {
            let confirmation = confirm.await.context("waiting for a publisher confirm")?;
            ensure!(confirmation.is_ack(), "the broker refused (nack) a pre-filled message");
        }
        Ok(())
    }

    /// Waits for every outstanding confirm.
    async fn finish(&mut self) -> anyhow::Result<()> {
        while !self.pending.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(())
    }
}

/// The single-update stream shared by (a) and (b), so both move identical messages: routing key
/// `_bench.r{i%10}.s{i%100}.t{i%1000}.u{i%10000}` (a depth-4 tree below the namespace, 10 000
/// leaves each updated in turn) and an SCA body with a progress that moves.
fn single_message(i: u64) -> (String, Vec<u8>) {
    let key = format!("_bench.r{}.s{}.t{}.u{}", i % 10, i % 100, i % 1000, i % 10_000);
    let progress = ((i / 10_000) % 100 + 1) as f64 / 100.0;
    (key, format!(r#"{{"progress":{progress:.2}}}"#).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_messages_are_valid_depth_4_updates() {
        for i in [0, 1, 9_999, 10_000, 99_999, 1_234_567] {
            let (routing_key, body) = single_message(i);
            let updates = cairn_progress::parse_message(&routing_key, &body).expect("valid message");
            assert_eq!(updates.len(), 1);
            assert_eq!(updates[0].0.depth(), 5, "namespace plus four levels: {routing_key}");
            let p = updates[0].1.progress.expect("progress set");
            assert!((0.0..=1.0).contains(&p), "{p}");
        }
        // Parents agree with children: s{i%100} lies under r{i%10}, and so on.
        let (a, _) = single_message(12_345);
        assert_eq!(a, "_bench.r5.s45.t345.u2345");
    }

    #[test]
    fn targets_are_judged_only_when_measured() {
        let mut report = Map::new();
        report.insert("b_ratio_to_broker".into(), json!(0.85));
        report.insert("e_ratio".into(), json!(1.05));
        let targets = targets(&report);
        assert_eq!(targets["b_ratio_to_broker"]["met"], json!(false));
        assert_eq!(targets["e_ratio"]["met"], json!(true));
        assert!(targets.get("c_burst_updates_per_s").is_none());
    }

    #[test]
    fn only_accepts_letters() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let cli = Cli::try_parse_from(["x", "--only", "e,a"]).unwrap();
        assert_eq!(cli.args.only, vec![Measurement::E, Measurement::A]);
        assert!(Cli::try_parse_from(["x", "--only", "g"]).is_err());
        assert!(Cli::try_parse_from(["x", "--burst-size", "5000"]).is_err());
    }
}
