//! Chaos: every service as its own OS process (two ingress, three request processors, two
//! progress aggregators and two stream trimmers, each `cairn dev --only <service>`) under a steady
//! load of submissions and progress updates, while one process picked at random is killed with
//! SIGKILL and started again every couple of seconds. Afterwards:
//! - every submission answered 202 reaches `succeeded` (attempts are plentiful), and so does its
//!   progress node;
//! - the upstream saw each (request, attempt) at most once, and the attempt that succeeded;
//! - every progress tree equals the reference model fed the same updates;
//! - no process's resident memory passed a bound.
//!
//! It runs twice: on one Redis with one request partition, and on a Redis Cluster of three
//! masters with the request queue in three partitions (docs/contract.md §8).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use cairn_progress::Key;
use cairn_progress::model::Tree;
use cairn_progress::update::Update;
use cairn_redis::progress::ReadOptions;
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_testkit::{
    AmqpVhost, RedisCluster, RedisNamespace, ServiceProcess, free_port, unique_name, wait_until,
};
use lapin::{BasicProperties, Channel};
use rand::Rng;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const CAIRN: &str = env!("CARGO_BIN_EXE_cairn");
/// How long the load and the killing go on.
const LOAD: Duration = Duration::from_secs(20);
/// Time between two kills.
const KILL_EVERY: Duration = Duration::from_millis(2000);
/// How long everything has to settle once the killing stops.
const SETTLE: Duration = Duration::from_secs(120);
/// No process may hold more than this much resident memory at any sample.
const MAX_RSS_KIB: u64 = 512 * 1024;
/// Progress leaves, `_chaos.j{j}.s{s}`, and the updates each gets.
const JOBS: usize = 4;
const STEPS_PER_JOB: usize = 5;
const UPDATES: usize = 20;

/// (request id, attempt) of every call the upstream finished.
type Effects = Arc<Mutex<Vec<(String, u32)>>>;

/// The upstream the `http` handler posts to: takes a moment (so kills land mid-request), then
/// records the call and answers 200.
async fn upstream(effects: Effects) -> u16 {
    let app = axum::Router::new().route(
        "/work",
        axum::routing::post(move |headers: HeaderMap| {
            let effects = effects.clone();
            async move {
                let pause = rand::rng().random_range(50..400);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let header =
                    |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let attempt = header("x-cairn-attempt").parse().unwrap_or(0);
                effects.lock().unwrap().push((header("x-cairn-request-id"), attempt));
                axum::Json(json!({"ok": true}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// Where the stack keeps its data: a prefix of its own on the shared Redis, or a Redis Cluster of
/// its own with the request queue in partitions.
struct Store {
    config: RedisConfig,
    partitions: u16,
    _namespace: Option<RedisNamespace>,
    _cluster: Option<RedisCluster>,
}

impl Store {
    fn single() -> Store {
        let ns = RedisNamespace::new();
        let config = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
        Store { config, partitions: 1, _namespace: Some(ns), _cluster: None }
    }

    async fn cluster(partitions: u16) -> Store {
        let cluster = RedisCluster::new().await;
        let config = RedisConfig::cluster(cluster.url(), unique_name("chaos"));
        Store { config, partitions, _namespace: None, _cluster: Some(cluster) }
    }

    /// The variables that point a service at this store.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CAIRN_REDIS_URL", self.config.url.clone()),
            ("CAIRN_KEY_PREFIX", self.config.prefix.clone()),
            ("CAIRN_REDIS_CLUSTER", self.config.cluster.to_string()),
            ("CAIRN_REQUEST_PARTITIONS", self.partitions.to_string()),
        ]
    }
}

struct Stack {
    processes: Vec<ServiceProcess>,
    /// Base URLs of the ingress replicas.
    ingress: Vec<String>,
}

impl Stack {
    fn start(store: &Store, vhost: &AmqpVhost, dir: &std::path::Path, upstream: u16) -> Stack {
        let handlers = dir.join("handlers.toml");
        std::fs::write(
            &handlers,
            format!("[handlers.work]\nkind = \"http\"\nurl = \"http://127.0.0.1:{upstream}/work\"\ntimeout = \"10s\"\n"),
        )
        .unwrap();
        let mut base = BTreeMap::from([
            ("CAIRN_AMQP_URL", vhost.url.clone()),
            ("CAIRN_LOG", "warn".to_owned()),
            ("CAIRN_HANDLERS_FILE", handlers.display().to_string()),
        ]);
        base.extend(store.env());
        let aggregator_ports = [free_port(), free_port()];
        let ingress_ports = [free_port(), free_port()];
        let mut processes = Vec::new();
        let mut add = |name: String, service: &str, extra: &[(&str, String)]| {
            let mut env: BTreeMap<String, String> =
                base.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
            env.insert("CAIRN_DEV_ONLY".into(), service.into());
            env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
            processes.push(ServiceProcess::new(name, CAIRN, &["dev"], env, dir));
        };
        for (i, port) in aggregator_ports.iter().enumerate() {
            add(
                format!("aggregator-{i}"),
                "progress-aggregator",
                &[
                    ("CAIRN_AGGREGATOR_GRPC_ADDR", format!("127.0.0.1:{port}")),
                    ("CAIRN_AGGREGATOR_ADMIN_ADDR", "127.0.0.1:0".into()),
                    ("CAIRN_AGGREGATOR_NAME", format!("aggregator-{i}")),
                    ("CAIRN_AGGREGATOR_LEASE_TTL", "2s".into()),
                ],
            );
        }
        for (i, port) in ingress_ports.iter().enumerate() {
            add(
                format!("ingress-{i}"),
                "ingress",
                &[
                    ("CAIRN_INGRESS_ADDR", format!("127.0.0.1:{port}")),
                    ("CAIRN_INGRESS_ADMIN_ADDR", "127.0.0.1:0".into()),
                    ("CAIRN_INGRESS_REPLICA", format!("ingress-{i}")),
                    ("CAIRN_AGGREGATOR_URL", format!("http://127.0.0.1:{}", aggregator_ports[i])),
                ],
            );
        }
        for i in 0..3 {
            add(
                format!("processor-{i}"),
                "request-processor",
                &[
                    ("CAIRN_PROCESSOR_ADMIN_ADDR", "127.0.0.1:0".into()),
                    ("CAIRN_PROCESSOR_NAME", format!("processor-{i}")),
                    ("CAIRN_HEARTBEAT_INTERVAL", "200ms".into()),
                    ("CAIRN_LEASE_TIMEOUT", "1s".into()),
                    ("CAIRN_RETRY_BACKOFF", "50ms".into()),
                ],
            );
        }
        for i in 0..2 {
            add(
                format!("trimmer-{i}"),
                "stream-trimmer",
                &[
                    ("CAIRN_TRIMMER_ADMIN_ADDR", "127.0.0.1:0".into()),
                    ("CAIRN_TRIMMER_NAME", format!("trimmer-{i}")),
                    ("CAIRN_TRIM_INTERVAL", "1s".into()),
                ],
            );
        }
        for process in &mut processes {
            process.start();
        }
        Stack {
            processes,
            ingress: ingress_ports.iter().map(|port| format!("http://127.0.0.1:{port}")).collect(),
        }
    }

    /// Starts whatever is not running (killed, or died by itself).
    fn revive(&mut self) {
        for process in &mut self.processes {
            if !process.is_running() {
                process.start();
            }
        }
    }

    fn max_rss(&self) -> Option<(String, u64)> {
        self.processes
            .iter()
            .filter_map(|p| p.rss_kib().map(|kib| (p.name().to_owned(), kib)))
            .max_by_key(|(_, kib)| *kib)
    }

    fn logs(&self) -> String {
        self.processes.iter().map(|p| format!("--- {}\n{}\n", p.name(), p.log_tail(15))).collect()
    }
}

/// Publishes every leaf's updates in order, spread over the load, feeding the model the same.
async fn publish_progress(channel: Channel, model: Arc<Mutex<Tree>>) {
    let pause = LOAD / u32::try_from(UPDATES).unwrap();
    for step in 0..UPDATES {
        for job in 0..JOBS {
            for s in 0..STEPS_PER_JOB {
                let key = format!("_chaos.j{job}.s{s}");
                let body = json!({
                    "seq": step,
                    "progress": step as f64 / (UPDATES - 1) as f64,
                    "weight": 1 + s,
                });
                let update = Update::from_json(&body).unwrap();
                let persistent = BasicProperties::default().with_delivery_mode(2);
                cairn_testkit::publish_progress(&channel, &key, body.to_string().as_bytes(), persistent)
                    .await;
                model.lock().unwrap().apply(&Key::parse(&key).unwrap(), &update, 0);
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// Submits a request every 40 ms to the ingress replicas in turn until `stop`; returns the ids
/// answered 202 (a refused connection or a 503 while a replica is down is not a submission).
async fn submit_load(ingress: Vec<String>, stop: CancellationToken) -> (Vec<String>, Vec<String>) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let base = &ingress[usize::try_from(n).unwrap() % ingress.len()];
        let submission = json!({"handler": "work", "payload": {"n": n}, "max_attempts": 50});
        match client.post(format!("{base}/v1/requests")).json(&submission).send().await {
            Ok(response) if response.status() == 202 => {
                let body: Value = response.json().await.expect("a 202 has a JSON body");
                accepted.push(body["id"].as_str().expect("a 202 names its request").to_owned());
            }
            Ok(response) => {
                refused.push(format!("{}: {}", response.status(), response.text().await.unwrap_or_default()))
            }
            Err(error) => refused.push(error.to_string()),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    (accepted, refused)
}

/// The state of request `id` through any ingress replica that answers.
async fn state(client: &reqwest::Client, ingress: &[String], id: &str) -> Option<Value> {
    for base in ingress {
        if let Ok(response) = client.get(format!("{base}/v1/requests/{id}")).send().await
            && response.status() == 200
            && let Ok(record) = response.json::<Value>().await
        {
            return Some(record);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_that_loses_a_random_process_every_few_seconds_loses_nothing() {
    chaos(Store::single()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_with_partitioned_requests_it_loses_nothing_either() {
    chaos(Store::cluster(3).await).await;
}

async fn chaos(store: Store) {
    let vhost = AmqpVhost::new().await;
    let dir = tempfile::tempdir().unwrap();
    let effects: Effects = Arc::default();
    let upstream_port = upstream(effects.clone()).await;
    let mut stack = Stack::start(&store, &vhost, dir.path(), upstream_port);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    for base in stack.ingress.clone() {
        let ready = wait_until("an ingress replica ready", Duration::from_secs(30), || {
            let (client, url) = (client.clone(), format!("{base}/readyz"));
            async move { client.get(url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        assert!(ready.is_ok(), "{:?}\n{}", ready, stack.logs());
    }

    let model = Arc::new(Mutex::new(Tree::new()));
    let (_conn, channel) = vhost.progress_publisher().await;
    let progress = tokio::spawn(publish_progress(channel, model.clone()));
    let stop = CancellationToken::new();
    let load = tokio::spawn(submit_load(stack.ingress.clone(), stop.clone()));

    let mut kills: HashMap<String, u32> = HashMap::new();
    let mut max_rss = 0;
    let end = tokio::time::Instant::now() + LOAD;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(KILL_EVERY).await;
        if let Some((name, kib)) = stack.max_rss() {
            assert!(kib < MAX_RSS_KIB, "{name} holds {kib} KiB");
            max_rss = max_rss.max(kib);
        }
        let victim = rand::rng().random_range(0..stack.processes.len());
        let process = &mut stack.processes[victim];
        *kills.entry(process.name().to_owned()).or_default() += 1;
        process.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stack.revive();
    }
    stop.cancel();
    let (accepted, refused) = load.await.unwrap();
    progress.await.unwrap();
    stack.revive();
    eprintln!(
        "chaos ({} partition(s), cluster {}): {} requests accepted, {} refused, kills {kills:?}, max RSS {max_rss} KiB",
        store.partitions,
        store.config.cluster,
        accepted.len(),
        refused.len()
    );
    assert!(
        accepted.len() > 100,
        "the load went on through the chaos: {} accepted, refused: {:?}\n{}",
        accepted.len(),
        refused.iter().take(5).collect::<Vec<_>>(),
        stack.logs()
    );

    // Every accepted request reaches a terminal state, and that state is success.
    let mut records: HashMap<String, Value> = HashMap::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while records.len() < accepted.len() && tokio::time::Instant::now() < deadline {
        for id in &accepted {
            if records.contains_key(id) {
                continue;
            }
            if let Some(record) = state(&client, &stack.ingress, id).await
                && matches!(record["state"].as_str(), Some("succeeded" | "failed" | "dead" | "canceled"))
            {
                records.insert(id.clone(), record);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled = records.len() == accepted.len();
    assert!(settled, "{} of {} terminal\n{}", records.len(), accepted.len(), stack.logs());
    let not_succeeded: Vec<&Value> = records.values().filter(|r| r["state"] != "succeeded").collect();
    assert!(not_succeeded.is_empty(), "every request succeeds in the end: {not_succeeded:?}");

    // The upstream ran each attempt at most once, and every successful attempt ran it.
    let effects = effects.lock().unwrap().clone();
    let mut seen = HashSet::new();
    for effect in &effects {
        assert!(seen.insert(effect.clone()), "attempt {} of {} ran twice", effect.1, effect.0);
    }
    for (id, record) in &records {
        let attempts = u32::try_from(record["attempts"].as_u64().expect("attempts")).unwrap();
        assert!(
            seen.contains(&(id.clone(), attempts)),
            "the successful attempt {attempts} of {id} reached the upstream"
        );
        assert!(
            effects.iter().filter(|(e, _)| e == id).all(|(_, a)| *a <= attempts),
            "no effect of {id} from an attempt after its last"
        );
    }

    // A request's node ends as its record.
    let store = ProgressStore::new(store.config.connection().unwrap(), store.config.prefix.clone());
    for id in records.keys() {
        let key = Key::parse(&format!("_requests.{id}")).unwrap();
        let node = store.get(&key, &ReadOptions::default()).await.unwrap();
        let ended = node.as_ref().is_some_and(|n| {
            n.status() == Some("finished")
                && n.fields.get("state") == Some(&json!("succeeded"))
                && n.progress() == Some(1.0)
        });
        assert!(ended, "the node of {id} ends finished, succeeded: {node:?}");
    }

    // Every progress node equals the model's.
    let model = model.lock().unwrap().clone();
    let last = json!(UPDATES - 1);
    let applied = wait_until("every leaf at its last update", SETTLE, || {
        let (store, last) = (store.clone(), last.clone());
        async move {
            for job in 0..JOBS {
                for s in 0..STEPS_PER_JOB {
                    let key = Key::parse(&format!("_chaos.j{job}.s{s}")).unwrap();
                    match store.get(&key, &ReadOptions::default()).await {
                        Ok(Some(node)) if node.fields.get("seq") == Some(&last) => {}
                        _ => return false,
                    }
                }
            }
            true
        }
    })
    .await;
    assert!(applied.is_ok(), "{}", stack.logs());
    for (key, expected) in model.nodes() {
        let node =
            store.get(key, &ReadOptions::default()).await.unwrap().unwrap_or_else(|| panic!("{key} exists"));
        let (got, want) = (node.progress().unwrap_or(0.0), expected.progress().unwrap_or(0.0));
        assert!((got - want).abs() < 1e-9, "{key}: progress {got}, the model says {want}");
        if let Some(weight) = expected.weight() {
            assert_eq!(node.fields.get("weight").and_then(Value::as_f64), Some(weight), "{key}: weight");
        }
    }
}
