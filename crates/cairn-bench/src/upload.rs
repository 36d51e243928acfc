//! `cairn-bench upload`: MB/s of files going from `cairn upload` to a handler through ingress
//! (tus, into Redis), Redis and the request processor (an `http` handler posting to a receiving
//! server in this process), next to `curl -F` posting the same files straight to the same
//! receiving server in the same run; and the RSS of the ingress and processor processes (the
//! binaries next to this one) while `cairn upload` runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cairn_testkit::{AmqpVhost, RedisNamespace, ServiceProcess, free_addr};
use clap::Parser as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// Files uploaded.
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// Size of each file in MiB (ingress refuses a stream above CAIRN_MAX_STREAM_BYTES, 64 MiB
    /// by default).
    #[arg(long, default_value_t = 32)]
    file_mib: u64,
    /// `cairn upload --chunk-size`.
    #[arg(long, default_value = "4MiB")]
    chunk_size: String,
    /// Files sent at the same time, by `cairn upload --threads` and by parallel `curl`s.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Directory holding the `ingress`, `request-processor` and `cairn` binaries (default: the
    /// one of this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// `VmRSS` of `pid` in KiB (0 once it is gone), read by the test harness.
fn rss_kib(pid: u32) -> u64 {
    cairn_testkit::rss_kib(pid).unwrap_or(0)
}

/// Bodies the receiving server has read whole, and their bytes.
#[derive(Default)]
struct Sink {
    bodies: AtomicU64,
    bytes: AtomicU64,
}

/// The receiving server: reads every POST body to its end, counting it.
async fn receiver(sink: Arc<Sink>, cancel: CancellationToken) -> anyhow::Result<SocketAddr> {
    async fn take(
        axum::extract::State(sink): axum::extract::State<Arc<Sink>>,
        body: axum::body::Body,
    ) -> &'static str {
        let mut stream = body.into_data_stream();
        while let Some(Ok(chunk)) = stream.next().await {
            sink.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        sink.bodies.fetch_add(1, Ordering::Relaxed);
        "{}"
    }
    let app = axum::Router::new()
        .route("/sink", axum::routing::post(take))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(sink);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        async move { axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await },
    );
    Ok(addr)
}

async fn wait_ready(url: &str) -> anyhow::Result<()> {
    cairn_testkit::wait_until(url, Duration::from_secs(30), || async {
        cairn_runtime::healthcheck(url).await.is_ok()
    })
    .await
}

/// Writes `count` files of `bytes` each (different content) into `dir`.
fn write_files(dir: &Path, count: usize, bytes: u64) -> anyhow::Result<Vec<PathBuf>> {
    (0..count)
        .map(|i| {
            let path = dir.join(format!("run/file{i}.bin"));
            std::fs::create_dir_all(path.parent().expect("has a parent"))?;
            let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let words = bytes / 8;
            let mut data = Vec::with_capacity(bytes as usize);
            for _ in 0..words {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.extend_from_slice(&x.to_le_bytes());
            }
            std::fs::write(&path, data)?;
            Ok(path)
        })
        .collect()
}

async fn until_bodies(sink: &Sink, count: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while sink.bodies.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            bail!("the handler got {} of {count} files within 10 min", sink.bodies.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    (bytes as f64 / 1e6 / seconds * 10.0).round() / 10.0
}

pub async fn run(args: Args) -> anyhow::Result<Value> {
    if args.files == 0 || args.threads == 0 || args.file_mib == 0 {
        bail!("--files, --threads and --file-mib must be at least 1");
    }
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?.parent().context("binary directory")?.to_path_buf(),
    };
    for bin in ["ingress", "request-processor", "cairn"] {
        if !bin_dir.join(bin).exists() {
            bail!(
                "{} does not exist: build it first (cargo build --release -p ingress -p request-processor -p cairn-cli)",
                bin_dir.join(bin).display()
            );
        }
    }
    let file_bytes = args.file_mib << 20;
    let total = file_bytes * args.files as u64;
    let cancel = CancellationToken::new();
    let sink = Arc::new(Sink::default());
    let sink_addr = receiver(sink.clone(), cancel.clone()).await?;

    let ns = RedisNamespace::new();
    let vhost = AmqpVhost::new().await;
    let work = tempfile::tempdir()?;
    let handlers = work.path().join("handlers.toml");
    std::fs::write(
        &handlers,
        format!("[handlers.sink]\nkind = \"http\"\nurl = \"http://{sink_addr}/sink\"\ntimeout = \"10m\"\n"),
    )?;
    let common = [format!("--redis-url={}", ns.url), format!("--key-prefix={}", ns.prefix)];

    let aggregator = progress_aggregator::App::build(progress_aggregator::Config::try_parse_from([
        "progress-aggregator".to_owned(),
        "--grpc-addr=127.0.0.1:0".into(),
        "--admin-addr=127.0.0.1:0".into(),
        format!("--amqp-url={}", vhost.url),
        common[0].clone(),
        common[1].clone(),
    ])?)
    .await?;
    let grpc = aggregator.grpc_addr();
    let aggregator_task = tokio::spawn(aggregator.run(cancel.clone()));

    let (ingress_addr, processor_admin) = (free_addr(), free_addr());
    // Each service as its own process (cleared environment, output in `work/<name>.log`).
    let service = |name: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = BTreeMap::from([("CAIRN_LOG".to_owned(), "warn".to_owned())]);
        let mut process = ServiceProcess::new(name, bin_dir.join(name), &args, env, work.path());
        process.start();
        process
    };
    let mut ingress = service(
        "ingress",
        [
            vec![format!("--addr={ingress_addr}"), "--admin-addr=127.0.0.1:0".into()],
            vec![format!("--aggregator-url=http://{grpc}"), format!("--handlers={}", handlers.display())],
            common.to_vec(),
        ]
        .concat(),
    );
    let mut processor = service(
        "request-processor",
        [
            vec![format!("--admin-addr={processor_admin}"), format!("--amqp-url={}", vhost.url)],
            vec![format!("--handlers={}", handlers.display())],
            common.to_vec(),
        ]
        .concat(),
    );
    let base = format!("http://{ingress_addr}");
    for (process, url) in
        [(&ingress, format!("{base}/readyz")), (&processor, format!("http://{processor_admin}/readyz"))]
    {
        wait_ready(&url).await.with_context(|| format!("{}: {}", process.name(), process.log_tail(20)))?;
    }
    let (ingress_pid, processor_pid) =
        (ingress.pid().context("ingress pid")?, processor.pid().context("processor pid")?);

    eprintln!("upload: writing {} files of {} MiB", args.files, args.file_mib);
    let dir = work.path().join("outbox");
    let files = write_files(&dir, args.files, file_bytes)?;

    // curl straight to the receiving server, `threads` at a time.
    eprintln!("upload: curl -F to the receiving server");
    let started = Instant::now();
    for batch in files.chunks(args.threads) {
        let mut runs = Vec::new();
        for file in batch {
            runs.push(
                tokio::process::Command::new("curl")
                    .args(["-sS", "-o", "/dev/null", "--fail", "-F"])
                    .arg(format!("file=@{}", file.display()))
                    .arg(format!("http://{sink_addr}/sink"))
                    .status(),
            );
        }
        for status in futures::future::join_all(runs).await {
            if !status.context("running curl")?.success() {
                bail!("curl failed");
            }
        }
    }
    let curl_s = started.elapsed().as_secs_f64();

    // cairn upload through the whole system.
    eprintln!("upload: cairn upload through ingress, Redis and the processor");
    let rss_before = (rss_kib(ingress_pid), rss_kib(processor_pid));
    let peaks = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let sampling = CancellationToken::new();
    let sampler = {
        let (peaks, sampling) = (peaks.clone(), sampling.clone());
        tokio::spawn(async move {
            while !sampling.is_cancelled() {
                peaks.0.fetch_max(rss_kib(ingress_pid), Ordering::Relaxed);
                peaks.1.fetch_max(rss_kib(processor_pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let bodies_before = sink.bodies.load(Ordering::Relaxed);
    let started = Instant::now();
    let output = tokio::process::Command::new(bin_dir.join("cairn"))
        .args(["upload", &dir.to_string_lossy(), "--handler", "sink", "--once", "--lag", "50ms", "--json"])
        .args(["--chunk-size", &args.chunk_size, "--threads", &args.threads.to_string()])
        .env("CAIRN_URL", &base)
        .output()
        .await
        .context("running cairn upload")?;
    if !output.status.success() {
        bail!(
            "cairn upload failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let uploaded_s = started.elapsed().as_secs_f64();
    until_bodies(&sink, bodies_before + args.files as u64).await?;
    let cairn_s = started.elapsed().as_secs_f64();
    sampling.cancel();
    let _ = sampler.await;

    cancel.cancel();
    ingress.kill();
    processor.kill();
    let _ = tokio::time::timeout(Duration::from_secs(15), aggregator_task).await;
    Ok(json!({
        "files": args.files,
        "file_bytes": file_bytes,
        "chunk_size": args.chunk_size,
        "threads": args.threads,
        "cairn": {
            "seconds_to_handler": (cairn_s * 1000.0).round() / 1000.0,
            "mb_per_s_to_handler": mb_per_s(total, cairn_s),
            "seconds_uploaded_and_submitted": (uploaded_s * 1000.0).round() / 1000.0,
        },
        "curl": {"seconds": (curl_s * 1000.0).round() / 1000.0, "mb_per_s": mb_per_s(total, curl_s)},
        "cairn_over_curl": ((curl_s / cairn_s) * 1000.0).round() / 1000.0,
        "ingress_rss_kib": {"before": rss_before.0, "peak": peaks.0.load(Ordering::Relaxed)},
        "processor_rss_kib": {"before": rss_before.1, "peak": peaks.1.load(Ordering::Relaxed)},
    }))
}
