//! Helpers shared by the trimmer's integration tests.
#![allow(dead_code)]

use cairn_testkit::RedisNamespace;
use clap::Parser;
use redis::aio::ConnectionManager;
use stream_trimmer::{App, Config};

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
pub async fn add(conn: &mut ConnectionManager, registry: &str, key: &str, n: usize) -> Vec<String> {
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
pub async fn ids(conn: &mut ConnectionManager, key: &str) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query_async(conn).await.unwrap();
    reply.ids.into_iter().map(|e| e.id).collect()
}

/// `XREADGROUP … >` for `consumer`: the ids delivered.
pub async fn read(
    conn: &mut ConnectionManager,
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

pub async fn create_group(conn: &mut ConnectionManager, key: &str, group: &str) {
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
