//! The live fan-out end to end against real Redis, on one Redis and on a Redis Cluster of three
//! masters (docs/contract.md §2 Live, §8): a watcher gets its snapshot, then the changes other
//! writers make, then the deletes; trees elsewhere in the same batches stay out of its events.
//! On a cluster the notification that wakes the hub is written after each tree's call.

use std::time::Duration;

use cairn_live::{Event, EventKind, Live, Settings, Subscription, Watch};
use cairn_progress::{Key, Update};
use cairn_redis::RedisConfig;
use cairn_redis::progress::{Change, ProgressStore};
use cairn_testkit::{RedisCluster, RedisNamespace, unique_name};
use tokio_util::sync::CancellationToken;

/// How long one event may take before the test fails (a bound, not a measurement).
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

fn change(key: &str, progress: f64, time_ms: i64) -> Change {
    Change { key: Key::parse(key).unwrap(), update: Update::new().progress(progress), time_ms }
}

async fn next(sub: &mut Subscription) -> Event {
    tokio::time::timeout(EVENT_TIMEOUT, sub.next())
        .await
        .expect("an event in time")
        .expect("the stream is open")
}

#[tokio::test]
async fn a_watcher_follows_its_tree_on_one_redis() {
    let ns = RedisNamespace::new();
    a_watcher_follows_its_tree(RedisConfig::new(ns.url.clone(), ns.prefix.clone())).await;
}

#[tokio::test]
async fn a_watcher_follows_its_tree_on_a_cluster() {
    let cluster = RedisCluster::new().await;
    a_watcher_follows_its_tree(RedisConfig::cluster(cluster.url(), unique_name("live"))).await;
}

async fn a_watcher_follows_its_tree(config: RedisConfig) {
    let conn = config.connection().unwrap();
    let store = ProgressStore::new(conn.clone(), config.prefix.clone());
    store.apply(&[change("_l.job.a", 0.5, 1_000)]).await.unwrap();
    let shutdown = CancellationToken::new();
    let live = Live::start(config.clone(), conn, Settings::default(), shutdown.clone());
    let watch = Watch { key: Key::parse("_l.job").unwrap(), depth: 8, limit: 100, after: None };
    let mut sub = live.subscribe(watch).unwrap();

    let snapshot = next(&mut sub).await;
    assert_eq!(snapshot.kind, EventKind::Snapshot);
    assert_eq!(snapshot.nodes[0].key, "_l.job");
    assert_eq!(snapshot.nodes[0].progress(), Some(0.5));

    // The notification reader starts in the background: write until a change is announced
    // (each write is a new change; the one the reader sees first is delivered).
    let mut time = 2_000;
    let update = loop {
        time += 1;
        store.apply(&[change("_l.other.x", 0.1, time), change("_l.job.b", 1.0, time)]).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
            Ok(event) => break event.expect("the stream is open"),
            Err(_) => assert!(time < 2_000 + 30, "no update after {} writes", time - 2_000),
        }
    };
    assert_eq!(update.kind, EventKind::Update);
    assert!(update.id > snapshot.id, "{:?} after {:?}", update.id, snapshot.id);
    let keys: Vec<&str> = update.nodes.iter().map(|node| node.key.as_str()).collect();
    assert_eq!(keys, ["_l.job", "_l.job.b"], "parents first, only the watched tree");
    assert_eq!(update.nodes[0].progress(), Some(0.75));

    assert_eq!(store.delete(&Key::parse("_l.job.a").unwrap(), time + 1).await.unwrap(), 1);
    let mut deleted = next(&mut sub).await;
    if deleted.kind == EventKind::Update {
        // the parent's new state may come first, in an event of its own
        deleted = next(&mut sub).await;
    }
    assert_eq!(deleted.kind, EventKind::Delete);
    assert_eq!(deleted.deleted, ["_l.job.a"]);
    shutdown.cancel();
    // (events already queued may still come first)
    let ended = tokio::time::timeout(EVENT_TIMEOUT, async { while sub.next().await.is_some() {} }).await;
    assert!(ended.is_ok(), "shutdown ends the subscription");
}
