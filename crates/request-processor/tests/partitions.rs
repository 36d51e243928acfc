//! request-processor with a partitioned request queue (`CAIRN_REQUEST_PARTITIONS=3`), run as
//! separate OS processes, on the shared Redis (a key prefix of its own) and on a Redis Cluster
//! of three masters (`CAIRN_REDIS_CLUSTER=true`): every partition is read, a killed processor's
//! entries in any partition are reclaimed by another, idle partitions never starve a busy one,
//! and a processor configured with another partition count refuses to start while requests of
//! the queue's own are unfinished.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_progress::now_ms;
use cairn_redis::RedisConfig;
use cairn_redis::requests::{QueueLayout, RequestQueues, SubmitOutcome};
use cairn_requests::{RequestRecord, RequestState, Submission};
use cairn_testkit::{AmqpVhost, RedisCluster, RedisNamespace, ServiceProcess, free_port, wait_until};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_request-processor");
const WAIT: Duration = Duration::from_secs(60);
const PARTITIONS: u16 = 3;

/// Runs each named `async fn(World)` as two tests, `single_redis` and `cluster`, in a module of
/// its name.
macro_rules! on_redis_and_cluster {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn single_redis() {
                    super::$name(super::World::single().await).await
                }

                #[tokio::test]
                async fn cluster() {
                    super::$name(super::World::cluster().await).await
                }
            }
        )*
    };
}

on_redis_and_cluster!(
    requests_in_every_partition_run_once_with_two_processors,
    a_killed_processors_entries_in_every_partition_are_reclaimed_and_finish,
    one_permit_and_idle_partitions_never_starve_the_busy_one,
    another_partition_count_is_refused_while_requests_are_unfinished,
);

/// A test's world: Redis (a prefix on the shared one, or a cluster of its own), a vhost, and a
/// temp dir with the handlers file, the handler's records and the processors' logs.
struct World {
    config: RedisConfig,
    queues: RequestQueues,
    amqp_url: String,
    dir: tempfile::TempDir,
    _vhost: AmqpVhost,
    _namespace: Option<RedisNamespace>,
    _cluster: Option<RedisCluster>,
}

impl World {
    async fn single() -> World {
        let ns = RedisNamespace::new();
        let config = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
        World::with(config, Some(ns), None).await
    }

    async fn cluster() -> World {
        let cluster = RedisCluster::new().await;
        let config = RedisConfig::cluster(cluster.url(), cairn_testkit::unique_name("c"));
        World::with(config, None, Some(cluster)).await
    }

    async fn with(
        config: RedisConfig,
        namespace: Option<RedisNamespace>,
        cluster: Option<RedisCluster>,
    ) -> World {
        let vhost = AmqpVhost::new().await;
        let dir = tempfile::tempdir().unwrap();
        let handlers = format!(
            r#"
[handlers.gated]
kind = "command"
program = "{program}"
env = {{ RUNS = "{runs}", EFFECTS = "{effects}", GATE = "{gate}" }}
"#,
            program = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gated_effect.sh").display(),
            runs = dir.path().join("runs.log").display(),
            effects = dir.path().join("effects.log").display(),
            gate = dir.path().join("gate").display(),
        );
        std::fs::write(dir.path().join("handlers.toml"), handlers).unwrap();
        let layout = QueueLayout::new(&config.prefix, "requests", "processors").with_partitions(PARTITIONS);
        let queues = RequestQueues::new(config.connection().expect("redis settings"), layout);
        World {
            config,
            queues,
            amqp_url: vhost.url.clone(),
            dir,
            _vhost: vhost,
            _namespace: namespace,
            _cluster: cluster,
        }
    }

    /// Starts a processor named `name` configured by environment, as deployed: this world's
    /// Redis (a cluster's seeds with `CAIRN_REDIS_CLUSTER=true`), three partitions, `settings`
    /// added (`CAIRN_*` name, value).
    fn processor(&self, name: &str, settings: &[(&str, &str)]) -> Processor {
        let handlers = self.dir.path().join("handlers.toml").display().to_string();
        let partitions = PARTITIONS.to_string();
        let cluster = if self.config.cluster { "true" } else { "false" };
        let base = [
            ("CAIRN_REDIS_URL", self.config.url.as_str()),
            ("CAIRN_REDIS_CLUSTER", cluster),
            ("CAIRN_KEY_PREFIX", self.config.prefix.as_str()),
            ("CAIRN_REQUEST_PARTITIONS", partitions.as_str()),
            ("CAIRN_AMQP_URL", self.amqp_url.as_str()),
            ("CAIRN_PROCESSOR_ADMIN_ADDR", "127.0.0.1:0"),
            ("CAIRN_PROCESSOR_NAME", name),
            ("CAIRN_HANDLERS_FILE", handlers.as_str()),
        ];
        let mut env: BTreeMap<String, String> =
            base.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        env.extend(settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let mut process = ServiceProcess::new(name, BIN, &[], env, self.dir.path());
        process.start();
        Processor { process }
    }

    /// Submits a request for the `gated` handler in `partition`, as ingress does: a new id of the
    /// partition, stored and queued by that partition's queue.
    async fn submit(&self, partition: u16) -> String {
        let id = self.queues.new_id_in(Some(partition));
        let mut submission = Submission::new("gated", json!({"n": 1}));
        submission.max_attempts = Some(3);
        let record = RequestRecord::queued(id.clone(), submission, 3, now_ms());
        let outcome = self.queues.of(&id).submit(&record, None, 60_000, None).await.unwrap();
        assert!(matches!(outcome, SubmitOutcome::Created { .. }), "{outcome:?}");
        assert_eq!(self.queues.layout().partition_of(&id), partition);
        id
    }

    /// `per_partition` requests in each partition.
    async fn submit_everywhere(&self, per_partition: usize) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..per_partition {
            for partition in 0..PARTITIONS {
                ids.push(self.submit(partition).await);
            }
        }
        ids
    }

    async fn records(&self, ids: &[String]) -> HashMap<String, RequestRecord> {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let records = self.queues.records(&refs).await.unwrap_or_default();
        ids.iter().cloned().zip(records).filter_map(|(id, record)| Some((id, record?))).collect()
    }

    async fn wait_for(&self, what: &str, ids: &[String], test: impl Fn(&RequestRecord) -> bool) {
        wait_until(what, WAIT, || async {
            let records = self.records(ids).await;
            records.len() == ids.len() && records.values().all(&test)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; logs in {}", self.dir.path().display()));
    }

    /// Lets every gated run, waiting or still to come, have its effect.
    fn open_gate(&self) {
        std::fs::write(self.dir.path().join("gate"), "").unwrap();
    }

    /// How many times each request id appears in the handler's `runs` or `effects` log.
    fn counts(&self, log: &str) -> HashMap<String, usize> {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{log}.log"))).unwrap_or_default();
        let mut counts = HashMap::new();
        for id in text.lines() {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
        counts
    }

    /// Entries pending for `consumer`, summed over every partition's stream.
    async fn pending_of(&self, consumer: &str) -> usize {
        let mut conn = self.config.connection().unwrap();
        let mut total = 0;
        for queue in self.queues.partitions() {
            let reply: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(&queue.names().stream)
                .arg(&queue.names().group)
                .arg("-")
                .arg("+")
                .arg(1000)
                .arg(consumer)
                .query_async(&mut conn)
                .await
                .unwrap();
            total += reply.ids.len();
        }
        total
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // A handler left waiting by a failed test exits instead of polling forever.
        self.open_gate();
        // Keep the processors' logs of a failed test for the person reading the failure.
        if std::thread::panicking() {
            let kept: PathBuf = self.dir.path().with_extension("kept");
            let _ = std::fs::rename(self.dir.path(), &kept);
            eprintln!("processor logs kept in {}", kept.display());
        }
    }
}

/// A processor process; killed with its handlers when dropped.
struct Processor {
    process: ServiceProcess,
}

impl Processor {
    /// `kill -9` of the processor and its handlers' process groups, as when its host dies.
    fn kill_tree(&mut self) {
        let Some(pid) = self.process.pid().filter(|_| self.process.is_running()) else { return };
        let pid = pid.to_string();
        // Frozen first, so it cannot start another handler between listing and killing.
        signal("STOP", &pid);
        let children = Command::new("pgrep").args(["-P", &pid]).output().unwrap();
        for child in String::from_utf8_lossy(&children.stdout).split_whitespace() {
            signal("KILL", &format!("-{child}"));
        }
        self.process.kill();
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        self.kill_tree();
    }
}

fn signal(signal: &str, target: &str) {
    let _ = Command::new("kill").args([&format!("-{signal}"), "--", target]).status();
}

/// Every id counted exactly `times` in `counts`, and nothing else in it.
fn assert_each(counts: &HashMap<String, usize>, ids: &[String], times: usize, what: &str) {
    for id in ids {
        assert_eq!(counts.get(id).copied().unwrap_or(0), times, "{what} of request {id}: {counts:?}");
    }
    assert_eq!(counts.len(), ids.len(), "{what} only of these requests: {counts:?}");
}

async fn requests_in_every_partition_run_once_with_two_processors(world: World) {
    world.open_gate();
    let admin_port = free_port();
    let admin_addr = format!("127.0.0.1:{admin_port}");
    let a = world
        .processor("a", &[("CAIRN_PROCESSOR_CONCURRENCY", "4"), ("CAIRN_PROCESSOR_ADMIN_ADDR", &admin_addr)]);
    let _b = world.processor("b", &[("CAIRN_PROCESSOR_CONCURRENCY", "4")]);
    // Ready means Redis answers, also on a cluster (PING reaches every master).
    let readyz = format!("http://{admin_addr}/readyz");
    wait_until("processor a is ready", WAIT, || async {
        reqwest::get(&readyz).await.is_ok_and(|answer| answer.status() == reqwest::StatusCode::OK)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", a.process.log_tail(20)));

    let ids = world.submit_everywhere(4).await;
    let used: BTreeSet<u16> = ids.iter().map(|id| world.queues.layout().partition_of(id)).collect();
    assert_eq!(used, (0..PARTITIONS).collect(), "requests wait in every partition");
    world.wait_for("every request succeeded", &ids, |r| r.state == RequestState::Succeeded).await;

    let records = world.records(&ids).await;
    for (id, record) in &records {
        assert_eq!(record.attempts, 1, "request {id} ran in one attempt");
        let owner = record.owner.as_deref();
        assert!(matches!(owner, Some("a" | "b")), "request {id} was run by {owner:?}");
    }
    assert_each(&world.counts("runs"), &ids, 1, "runs");
    assert_each(&world.counts("effects"), &ids, 1, "effects");
    assert_eq!(world.pending_of("a").await + world.pending_of("b").await, 0, "every entry was acked");
}

async fn a_killed_processors_entries_in_every_partition_are_reclaimed_and_finish(world: World) {
    let fast = [("CAIRN_HEARTBEAT_INTERVAL", "200ms"), ("CAIRN_LEASE_TIMEOUT", "2s")];
    let mut doomed = world.processor("doomed", &[fast[0], fast[1], ("CAIRN_PROCESSOR_CONCURRENCY", "8")]);
    let ids = world.submit_everywhere(2).await;
    // Each handler waits at the gate: every request of every partition is mid-run on `doomed`.
    world
        .wait_for("every request running on doomed", &ids, |r| {
            r.state == RequestState::Running && r.owner.as_deref() == Some("doomed")
        })
        .await;
    wait_until("every handler started", WAIT, || async { world.counts("runs").len() == ids.len() })
        .await
        .unwrap();
    let _survivor = world.processor("survivor", &[fast[0], fast[1], ("CAIRN_PROCESSOR_CONCURRENCY", "8")]);
    doomed.kill_tree();
    assert!(world.counts("effects").is_empty(), "the killed runs had no effect");
    world.open_gate();

    world.wait_for("every request succeeded", &ids, |r| r.state == RequestState::Succeeded).await;
    for (id, record) in world.records(&ids).await {
        assert_eq!(record.owner.as_deref(), Some("survivor"), "request {id} finished on the survivor");
        assert!(record.attempts >= 2, "request {id} ran again after the kill: {} attempts", record.attempts);
    }
    let runs = world.counts("runs");
    for id in &ids {
        assert!(runs.get(id).copied().unwrap_or(0) >= 2, "request {id} ran on doomed, then again: {runs:?}");
    }
    assert_each(&world.counts("effects"), &ids, 1, "effects");
    assert_eq!(world.pending_of("doomed").await, 0, "nothing stays pending for the dead processor");
    assert_eq!(world.pending_of("survivor").await, 0);
}

async fn one_permit_and_idle_partitions_never_starve_the_busy_one(world: World) {
    world.open_gate();
    let _processor = world.processor("single", &[("CAIRN_PROCESSOR_CONCURRENCY", "1")]);
    // Work in the last partition only; the readers of the other two wait on empty streams.
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(world.submit(PARTITIONS - 1).await);
    }
    world.wait_for("every request succeeded", &ids, |r| r.state == RequestState::Succeeded).await;
    assert_each(&world.counts("runs"), &ids, 1, "runs");
    assert_each(&world.counts("effects"), &ids, 1, "effects");
    assert_eq!(world.pending_of("single").await, 0);
}

async fn another_partition_count_is_refused_while_requests_are_unfinished(world: World) {
    world.queues.prepare().await.unwrap();
    let id = world.submit(2).await;
    let mut wrong = world.processor("wrong", &[("CAIRN_REQUEST_PARTITIONS", "2")]);
    let status = wrong.process.wait_exit(WAIT).expect("the processor stops by itself");
    assert!(!status.success(), "{status:?}");
    let log = std::fs::read_to_string(wrong.process.log()).unwrap();
    assert!(
        log.contains("CAIRN_REQUEST_PARTITIONS=2")
            && log.contains("made with CAIRN_REQUEST_PARTITIONS=3")
            && log.contains("1 of its requests are not finished"),
        "{log}"
    );

    // The queue's own count runs it; once nothing is unfinished, the new count is taken.
    world.open_gate();
    let _right = world.processor("right", &[]);
    world.wait_for("success", std::slice::from_ref(&id), |r| r.state == RequestState::Succeeded).await;
    wait_until("the entry to be acked", WAIT, || async { world.pending_of("right").await == 0 })
        .await
        .unwrap();
    drop(_right);
    let mut changed = world.processor("changed", &[("CAIRN_REQUEST_PARTITIONS", "2")]);
    wait_until("the processor to start with 2 partitions", WAIT, || async {
        std::fs::read_to_string(changed.process.log())
            .unwrap_or_default()
            .contains("request-processor starting")
    })
    .await
    .unwrap();
    assert!(changed.process.is_running());
    let log = std::fs::read_to_string(changed.process.log()).unwrap();
    assert!(log.contains("changes its number of partitions"), "{log}");
}
