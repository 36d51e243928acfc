//! The change feed the Lua library writes with every change (docs/contract.md §2 Live), on real Redis: what
//! each writer appends, snapshots with their feed position, resume and gaps, purge; on one Redis
//! and on a Redis Cluster (the same tests on both, `common::Target`).

mod common;

use std::collections::BTreeSet;

use cairn_progress::{Key, Update};
use cairn_redis::progress::feed::{FeedId, Notice, NotificationReader, Since};
use cairn_redis::progress::{Change, ReadOptions};
use cairn_redis::streams::Purger;
use common::Target;

fn key(s: &str) -> Key {
    Key::parse(s).expect("valid key")
}

fn change(k: &str, body: &str, time_ms: i64) -> Change {
    Change { key: key(k), update: Update::from_slice(body.as_bytes()).unwrap(), time_ms }
}

on_redis_and_cluster!(
    every_call_appends_its_changed_nodes_to_each_trees_feed_and_notifies_once,
    an_id_the_feed_no_longer_holds_is_a_gap,
    a_purge_drops_the_feed_and_tells_watchers,
);

fn set(keys: &[String]) -> BTreeSet<&str> {
    keys.iter().map(String::as_str).collect()
}

fn entries(since: Since) -> Vec<cairn_redis::progress::feed::FeedEntry> {
    match since {
        Since::Entries(entries) => entries,
        Since::Gap => panic!("unexpected gap"),
    }
}

/// One call notifies once for all its trees; on a cluster, where a batch is one call per tree,
/// once per tree.
async fn every_call_appends_its_changed_nodes_to_each_trees_feed_and_notifies_once(t: &Target) {
    let (store, feed) = (t.store(), t.feed());
    let mut reader =
        NotificationReader::start(t.config.dedicated_connection().await.unwrap(), &feed).await.unwrap();

    // One call, two trees, one node touched many times.
    let burst: Vec<Change> = (0..100u8)
        .map(|i| {
            change("_t.a.x.y", &format!(r#"{{"progress": {}}}"#, f64::from(i) / 100.0), 1000 + i64::from(i))
        })
        .chain([change("_t.b.z", r#"{"progress": 1}"#, 2000)])
        .collect();
    store.apply(&burst).await.unwrap();

    let notices = reader.next(1000, 100).await.unwrap();
    assert!(!notices.lost);
    assert_eq!(notices.notices.len(), 2, "{:?}", notices.notices);
    let roots: BTreeSet<&str> = notices.notices.iter().map(|(root, _)| root.as_str()).collect();
    assert_eq!(roots, BTreeSet::from(["_t.a", "_t.b"]), "both trees are named");
    let Some((_, Notice::Entry(id_a))) = notices.notices.iter().find(|(r, _)| r == "_t.a") else { panic!() };

    let a = entries(feed.since("_t.a", FeedId::ZERO).await.unwrap());
    assert_eq!(a.len(), 1, "one entry per call, not per update");
    assert_eq!(a[0].id, *id_a);
    assert_eq!(set(&a[0].changed), BTreeSet::from(["_t.a", "_t.a.x", "_t.a.x.y"]));
    assert!(a[0].deleted.is_empty());

    // A snapshot names the position it shows; what follows it is exactly the later changes.
    let (at, node) = feed.snapshot(&key("_t.a"), &ReadOptions::depth(3)).await.unwrap();
    assert_eq!(at, *id_a);
    assert_eq!(node.unwrap().tasks[0].tasks[0].progress(), Some(0.99));
    store.apply(&[change("_t.a.w", r#"{"progress": 0.5}"#, 3000)]).await.unwrap();
    let later = entries(feed.since("_t.a", at).await.unwrap());
    assert_eq!(later.len(), 1);
    assert_eq!(set(&later[0].changed), BTreeSet::from(["_t.a", "_t.a.w"]));
    assert_eq!(feed.entries_after("_t.a", at, 10).await.unwrap(), later);

    // A delete names the subtree that went and the ancestors it changed.
    assert_eq!(store.delete(&key("_t.a.x"), 4000).await.unwrap(), 2);
    let deleted = entries(feed.since("_t.a", later[0].id).await.unwrap());
    assert_eq!(deleted[0].deleted, ["_t.a.x"]);
    assert_eq!(set(&deleted[0].changed), BTreeSet::from(["_t.a"]));

    // The newest states of several nodes in one call; a missing one is None.
    let nodes = feed.read_nodes(&["_t.a.w".into(), "_t.a.x".into()], 10).await.unwrap();
    assert_eq!(nodes[0].as_ref().unwrap().progress(), Some(0.5));
    assert!(nodes[1].is_none());
}

async fn an_id_the_feed_no_longer_holds_is_a_gap(t: &Target) {
    let (store, feed) = (t.store(), t.feed());
    assert_eq!(
        feed.since("_t.g", FeedId::ZERO).await.unwrap(),
        Since::Entries(Vec::new()),
        "no feed, no changes"
    );
    assert_eq!(feed.since("_t.g", FeedId { ms: 5, seq: 0 }).await.unwrap(), Since::Gap);
    for i in 0..5 {
        store.apply(&[change("_t.g.a", &format!(r#"{{"progress": 0.{i}}}"#), 1000 + i)]).await.unwrap();
    }
    let all = entries(feed.since("_t.g", FeedId::ZERO).await.unwrap());
    assert_eq!(all.len(), 5, "the whole feed, from its start");
    let mut conn = t.connection();
    let _: i64 = redis::cmd("XTRIM")
        .arg(t.feed_key("_t.g"))
        .arg("MAXLEN")
        .arg(2)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(feed.since("_t.g", all[0].id).await.unwrap(), Since::Gap, "entries after it were trimmed");
    assert_eq!(feed.since("_t.g", FeedId::ZERO).await.unwrap(), Since::Gap);
    assert_eq!(entries(feed.since("_t.g", all[3].id).await.unwrap()), all[4..].to_vec());
}

/// A finished tree older than the cutoff goes with its feed, and watchers hear of it; a newer one
/// stays (on a cluster the guard reads the root's own update time, the index being elsewhere).
async fn a_purge_drops_the_feed_and_tells_watchers(t: &Target) {
    let (store, feed) = (t.store(), t.feed());
    store.apply(&[change("_t.p.a", r#"{"progress": 1, "status": "finished"}"#, 1000)]).await.unwrap();
    store.apply(&[change("_t.p", r#"{"status": "finished"}"#, 1000)]).await.unwrap();
    store.apply(&[change("_t.q", r#"{"status": "finished"}"#, 3000)]).await.unwrap();
    let mut reader =
        NotificationReader::start(t.config.dedicated_connection().await.unwrap(), &feed).await.unwrap();
    let purger = Purger::new(t.connection(), t.prefix.clone());
    assert_eq!(purger.old_roots(2000, 0, 10).await.unwrap(), ["_t.p"]);
    assert_eq!(purger.purge_tree("_t.q", 5000, 2000).await.unwrap(), None, "updated after the cutoff");
    assert_eq!(purger.purge_tree("_t.p", 5000, 2000).await.unwrap(), Some(2));
    let notices = reader.next(1000, 100).await.unwrap();
    assert_eq!(notices.notices, [("_t.p".to_owned(), Notice::Dropped)], "watchers hear the tree went");
    let mut conn = t.connection();
    let exists: i64 = redis::cmd("EXISTS").arg(t.feed_key("_t.p")).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 0, "the feed went with the tree");
    let roots: Vec<String> =
        redis::cmd("ZRANGE").arg(t.key("proots")).arg(0).arg(-1).query_async(&mut conn).await.unwrap();
    assert_eq!(roots, ["_t.q"], "the purged root left the index");
    let registered: Vec<String> =
        redis::cmd("SMEMBERS").arg(t.key("streams")).query_async(&mut conn).await.unwrap();
    assert!(registered.contains(&t.key("pfeed")), "{registered:?}");
}
