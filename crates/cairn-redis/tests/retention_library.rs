//! Retention's Lua (safe trim, purges, the lease) runs from the one function library: on a fresh
//! server the first call loads it, no `EVAL`/`EVALSHA` is ever sent, and it runs while Redis
//! is out of memory. On one Redis and on a Redis Cluster (`common::Target`) each retention call
//! touches one slot: the request queue's partitions are trimmed and purged one by one.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use cairn_redis::RedisConfig;
use cairn_redis::keys;
use cairn_redis::requests::QueueLayout;
use cairn_redis::streams::{Lease, LeaseState, Purger, Streams, TrimPolicy};
use cairn_testkit::RedisServer;
use common::Target;
use redis::aio::ConnectionManager;

on_redis_and_cluster!(retention_calls_touch_one_slot_each_and_partitions_are_purged_one_by_one);

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
    let partition = &purger.partitions()[0];
    let purge = purger.purge_requests(partition, 10, None, 100).await.unwrap();
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

async fn retention_calls_touch_one_slot_each_and_partitions_are_purged_one_by_one(t: &Target) {
    let conn = t.connection();
    let mut admin = t.connection();
    let lease = keys::retention::lease(&t.prefix);
    let ttl = Duration::from_secs(30);
    let (a, b) = (Lease::new(conn.clone(), &lease, "a", ttl), Lease::new(conn.clone(), &lease, "b", ttl));
    assert_eq!(a.acquire_or_renew().await.unwrap(), LeaseState::Acquired);
    assert_eq!(b.acquire_or_renew().await.unwrap(), LeaseState::HeldBy("a".into()));
    assert_eq!(a.acquire_or_renew().await.unwrap(), LeaseState::Renewed);
    assert!(a.release().await.unwrap());

    let layout =
        QueueLayout::new(&t.prefix, "requests", "processors").with_partitions(3).tagged(t.is_cluster());
    let streams = Streams::new(conn.clone(), t.prefix.clone());
    let registry = streams.registry();
    for names in layout.all() {
        for i in 0..3 {
            let _: String = redis::cmd("XADD")
                .arg(&names.stream)
                .arg("*")
                .arg("i")
                .arg(i)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&names.stream)
            .arg("processors")
            .arg("$")
            .query_async(&mut admin)
            .await
            .unwrap();
        let _: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(&names.stream)
            .arg("processors")
            .arg("idle")
            .query_async(&mut admin)
            .await
            .unwrap();
        let _: () =
            redis::cmd("SADD").arg(&registry).arg(&names.stream).query_async(&mut admin).await.unwrap();
    }
    // A registered stream that is gone (on a cluster in another slot than the registry).
    let gone = keys::requests::replies(&t.prefix, "gone");
    let _: () = redis::cmd("SADD").arg(&registry).arg(&gone).query_async(&mut admin).await.unwrap();
    let expected: HashSet<String> =
        layout.all().into_iter().map(|names| names.stream).chain([gone.clone()]).collect();
    assert_eq!(streams.registered().await.unwrap().into_iter().collect::<HashSet<_>>(), expected);

    // Idle for longer than zero milliseconds.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let policy = TrimPolicy { max_len: Some(1), exact: true, ..TrimPolicy::default() };
    for names in layout.all() {
        let outcome = streams.safe_trim(&names.stream, &policy, 0).await.unwrap().expect("the stream exists");
        assert_eq!((outcome.trimmed, outcome.length), (2, 1), "{}", names.stream);
        let removed = streams.remove_idle_consumers(&names.stream, Duration::ZERO).await.unwrap();
        assert_eq!(removed.iter().map(|c| c.consumer.as_str()).collect::<Vec<_>>(), ["idle"]);
        // What `cairn streams` shows of it.
        let info = streams.info(&names.stream).await.unwrap().expect("the stream exists");
        assert_eq!((info.length, info.groups.len(), info.groups[0].consumers), (1, 1, 0));
    }
    assert_eq!(streams.safe_trim(&gone, &policy, 0).await.unwrap(), None);
    assert!(!streams.registered().await.unwrap().contains(&gone), "a vanished stream leaves the registry");
    assert_eq!(streams.info(&gone).await.unwrap(), None);

    // One finished index per partition on a cluster, one shared on one Redis; a record, its
    // idempotency claim and its data stream are in its partition's slot.
    let purger = Purger::for_layout(conn.clone(), &layout);
    assert_eq!(purger.partitions().len(), if t.is_cluster() { 3 } else { 1 });
    let mut gone_keys = Vec::new();
    for names in layout.all() {
        let id = layout.new_id_in(Some(names.partition));
        let idem = names.idem(&format!("key-{}", names.partition));
        let stream = format!("{}:s:data", names.record(&id));
        let _: () = redis::cmd("HSET")
            .arg(names.record(&id))
            .arg("state")
            .arg("succeeded")
            .arg("finished_ms")
            .arg(5)
            .arg("idempotency_key")
            .arg(format!("key-{}", names.partition))
            .arg("streams")
            .arg(r#"[{"name":"data","bytes":1}]"#)
            .query_async(&mut admin)
            .await
            .unwrap();
        let _: () = redis::cmd("SET").arg(&idem).arg(&id).query_async(&mut admin).await.unwrap();
        let _: () = redis::cmd("SET").arg(&stream).arg("x").query_async(&mut admin).await.unwrap();
        let _: () =
            redis::cmd("ZADD").arg(names.finished()).arg(5).arg(&id).query_async(&mut admin).await.unwrap();
        gone_keys.extend([names.record(&id), idem, stream]);
    }
    let mut purged = 0;
    for partition in purger.partitions() {
        purged += purger.purge_requests(&partition, 10, None, 100).await.unwrap().purged;
    }
    assert_eq!(purged, 3);
    for key in &gone_keys {
        let exists: bool = redis::cmd("EXISTS").arg(key).query_async(&mut admin).await.unwrap();
        assert!(!exists, "{key} is purged");
    }
    // No such tree: nothing removed. On a cluster the roots index is in another slot, so the
    // call takes the root for a stale index entry without its tree (and unindexes it).
    let nothing = if t.is_cluster() { Some(0) } else { None };
    for root in ["_gone", "_uploads.gone"] {
        assert_eq!(purger.purge_tree(root, 10, 10).await.unwrap(), nothing, "{root}");
    }
}
