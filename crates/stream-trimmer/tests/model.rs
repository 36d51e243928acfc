//! Model-based test of safe trimming: random interleavings of XADD, XREADGROUP (two groups, two
//! consumers each), XACK, XAUTOCLAIM and trim runs with tiny retention, checked after every step
//! against a model of entries, deliveries and acknowledgements.
//!
//! Runs on a `redis-server` of its own and on a Redis Cluster of three masters (the stream in
//! one slot, `safe_trim` called as on a cluster), both with `stream-node-max-entries 3`, so
//! approximate trimming (whole macro nodes) actually removes entries in streams this small.

use std::collections::BTreeSet;
use std::time::Duration;

use cairn_redis::streams::{Streams, TrimPolicy};
use cairn_redis::{RedisConfig, RedisConnection};
use cairn_testkit::{RedisCluster, RedisNamespace, RedisServer, unique_name};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply};

const GROUPS: [&str; 2] = ["g0", "g1"];
const CONSUMERS: [&str; 2] = ["c0", "c1"];

#[derive(Debug, Clone)]
enum Op {
    Add(usize),
    Read { group: usize, consumer: usize, count: usize },
    Ack { group: usize, pick: usize },
    Claim { group: usize, consumer: usize },
    Trim { max_len: u64, exact: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..4usize).prop_map(Op::Add),
        3 => (0..2usize, 0..2usize, 1..4usize).prop_map(|(group, consumer, count)| Op::Read { group, consumer, count }),
        3 => (0..2usize, any::<usize>()).prop_map(|(group, pick)| Op::Ack { group, pick }),
        1 => (0..2usize, 0..2usize).prop_map(|(group, consumer)| Op::Claim { group, consumer }),
        2 => (0..4u64, any::<bool>()).prop_map(|(max_len, exact)| Op::Trim { max_len, exact }),
    ]
}

/// What Redis should hold. Entries are numbered in the order added; trimming always removes a
/// prefix, so the stream holds `entries[first..]`.
#[derive(Default)]
struct Model {
    entries: Vec<String>,
    first: usize,
    /// Per group: how many entries were delivered (the next undelivered index) and which
    /// delivered entries are pending.
    delivered: [usize; 2],
    pending: [BTreeSet<usize>; 2],
}

impl Model {
    fn index(&self, id: &str) -> usize {
        self.entries.iter().position(|e| e == id).unwrap_or_else(|| panic!("unknown id {id}"))
    }

    /// The lowest index a trim may not pass: min over groups of the oldest pending entry and
    /// the first undelivered one.
    fn safe(&self) -> usize {
        (0..2)
            .map(|g| self.pending[g].first().copied().unwrap_or(usize::MAX).min(self.delivered[g]))
            .min()
            .unwrap()
    }
}

struct Case {
    conn: RedisConnection,
    streams: Streams,
    key: String,
    model: Model,
}

impl Case {
    async fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let (conn, key, model) = (&mut self.conn, &self.key, &mut self.model);
        match *op {
            Op::Add(n) => {
                for _ in 0..n {
                    let id: String = redis::cmd("XADD")
                        .arg(key)
                        .arg("*")
                        .arg("f")
                        .arg("v")
                        .query_async(conn)
                        .await
                        .unwrap();
                    model.entries.push(id);
                }
            }
            Op::Read { group, consumer, count } => {
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUPS[group])
                    .arg(CONSUMERS[consumer])
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(key)
                    .arg(">")
                    .query_async(conn)
                    .await
                    .unwrap();
                let got: Vec<String> = reply
                    .map(|r| r.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).collect())
                    .unwrap_or_default();
                let from = model.delivered[group];
                let expected = &model.entries[from..(from + count).min(model.entries.len())];
                prop_assert_eq!(&got, expected, "group {} receives the next undelivered entries", group);
                model.delivered[group] += got.len();
                model.pending[group].extend(from..from + got.len());
            }
            Op::Ack { group, pick } => {
                if model.pending[group].is_empty() {
                    return Ok(());
                }
                let index = *model.pending[group].iter().nth(pick % model.pending[group].len()).unwrap();
                let acked: u64 = redis::cmd("XACK")
                    .arg(key)
                    .arg(GROUPS[group])
                    .arg(&model.entries[index])
                    .query_async(conn)
                    .await
                    .unwrap();
                prop_assert_eq!(acked, 1);
                model.pending[group].remove(&index);
            }
            Op::Claim { group, consumer } => {
                let reply: StreamAutoClaimReply = redis::AsyncCommands::xautoclaim_options(
                    conn,
                    key,
                    GROUPS[group],
                    CONSUMERS[consumer],
                    0,
                    "0-0",
                    StreamAutoClaimOptions::default().count(100),
                )
                .await
                .unwrap();
                prop_assert!(
                    reply.deleted_ids.is_empty(),
                    "pending entries were trimmed: {:?}",
                    reply.deleted_ids
                );
                let claimed: BTreeSet<usize> = reply.claimed.iter().map(|e| model.index(&e.id)).collect();
                prop_assert_eq!(
                    &claimed,
                    &model.pending[group],
                    "every pending entry is still there to claim"
                );
            }
            Op::Trim { max_len, exact } => {
                let policy = TrimPolicy { max_len: Some(max_len), exact, ..TrimPolicy::default() };
                let outcome = self.streams.safe_trim(key, &policy, 0).await.unwrap().expect("stream exists");
                let len = model.entries.len() - model.first;
                let target =
                    if len as u64 > max_len { model.entries.len() - max_len as usize } else { model.first };
                let safe = model.safe();
                let limit = target.min(safe).max(model.first);
                let now: Vec<String> = {
                    let reply: redis::streams::StreamRangeReply =
                        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query_async(conn).await.unwrap();
                    reply.ids.into_iter().map(|e| e.id).collect()
                };
                let first = model.entries.len() - now.len();
                prop_assert_eq!(&now[..], &model.entries[first..], "trimming removes a prefix");
                if exact {
                    prop_assert_eq!(first, limit, "exact trims to min(target, safe)");
                } else {
                    prop_assert!(
                        first >= model.first && first <= limit,
                        "approximate never passes the limit"
                    );
                }
                prop_assert_eq!(outcome.trimmed as usize, first - model.first);
                prop_assert_eq!(outcome.length as usize, now.len());
                prop_assert_eq!(
                    outcome.capped,
                    safe < target,
                    "capped exactly when safety held entries back"
                );
                model.first = first;
                // The properties themselves, checked against Redis rather than the arithmetic.
                for group in 0..2 {
                    for &index in &model.pending[group] {
                        let found: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                            .arg(key)
                            .arg(&model.entries[index])
                            .arg(&model.entries[index])
                            .query_async(conn)
                            .await
                            .unwrap();
                        prop_assert_eq!(
                            found.ids.len(),
                            1,
                            "pending entry {} of group {} is readable",
                            index,
                            group
                        );
                    }
                    prop_assert!(
                        model.delivered[group] >= first,
                        "group {}'s undelivered entries are intact",
                        group
                    );
                    for index in 0..first {
                        prop_assert!(
                            index < model.delivered[group] && !model.pending[group].contains(&index),
                            "trimmed entry {} was delivered to and acked by group {}",
                            index,
                            group
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where the cases run: a redis-server, or a cluster, of their own.
enum Backend {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    /// A connection and a fresh prefix for one case; the prefix's keys on one Redis are deleted
    /// with the namespace (the cluster goes with the test).
    async fn case(&self) -> (RedisConnection, String, Option<RedisNamespace>) {
        match self {
            Backend::Single(server) => {
                let ns = RedisNamespace::with_url(server.url());
                (RedisConnection::from(ns.connection().await), ns.prefix.clone(), Some(ns))
            }
            Backend::Cluster(cluster) => {
                let config = RedisConfig::cluster(cluster.url(), unique_name("m"));
                let prefix = config.prefix.clone();
                (config.connection().expect("cluster settings"), prefix, None)
            }
        }
    }
}

#[test]
fn trimming_only_ever_removes_entries_every_group_received_and_acked_on_one_redis() {
    check_model(|| async {
        let server = RedisServer::new().await;
        let ns = RedisNamespace::with_url(server.url());
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("stream-node-max-entries")
            .arg(3)
            .query_async(&mut ns.connection().await)
            .await
            .unwrap();
        Backend::Single(server)
    });
}

#[test]
fn trimming_only_ever_removes_entries_every_group_received_and_acked_on_a_redis_cluster() {
    check_model(|| async {
        let cluster = RedisCluster::new().await;
        cluster.config_set("stream-node-max-entries", "3").await;
        Backend::Cluster(cluster)
    });
}

fn check_model<F, Fut>(start: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Backend>,
{
    let setup = tokio::runtime::Runtime::new().unwrap();
    let backend = setup.block_on(start());
    let mut runner = TestRunner::new(ProptestConfig { cases: 32, ..ProptestConfig::default() });
    let result = runner.run(&prop::collection::vec(op(), 1..60), |ops| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (mut conn, prefix, _namespace) = backend.case().await;
            let key = format!("{prefix}:stream");
            for group in GROUPS {
                let _: () = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&key)
                    .arg(group)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            let streams = Streams::new(conn.clone(), prefix);
            let mut case = Case { conn, streams, key, model: Model::default() };
            for op in &ops {
                case.apply(op).await?;
            }
            // Finally trim with every policy size once more.
            for max_len in 0..4 {
                case.apply(&Op::Trim { max_len, exact: true }).await?;
            }
            Ok(())
        })
    });
    drop(backend);
    setup.shutdown_timeout(Duration::from_secs(1));
    if let Err(error) = result {
        panic!("{error}");
    }
}
