//! Test harness shared by every crate's integration tests, so tests run in parallel against the
//! shared Redis and RabbitMQ and leave nothing behind: a Redis key prefix per test (keys deleted
//! on drop), a throw-away `redis-server` process for tests that kill or restart Redis, a private
//! Redis Cluster of three masters on loopback, a fresh RabbitMQ vhost per test (deleted on drop,
//! with management-API helpers to drop connections and read queues), a RabbitMQ node of its own
//! and generated certificates for TLS tests, service processes to signal, kill and restart, a TCP proxy
//! that cuts a shared server off from the code under test, unique names, deterministic test
//! bytes and their digests, and a polling `wait_until` used instead of sleeps.
//!
//! Fixtures panic with a message naming the problem (and the environment variable to set) when
//! setup fails: a test without its environment should fail right there, loudly.
//!
//! Environment: `CAIRN_TEST_REDIS_URL`, `CAIRN_TEST_REDIS_SERVER` and `CAIRN_TEST_REDIS_CLI`
//! (binaries), `CAIRN_TEST_AMQP_URL`, `CAIRN_TEST_RABBITMQ_API`, `CAIRN_TEST_RABBITMQ_USER`,
//! `CAIRN_TEST_RABBITMQ_PASS`, `CAIRN_TEST_RABBITMQ_SERVER` (binary of [`RabbitNode`]). RabbitMQ
//! needs the `rabbitmq_management` plugin.

mod amqp;
mod data;
mod process;
mod rabbitmq_node;
mod redis_cluster;
mod redis_namespace;
mod redis_server;
mod tcp_proxy;
mod tls;

use std::future::Future;
use std::time::{Duration, Instant};

pub use amqp::{AmqpVhost, publish_progress};
pub use data::{hex, sha256_hex, test_bytes};
pub use process::{
    ServiceProcess, Signal, cpu_seconds, free_addr, free_port, process_exists, rss_kib, signal_process,
};
pub use rabbitmq_node::RabbitNode;
pub use redis_cluster::RedisCluster;
pub use redis_namespace::RedisNamespace;
pub use redis_server::{RedisServer, RedisServerBuilder};
pub use tcp_proxy::TcpProxy;
pub use tls::TestCerts;

/// How often [`wait_until`] re-evaluates its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A name no other test uses: `t-<prefix>-<8 hex digits>`, for streams, groups, exchanges,
/// queues and the like.
pub fn unique_name(prefix: &str) -> String {
    format!("t-{prefix}-{}", short_id())
}

/// Eight random hex digits.
fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Polls `f` every 20 ms until it returns `true`, failing after `timeout`; tests use it instead
/// of sleeping for a guessed time. `f` is always evaluated at least once.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// An environment variable, or `default` when it is unset or empty.
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// Command-line arguments of an in-process progress-aggregator for a test stack: loopback ports
/// picked by the OS, this prefix and vhost, one shard, a 5 s grace; `progress-aggregator` first
/// (the program name clap expects). Append flags to add or override settings.
pub fn aggregator_args(ns: &RedisNamespace, vhost: &AmqpVhost) -> Vec<String> {
    let redis = ["--redis-url", &ns.url, "--key-prefix", &ns.prefix].map(String::from);
    aggregator_args_with(&redis, vhost)
}

/// [`aggregator_args`] with the Redis flags given (`--redis-url`, `--key-prefix` and, for a
/// [`RedisCluster`], `--redis-cluster true`).
pub fn aggregator_args_with(redis: &[String], vhost: &AmqpVhost) -> Vec<String> {
    let args = ["progress-aggregator", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"];
    let amqp = ["--amqp-url", &vhost.url];
    let behaviour = ["--shards", "1", "--grace", "5s"];
    let fixed = |args: &[&str]| args.iter().map(|arg| (*arg).to_owned()).collect::<Vec<_>>();
    [fixed(&args), redis.to_vec(), fixed(&amqp), fixed(&behaviour)].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn unique_names_have_the_prefix_and_differ() {
        let a = unique_name("stream");
        let b = unique_name("stream");
        assert_ne!(a, b);
        assert!(a.starts_with("t-stream-"), "{a}");
        let suffix = &a["t-stream-".len()..];
        assert_eq!(suffix.len(), 8);
        assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    }

    #[tokio::test]
    async fn wait_until_returns_once_true() {
        let calls = AtomicU32::new(0);
        wait_until("third call", Duration::from_secs(5), || async {
            calls.fetch_add(1, Ordering::SeqCst) >= 2
        })
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn wait_until_names_what_timed_out() {
        let err = wait_until("the moon", Duration::from_millis(50), || async { false })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("the moon") && err.contains("50ms"), "{err}");
    }
}
