//! Helpers shared by the trimmer's integration tests: where a test runs ([`Target`]: a prefix of
//! its own on the shared Redis, or a private Redis Cluster of three masters; docs/contract.md §8)
//! and stream commands that work on either. [`on_redis_and_cluster!`] runs one test body on each.
#![allow(dead_code)]

use cairn_redis::progress::ProgressStore;
use cairn_redis::requests::{QueueLayout, RequestQueues};
use cairn_redis::{RedisConfig, RedisConnection};
use cairn_testkit::{RedisCluster, RedisNamespace, unique_name};
use clap::Parser;
use redis::aio::ConnectionLike;
use stream_trimmer::{App, Config};

/// The request partitions (`CAIRN_REQUEST_PARTITIONS`) of a partitioned target.
pub const PARTITIONS: u16 = 3;

/// A key prefix on one Redis or on a cluster, and the request partitions the queue and the
/// trimmer use there.
pub struct Target {
    pub config: RedisConfig,
    pub prefix: String,
    pub partitions: u16,
    _namespace: Option<RedisNamespace>,
    _cluster: Option<RedisCluster>,
}

impl Target {
    /// A prefix of its own on the shared Redis with one partition: every key as before
    /// partitions existed. Its keys are deleted on drop.
    pub fn single() -> Self {
        Self::on_namespace(1)
    }

    /// A prefix of its own on the shared Redis with [`PARTITIONS`] partitions.
    pub fn single_partitioned() -> Self {
        Self::on_namespace(PARTITIONS)
    }

    /// A cluster of its own with [`PARTITIONS`] partitions, stopped on drop.
    pub async fn cluster() -> Self {
        let cluster = RedisCluster::new().await;
        let prefix = unique_name("c");
        Target {
            config: RedisConfig::cluster(cluster.url(), prefix.clone()),
            prefix,
            partitions: PARTITIONS,
            _namespace: None,
            _cluster: Some(cluster),
        }
    }

    fn on_namespace(partitions: u16) -> Self {
        let ns = RedisNamespace::new();
        Target {
            config: RedisConfig::new(ns.url.clone(), ns.prefix.clone()),
            prefix: ns.prefix.clone(),
            partitions,
            _namespace: Some(ns),
            _cluster: None,
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.config.cluster
    }

    /// A connection as the services have: a command on it reaches the node of its key.
    pub fn connection(&self) -> RedisConnection {
        self.config.connection().expect("redis url")
    }

    /// `{prefix}:{name}`.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// A key's name under the prefix, as the trimmer reports it.
    pub fn name<'a>(&self, key: &'a str) -> &'a str {
        key.strip_prefix(&format!("{}:", self.prefix))
            .unwrap_or_else(|| panic!("{key} is not under the prefix"))
    }

    /// The request queue's layout, tagged on a cluster.
    pub fn layout(&self) -> QueueLayout {
        QueueLayout::new(&self.prefix, "requests", "processors")
            .with_partitions(self.partitions)
            .tagged(self.is_cluster())
    }

    /// Every partition of the request queue, as ingress and the processors use it.
    pub fn queues(&self) -> RequestQueues {
        RequestQueues::new(self.connection(), self.layout())
    }

    pub fn store(&self) -> ProgressStore {
        ProgressStore::new(self.connection(), self.prefix.clone())
    }

    /// A trimmer's flags on this target, admin port 0, then `extra`.
    pub fn config(&self, extra: &[&str]) -> Config {
        let mut args = vec![
            "stream-trimmer".to_owned(),
            format!("--redis-url={}", self.config.url),
            format!("--redis-cluster={}", self.is_cluster()),
            format!("--key-prefix={}", self.prefix),
            format!("--request-partitions={}", self.partitions),
            "--admin-addr=127.0.0.1:0".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Config::try_parse_from(args).expect("valid trimmer flags")
    }

    pub async fn trimmer(&self, extra: &[&str]) -> App {
        App::build(self.config(extra)).await.expect("trimmer builds")
    }
}

/// Runs each named `async fn(&Target)` three times, in a module of its name: `single_redis` (one
/// partition), `single_redis_partitioned` and `cluster` ([`PARTITIONS`] partitions).
#[macro_export]
macro_rules! on_redis_and_cluster {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn single_redis() {
                    super::$name(&super::common::Target::single()).await
                }

                #[tokio::test]
                async fn single_redis_partitioned() {
                    super::$name(&super::common::Target::single_partitioned()).await
                }

                #[tokio::test]
                async fn cluster() {
                    super::$name(&super::common::Target::cluster().await).await
                }
            }
        )*
    };
}

/// A trimmer on the namespace's prefix, admin port 0, with `extra` flags.
pub fn config(ns: &RedisNamespace, extra: &[&str]) -> Config {
    let mut args = vec![
        "stream-trimmer".to_owned(),
        format!("--redis-url={}", ns.url),
        format!("--key-prefix={}", ns.prefix),
        "--admin-addr=127.0.0.1:0".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Config::try_parse_from(args).expect("valid trimmer flags")
}

pub async fn trimmer(ns: &RedisNamespace, extra: &[&str]) -> App {
    App::build(config(ns, extra)).await.expect("trimmer builds")
}

/// Adds `n` entries to `key` and registers it; returns their ids.
pub async fn add(conn: &mut impl ConnectionLike, registry: &str, key: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id: String =
            redis::cmd("XADD").arg(key).arg("*").arg("n").arg(i).query_async(conn).await.unwrap();
        ids.push(id);
    }
    let _: () = redis::cmd("SADD").arg(registry).arg(key).query_async(conn).await.unwrap();
    ids
}

/// Every id in the stream, oldest first.
pub async fn ids(conn: &mut impl ConnectionLike, key: &str) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query_async(conn).await.unwrap();
    reply.ids.into_iter().map(|e| e.id).collect()
}

/// `XREADGROUP … >` for `consumer`: the ids delivered.
pub async fn read(
    conn: &mut impl ConnectionLike,
    key: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<String> {
    let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(key)
        .arg(">")
        .query_async(conn)
        .await
        .unwrap();
    reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).collect()).unwrap_or_default()
}

pub async fn create_group(conn: &mut impl ConnectionLike, key: &str, group: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await
        .unwrap();
}

/// The Prometheus page of this test process.
pub fn metrics() -> String {
    cairn_runtime::metrics_handle().render()
}
