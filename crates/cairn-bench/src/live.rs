//! `cairn-bench live`: N concurrent SSE subscribers over M trees, each tree updated `rate` times
//! a second, against an ingress process of its own (the `ingress` binary next to this one, so
//! its memory and CPU are its own). Reports update-to-client latency (from the Redis write to the
//! client reading the event), events per subscriber per second, ingress RSS per idle subscriber
//! and ingress CPU per delivered event.
//!
//! Updates are written straight into Redis with the progress store (as the aggregator does: one
//! call per tick carrying one update per tree); each names its write time (`sent_us`), which the
//! clients read back from the events. Clients are plain TCP readers of the event stream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use cairn_progress::{Key, Update};
use cairn_redis::RedisConfig;
use cairn_redis::progress::{Change, ProgressStore};
use cairn_testkit::{RedisNamespace, ServiceProcess};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent SSE subscribers.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Trees updated (subscribers are spread evenly over them).
    #[arg(long, default_value_t = 100)]
    trees: usize,
    /// Updates a second per tree.
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// Length of the loaded phase.
    #[arg(long, default_value = "20s", value_parser = cairn_runtime::parse_duration)]
    duration: Duration,
    /// The ingress binary (default: `ingress` next to this binary).
    #[arg(long)]
    ingress: Option<PathBuf>,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// CPU seconds `pid` has used (0 once it is gone).
fn process_cpu_s(pid: u32) -> f64 {
    cairn_testkit::cpu_seconds(pid).unwrap_or(0.0)
}

/// `VmRSS` of `pid` in KiB (0 once it is gone), read by the test harness.
fn rss_kib(pid: u32) -> u64 {
    cairn_testkit::rss_kib(pid).unwrap_or(0)
}

/// Latencies (µs) one subscriber saw (its own lock: never contended while measuring).
type Seen = Arc<std::sync::Mutex<Vec<u64>>>;

pub async fn run(args: Args) -> anyhow::Result<Value> {
    if args.trees == 0 || args.subscribers == 0 || args.rate == 0 {
        bail!("--subscribers, --trees and --rate must be at least 1");
    }
    let ingress_bin = match &args.ingress {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("ingress"),
    };
    if !ingress_bin.exists() {
        bail!("{} does not exist: build it first (cargo build --release -p ingress)", ingress_bin.display());
    }
    let ns = RedisNamespace::new();
    let config = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
    let store = ProgressStore::new(config.manager()?, ns.prefix.clone());
    let trees: Vec<String> = (0..args.trees).map(|t| format!("_bench.t{t}")).collect();
    let first: Vec<Change> = trees.iter().map(|t| change(&format!("{t}.leaf"), 0.0, 0)).collect();
    store.apply(&first).await?;

    let addr = SocketAddr::from(([127, 0, 0, 1], cairn_testkit::free_port()));
    let max_subscribers = (args.subscribers + 10).to_string();
    let addr_arg = addr.to_string();
    let work = tempfile::tempdir()?;
    let env = BTreeMap::from([("CAIRN_LOG".to_owned(), "warn".to_owned())]);
    let service_args = [
        ("--addr", addr_arg.as_str()),
        ("--admin-addr", "127.0.0.1:0"),
        ("--redis-url", ns.url.as_str()),
        ("--key-prefix", ns.prefix.as_str()),
        ("--aggregator-url", "http://127.0.0.1:1"),
        ("--max-live-subscribers", max_subscribers.as_str()),
    ];
    let service_args: Vec<&str> = service_args.iter().flat_map(|(flag, value)| [*flag, *value]).collect();
    let mut ingress = ServiceProcess::new("ingress", &ingress_bin, &service_args, env, work.path());
    ingress.start();
    let pid = ingress.pid().context("ingress pid")?;
    let started = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("ingress did not listen within 20 s: {}", ingress.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid);

    // Subscribers connect and read their snapshot.
    eprintln!("live: connecting {} subscribers over {} trees", args.subscribers, args.trees);
    let mut seen_all: Vec<Seen> = Vec::with_capacity(args.subscribers);
    let events = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.subscribers);
    let mut clients = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let tree = trees[i % trees.len()].clone();
        let seen = Seen::default();
        seen_all.push(seen.clone());
        let (events, measuring, ready) = (events.clone(), measuring.clone(), ready_tx.clone());
        clients.push(tokio::spawn(async move {
            if let Err(error) = subscriber(addr, &tree, seen, events, measuring, ready).await {
                eprintln!("live: subscriber of {tree}: {error:#}");
            }
        }));
        if i % 500 == 499 {
            tokio::task::yield_now().await;
        }
    }
    drop(ready_tx);
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    let mut ready = 0;
    while ready < args.subscribers {
        match tokio::time::timeout_at(connect_deadline.into(), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => break,
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    if ready < args.subscribers {
        eprintln!("live: only {ready} of {} subscribers got their snapshot", args.subscribers);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(pid);

    // Load: every tick one call with one update per tree.
    eprintln!("live: {} trees at {} Hz for {:?}", args.trees, args.rate, args.duration);
    measuring.store(true, Ordering::SeqCst);
    let cpu_before = process_cpu_s(pid);
    let load_started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate);
    let mut writes = 0u64;
    let mut n = 0u64;
    while load_started.elapsed() < args.duration {
        tick.tick().await;
        n += 1;
        let sent = now_us();
        let progress = (n % 1000) as f64 / 1000.0;
        let batch: Vec<Change> = trees.iter().map(|t| change(&format!("{t}.leaf"), progress, sent)).collect();
        store.apply(&batch).await?;
        writes += batch.len() as u64;
    }
    // Let the last events arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    measuring.store(false, Ordering::SeqCst);
    let load_s = load_started.elapsed().as_secs_f64();
    let cpu_s = process_cpu_s(pid) - cpu_before;
    let rss_loaded = rss_kib(pid);
    let delivered = events.load(Ordering::SeqCst);

    for client in &clients {
        client.abort();
    }
    ingress.kill();
    let mut latencies: Vec<u64> =
        seen_all.iter().flat_map(|seen| std::mem::take(&mut *seen.lock().expect("latencies lock"))).collect();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i] as f64 / 1000.0
    };
    let subscribers = args.subscribers as f64;
    Ok(json!({
        "benchmark": "live",
        "subscribers": args.subscribers,
        "subscribers_ready": ready,
        "trees": args.trees,
        "rate_hz_per_tree": args.rate,
        "connect_s": round(connect_s),
        "load_s": round(load_s),
        "updates_written": writes,
        "events_delivered": delivered,
        "events_per_subscriber_per_s": round(delivered as f64 / subscribers / load_s),
        "latency_ms": {"p50": round(pct(0.5)), "p99": round(pct(0.99)), "max": round(pct(1.0)), "samples": latencies.len()},
        "ingress_rss_kib": {"before": rss_before, "idle_subscribed": rss_idle, "loaded": rss_loaded},
        "ingress_kib_per_idle_subscriber": round((rss_idle.saturating_sub(rss_before)) as f64 / subscribers),
        "ingress_cpu_s": round(cpu_s),
        "ingress_cpu_us_per_event": round(cpu_s * 1e6 / delivered.max(1) as f64),
        "ingress_cores_busy": round(cpu_s / load_s),
    }))
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn change(key: &str, progress: f64, sent_us: u64) -> Change {
    let body = json!({"progress": progress, "sent_us": sent_us});
    Change {
        key: Key::parse(key).expect("bench keys are valid"),
        update: Update::from_json(&body).expect("bench updates are valid"),
        time_ms: (sent_us / 1000) as i64,
    }
}

/// One SSE client: reads events, and once measuring, records the latency of each `sent_us` it
/// sees (found by a substring scan; parsing every event's JSON would load this process more than
/// the ingress).
async fn subscriber(
    addr: SocketAddr,
    tree: &str,
    seen: Seen,
    events: Arc<AtomicU64>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET /status/{tree}/events?depth=2 HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    let status = lines.next_line().await?.unwrap_or_default();
    if !status.contains(" 200") {
        bail!("answered {status:?}");
    }
    let mut ready = Some(ready);
    while let Some(line) = lines.next_line().await? {
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if let Some(ready) = ready.take() {
            let _ = ready.send(()).await;
            continue;
        }
        if !measuring.load(Ordering::Relaxed) {
            continue;
        }
        events.fetch_add(1, Ordering::Relaxed);
        let now = now_us();
        let mut rest = data;
        while let Some(at) = rest.find("\"sent_us\":") {
            rest = &rest[at + 10..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(sent) = digits.parse::<u64>() {
                seen.lock().expect("latencies lock").push(now.saturating_sub(sent));
            }
        }
    }
    Ok(())
}
