//! The web UI in a real browser: starts a stack (ingress, aggregator, a processor) on port 0 and
//! runs the Node scripts in `tests/ui/` (playwright-core driving Debian's headless Chromium)
//! against it; a failed assertion there fails the test here. `scripts/deps.sh --browser`
//! installs Chromium and the scripts' npm packages.
//!
//! `CAIRN_UI_SCREENSHOTS=<dir>` also writes the README's screenshots there.

mod common;

use cairn_progress::now_ms;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_progress::{Key, Update};
use cairn_redis::ProgressStore;
use cairn_redis::progress::Change;
use common::{Options, Stack};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use request_processor::handlers::Echo;
use request_processor::{Context, Handler, HandlerError, HandlerSet};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

/// One browser at a time: two would share two cores and distort each other.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest a browser script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs until it is told to stop (cancel, lease lost, shutdown).
struct Block;

impl Handler for Block {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async {
            ctx.cancel.cancelled().await;
            Err(HandlerError::Retryable("stopped".into()))
        }
        .boxed()
    }
}

/// Fails for good the first time it runs, then echoes: a request that dies, then succeeds when
/// retried from the dead letters.
struct Flaky(AtomicBool);

impl Handler for Flaky {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        let failed_before = self.0.swap(true, Ordering::SeqCst);
        let payload = ctx.payload.clone();
        async move {
            if failed_before {
                Ok(payload)
            } else {
                Err(HandlerError::Permanent("flaky: failed on purpose the first time".into()))
            }
        }
        .boxed()
    }
}

/// Always fails for good, with the payload's `error`.
struct Fail;

impl Handler for Fail {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        let error = ctx.payload["error"].as_str().unwrap_or("failed").to_owned();
        async move { Err(HandlerError::Permanent(error)) }.boxed()
    }
}

fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

/// Fails with what to run when the browser or the npm packages are missing.
fn require_browser() {
    let chromium = std::env::var("CAIRN_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "no Chromium at {chromium}: run scripts/deps.sh --browser (apt-get install chromium)"
    );
    assert!(
        scripts_dir().join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/deps.sh --browser (npm ci in {})",
        scripts_dir().display()
    );
}

/// Runs `node <script> <args>` in `tests/ui`, echoing its output; panics unless it exits 0.
/// Returns its standard output.
async fn node(script: &str, args: &[&str]) -> String {
    let mut child = Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(scripts_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (install it with scripts/deps.sh --browser)");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut out = String::new();
    let run = async {
        while let Some(line) = lines.next_line().await.expect("node output") {
            println!("{line}");
            out.push_str(&line);
            out.push('\n');
        }
        child.wait().await.expect("node exits")
    };
    let status = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {SCRIPT_TIMEOUT:?}"));
    assert!(status.success(), "{script} failed ({status})");
    out
}

fn key(s: &str) -> Key {
    Key::parse(s).expect("valid key")
}

/// `count` children `{parent}.c00001…` written straight into the store, each 1 ms after the
/// previous one (so start-time order is name order), in calls of 2 000.
async fn seed_children(store: &ProgressStore, parent: &str, count: usize) {
    let start = now_ms();
    let changes: Vec<Change> = (1..=count)
        .map(|i| Change {
            key: key(&format!("{parent}.c{i:05}")),
            update: Update::new().progress((i % 100) as f64 / 100.0).status("running"),
            time_ms: start + i as i64,
        })
        .collect();
    for chunk in changes.chunks(2000) {
        store.apply(chunk).await.expect("seed children");
    }
}

async fn ui_stack() -> Stack {
    let handlers = HandlerSet::new()
        .with("echo", Echo)
        .with("block", Block)
        .with("flaky", Flaky(AtomicBool::new(false)))
        .with("fail", Fail);
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("handlers.toml");
    let names: String = ["echo", "block", "flaky", "fail"]
        .iter()
        .map(|n| format!("[handlers.{n}]\nkind = \"echo\"\n\n"))
        .collect();
    std::fs::write(&file, names).expect("write handlers file");
    let stack =
        Stack::with(Options::default().handlers(handlers).arg("--handlers", file.to_str().expect("UTF-8")))
            .await;
    // The ingress read the file at start.
    drop(dir);
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_works_in_chromium() {
    require_browser();
    let _browser = BROWSER.lock().await;
    let stack = ui_stack().await;
    let store = ProgressStore::new(stack.redis().await, stack.ns().prefix.clone());
    seed_children(&store, "_uitest.big", 10_000).await;
    let mut args = vec![stack.base.as_str()];
    let shots = std::env::var("CAIRN_UI_SCREENSHOTS").ok();
    if let Some(dir) = &shots {
        args.extend(["--screenshots", dir.as_str()]);
    }
    node("ui.test.mjs", &args).await;
    stack.stop().await;
}

/// Reports (does not assert) the main thread's busy share with 1 000 visible nodes changing at
/// 10 Hz; the figure goes in the UI's README. Asserts that the page showed them and received
/// updates while it was measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_live_nodes_keep_the_page_responsive() {
    require_browser();
    let _browser = BROWSER.lock().await;
    let stack = ui_stack().await;
    let store = ProgressStore::new(stack.redis().await, stack.ns().prefix.clone());
    let parent = "_uitest.perf";
    seed_children(&store, parent, 1000).await;

    // Every 100 ms, a new state for each of the 1 000 children, in one store call.
    let ticks = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let driver = tokio::spawn({
        let (ticks, stop, store) = (ticks.clone(), stop.clone(), store.clone());
        async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut tick = 0u64;
            while !stop.is_cancelled() {
                interval.tick().await;
                tick += 1;
                let now = now_ms();
                let changes: Vec<Change> = (1..=1000)
                    .map(|i| Change {
                        key: key(&format!("{parent}.c{i:05}")),
                        update: Update::new()
                            .progress(((tick + i) % 100) as f64 / 100.0)
                            .msg(format!("tick {tick}")),
                        time_ms: now,
                    })
                    .collect();
                store.apply(&changes).await.expect("perf updates");
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let started = Instant::now();
    let out = node("perf.mjs", &[&stack.base, parent]).await;
    let elapsed = started.elapsed().as_secs_f64();
    stop.cancel();
    driver.await.expect("update driver");
    let rate = ticks.load(Ordering::Relaxed) as f64 / elapsed;
    let perf: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("PERF ")).collect();
    assert_eq!(perf.len(), 2, "perf.mjs prints its figures for two window sizes");
    println!("UI-PERF {{\"server_rounds_per_s\": {rate:.1}, \"browser\": [{}]}}", perf.join(", "));
    stack.stop().await;
}
