//! `cairn-bench requests`: the request path with lifecycle progress reporting on, everything
//! in this process (aggregator, ingress, one processor) against the real Redis and RabbitMQ:
//! (1) REST round trip with one client — `POST /v1/requests` with `Prefer: wait`, `echo`;
//! (2) one processor draining a pre-filled stream of `echo` requests (its reports applied by the
//!     aggregator);
//! (3) end-to-end REST throughput with concurrent keep-alive connections, each request waited for.
//!
//! With `--partitions N` every service runs the request queue in N partitions (one processor
//! reads them all); the drain also reports the CPU microseconds one request costs in this
//! process and in Redis, which must not grow with N (this 2-core machine cannot show a
//! speed-up, only that partitioning adds no cost).

use cairn_progress::now_ms;
use std::time::{Duration, Instant};

use cairn_redis::RedisConfig;
use cairn_redis::requests::{QueueLayout, RequestQueues};
use cairn_requests::{RequestRecord, Submission};
use cairn_testkit::{AmqpVhost, RedisNamespace};
use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::stats::percentile_ms;
use crate::system::{Probe, us_per_item};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Round trips measured with one client (after 200 warm-up ones).
    #[arg(long, default_value_t = 3000)]
    round_trips: usize,
    /// Requests pre-filled for the drain measurement.
    #[arg(long, default_value_t = 50_000)]
    drain: usize,
    /// Concurrent connections of the end-to-end measurement.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long the end-to-end measurement runs.
    #[arg(long, default_value = "10s", value_parser = cairn_runtime::parse_duration)]
    duration: Duration,
    /// Processor concurrency.
    #[arg(long, default_value_t = 256)]
    concurrency: u32,
    /// Also run the full-stack measurement with auth on (an HS256 secret on every service, a
    /// bearer token on every call), right after the one with auth off, and report the cost.
    #[arg(long)]
    compare_auth: bool,
    /// Partitions of the request queue (CAIRN_REQUEST_PARTITIONS of every service).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    partitions: u16,
}

/// The secret of the auth-on measurement.
const BENCH_SECRET: &str = "cairn-bench-secret";

const BODY: &str = r#"{"handler":"echo","payload":{"n":1}}"#;

/// Aggregator, ingress and processor in this process, in a fresh prefix and vhost.
struct Stack {
    base: String,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Stack {
    async fn start(
        ns: &RedisNamespace,
        vhost: &AmqpVhost,
        concurrency: u32,
        processor: bool,
        auth: bool,
        partitions: u16,
    ) -> anyhow::Result<Stack> {
        let cancel = CancellationToken::new();
        let mut common = vec![format!("--redis-url={}", ns.url), format!("--key-prefix={}", ns.prefix)];
        if auth {
            common.push(format!("--auth-jwt-secret={BENCH_SECRET}"));
        }
        let amqp = format!("--amqp-url={}", vhost.url);
        let mut tasks = Vec::new();

        let mut args = vec![
            "progress-aggregator".to_owned(),
            "--grpc-addr=127.0.0.1:0".into(),
            "--admin-addr=127.0.0.1:0".into(),
            amqp.clone(),
        ];
        args.extend(common.iter().cloned());
        let aggregator =
            progress_aggregator::App::build(progress_aggregator::Config::try_parse_from(args)?).await?;
        let grpc = aggregator.grpc_addr();
        tasks.push(tokio::spawn(aggregator.run(cancel.clone())));

        let mut args = vec![
            "ingress".to_owned(),
            "--addr=127.0.0.1:0".into(),
            "--admin-addr=127.0.0.1:0".into(),
            format!("--aggregator-url=http://{grpc}"),
            format!("--request-partitions={partitions}"),
        ];
        args.extend(common.iter().cloned());
        let ingress = ingress::App::build(ingress::Config::try_parse_from(args)?).await?;
        let base = format!("http://{}", ingress.local_addr());
        tasks.push(tokio::spawn(ingress.run(cancel.clone())));

        if processor {
            tasks.push(tokio::spawn(
                start_processor(ns, vhost, concurrency, cancel.clone(), auth, partitions).await?,
            ));
        }
        let stack = Stack { base, cancel, tasks };
        stack.wait_ready().await?;
        Ok(stack)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if cairn_runtime::healthcheck(&format!("{}/readyz", self.base)).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("ingress not ready within 30 s")
    }

    async fn stop(self) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
}

async fn start_processor(
    ns: &RedisNamespace,
    vhost: &AmqpVhost,
    concurrency: u32,
    cancel: CancellationToken,
    auth: bool,
    partitions: u16,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + use<>> {
    let mut args = vec![
        "request-processor".to_owned(),
        "--admin-addr=127.0.0.1:0".into(),
        format!("--redis-url={}", ns.url),
        format!("--key-prefix={}", ns.prefix),
        format!("--amqp-url={}", vhost.url),
        format!("--concurrency={concurrency}"),
        format!("--request-partitions={partitions}"),
    ];
    if auth {
        args.push(format!("--auth-jwt-secret={BENCH_SECRET}"));
    }
    let app = request_processor::App::build(request_processor::Config::try_parse_from(args)?).await?;
    Ok(app.run(cancel))
}

pub async fn run(args: Args) -> anyhow::Result<Value> {
    let mut report = serde_json::Map::new();
    report.insert(
        "machine".into(),
        json!({"cores": std::thread::available_parallelism().map_or(0, |n| n.get())}),
    );

    // (1) and (3): the full stack, with auth off and (with --compare-auth) on.
    let off = full_stack(&args, false).await?;
    if args.compare_auth {
        let on = full_stack(&args, true).await?;
        let (rate_off, rate_on) =
            (off["rest_e2e_requests_per_s"].as_f64(), on["rest_e2e_requests_per_s"].as_f64());
        if let (Some(rate_off), Some(rate_on)) = (rate_off, rate_on) {
            let cost = (1.0 - rate_on / rate_off) * 100.0;
            eprintln!("auth costs {cost:.1} % of end-to-end throughput");
            report.insert("auth_cost_percent".into(), json!((cost * 10.0).round() / 10.0));
        }
        report.insert("auth_on".into(), Value::Object(on));
    }
    report.extend(off);

    // (2) one processor draining a pre-filled stream, its lifecycle reports applied by an
    // aggregator (without one, no queue is bound and every report would come back unroutable).
    {
        let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
        let stack = Stack::start(&ns, &vhost, args.concurrency, false, false, args.partitions).await?;
        let config = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
        let layout = QueueLayout::new(&ns.prefix, "requests", "processors").with_partitions(args.partitions);
        let queues = RequestQueues::new(config.connection()?, layout.clone());
        queues.ensure_groups().await?;
        let filled = Instant::now();
        let mut pending = futures::stream::FuturesUnordered::new();
        for i in 0..args.drain {
            let queues = queues.clone();
            pending.push(async move {
                let record = RequestRecord::queued(
                    queues.new_id(None),
                    Submission::new("echo", json!({"i": i})),
                    3,
                    now_ms(),
                );
                queues.of(&record.id).submit(&record, None, 60_000, None).await
            });
            if pending.len() >= 256 {
                use futures::StreamExt;
                pending.next().await.transpose()?;
            }
        }
        {
            use futures::StreamExt;
            while let Some(result) = pending.next().await {
                result?;
            }
        }
        eprintln!("pre-filled {} requests in {:.1} s", args.drain, filled.elapsed().as_secs_f64());
        let cancel = CancellationToken::new();
        let mut probe = Probe::new(&ns.url).await?;
        let before = probe.sample().await?;
        let started = Instant::now();
        let processor = tokio::spawn(
            start_processor(&ns, &vhost, args.concurrency, cancel.clone(), false, args.partitions).await?,
        );
        let mut conn = config.manager()?;
        loop {
            let (read, pending): (u64, u64) = group_progress(&mut conn, &layout).await?;
            if read as usize >= args.drain && pending == 0 {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "drain did not finish in 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let cpu = probe.sample().await?.since(&before);
        let per_request = us_per_item(&cpu, args.drain as u64);
        let rate = args.drain as f64 / elapsed.as_secs_f64();
        eprintln!(
            "drain: {rate:.0} requests/s over {} partition(s); CPU µs per request: {per_request}",
            args.partitions
        );
        report.insert("processor_drain_cpu".into(), cpu);
        report.insert("processor_drain_cpu_us_per_request".into(), per_request);
        report.insert("processor_drain_requests_per_s".into(), json!(rate.round()));
        report.insert("processor_drain_s".into(), json!((elapsed.as_secs_f64() * 1000.0).round() / 1000.0));
        cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), processor).await;
        stack.stop().await;
    }

    report.insert(
        "params".into(),
        json!({"round_trips": args.round_trips, "drain": args.drain, "connections": args.connections,
               "duration_s": args.duration.as_secs_f64(), "concurrency": args.concurrency,
               "partitions": args.partitions,
               "progress_reporting": "on (processor bursts to the aggregator over AMQP)"}),
    );
    Ok(Value::Object(report))
}

/// Round trips and end-to-end throughput of the full stack; with `auth`, every service verifies
/// and every call carries a bearer token (submit `echo`, read its progress).
async fn full_stack(args: &Args, auth: bool) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut report = serde_json::Map::new();
    {
        let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
        let stack = Stack::start(&ns, &vhost, args.concurrency, true, auth, args.partitions).await?;
        let mut headers = reqwest::header::HeaderMap::new();
        if auth {
            let config =
                cairn_auth::AuthConfig { jwt_secret: Some(BENCH_SECRET.into()), ..Default::default() };
            let minter = config.minter().expect("a secret mints");
            let scopes = cairn_auth::Scopes {
                submit: vec!["echo".into()],
                read: vec!["_requests".into()],
                ..Default::default()
            };
            headers
                .insert("authorization", format!("Bearer {}", minter.token("bench", scopes, 3600)).parse()?);
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.connections)
            .default_headers(headers)
            .build()?;
        let url = format!("{}/v1/requests", stack.base);
        let call = |client: reqwest::Client, url: String| async move {
            let started = Instant::now();
            let response = client.post(&url).header("prefer", "wait=5").body(BODY).send().await?;
            let status = response.status();
            let _ = response.bytes().await?;
            anyhow::ensure!(status == 200, "round trip answered {status}");
            Ok::<_, anyhow::Error>(started.elapsed())
        };
        for _ in 0..200 {
            call(client.clone(), url.clone()).await?;
        }
        let mut samples = Vec::with_capacity(args.round_trips);
        for _ in 0..args.round_trips {
            samples.push(call(client.clone(), url.clone()).await?);
        }
        samples.sort();
        eprintln!("round trip: p50 {:.3} ms", percentile_ms(&samples, 0.5));
        report.insert("rest_round_trip_p50_ms".into(), json!(percentile_ms(&samples, 0.5)));
        report.insert("rest_round_trip_p99_ms".into(), json!(percentile_ms(&samples, 0.99)));

        let stop_at = Instant::now() + args.duration;
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..args.connections {
            let (client, url) = (client.clone(), url.clone());
            workers.push(tokio::spawn(async move {
                let (mut done, mut failed, mut latencies) = (0u64, 0u64, Vec::new());
                while Instant::now() < stop_at {
                    match call(client.clone(), url.clone()).await {
                        Ok(latency) => {
                            done += 1;
                            latencies.push(latency);
                        }
                        Err(_) => failed += 1,
                    }
                }
                (done, failed, latencies)
            }));
        }
        let (mut done, mut failed, mut latencies) = (0, 0, Vec::new());
        for worker in workers {
            let (d, f, l) = worker.await?;
            done += d;
            failed += f;
            latencies.extend(l);
        }
        let elapsed = started.elapsed();
        latencies.sort();
        let rate = done as f64 / elapsed.as_secs_f64();
        eprintln!("end to end: {rate:.0} requests/s with {} connections", args.connections);
        report.insert("rest_e2e_requests_per_s".into(), json!(rate.round()));
        report.insert("rest_e2e_failed".into(), json!(failed));
        report.insert("rest_e2e_p50_ms".into(), json!(percentile_ms(&latencies, 0.5)));
        report.insert("rest_e2e_p99_ms".into(), json!(percentile_ms(&latencies, 0.99)));
        stack.stop().await;
    }
    Ok(report)
}

/// `entries-read` and `pending` of the processors' group, summed over every partition.
async fn group_progress(
    conn: &mut redis::aio::ConnectionManager,
    layout: &QueueLayout,
) -> anyhow::Result<(u64, u64)> {
    let (mut read, mut pending) = (0, 0);
    for names in layout.all() {
        let (r, p) = partition_progress(conn, &names).await?;
        read += r;
        pending += p;
    }
    Ok((read, pending))
}

async fn partition_progress(
    conn: &mut redis::aio::ConnectionManager,
    names: &cairn_redis::requests::QueueNames,
) -> anyhow::Result<(u64, u64)> {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(&names.stream).query_async(conn).await?;
    for group in groups {
        let name: Option<String> = group.get("name").and_then(|v| redis::from_redis_value(v.clone()).ok());
        if name.as_deref() == Some(names.group.as_str()) {
            let read = group
                .get("entries-read")
                .and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
                .unwrap_or(0);
            let pending = group
                .get("pending")
                .and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
                .unwrap_or(0);
            return Ok((read, pending));
        }
    }
    Ok((0, 0))
}
