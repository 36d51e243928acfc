//! The Redis fixtures against the shared Redis, throw-away `redis-server`s and a private cluster.

use std::time::Duration;

use cairn_testkit::{RedisCluster, RedisNamespace, RedisServer, unique_name, wait_until};
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;

async fn exists(con: &mut ConnectionManager, key: &str) -> bool {
    con.exists(key).await.unwrap()
}

#[tokio::test]
async fn namespace_drop_removes_its_keys_and_only_its_keys() {
    let ns = RedisNamespace::new();
    let other = RedisNamespace::new();
    assert_ne!(ns.prefix, other.prefix);
    let mut con = ns.connection().await;

    // More keys than one SCAN/UNLINK batch, of several types.
    let mut pipe = redis::pipe();
    for i in 0..1_200 {
        pipe.set(ns.key(&format!("k{i}")), i).ignore();
    }
    pipe.xadd(ns.key("stream"), "*", &[("f", "v")]).ignore();
    pipe.hset(ns.key("hash"), "f", "v").ignore();
    pipe.set(other.key("kept"), 1).ignore();
    // Shares the prefix text but is not under `{prefix}:`.
    let lookalike = format!("{}x:kept", ns.prefix);
    let outside = unique_name("outside");
    pipe.set(&lookalike, 1).ignore();
    pipe.set(&outside, 1).ignore();
    pipe.exec_async(&mut con).await.unwrap();

    let prefix = ns.prefix.clone();
    drop(ns);

    let mut cursor = 0u64;
    let mut left = Vec::<String>::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut con)
            .await
            .unwrap();
        left.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert!(left.is_empty(), "keys left behind: {left:?}");
    assert!(exists(&mut con, &other.key("kept")).await);
    assert!(exists(&mut con, &lookalike).await);
    assert!(exists(&mut con, &outside).await);

    let _: () = con.del(&[&lookalike, &outside]).await.unwrap();
    drop(other);
    let gone: bool = con.exists(format!("{prefix}:kept")).await.unwrap();
    assert!(!gone);
}

#[test]
fn namespace_cleans_up_when_dropped_outside_a_runtime() {
    let ns = RedisNamespace::new();
    let client = redis::Client::open(ns.url.as_str()).unwrap();
    let mut con = client.get_connection().unwrap();
    let key = ns.key("plain");
    redis::cmd("SET").arg(&key).arg(1).exec(&mut con).unwrap();
    drop(ns);
    let exists: bool = redis::cmd("EXISTS").arg(&key).query(&mut con).unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn aof_server_keeps_data_across_a_crash() {
    let mut server = RedisServer::with_aof().await;
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    let ns = RedisNamespace::with_url(server.url());
    let mut con = ns.connection().await;
    let _: () = con.set(ns.key("survivor"), "still here").await.unwrap();

    server.stop();
    let client = redis::Client::open(server.url()).unwrap();
    assert!(client.get_multiplexed_async_connection().await.is_err(), "a stopped server refuses connections");

    server.restart().await;
    // The connection manager reconnects by itself; the first command may see the old socket.
    let key = ns.key("survivor");
    wait_until("the key to be readable again", Duration::from_secs(10), || {
        let mut con = con.clone();
        let key = key.clone();
        async move { matches!(con.get::<_, Option<String>>(&key).await, Ok(Some(v)) if v == "still here") }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn server_without_aof_forgets_on_restart() {
    let mut server = RedisServer::new().await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = con.set("k", 1).await.unwrap();

    server.restart().await;
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let value: Option<i64> = con.get("k").await.unwrap();
    assert_eq!(value, None);
    // The DEBUG command is enabled, for tests that need it.
    let _: () = redis::cmd("DEBUG").arg("SLEEP").arg(0).query_async(&mut con).await.unwrap();
}

#[tokio::test]
async fn paused_server_stops_answering_until_resumed() {
    let mut server = RedisServer::new().await;
    let client = redis::Client::open(server.url()).unwrap();
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_millis(300)));
    let mut con = client.get_multiplexed_async_connection_with_config(&config).await.unwrap();

    server.pause();
    let stalled: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut con).await;
    assert!(stalled.is_err(), "a paused server does not answer");

    server.resume();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn dropping_a_server_kills_it_even_when_paused() {
    let mut server = RedisServer::new().await;
    let url = server.url();
    let dir = server.dir().to_owned();
    server.pause();
    drop(server);

    let client = redis::Client::open(url).unwrap();
    assert!(client.get_multiplexed_async_connection().await.is_err());
    assert!(!dir.exists(), "the data directory is removed");
}

/// Three masters share all 16 384 slots, each refuses a key of another's slots (MOVED), and
/// dropping the cluster stops every node.
#[tokio::test]
async fn cluster_has_three_masters_covering_every_slot() {
    let cluster = RedisCluster::new().await;
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    assert_eq!(cluster.url(), urls.join(","));
    let mut moved = 0;
    for url in &urls {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut con).await.unwrap();
        for expected in ["cluster_state:ok", "cluster_slots_assigned:16384", "cluster_size:3"] {
            assert!(info.lines().any(|line| line.trim() == expected), "{url}: {info}");
        }
        // "a" and "b" hash to slots of different masters (15495 and 3300).
        for key in ["a", "b"] {
            if let Err(e) = redis::cmd("SET").arg(key).arg(1).query_async::<()>(&mut con).await {
                assert_eq!(e.code(), Some("MOVED"), "{url}: {e}");
                moved += 1;
            }
        }
    }
    assert_eq!(moved, 4, "each key is owned by one master and moved by the other two");
    drop(cluster);
    for url in urls {
        let client = redis::Client::open(url).unwrap();
        assert!(client.get_multiplexed_async_connection().await.is_err());
    }
}
