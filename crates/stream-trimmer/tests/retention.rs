//! Retention purges against real Redis: finished request records and progress trees past
//! retention go with every index entry, unfinished ones and everything recent stay, each run is
//! bounded, and of two trimmers on one prefix only the lease holder acts.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use cairn_progress::now_ms;
use cairn_progress::{Key, Update};
use cairn_redis::progress::Change;
use cairn_redis::requests::{Commit, QueueNames, RequestQueue, Start};
use cairn_redis::streams::{LeaseState, registry_key};
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_requests::{RequestRecord, RequestState, Submission, new_request_id};
use cairn_testkit::RedisNamespace;
use common::trimmer;
use redis::aio::ConnectionManager;
use serde_json::json;
use stream_trimmer::trim_once;
use tokio_util::sync::CancellationToken;

const HOUR_MS: i64 = 3_600_000;

struct Requests {
    queue: RequestQueue,
    conn: ConnectionManager,
    prefix: String,
}

impl Requests {
    async fn new(ns: &RedisNamespace) -> Self {
        let config = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
        let queue = RequestQueue::new(
            config.manager().unwrap(),
            QueueNames::new(&ns.prefix, "requests", "processors"),
        );
        queue.ensure_group().await.unwrap();
        Self { queue, conn: ns.connection().await, prefix: ns.prefix.clone() }
    }

    async fn submit(&self, idempotency_key: Option<&str>, at: i64) -> String {
        let id = new_request_id();
        let mut submission = Submission::new("echo", json!({"id": id}));
        submission.idempotency_key = idempotency_key.map(str::to_owned);
        let record = RequestRecord::queued(id.clone(), submission, 3, at);
        let reply_to = format!("{}:replies:r1", self.prefix);
        self.queue.submit(&record, Some(&reply_to), 48 * HOUR_MS as u64, None).await.unwrap();
        id
    }

    /// Submits a request and runs it to `state` at time `at`.
    async fn finished(&self, state: RequestState, idempotency_key: Option<&str>, at: i64) -> String {
        let id = self.submit(idempotency_key, at).await;
        let entry = self.start(&id, at).await;
        let error = (state != RequestState::Succeeded).then(|| "it failed".to_owned());
        let commit = Commit { entry, state, result: Some(json!({"ok": true})), error };
        assert_eq!(self.queue.commit("c", &[commit], at).await.unwrap(), [true]);
        id
    }

    /// Delivers the request's entry to consumer `c` and starts its attempt.
    async fn start(&self, id: &str, at: i64) -> cairn_redis::requests::Entry {
        let entries = self.queue.read_new(&mut self.conn.clone(), "c", 100, 10).await.unwrap();
        let entry = entries.into_iter().find(|e| e.request_id == id).expect("entry delivered");
        let started = self.queue.start("c", std::slice::from_ref(&entry), at).await.unwrap();
        assert!(matches!(started[..], [Start::Run { .. }]), "{started:?}");
        entry
    }

    async fn exists(&self, key: &str) -> bool {
        redis::cmd("EXISTS").arg(key).query_async::<i64>(&mut self.conn.clone()).await.unwrap() == 1
    }

    async fn record_exists(&self, id: &str) -> bool {
        self.exists(&format!("{}:req:{id}", self.prefix)).await
    }

    async fn indexed(&self) -> HashSet<String> {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{}:req:finished", self.prefix))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn.clone())
            .await
            .unwrap();
        members.into_iter().collect()
    }
}

#[tokio::test]
async fn finished_records_past_retention_go_with_their_index_entries_and_idempotency_keys() {
    let ns = RedisNamespace::new();
    let requests = Requests::new(&ns).await;
    let now = now_ms();
    let old = now - 2 * HOUR_MS;
    let succeeded = requests.finished(RequestState::Succeeded, Some("order-1"), old).await;
    let dead = requests.finished(RequestState::Dead, None, old).await;
    let canceled = requests.submit(None, old).await;
    requests.queue.cancel(&canceled, old).await.unwrap();
    // Its idempotency key was taken over by another request meanwhile: the key stays.
    let reused = requests.finished(RequestState::Succeeded, Some("order-2"), old).await;
    let other = requests.submit(None, now).await;
    let mut conn = requests.conn.clone();
    let _: () =
        redis::cmd("SET").arg(ns.key("idem:order-2")).arg(&other).query_async(&mut conn).await.unwrap();
    // Unfinished or recent: all stay.
    let running = requests.submit(None, old).await;
    requests.start(&running, old).await;
    let recent = requests.finished(RequestState::Succeeded, None, now - 1_000).await;
    let retried = requests.finished(RequestState::Dead, None, old).await;
    requests.queue.retry_dead(&retried, now).await.unwrap();

    // Every stream the requests created is registered for the trimmer: the queue's, and the
    // change feed of each request's progress tree (written with its node).
    let mut registered: HashSet<String> =
        redis::cmd("SMEMBERS").arg(registry_key(&ns.prefix)).query_async(&mut conn).await.unwrap();
    // And the notification stream every change also appends to.
    assert!(registered.remove(&ns.key("pfeed")), "{registered:?}");
    let feeds = ns.key("pf:");
    let (feeds, queue): (HashSet<String>, HashSet<String>) =
        registered.into_iter().partition(|k| k.starts_with(&feeds));
    let expected: HashSet<String> =
        ["requests", "dead", "replies:r1"].into_iter().map(|s| ns.key(s)).collect();
    assert_eq!(queue, expected);
    assert!(feeds.iter().all(|k| k.contains(":pf:_requests.")), "{feeds:?}");

    let before = requests.indexed().await;
    for id in [&succeeded, &dead, &canceled, &reused, &recent, &retried] {
        assert!(before.contains(id.as_str()), "{id} is indexed when it finishes");
    }
    assert!(!before.contains(&running));

    let app = trimmer(&ns, &["--request-retention=1h"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    assert_eq!(report.records_purged, 3, "{report:?}");
    for id in [&succeeded, &canceled, &reused] {
        assert!(!requests.record_exists(id).await, "{id} purged");
    }
    // Dead letters are kept until retried or deleted: out of the index, so never examined again.
    for id in [&running, &recent, &retried, &other, &dead] {
        assert!(requests.record_exists(id).await, "{id} kept");
    }
    assert!(!requests.exists(&ns.key("idem:order-1")).await, "the purged request's idempotency key goes");
    assert!(requests.exists(&ns.key("idem:order-2")).await, "a key pointing to another request stays");
    assert_eq!(
        requests.indexed().await,
        HashSet::from([recent.clone()]),
        "the retried and dead ones left the index"
    );
}

#[tokio::test]
async fn dead_requests_have_a_retention_of_their_own() {
    let ns = RedisNamespace::new();
    let requests = Requests::new(&ns).await;
    let now = now_ms();
    let long_dead = requests.finished(RequestState::Dead, None, now - 3 * HOUR_MS).await;
    let dead = requests.finished(RequestState::Dead, None, now - 2 * HOUR_MS).await;
    let app = trimmer(&ns, &["--request-retention=1h", "--dead-retention=150m"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    assert_eq!(report.records_purged, 1, "{report:?}");
    assert!(!requests.record_exists(&long_dead).await);
    assert!(requests.record_exists(&dead).await);
    // Re-scored to when it is due: half an hour from now, with the request retention's cutoff.
    let later = now + 31 * 60_000;
    assert_eq!(trim_once(&app.deps(), later).await.unwrap().records_purged, 1);
    assert!(!requests.record_exists(&dead).await);
}

#[tokio::test]
async fn purges_are_bounded_per_run() {
    let ns = RedisNamespace::new();
    let requests = Requests::new(&ns).await;
    let now = now_ms();
    for _ in 0..5 {
        requests.finished(RequestState::Succeeded, None, now - 2 * HOUR_MS).await;
    }
    let app = trimmer(&ns, &["--request-retention=1h", "--purge-limit=2"]).await;
    let mut purged = Vec::new();
    for _ in 0..4 {
        purged.push(trim_once(&app.deps(), now).await.unwrap().records_purged);
    }
    assert_eq!(purged, [2, 2, 1, 0]);
}

fn change(key: &str, update: Update, time_ms: i64) -> Change {
    Change { key: Key::parse(key).unwrap(), update, time_ms }
}

async fn progress_keys(conn: &mut ConnectionManager, prefix: &str) -> HashSet<String> {
    let mut keys = HashSet::new();
    for pattern in ["pn:*", "pc:*"] {
        let found: Vec<String> =
            redis::cmd("KEYS").arg(format!("{prefix}:{pattern}")).query_async(conn).await.unwrap();
        keys.extend(found.into_iter().map(|k| k[prefix.len() + 1..].to_owned()));
    }
    keys
}

async fn roots(conn: &mut ConnectionManager, prefix: &str) -> HashSet<String> {
    let roots: Vec<String> =
        redis::cmd("ZRANGE").arg(format!("{prefix}:proots")).arg(0).arg(-1).query_async(conn).await.unwrap();
    roots.into_iter().collect()
}

#[tokio::test]
async fn finished_progress_trees_past_retention_go_and_unfinished_ones_stay() {
    let ns = RedisNamespace::new();
    let store = ProgressStore::new(
        RedisConfig::new(ns.url.clone(), ns.prefix.clone()).manager().unwrap(),
        ns.prefix.clone(),
    );
    let now = now_ms();
    let old = now - 10 * HOUR_MS;
    let done = |p: f64| Update::new().progress(p).status("finished");
    store
        .apply(&[
            // Finished long ago: purged, children and child index included.
            change("done.a", done(1.0), old),
            change("done.b.x", done(1.0), old),
            change("done", Update::new().status("finished"), old),
            change("_portal.failed", Update::new().status("failed"), old),
            change("_portal.failed.step", Update::new().progress(0.3).status("failed"), old),
            // Still running, however old: kept with its children.
            change("running.a", done(1.0), old),
            change("running.b", Update::new().progress(0.5).status("running"), old),
            change("running", Update::new().status("running"), old),
            // No status of its own: not known to be finished, kept.
            change("implicit.a", done(1.0), old),
            // Finished recently, or finished long ago with a recent update below: kept.
            change("recent", done(1.0), now - 1_000),
            change("touched", Update::new().status("finished"), old),
            change("touched.late", Update::new().msg("late note"), now - 1_000),
        ])
        .await
        .unwrap();
    let mut conn = ns.connection().await;
    let before = progress_keys(&mut conn, &ns.prefix).await;

    let app = trimmer(&ns, &["--progress-retention=1h"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    assert_eq!(report.trees_purged, 2, "{report:?}");
    assert_eq!(report.nodes_purged, 6, "done, done.a, done.b, done.b.x, _portal.failed, its step");

    let after = progress_keys(&mut conn, &ns.prefix).await;
    let gone: HashSet<&str> = before.difference(&after).map(String::as_str).collect();
    let expected: HashSet<&str> = [
        "pn:done",
        "pn:done.a",
        "pn:done.b",
        "pn:done.b.x",
        "pc:done",
        "pc:done.b",
        "pn:_portal.failed",
        "pn:_portal.failed.step",
        "pc:_portal.failed",
    ]
    .into();
    assert_eq!(gone, expected);
    assert_eq!(
        roots(&mut conn, &ns.prefix).await,
        ["running", "implicit", "recent", "touched"].into_iter().map(str::to_owned).collect()
    );
    for kept in ["pn:running.a", "pn:running.b", "pc:running", "pn:touched.late"] {
        assert!(after.contains(kept), "{kept} kept");
    }
}

#[tokio::test]
async fn a_crowd_of_unfinished_old_trees_does_not_hide_finished_ones() {
    let ns = RedisNamespace::new();
    let store = ProgressStore::new(
        RedisConfig::new(ns.url.clone(), ns.prefix.clone()).manager().unwrap(),
        ns.prefix.clone(),
    );
    let now = now_ms();
    let old = now - 10 * HOUR_MS;
    let mut changes: Vec<Change> =
        (0..12).map(|i| change(&format!("stuck{i}"), Update::new().status("running"), old + i)).collect();
    changes.push(change("done", Update::new().status("finished"), old + 100));
    store.apply(&changes).await.unwrap();
    // A run looks at ten times its limit of roots at most, then the next run goes on from there.
    let app = trimmer(&ns, &["--progress-retention=1h", "--purge-limit=1"]).await;
    assert_eq!(trim_once(&app.deps(), now).await.unwrap().trees_purged, 0);
    assert_eq!(trim_once(&app.deps(), now).await.unwrap().trees_purged, 1);
    let mut conn = ns.connection().await;
    assert_eq!(roots(&mut conn, &ns.prefix).await.len(), 12);
}

#[tokio::test]
async fn of_two_trimmers_on_one_prefix_only_the_lease_holder_acts() {
    let ns = RedisNamespace::new();
    let (a, b) = (trimmer(&ns, &["--interval=50ms"]).await, trimmer(&ns, &["--interval=50ms"]).await);
    // Step by step, also when both run at the same moment: exactly one acts each round.
    let (deps_a, deps_b) = (a.deps(), b.deps());
    for _ in 0..20 {
        let (ra, rb) = tokio::join!(trim_once(&deps_a, now_ms()), trim_once(&deps_b, now_ms()));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(u8::from(ra.acted()) + u8::from(rb.acted()), 1, "{:?} / {:?}", ra.lease, rb.lease);
    }
    let holder: String =
        redis::cmd("GET").arg(ns.key("trimmer:lease")).query_async(&mut ns.connection().await).await.unwrap();
    let (first, second) = if holder == a.instance() { (a, b) } else { (b, a) };

    // As services: the holder keeps acting, the other never does until the holder stops.
    let (first_name, second_name) = (first.instance().to_owned(), second.instance().to_owned());
    let (mut first_reports, mut second_reports) = (first.subscribe(), second.subscribe());
    let (stop_first, stop_second) = (CancellationToken::new(), CancellationToken::new());
    let first_run = tokio::spawn(first.run(stop_first.clone()));
    let second_run = tokio::spawn(second.run(stop_second.clone()));
    let _stop = stop_second.clone().drop_guard();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop_first.cancel();
    first_run.await.unwrap().unwrap();
    let mut acted_first = 0;
    while let Ok(report) = first_reports.try_recv() {
        assert!(report.acted(), "the holder acts every run: {:?}", report.lease);
        acted_first += 1;
    }
    // The other never acted while the holder ran; once the holder released the lease on
    // shutdown it takes over at its next run.
    let mut idle_second = 0;
    loop {
        let report = tokio::time::timeout(Duration::from_secs(5), second_reports.recv())
            .await
            .expect("the second trimmer keeps reporting")
            .unwrap();
        match &report.lease {
            LeaseState::HeldBy(holder) => {
                assert_eq!(holder, &first_name);
                assert!(!report.acted() && report.streams.is_empty());
                idle_second += 1;
            }
            LeaseState::Acquired => break,
            other => panic!("the second trimmer renewed a lease it never took: {other:?}"),
        }
    }
    assert!(acted_first >= 3 && idle_second >= 3, "{acted_first} runs acted, {idle_second} idle");
    let holder: String =
        redis::cmd("GET").arg(ns.key("trimmer:lease")).query_async(&mut ns.connection().await).await.unwrap();
    assert_eq!(holder, second_name);
    stop_second.cancel();
    second_run.await.unwrap().unwrap();
}

#[tokio::test]
async fn data_streams_go_with_their_purged_request_and_stay_with_the_others() {
    use cairn_redis::BlobStore;
    use cairn_redis::requests::{QueueLayout, StreamSource};
    use cairn_requests::StreamInfo;

    let ns = RedisNamespace::new();
    let requests = Requests::new(&ns).await;
    let blobs =
        BlobStore::new(requests.conn.clone(), &QueueLayout::new(&ns.prefix, "requests", "processors"));
    let now = now_ms();
    let old = now - 2 * HOUR_MS;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = new_request_id();
        let mut record = RequestRecord::queued(id.clone(), Submission::new("echo", json!(null)), 3, old);
        for name in ["a", "b"] {
            let base = blobs.stream_key(&id, name);
            blobs.create(&base, &[], old, None).await.unwrap();
            assert_eq!(blobs.append(&base, 0, b"some bytes", None).await.unwrap(), 10);
            record.streams.push(StreamInfo { name: name.to_owned(), bytes: 10 });
        }
        let sources: Vec<StreamSource> =
            ["a", "b"].iter().map(|n| StreamSource { name: (*n).to_owned(), upload: None }).collect();
        requests.queue.submit_with_streams(&record, None, 60_000, None, &sources).await.unwrap();
        ids.push(id);
    }
    let (done, running) = (&ids[0], &ids[1]);
    let entry = requests.start(done, old).await;
    let commit = Commit { entry, state: RequestState::Succeeded, result: None, error: None };
    assert_eq!(requests.queue.commit("c", &[commit], old).await.unwrap(), [true]);

    let app = trimmer(&ns, &["--request-retention=1h"]).await;
    assert_eq!(trim_once(&app.deps(), now).await.unwrap().records_purged, 1);
    for name in ["a", "b"] {
        for key in cairn_redis::blobs::keys(&blobs.stream_key(done, name)) {
            assert!(!requests.exists(&key).await, "{key} went with its request");
        }
        for key in cairn_redis::blobs::keys(&blobs.stream_key(running, name)) {
            assert!(requests.exists(&key).await, "{key} of an unfinished request stays");
        }
    }
}

#[tokio::test]
async fn an_abandoned_uploads_tree_goes_once_its_upload_is_gone() {
    let ns = RedisNamespace::new();
    let store = ProgressStore::new(
        RedisConfig::new(ns.url.clone(), ns.prefix.clone()).manager().unwrap(),
        ns.prefix.clone(),
    );
    let now = now_ms();
    let old = now - 10 * HOUR_MS;
    let running = || Update::new().progress(0.4).status("running").field("bytes", 4).field("total_bytes", 10);
    store
        .apply(&[change("_uploads.gone", running(), old), change("_uploads.alive", running(), old)])
        .await
        .unwrap();
    let mut conn = ns.connection().await;
    let _: () = redis::cmd("HSET")
        .arg(ns.key("upload:alive"))
        .arg("offset")
        .arg(4)
        .query_async(&mut conn)
        .await
        .unwrap();
    let app = trimmer(&ns, &["--progress-retention=1h"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    assert_eq!(report.trees_purged, 1, "{report:?}");
    assert_eq!(roots(&mut conn, &ns.prefix).await, HashSet::from(["_uploads.alive".to_owned()]));
}
