//! request-processor run as separate OS processes against real Redis and RabbitMQ, and killed:
//! kill -9 mid-request, SIGTERM drain, SIGSTOP past the lease, poison requests, cancellation of a
//! running command, and a Redis restart under load.

use cairn_progress::now_ms;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_redis::RedisConfig;
use cairn_redis::requests::{QueueNames, RequestQueue, SubmitOutcome};
use cairn_requests::{RequestRecord, RequestState, Submission, new_request_id};
use cairn_testkit::{
    AmqpVhost, RedisNamespace, RedisServer, ServiceProcess, Signal, process_exists, sha256_hex, test_bytes,
    wait_until,
};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_request-processor");
const WAIT: Duration = Duration::from_secs(60);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A test's world: Redis namespace, vhost, temp dir with the handlers file and effect log.
struct World {
    redis_url: String,
    prefix: String,
    amqp_url: String,
    dir: tempfile::TempDir,
    queue: RequestQueue,
    _ns: Option<RedisNamespace>,
    _vhost: AmqpVhost,
}

impl World {
    async fn new() -> World {
        let ns = RedisNamespace::new();
        let (url, prefix) = (ns.url.clone(), ns.prefix.clone());
        World::with(url, prefix, Some(ns)).await
    }

    async fn with(redis_url: String, prefix: String, ns: Option<RedisNamespace>) -> World {
        let vhost = AmqpVhost::new().await;
        let dir = tempfile::tempdir().unwrap();
        let handlers = format!(
            r#"
[handlers.echo]
kind = "echo"

[handlers.effect]
kind = "command"
program = "{effect}"
env = {{ EFFECTS = "{effects}", SLEEP = "1" }}

[handlers.slow_effect]
kind = "command"
program = "{effect}"
env = {{ EFFECTS = "{effects}", SLEEP = "3" }}

[handlers.poison]
kind = "command"
program = "{fails}"

[handlers.hang]
kind = "command"
program = "{hang}"
env = {{ PIDFILE = "{pidfile}" }}
"#,
            effect = fixture("effect.sh").display(),
            effects = dir.path().join("effects.log").display(),
            fails = fixture("always_fails.sh").display(),
            hang = fixture("hang.sh").display(),
            pidfile = dir.path().join("hang.pid").display(),
        );
        std::fs::write(dir.path().join("handlers.toml"), handlers).unwrap();
        let config = RedisConfig::new(redis_url.clone(), prefix.clone());
        let queue =
            RequestQueue::new(config.manager().unwrap(), QueueNames::new(&prefix, "requests", "processors"));
        World { redis_url, prefix, amqp_url: vhost.url.clone(), dir, queue, _ns: ns, _vhost: vhost }
    }

    /// A processor named `name`, started, its output in `{name}.log` of the test's directory.
    /// Dropped, it is killed with the commands it runs (a host going away takes its children with
    /// it).
    fn processor(&self, name: &str, extra: &[&str]) -> ServiceProcess {
        let handlers = self.dir.path().join("handlers.toml");
        let mut args = Vec::new();
        // Fast leases by default; a test's own flags replace these.
        for (flag, value) in
            [("--heartbeat-interval", "200ms"), ("--lease-timeout", "1s"), ("--retry-backoff", "50ms")]
        {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend([
            "--redis-url",
            &self.redis_url,
            "--key-prefix",
            &self.prefix,
            "--amqp-url",
            &self.amqp_url,
        ]);
        args.extend(["--admin-addr", "127.0.0.1:0", "--name", name]);
        args.extend(["--handlers", handlers.to_str().expect("a UTF-8 temporary path")]);
        args.extend(extra);
        let mut processor = ServiceProcess::new(name, BIN, &args, BTreeMap::new(), self.dir.path());
        processor.start();
        processor
    }

    async fn submit(&self, handler: &str, max_attempts: u32) -> String {
        let id = new_request_id();
        let mut submission = Submission::new(handler, json!({"n": 1}));
        submission.max_attempts = Some(max_attempts);
        let record = RequestRecord::queued(id.clone(), submission, 3, now_ms());
        // The first command after a Redis restart may fail while the connection is remade.
        for _ in 0..50 {
            match self.queue.submit(&record, None, 60_000, None).await {
                Ok(outcome) => {
                    assert!(matches!(outcome, SubmitOutcome::Created { .. }));
                    return id;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        panic!("cannot submit to redis")
    }

    async fn states(&self, ids: &[String]) -> HashMap<String, RequestRecord> {
        let mut out = HashMap::new();
        for id in ids {
            if let Ok(Some(record)) = self.queue.record(id).await {
                out.insert(id.clone(), record);
            }
        }
        out
    }

    async fn wait_all(&self, ids: &[String], state: RequestState, timeout: Duration) {
        wait_until(&format!("{} requests {state}", ids.len()), timeout, || async {
            self.states(ids).await.values().filter(|r| r.state == state).count() == ids.len()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; logs in {}", self.dir.path().display()));
    }

    fn effects(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("effects.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    async fn pending_of(&self, consumer: &str) -> usize {
        let mut conn = RedisConfig::new(self.redis_url.clone(), self.prefix.clone()).manager().unwrap();
        let reply: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.queue.names().stream)
            .arg("processors")
            .arg("-")
            .arg("+")
            .arg(1000)
            .arg(consumer)
            .query_async(&mut conn)
            .await
            .unwrap();
        reply.ids.len()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Keep the processors' logs of a failed test for the person reading the failure.
        if std::thread::panicking() {
            let kept = self.dir.path().with_extension("kept");
            let _ = std::fs::rename(self.dir.path(), &kept);
            eprintln!("processor logs kept in {}", kept.display());
        }
    }
}

#[tokio::test]
async fn kill_9_mid_request_completes_every_request_exactly_once_elsewhere() {
    let world = World::new().await;
    let mut doomed = world.processor("doomed", &["--concurrency", "8"]);
    let mut ids = Vec::new();
    // Three seconds of work before the effect: the kill lands well before it.
    for _ in 0..16 {
        ids.push(world.submit("slow_effect", 3).await);
    }
    wait_until("the doomed processor runs requests", WAIT, || async {
        world
            .states(&ids)
            .await
            .values()
            .any(|r| r.owner.as_deref() == Some("doomed") && r.state == RequestState::Running)
    })
    .await
    .unwrap();
    doomed.signal_tree(Signal::KILL);
    assert!(doomed.wait_exit(Duration::from_secs(5)).is_some(), "killed");
    let _survivor = world.processor("survivor", &["--concurrency", "16"]);
    world.wait_all(&ids, RequestState::Succeeded, WAIT).await;

    let effects = world.effects();
    for id in &ids {
        assert_eq!(
            effects.iter().filter(|e| *e == id).count(),
            1,
            "request {id} had exactly one effect: {effects:?}"
        );
    }
    assert_eq!(effects.len(), ids.len());
    assert_eq!(world.pending_of("doomed").await, 0, "nothing stays pending for the dead processor");
}

#[tokio::test]
async fn sigterm_drains_in_flight_work_and_exits_0() {
    let world = World::new().await;
    let mut processor = world.processor("draining", &["--concurrency", "4", "--grace", "20s"]);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(world.submit("slow_effect", 3).await);
    }
    wait_until("all four running", WAIT, || async {
        world.states(&ids).await.values().filter(|r| r.state == RequestState::Running).count() == 4
    })
    .await
    .unwrap();
    let later = world.submit("echo", 3).await;
    processor.signal(Signal::TERM);
    let status = processor.wait_exit(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit 0 after draining");
    world.wait_all(&ids, RequestState::Succeeded, Duration::from_secs(1)).await;
    assert_eq!(world.effects().len(), 4);
    assert_eq!(world.pending_of("draining").await, 0, "nothing of its own left pending");
    let record = world.queue.record(&later).await.unwrap().unwrap();
    assert_eq!(record.state, RequestState::Queued, "work it never took stays queued for others");
}

#[tokio::test]
async fn a_processor_paused_past_its_lease_cannot_commit_late() {
    let world = World::new().await;
    // Slow heartbeats: once resumed it does not notice the lost lease before its handler ends.
    let mut paused = world.processor("paused", &["--heartbeat-interval", "10s", "--lease-timeout", "30s"]);
    let id = world.submit("effect", 3).await;
    wait_until("running on the paused processor", WAIT, || async {
        world.states(std::slice::from_ref(&id)).await.values().any(|r| r.state == RequestState::Running)
    })
    .await
    .unwrap();
    paused.signal_tree(Signal::STOP);
    let _other = world.processor("other", &[]);
    world.wait_all(std::slice::from_ref(&id), RequestState::Succeeded, WAIT).await;
    let record = world.queue.record(&id).await.unwrap().unwrap();
    assert_eq!(record.owner.as_deref(), Some("other"));
    assert_eq!(record.attempts, 2, "the second attempt ran elsewhere");

    paused.signal_tree(Signal::CONT);
    // The paused run's handler finishes now and its commit is refused by the lease fence.
    let log = world.dir.path().join("paused.log");
    wait_until("the late commit is refused", WAIT, || async {
        std::fs::read_to_string(&log).unwrap_or_default().contains("outcome refused")
    })
    .await
    .unwrap();
    let after = world.queue.record(&id).await.unwrap().unwrap();
    assert_eq!(after.owner.as_deref(), Some("other"), "the stored outcome is the other processor's");
    assert_eq!(after.state, RequestState::Succeeded);
    assert_eq!(after.finished_ms, record.finished_ms, "nothing was stored again");
    assert_eq!(world.pending_of("paused").await, 0);
    drop(paused);
}

#[tokio::test]
async fn poison_requests_die_after_max_attempts_while_good_ones_succeed() {
    let world = World::new().await;
    let _processor = world.processor("p", &["--concurrency", "8"]);
    let poison = world.submit("poison", 3).await;
    let mut good = Vec::new();
    for _ in 0..50 {
        good.push(world.submit("echo", 3).await);
    }
    world.wait_all(&good, RequestState::Succeeded, WAIT).await;
    world.wait_all(std::slice::from_ref(&poison), RequestState::Dead, WAIT).await;
    let record = world.queue.record(&poison).await.unwrap().unwrap();
    assert_eq!(record.attempts, 3);
    let error = record.error.unwrap_or_default();
    assert!(error.contains("always fails"), "the last error is kept: {error}");
    let dead = world.queue.dead_letters("-", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].request_id, poison);
}

#[tokio::test]
async fn canceling_a_running_command_kills_it_within_a_heartbeat() {
    let world = World::new().await;
    let _processor = world.processor("p", &[]);
    let id = world.submit("hang", 3).await;
    let pidfile = world.dir.path().join(format!("hang.pid.{id}"));
    wait_until("the command runs", WAIT, || async { pidfile.exists() }).await.unwrap();
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(process_exists(pid));
    world.queue.cancel(&id, now_ms()).await.unwrap();
    let started = std::time::Instant::now();
    world.wait_all(std::slice::from_ref(&id), RequestState::Canceled, Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "canceled within about one heartbeat (200 ms)");
    wait_until("its process is gone", Duration::from_secs(5), || async { !process_exists(pid) })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_redis_restart_under_load_loses_no_request() {
    let server = RedisServer::with_aof().await;
    let world = World::with(server.url(), "t:restart".into(), None).await;
    let _processor = world.processor("p", &["--concurrency", "16"]);
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(world.submit("echo", 3).await);
    }
    let mut server = server;
    server.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart().await;
    for _ in 0..100 {
        ids.push(world.submit("echo", 3).await);
    }
    world.wait_all(&ids, RequestState::Succeeded, WAIT).await;
}

/// Redis hung (SIGSTOP) for longer than the reader's block and slack, and past the lease: the
/// processor notices, reconnects by itself once Redis answers, and every request submitted
/// before, during (queued by a client that retries) and after completes exactly once.
#[tokio::test]
async fn a_hung_redis_under_load_recovers_on_its_own() {
    let server = RedisServer::new().await;
    let world = World::with(server.url(), "t:hung".into(), None).await;
    let _processor = world.processor("p", &["--concurrency", "8"]);
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(world.submit("echo", 3).await);
    }
    let mut server = server;
    server.pause();
    tokio::time::sleep(Duration::from_secs(7)).await;
    server.resume();
    for _ in 0..50 {
        ids.push(world.submit("echo", 3).await);
    }
    world.wait_all(&ids, RequestState::Succeeded, WAIT).await;
    let states = world.states(&ids).await;
    assert!(states.values().all(|r| r.attempts >= 1), "every request ran");
}

/// A processor killed mid-request and started again under the same consumer name drains its
/// own pending entries: every request ends once, none is left pending for that name.
#[tokio::test]
async fn a_processor_restarted_with_its_name_drains_its_own_pending_entries() {
    let world = World::new().await;
    let mut first = world.processor("same", &["--concurrency", "8"]);
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(world.submit("slow_effect", 3).await);
    }
    wait_until("the first life runs requests", WAIT, || async {
        world.states(&ids).await.values().any(|r| r.state == RequestState::Running)
    })
    .await
    .unwrap();
    first.signal_tree(Signal::KILL);
    assert!(first.wait_exit(Duration::from_secs(5)).is_some(), "killed");
    assert!(world.pending_of("same").await > 0, "the killed life left entries pending");
    let _second = world.processor("same", &["--concurrency", "8"]);
    world.wait_all(&ids, RequestState::Succeeded, WAIT).await;
    let effects = world.effects();
    for id in &ids {
        assert_eq!(effects.iter().filter(|e| *e == id).count(), 1, "request {id}: {effects:?}");
    }
    assert_eq!(world.pending_of("same").await, 0);
}

/// Stores `data` as the data stream `name` of a new request for `handler` and queues it.
async fn submit_with_stream(world: &World, handler: &str, name: &str, data: &[u8]) -> String {
    use cairn_redis::BlobStore;
    use cairn_redis::blobs::{BlobWriter, WriteMode};
    use cairn_redis::requests::StreamSource;
    use cairn_requests::StreamInfo;

    let conn = RedisConfig::new(world.redis_url.clone(), world.prefix.clone()).manager().unwrap();
    let blobs = BlobStore::new(
        conn,
        &cairn_redis::requests::QueueLayout::new(&world.prefix, "requests", "processors"),
    );
    let id = new_request_id();
    let base = blobs.stream_key(&id, name);
    blobs.create(&base, &[], now_ms(), None).await.unwrap();
    let mut writer = BlobWriter::new(blobs.clone(), base, 0, WriteMode::Direct, None);
    for chunk in data.chunks(100_000) {
        writer.write(bytes::Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), data.len() as u64);
    let mut submission = Submission::new(handler, json!({"n": 1}));
    submission.max_attempts = Some(3);
    let mut record = RequestRecord::queued(id.clone(), submission, 3, now_ms());
    record.streams = vec![StreamInfo { name: name.to_owned(), bytes: data.len() as u64 }];
    let source = StreamSource { name: name.to_owned(), upload: None };
    let outcome = world.queue.submit_with_streams(&record, None, 60_000, None, &[source]).await.unwrap();
    assert!(matches!(outcome, SubmitOutcome::Created { .. }), "{outcome:?}");
    id
}

/// What the upstream of the `upload` handler saw: per attempt, the bytes of the `data` part.
#[derive(Default)]
struct Upstream {
    /// Bytes of `data` received by the first attempt so far (read slowly).
    first_attempt: std::sync::atomic::AtomicU64,
    /// (attempt, payload part, bytes, sha256) of each body read to its end.
    whole: std::sync::Mutex<Vec<(String, String, u64, String)>>,
}

/// An upstream reading multipart bodies: the first attempt's slowly (so a kill lands
/// mid-transfer), later ones at full speed; answers the `data` part's size and SHA-256.
async fn start_upstream(upstream: std::sync::Arc<Upstream>) -> String {
    use axum::extract::{Multipart, State};
    use axum::http::HeaderMap;
    use sha2::Digest as _;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    async fn receive(
        State(upstream): State<Arc<Upstream>>,
        headers: HeaderMap,
        mut multipart: Multipart,
    ) -> axum::Json<serde_json::Value> {
        let attempt = headers.get("x-cairn-attempt").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let (mut payload, mut bytes, mut hasher) = (String::new(), 0u64, sha2::Sha256::new());
        // A body cut off (its sender killed) ends in an error, never as a whole body.
        let cut = || axum::Json(json!({"error": "the body was cut off"}));
        loop {
            let mut field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(_) => return cut(),
            };
            let name = field.name().unwrap_or("").to_owned();
            loop {
                let chunk = match field.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(_) => return cut(),
                };
                if name == "payload" {
                    payload.push_str(&String::from_utf8_lossy(&chunk));
                    continue;
                }
                bytes += chunk.len() as u64;
                hasher.update(&chunk);
                if attempt == "1" {
                    upstream.first_attempt.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let sha: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        upstream.whole.lock().unwrap().push((attempt, payload, bytes, sha.clone()));
        axum::Json(json!({"bytes": bytes, "sha256": sha}))
    }

    let app = axum::Router::new()
        .route("/", axum::routing::post(receive))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(upstream);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn add_handler(world: &World, text: &str) {
    let path = world.dir.path().join("handlers.toml");
    let mut handlers = std::fs::read_to_string(&path).unwrap();
    handlers.push_str(text);
    std::fs::write(path, handlers).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_killed_mid_transfer_leaves_the_retry_the_whole_stream() {
    use std::sync::atomic::Ordering;

    let world = World::new().await;
    let upstream = std::sync::Arc::new(Upstream::default());
    let url = start_upstream(upstream.clone()).await;
    add_handler(
        &world,
        &format!("\n[handlers.upload]\nkind = \"http\"\nurl = \"{url}\"\ntimeout = \"60s\"\n"),
    );
    let data = test_bytes(8 * 1024 * 1024, 5);
    let mut doomed = world.processor("doomed", &[]);
    let id = submit_with_stream(&world, "upload", "data", &data).await;
    wait_until("the upstream receives part of the stream", WAIT, || async {
        upstream.first_attempt.load(Ordering::SeqCst) > 1024 * 1024
    })
    .await
    .unwrap();
    doomed.signal_tree(Signal::KILL);
    assert!(doomed.wait_exit(Duration::from_secs(5)).is_some(), "killed");
    let cut_at = upstream.first_attempt.load(Ordering::SeqCst);
    assert!(cut_at < data.len() as u64, "the kill landed mid-transfer ({cut_at} bytes)");

    let _survivor = world.processor("survivor", &[]);
    world.wait_all(std::slice::from_ref(&id), RequestState::Succeeded, WAIT).await;
    let record = world.queue.record(&id).await.unwrap().unwrap();
    assert_eq!(record.attempts, 2);
    let result = record.result.unwrap();
    assert_eq!(result["bytes"], data.len() as u64, "the retry sent the whole stream: {result}");
    assert_eq!(result["sha256"], sha256_hex(&data));
    let whole = upstream.whole.lock().unwrap().clone();
    assert_eq!(whole.len(), 1, "only the retry's body arrived whole: {whole:?}");
    assert_eq!(whole[0].0, "2");
    assert_eq!(whole[0].1, r#"{"n":1}"#, "the payload part comes first, as JSON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_gets_its_streams_as_files_in_a_private_directory_removed_afterwards() {
    let world = World::new().await;
    add_handler(
        &world,
        &format!(
            "\n[handlers.files]\nkind = \"command\"\nprogram = \"{}\"\n",
            fixture("streams.sh").display()
        ),
    );
    let data = test_bytes(3 * 1024 * 1024 + 5, 9);
    let _processor = world.processor("files", &[]);
    let id = submit_with_stream(&world, "files", "scan-1", &data).await;
    world.wait_all(std::slice::from_ref(&id), RequestState::Succeeded, WAIT).await;
    let result = world.queue.record(&id).await.unwrap().unwrap().result.unwrap();
    assert_eq!(result["files"]["scan-1"]["bytes"], data.len() as u64, "{result}");
    assert_eq!(result["files"]["scan-1"]["sha256"], sha256_hex(&data));
    assert_eq!(result["mode"], "700", "only the processor's user can read the streams");
    let dir = result["dir"].as_str().unwrap();
    assert!(!Path::new(dir).exists(), "{dir} was removed after the run");
}
