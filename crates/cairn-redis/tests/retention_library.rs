//! Retention's Lua (safe trim, purges, the lease) runs from the one function library: on a fresh
//! server the first call loads it, no `EVAL`/`EVALSHA` is ever sent, and it runs while Redis
//! is out of memory.

use std::time::Duration;

use cairn_redis::RedisConfig;
use cairn_redis::keys;
use cairn_redis::streams::{Lease, LeaseState, Purger, Streams, TrimPolicy};
use cairn_testkit::RedisServer;
use redis::aio::ConnectionManager;

async fn command_calls(conn: &mut ConnectionManager, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    let line = info.lines().find(|line| line.starts_with(&format!("cmdstat_{command}:")));
    line.and_then(|line| line.split(['=', ',']).nth(1)).map_or(0, |calls| calls.parse().unwrap())
}

#[tokio::test]
async fn retention_loads_and_calls_the_function_library_only() {
    let server = RedisServer::new().await;
    let conn = RedisConfig::new(server.url(), "t").manager().expect("redis url");
    let mut admin = conn.clone();

    let ttl = Duration::from_secs(30);
    let a = Lease::new(conn.clone(), keys::retention::lease("t"), "a", ttl);
    let b = Lease::new(conn.clone(), keys::retention::lease("t"), "b", ttl);
    assert_eq!(a.acquire_or_renew().await.unwrap(), LeaseState::Acquired);
    assert_eq!(b.acquire_or_renew().await.unwrap(), LeaseState::HeldBy("a".into()));
    assert_eq!(a.acquire_or_renew().await.unwrap(), LeaseState::Renewed);
    assert!(!b.release().await.unwrap(), "b does not hold it");
    assert!(a.release().await.unwrap());
    assert_eq!(b.acquire_or_renew().await.unwrap(), LeaseState::Acquired);

    let streams = Streams::new(conn.clone(), "t");
    let stream = keys::requests::stream("t", "requests");
    for i in 0..3 {
        let _: String =
            redis::cmd("XADD").arg(&stream).arg("*").arg("i").arg(i).query_async(&mut admin).await.unwrap();
    }
    let policy = TrimPolicy { max_len: Some(1), exact: true, ..TrimPolicy::default() };
    let outcome = streams.safe_trim(&stream, &policy, 0).await.unwrap().expect("the stream exists");
    assert_eq!((outcome.trimmed, outcome.length), (2, 1));
    assert!(streams.remove_idle_consumers(&stream, Duration::ZERO).await.unwrap().is_empty());

    let purger = Purger::new(conn.clone(), "t");
    let _: () = redis::cmd("HSET")
        .arg(keys::requests::record("t", "r1"))
        .arg("state")
        .arg("succeeded")
        .arg("finished_ms")
        .arg(5)
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(keys::requests::finished("t"))
        .arg(5)
        .arg("r1")
        .query_async(&mut admin)
        .await
        .unwrap();
    let purge = purger.purge_requests(10, None, 100).await.unwrap();
    assert_eq!((purge.purged, purge.examined), (1, 1));
    assert_eq!(purger.purge_tree("_gone", 10, 10).await.unwrap(), None, "no such tree: it stays");

    // Retention frees memory, so it must run while Redis is out of it (as EVAL scripts did).
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(1).query_async(&mut admin).await.unwrap();
    let refused = redis::cmd("SET").arg("t:x").arg(1).query_async::<()>(&mut admin).await.unwrap_err();
    assert_eq!(refused.code(), Some("OOM"), "{refused}");
    let policy = TrimPolicy { max_len: Some(0), exact: true, ..TrimPolicy::default() };
    let outcome = streams.safe_trim(&stream, &policy, 0).await.unwrap().expect("the stream exists");
    assert_eq!((outcome.trimmed, outcome.length), (1, 0));
    assert!(b.release().await.unwrap());
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query_async(&mut admin).await.unwrap();

    let libraries: Vec<redis::Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("cairn_*")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(libraries.len(), 1, "the first call loaded the library");
    assert!(command_calls(&mut admin, "fcall").await >= 10);
    assert_eq!(command_calls(&mut admin, "evalsha").await, 0);
    assert_eq!(command_calls(&mut admin, "eval").await, 0);
}
