//! `cairn-bench soak`: does Redis memory stay flat under steady load with retention on?
//!
//! A `redis-server` of its own (so `used_memory` is Cairn's alone), and in this process a
//! progress aggregator, a request processor and the stream trimmer with short retention
//! (trim every 5 s, requests and progress trees kept 10 s, streams capped near 1000 entries).
//! A steady rate of `echo` requests (default 500/s) is submitted straight to the queue for the
//! whole run. Every 5 s one JSON line with Redis's memory and key counts goes to stderr; the
//! summary on stdout gives min/max/mean of `used_memory` after the warm-up and its drift: the
//! mean of the last third of those samples against the first third, and a least-squares slope.

use cairn_progress::now_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_redis::RedisConfig;
use cairn_redis::requests::{QueueNames, RequestQueue};
use cairn_requests::{RequestRecord, Submission, new_request_id};
use cairn_testkit::{AmqpVhost, RedisNamespace, RedisServer};
use clap::Parser;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// How long the load runs.
    #[arg(long, default_value = "5m", value_parser = cairn_runtime::parse_duration)]
    duration: Duration,
    /// Samples taken before this are left out of the summary (retention is not yet in force).
    #[arg(long, default_value = "30s", value_parser = cairn_runtime::parse_duration)]
    warmup: Duration,
    /// Requests submitted per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Time between memory samples.
    #[arg(long, default_value = "5s", value_parser = cairn_runtime::parse_duration)]
    sample_every: Duration,
    /// The trimmer's run interval.
    #[arg(long, default_value = "5s")]
    trim_interval: String,
    /// How long finished requests and progress trees are kept.
    #[arg(long, default_value = "10s")]
    retention: String,
    /// The streams' length bound (approximate trimming).
    #[arg(long, default_value_t = 1000)]
    maxlen: u64,
    /// Processor concurrency.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
}

/// Submissions per tick; ticks come `TICK_BATCH / rate` seconds apart.
const TICK_BATCH: u32 = 10;

/// One memory sample.
struct Sample {
    at: Duration,
    used_memory: u64,
}

/// `used_memory` and friends from `INFO memory`, key counts and the request backlog.
async fn sample(conn: &mut ConnectionManager, ns: &RedisNamespace, stream: &str) -> anyhow::Result<Value> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let (dbsize, length, finished, roots): (u64, u64, u64, u64) = redis::pipe()
        .cmd("DBSIZE")
        .cmd("XLEN")
        .arg(stream)
        .cmd("ZCARD")
        .arg(ns.key("req:finished"))
        .cmd("ZCARD")
        .arg(ns.key("proots"))
        .query_async(conn)
        .await?;
    Ok(json!({
        "used_memory": field("used_memory"),
        "used_memory_dataset": field("used_memory_dataset"),
        "keys": dbsize,
        "stream_length": length,
        "finished_requests": finished,
        "progress_roots": roots,
    }))
}

fn stats(samples: &[Sample]) -> Value {
    if samples.is_empty() {
        return json!(null);
    }
    let values: Vec<f64> = samples.iter().map(|s| s.used_memory as f64).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let third = (values.len() / 3).max(1);
    let (first, last) = (mean(&values[..third]), mean(&values[values.len() - third..]));
    // Least-squares slope of used_memory over time, in bytes per minute.
    let times: Vec<f64> = samples.iter().map(|s| s.at.as_secs_f64() / 60.0).collect();
    let (tm, vm) = (mean(&times), mean(&values));
    let var: f64 = times.iter().map(|t| (t - tm).powi(2)).sum();
    let cov: f64 = times.iter().zip(&values).map(|(t, v)| (t - tm) * (v - vm)).sum();
    let slope = if var > 0.0 { cov / var } else { 0.0 };
    json!({
        "samples": values.len(),
        "min": values.iter().copied().fold(f64::INFINITY, f64::min) as u64,
        "max": values.iter().copied().fold(0.0, f64::max) as u64,
        "mean": vm.round() as u64,
        "mean_first_third": first.round() as u64,
        "mean_last_third": last.round() as u64,
        "drift_pct": ((last - first) / first * 1e4).round() / 1e2,
        "slope_bytes_per_min": slope.round() as i64,
    })
}

pub async fn run(args: Args) -> anyhow::Result<Value> {
    let server = RedisServer::new().await;
    let ns = RedisNamespace::with_url(server.url());
    let vhost = AmqpVhost::new().await;
    let cancel = CancellationToken::new();
    let common = [format!("--redis-url={}", ns.url), format!("--key-prefix={}", ns.prefix)];
    let amqp = format!("--amqp-url={}", vhost.url);
    let mut tasks = Vec::new();

    let mut flags = vec![
        "progress-aggregator".to_owned(),
        "--grpc-addr=127.0.0.1:0".into(),
        "--admin-addr=127.0.0.1:0".into(),
        amqp.clone(),
    ];
    flags.extend(common.iter().cloned());
    let aggregator =
        progress_aggregator::App::build(progress_aggregator::Config::try_parse_from(flags)?).await?;
    tasks.push(tokio::spawn(aggregator.run(cancel.clone())));

    let mut flags = vec![
        "request-processor".to_owned(),
        "--admin-addr=127.0.0.1:0".into(),
        amqp,
        format!("--concurrency={}", args.concurrency),
    ];
    flags.extend(common.iter().cloned());
    let processor = request_processor::App::build(request_processor::Config::try_parse_from(flags)?).await?;
    tasks.push(tokio::spawn(processor.run(cancel.clone())));

    let mut flags = vec![
        "stream-trimmer".to_owned(),
        "--admin-addr=127.0.0.1:0".into(),
        format!("--interval={}", args.trim_interval),
        format!("--request-retention={}", args.retention),
        format!("--progress-retention={}", args.retention),
        format!("--default-policy=maxlen:{}", args.maxlen),
    ];
    flags.extend(common.iter().cloned());
    let trimmer = stream_trimmer::App::build(stream_trimmer::Config::try_parse_from(flags)?).await?;
    let mut reports = trimmer.subscribe();
    tasks.push(tokio::spawn(trimmer.run(cancel.clone())));
    let trimmed = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let counting = {
        let trimmed = trimmed.clone();
        tokio::spawn(async move {
            while let Ok(report) = reports.recv().await {
                if report.acted() {
                    trimmed[0].fetch_add(1, Ordering::Relaxed);
                    trimmed[1].fetch_add(report.trimmed(), Ordering::Relaxed);
                    trimmed[2].fetch_add(report.records_purged, Ordering::Relaxed);
                    trimmed[3].fetch_add(report.trees_purged, Ordering::Relaxed);
                }
            }
        })
    };

    let names = QueueNames::new(&ns.prefix, "requests", "processors");
    let stream = names.stream.clone();
    let queue = RequestQueue::new(RedisConfig::new(ns.url.clone(), ns.prefix.clone()).manager()?, names);
    queue.ensure_group().await?;

    let submitted = Arc::new(AtomicU64::new(0));
    let stop_load = CancellationToken::new();
    let producer = {
        let (queue, submitted, stop) = (queue.clone(), submitted.clone(), stop_load.clone());
        let tick = Duration::from_secs_f64(f64::from(TICK_BATCH) / f64::from(args.rate.max(1)));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(tick);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
            while !stop.is_cancelled() {
                ticks.tick().await;
                let batch = (0..TICK_BATCH).map(|n| {
                    let record = RequestRecord::queued(
                        new_request_id(),
                        Submission::new("echo", json!({"n": n})),
                        3,
                        now_ms(),
                    );
                    let queue = queue.clone();
                    async move { queue.submit(&record, None, 60_000, None).await }
                });
                for outcome in futures::future::join_all(batch).await {
                    outcome?;
                    submitted.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        })
    };

    let mut conn = ns.connection().await;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut every = tokio::time::interval(args.sample_every);
    every.tick().await;
    while started.elapsed() < args.duration {
        every.tick().await;
        let at = started.elapsed();
        let mut line = sample(&mut conn, &ns, &stream).await?;
        line["t_s"] = json!((at.as_secs_f64() * 10.0).round() / 10.0);
        line["submitted"] = json!(submitted.load(Ordering::Relaxed));
        eprintln!("{line}");
        if at >= args.warmup {
            samples.push(Sample { at, used_memory: line["used_memory"].as_u64().unwrap_or(0) });
        }
        if producer.is_finished() {
            break;
        }
    }
    stop_load.cancel();
    producer.await??;
    let elapsed = started.elapsed();
    let lag = queue.lag().await?.unwrap_or(0);
    let last = sample(&mut conn, &ns, &stream).await?;

    cancel.cancel();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
    }
    counting.abort();
    let submitted = submitted.load(Ordering::Relaxed);
    Ok(json!({
        "benchmark": "soak",
        "machine": {"cores": std::thread::available_parallelism().map_or(0, |n| n.get())},
        "settings": {
            "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(),
            "rate_per_s": args.rate,
            "trim_interval": args.trim_interval,
            "retention": args.retention,
            "maxlen": args.maxlen,
            "processor_concurrency": args.concurrency,
        },
        "submitted": submitted,
        "achieved_rate_per_s": (submitted as f64 / elapsed.as_secs_f64()).round(),
        "lag_at_end": lag,
        "used_memory_after_warmup": stats(&samples),
        "at_end": last,
        "trimmer": {
            "runs": trimmed[0].load(Ordering::Relaxed),
            "entries_trimmed": trimmed[1].load(Ordering::Relaxed),
            "records_purged": trimmed[2].load(Ordering::Relaxed),
            "trees_purged": trimmed[3].load(Ordering::Relaxed),
        },
    }))
}
