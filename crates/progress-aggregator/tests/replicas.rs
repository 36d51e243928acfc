//! Aggregator replicas as separate OS processes sharing the shard queues (docs/contract.md §8): each holds
//! about shards/replicas of them (its `/metrics` says which), and when one is killed with
//! SIGKILL its shards move to the others within the lease, with per-key order kept.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cairn_progress::Key;
use cairn_redis::progress::ReadOptions;
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_testkit::{AmqpVhost, RedisNamespace, ServiceProcess, free_port, publish_progress, wait_until};
use lapin::BasicProperties;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_progress-aggregator");
const SHARDS: u16 = 6;
const WAIT: Duration = Duration::from_secs(60);

/// One aggregator process; killed when dropped.
struct Replica {
    process: ServiceProcess,
    admin: String,
    _logs: tempfile::TempDir,
}

impl Replica {
    fn start(ns: &RedisNamespace, vhost: &AmqpVhost, name: &str) -> Replica {
        let admin = format!("127.0.0.1:{}", free_port());
        let args = [
            "--grpc-addr=127.0.0.1:0",
            &format!("--admin-addr={admin}"),
            &format!("--redis-url={}", ns.url),
            &format!("--key-prefix={}", ns.prefix),
            &format!("--amqp-url={}", vhost.url),
            &format!("--shards={SHARDS}"),
            "--lease-ttl=1500ms",
            &format!("--name={name}"),
            "--grace=5s",
        ];
        let logs = tempfile::tempdir().expect("a log directory");
        let mut process = ServiceProcess::new(name, BIN, &args, BTreeMap::new(), logs.path());
        process.start();
        Replica { process, admin, _logs: logs }
    }

    /// The shards this replica's `/metrics` says it owns; empty while it cannot answer.
    async fn owned(&self) -> BTreeSet<u16> {
        let Ok(text) = get(&self.admin, "/metrics").await else { return BTreeSet::new() };
        text.lines()
            .filter_map(|line| line.strip_prefix("cairn_aggregator_shard_owned{shard=\""))
            .filter_map(|rest| rest.split_once("\"} "))
            .filter(|(_, value)| value.trim() == "1")
            .filter_map(|(shard, _)| shard.parse().ok())
            .collect()
    }

    fn kill(&mut self) {
        self.process.kill();
    }

    /// The end of its log, for a failure message.
    fn log_tail(&self) -> String {
        format!("{}:\n{}", self.process.name(), self.process.log_tail(20))
    }
}

/// A plain HTTP/1.0 GET (the admin port closes the connection after the answer).
async fn get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// Waits until the replicas own disjoint sets covering every shard, each at most `most`.
async fn wait_for_spread(replicas: &[&Replica], most: usize) -> Vec<BTreeSet<u16>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut owned = Vec::new();
        for replica in replicas {
            owned.push(replica.owned().await);
        }
        let total: usize = owned.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<u16> = owned.iter().flatten().copied().collect();
        if total == usize::from(SHARDS)
            && union.len() == usize::from(SHARDS)
            && owned.iter().all(|o| o.len() <= most)
        {
            return owned;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shards never spread over the replicas: {owned:?}; {}",
            { replicas.iter().map(|replica| replica.log_tail()).collect::<Vec<_>>().join("\n") }
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_shards_and_a_killed_ones_move_within_the_lease() {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let mut replicas = [
        Replica::start(&ns, &vhost, "agg-a"),
        Replica::start(&ns, &vhost, "agg-b"),
        Replica::start(&ns, &vhost, "agg-c"),
    ];
    // Six shards over three replicas: two each.
    let owned = wait_for_spread(&replicas.iter().collect::<Vec<_>>(), 2).await;
    assert!(owned.iter().all(|o| o.len() == 2), "{owned:?}");

    let config = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
    let store = ProgressStore::new(config.manager().unwrap(), ns.prefix.clone());
    let (_conn, channel) = vhost.progress_publisher().await;
    let (keys, steps) = (24, 40);
    for step in 0..steps {
        if step == steps / 2 {
            // One replica dies without a word, batches in hand; its leases run out and the
            // others take its shards.
            replicas[0].kill();
        }
        for k in 0..keys {
            let body = json!({"seq": step, "progress": f64::from(step) / f64::from(steps - 1)}).to_string();
            let persistent = BasicProperties::default().with_delivery_mode(2);
            publish_progress(&channel, &format!("_t.o.k{k}"), body.as_bytes(), persistent).await;
        }
    }
    let survivors: Vec<&Replica> = replicas[1..].iter().collect();
    let owned = wait_for_spread(&survivors, 3).await;
    assert!(owned.iter().all(|o| o.len() == 3), "the survivors hold three shards each: {owned:?}");

    let last = json!(steps - 1);
    wait_until("the last update of every key applied", WAIT, || async {
        let mut done = true;
        for k in 0..keys {
            let node = store
                .get(&Key::parse(&format!("_t.o.k{k}")).unwrap(), &ReadOptions::default())
                .await
                .unwrap();
            done &= node.is_some_and(|n| n.fields.get("seq") == Some(&last));
        }
        done
    })
    .await
    .unwrap();
    // A reordered straggler would overwrite a final state: give it the chance, then check again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for k in 0..keys {
        let node = store
            .get(&Key::parse(&format!("_t.o.k{k}")).unwrap(), &ReadOptions::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(node.fields.get("seq"), Some(&last), "key k{k} ends at its last update");
        assert_eq!(node.progress(), Some(1.0));
    }

    // A replica that joins takes its share back from the others.
    let joined = Replica::start(&ns, &vhost, "agg-d");
    let all: Vec<&Replica> = replicas[1..].iter().chain(std::iter::once(&joined)).collect();
    let owned = wait_for_spread(&all, 2).await;
    assert!(owned.iter().all(|o| o.len() == 2), "{owned:?}");
}
