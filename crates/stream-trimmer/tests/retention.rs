//! Retention purges against real Redis, one Redis and a Redis Cluster alike (`common::Target`,
//! the request queue in partitions): finished request records past retention go from every
//! partition with every index entry, idempotency claim and data stream, unfinished ones and
//! everything recent stay, dead letters keep their own retention per partition, progress trees
//! go when finished, each run is bounded, and of two trimmers on one prefix only the lease
//! holder acts.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use cairn_progress::now_ms;
use cairn_progress::{Key, Update};
use cairn_redis::progress::Change;
use cairn_redis::requests::{Commit, Entry, QueueLayout, RequestQueues, Start, SubmitOutcome};
use cairn_redis::streams::{LeaseState, registry_key};
use cairn_redis::{BlobStore, RedisConnection, keys};
use cairn_requests::{RequestRecord, RequestState, Submission};
use common::Target;
use redis::aio::ConnectionLike;
use serde_json::json;
use stream_trimmer::trim_once;
use tokio_util::sync::CancellationToken;

const HOUR_MS: i64 = 3_600_000;

on_redis_and_cluster!(
    finished_records_past_retention_go_with_their_index_entries_and_idempotency_keys,
    finished_requests_of_every_partition_go_and_unfinished_ones_stay,
    dead_requests_have_a_retention_of_their_own,
    dead_letter_streams_of_every_partition_keep_the_dead_retention,
    purges_are_bounded_per_run,
    finished_progress_trees_past_retention_go_and_unfinished_ones_stay,
    a_crowd_of_unfinished_old_trees_does_not_hide_finished_ones,
    of_two_trimmers_on_one_prefix_only_the_lease_holder_acts,
    data_streams_go_with_their_purged_request_and_stay_with_the_others,
    an_abandoned_uploads_tree_goes_once_its_upload_is_gone,
);

/// The request queue of a target, submitted to as ingress does and run as a processor does.
struct Requests {
    queues: RequestQueues,
    conn: RedisConnection,
    prefix: String,
}

impl Requests {
    async fn new(t: &Target) -> Self {
        let queues = t.queues();
        queues.ensure_groups().await.unwrap();
        Self { queues, conn: t.connection(), prefix: t.prefix.clone() }
    }

    fn layout(&self) -> &QueueLayout {
        self.queues.layout()
    }

    fn reply_stream(&self) -> String {
        keys::requests::replies(&self.prefix, "r1")
    }

    async fn submit(&self, idempotency_key: Option<&str>, at: i64) -> String {
        self.submit_in(None, idempotency_key, at).await
    }

    /// Submits a request: in the partition of its idempotency key if it has one, else in
    /// `partition`, or wherever its id falls.
    async fn submit_in(&self, partition: Option<u16>, idempotency_key: Option<&str>, at: i64) -> String {
        let id = match idempotency_key {
            Some(key) => self.queues.new_id(Some(key)),
            None => self.queues.new_id_in(partition),
        };
        let mut submission = Submission::new("echo", json!({"id": id}));
        submission.idempotency_key = idempotency_key.map(str::to_owned);
        let record = RequestRecord::queued(id.clone(), submission, 3, at);
        let reply_to = self.reply_stream();
        let queue = self.queues.of(&id);
        let outcome = queue.submit(&record, Some(&reply_to), 48 * HOUR_MS as u64, None).await.unwrap();
        assert!(matches!(outcome, SubmitOutcome::Created { .. }), "{outcome:?}");
        id
    }

    /// Submits a request and runs it to `state` at time `at`.
    async fn finished(&self, state: RequestState, idempotency_key: Option<&str>, at: i64) -> String {
        self.finished_in(None, state, idempotency_key, at).await
    }

    async fn finished_in(
        &self,
        partition: Option<u16>,
        state: RequestState,
        idempotency_key: Option<&str>,
        at: i64,
    ) -> String {
        let id = self.submit_in(partition, idempotency_key, at).await;
        self.run(&id, state, at).await;
        id
    }

    /// Starts a submitted request and commits `state` at time `at`.
    async fn run(&self, id: &str, state: RequestState, at: i64) {
        let entry = self.start(id, at).await;
        let error = (state != RequestState::Succeeded).then(|| "it failed".to_owned());
        let commit = Commit { entry, state, result: Some(json!({"ok": true})), error };
        assert_eq!(self.queues.of(id).commit("c", &[commit], at).await.unwrap(), [true]);
    }

    /// Delivers the request's entry to consumer `c` and starts its attempt.
    async fn start(&self, id: &str, at: i64) -> Entry {
        let queue = self.queues.of(id);
        let entries = queue.read_new(&mut self.conn.clone(), "c", 100, 10).await.unwrap();
        let entry = entries.into_iter().find(|e| e.request_id == id).expect("entry delivered");
        let started = queue.start("c", std::slice::from_ref(&entry), at).await.unwrap();
        assert!(matches!(started[..], [Start::Run { .. }]), "{started:?}");
        entry
    }

    async fn exists(&self, key: &str) -> bool {
        exists(&mut self.conn.clone(), key).await
    }

    async fn record_exists(&self, id: &str) -> bool {
        self.exists(&self.queues.of(id).names().record(id)).await
    }

    /// The claim of an idempotency key.
    fn idem(&self, key: &str) -> String {
        self.queues.of(key).names().idem(key)
    }

    /// An idempotency key that falls in `partition`: `{base}-{n}` for the first such `n`.
    fn key_in(&self, partition: u16, base: &str) -> String {
        (0..).map(|n| format!("{base}-{n}")).find(|key| self.layout().partition_of(key) == partition).unwrap()
    }

    /// Every finished index's members (one index per partition on a cluster, one on one Redis).
    async fn indexed(&self) -> HashSet<String> {
        let mut all = HashSet::new();
        let indexes: HashSet<String> = self.layout().all().iter().map(|names| names.finished()).collect();
        for index in indexes {
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(index)
                .arg(0)
                .arg(-1)
                .query_async(&mut self.conn.clone())
                .await
                .unwrap();
            all.extend(members);
        }
        all
    }

    /// Every partition's dead-letter stream (one on one Redis).
    fn dead_streams(&self) -> Vec<String> {
        let mut dead: Vec<String> = self.layout().all().iter().map(|names| names.dead()).collect();
        dead.dedup();
        dead
    }

    /// Submits a request with two data streams, `a` and `b`, of 10 bytes each; returns its id.
    async fn with_streams(&self, blobs: &BlobStore, partition: Option<u16>, at: i64) -> String {
        use cairn_redis::requests::StreamSource;
        use cairn_requests::StreamInfo;

        let id = self.queues.new_id_in(partition);
        let mut record = RequestRecord::queued(id.clone(), Submission::new("echo", json!(null)), 3, at);
        for name in ["a", "b"] {
            let base = blobs.stream_key(&id, name);
            blobs.create(&base, &[], at, None).await.unwrap();
            assert_eq!(blobs.append(&base, 0, b"some bytes", None).await.unwrap(), 10);
            record.streams.push(StreamInfo { name: name.to_owned(), bytes: 10 });
        }
        let sources: Vec<StreamSource> =
            ["a", "b"].iter().map(|n| StreamSource { name: (*n).to_owned(), upload: None }).collect();
        self.queues.of(&id).submit_with_streams(&record, None, 60_000, None, &sources).await.unwrap();
        id
    }
}

async fn exists(conn: &mut impl ConnectionLike, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query_async::<i64>(conn).await.unwrap() == 1
}

async fn finished_records_past_retention_go_with_their_index_entries_and_idempotency_keys(t: &Target) {
    let requests = Requests::new(t).await;
    let now = now_ms();
    let old = now - 2 * HOUR_MS;
    let succeeded = requests.finished(RequestState::Succeeded, Some("order-1"), old).await;
    let dead = requests.finished(RequestState::Dead, None, old).await;
    let canceled = requests.submit(None, old).await;
    requests.queues.cancel(&canceled, old).await.unwrap();
    // Its idempotency key was taken over by another request meanwhile: the key stays.
    let reused = requests.finished(RequestState::Succeeded, Some("order-2"), old).await;
    let other = requests.submit(None, now).await;
    let mut conn = requests.conn.clone();
    let _: () =
        redis::cmd("SET").arg(requests.idem("order-2")).arg(&other).query_async(&mut conn).await.unwrap();
    // Unfinished or recent: all stay.
    let running = requests.submit(None, old).await;
    requests.start(&running, old).await;
    let recent = requests.finished(RequestState::Succeeded, None, now - 1_000).await;
    let retried = requests.finished(RequestState::Dead, None, old).await;
    requests.queues.retry_dead(&retried, now).await.unwrap();

    // Every stream the requests created is registered for the trimmer: the queue's (each
    // partition's stream and dead letters), and the change feed of each request's progress tree
    // (written with its node).
    let mut registered: HashSet<String> =
        redis::cmd("SMEMBERS").arg(registry_key(&t.prefix)).query_async(&mut conn).await.unwrap();
    // And the notification stream every change also appends to.
    assert!(registered.remove(&t.key("pfeed")), "{registered:?}");
    let feeds = t.key("pf:");
    let (feeds, queue): (HashSet<String>, HashSet<String>) =
        registered.into_iter().partition(|k| k.starts_with(&feeds));
    let mut expected: HashSet<String> =
        requests.layout().all().iter().flat_map(|names| [names.stream.clone(), names.dead()]).collect();
    expected.insert(requests.reply_stream());
    assert_eq!(queue, expected);
    if t.partitions == 1 && !t.is_cluster() {
        let before: HashSet<String> =
            ["requests", "dead", "replies:r1"].into_iter().map(|s| t.key(s)).collect();
        assert_eq!(queue, before, "one partition on one Redis: the keys of old");
    }
    // On a cluster a feed's key carries its root in braces (`pf:{_requests.<id>}`).
    assert!(feeds.iter().all(|k| k.replace(['{', '}'], "").contains(":pf:_requests.")), "{feeds:?}");

    let before = requests.indexed().await;
    for id in [&succeeded, &dead, &canceled, &reused, &recent, &retried] {
        assert!(before.contains(id.as_str()), "{id} is indexed when it finishes");
    }
    assert!(!before.contains(&running));

    let app = t.trimmer(&["--request-retention=1h"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    assert_eq!(report.records_purged, 3, "{report:?}");
    for id in [&succeeded, &canceled, &reused] {
        assert!(!requests.record_exists(id).await, "{id} purged");
    }
    // Dead letters are kept until retried or deleted: out of the index, so never examined again.
    for id in [&running, &recent, &retried, &other, &dead] {
        assert!(requests.record_exists(id).await, "{id} kept");
    }
    assert!(!requests.exists(&requests.idem("order-1")).await, "the purged request's idempotency key goes");
    assert!(requests.exists(&requests.idem("order-2")).await, "a key pointing to another request stays");
    assert_eq!(
        requests.indexed().await,
        HashSet::from([recent.clone()]),
        "the retried and dead ones left the index"
    );
}

/// In every partition: a succeeded request with an idempotency claim, a canceled one, a dead
/// one (past a dead retention of an hour) and one with data streams go, claims and streams
/// included; a running, a queued and a recent one stay.
async fn finished_requests_of_every_partition_go_and_unfinished_ones_stay(t: &Target) {
    let requests = Requests::new(t).await;
    let blobs = BlobStore::new(t.connection(), requests.layout());
    let now = now_ms();
    let old = now - 2 * HOUR_MS;
    let (mut gone, mut kept, mut claims, mut recent) = (Vec::new(), Vec::new(), Vec::new(), HashSet::new());
    for p in 0..t.partitions {
        let key = requests.key_in(p, "order");
        gone.push(requests.finished(RequestState::Succeeded, Some(&key), old).await);
        claims.push(key);
        let canceled = requests.submit_in(Some(p), None, old).await;
        requests.queues.cancel(&canceled, old).await.unwrap();
        gone.push(canceled);
        gone.push(requests.finished_in(Some(p), RequestState::Dead, None, old).await);
        let streamed = requests.with_streams(&blobs, Some(p), old).await;
        requests.run(&streamed, RequestState::Succeeded, old).await;
        gone.push(streamed);
        let running = requests.submit_in(Some(p), None, old).await;
        requests.start(&running, old).await;
        kept.push(running);
        kept.push(requests.submit_in(Some(p), None, old).await);
        recent.insert(requests.finished_in(Some(p), RequestState::Succeeded, None, now - 1_000).await);
    }
    let partitions: HashSet<u16> = gone.iter().map(|id| requests.layout().partition_of(id)).collect();
    assert_eq!(partitions.len(), usize::from(t.partitions), "every partition has requests to purge");

    let app = t.trimmer(&["--request-retention=1h", "--dead-retention=1h"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.records_purged, gone.len() as u64, "{report:?}");
    for id in &gone {
        assert!(!requests.record_exists(id).await, "{id} purged");
        for name in ["a", "b"] {
            for key in cairn_redis::blobs::keys(&blobs.stream_key(id, name)) {
                assert!(!requests.exists(&key).await, "{key}");
            }
        }
    }
    for id in kept.iter().chain(&recent) {
        assert!(requests.record_exists(id).await, "{id} kept");
    }
    for key in &claims {
        assert!(!requests.exists(&requests.idem(key)).await, "the claim of {key} went with its request");
    }
    assert_eq!(requests.indexed().await, recent);
}

/// Dead requests keep their own retention, in every partition.
async fn dead_requests_have_a_retention_of_their_own(t: &Target) {
    let requests = Requests::new(t).await;
    let now = now_ms();
    let (mut long_dead, mut dead) = (Vec::new(), Vec::new());
    for p in 0..t.partitions {
        long_dead.push(requests.finished_in(Some(p), RequestState::Dead, None, now - 3 * HOUR_MS).await);
        dead.push(requests.finished_in(Some(p), RequestState::Dead, None, now - 2 * HOUR_MS).await);
    }
    let app = t.trimmer(&["--request-retention=1h", "--dead-retention=150m"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    assert_eq!(report.records_purged, u64::from(t.partitions), "{report:?}");
    for (long_dead, dead) in long_dead.iter().zip(&dead) {
        assert!(!requests.record_exists(long_dead).await);
        assert!(requests.record_exists(dead).await);
    }
    // Re-scored to when it is due: half an hour from now, with the request retention's cutoff.
    let later = now + 31 * 60_000;
    assert_eq!(trim_once(&app.deps(), later).await.unwrap().records_purged, u64::from(t.partitions));
    for dead in &dead {
        assert!(!requests.record_exists(dead).await);
    }
}

/// Every partition's dead-letter stream gets the `dead` policy: kept whole by default, trimmed by
/// age with `CAIRN_DEAD_RETENTION`. On a cluster a partition's dead-letter stream is made by a
/// call that cannot register it; the trimmer finds it all the same and registers it.
async fn dead_letter_streams_of_every_partition_keep_the_dead_retention(t: &Target) {
    let requests = Requests::new(t).await;
    let mut conn = t.connection();
    let registry = registry_key(&t.prefix);
    let keep = t.trimmer(&[]).await;
    // Registered by the queue on a cluster before they exist: they leave the registry.
    trim_once(&keep.deps(), now_ms()).await.unwrap();
    let now = now_ms();
    let dead_streams = requests.dead_streams();
    for key in &dead_streams {
        // Old entries fill whole macro nodes (an approximate trim removes nothing less).
        for i in 0..250 {
            let id = format!("{}-{i}", now - 3 * HOUR_MS);
            let _: String =
                redis::cmd("XADD").arg(key).arg(id).arg("id").arg(i).query_async(&mut conn).await.unwrap();
        }
        let _: String = redis::cmd("XADD")
            .arg(key)
            .arg(format!("{}-0", now - 1_000))
            .arg("id")
            .arg("recent")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    let report = trim_once(&keep.deps(), now).await.unwrap();
    let members: HashSet<String> =
        redis::cmd("SMEMBERS").arg(&registry).query_async(&mut conn).await.unwrap();
    for key in &dead_streams {
        let name = t.name(key);
        let stream = report.stream(name).unwrap_or_else(|| panic!("{name} is found: {report:?}"));
        assert!(stream.policy.keeps_all(), "{name}: {stream:?}");
        assert_eq!((stream.outcome.trimmed, stream.outcome.length), (0, 251), "{name}");
        assert!(members.contains(key), "{key} is registered: {members:?}");
    }

    assert!(keep.deps().lease.release().await.unwrap());
    let app = t.trimmer(&["--dead-retention=2h"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    for key in &dead_streams {
        let name = t.name(key);
        let stream = report.stream(name).unwrap();
        assert_eq!(stream.policy.max_age, Some(Duration::from_secs(2 * 3600)), "{name}");
        assert!(stream.outcome.trimmed >= 100, "{name}: {stream:?}");
        let left = common::ids(&mut conn, key).await;
        assert_eq!(left.len() as u64 + stream.outcome.trimmed, 251, "{name}");
        assert_eq!(left.last(), Some(&format!("{}-0", now - 1_000)), "{name}: the recent entry stays");
    }
}

async fn purges_are_bounded_per_run(t: &Target) {
    let requests = Requests::new(t).await;
    let now = now_ms();
    for _ in 0..5 {
        requests.finished(RequestState::Succeeded, None, now - 2 * HOUR_MS).await;
    }
    let app = t.trimmer(&["--request-retention=1h", "--purge-limit=2"]).await;
    let mut purged = Vec::new();
    for _ in 0..4 {
        purged.push(trim_once(&app.deps(), now).await.unwrap().records_purged);
    }
    assert_eq!(purged, [2, 2, 1, 0]);
}

fn change(key: &str, update: Update, time_ms: i64) -> Change {
    Change { key: Key::parse(key).unwrap(), update, time_ms }
}

/// The progress keys under `prefix`, without it, as one Redis names them (a cluster's keys
/// without their braces: `pn:{done}.a` is `pn:done.a`). `KEYS` goes to every master.
async fn progress_keys(conn: &mut impl ConnectionLike, prefix: &str) -> HashSet<String> {
    let mut keys = HashSet::new();
    for pattern in ["pn:*", "pc:*"] {
        let found: Vec<String> =
            redis::cmd("KEYS").arg(format!("{prefix}:{pattern}")).query_async(conn).await.unwrap();
        keys.extend(found.into_iter().map(|k| k[prefix.len() + 1..].replace(['{', '}'], "")));
    }
    keys
}

async fn roots(conn: &mut impl ConnectionLike, prefix: &str) -> HashSet<String> {
    let roots: Vec<String> =
        redis::cmd("ZRANGE").arg(format!("{prefix}:proots")).arg(0).arg(-1).query_async(conn).await.unwrap();
    roots.into_iter().collect()
}

async fn finished_progress_trees_past_retention_go_and_unfinished_ones_stay(t: &Target) {
    let store = t.store();
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
    let mut conn = t.connection();
    let before = progress_keys(&mut conn, &t.prefix).await;

    let app = t.trimmer(&["--progress-retention=1h"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    assert_eq!(report.trees_purged, 2, "{report:?}");
    assert_eq!(report.nodes_purged, 6, "done, done.a, done.b, done.b.x, _portal.failed, its step");

    let after = progress_keys(&mut conn, &t.prefix).await;
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
        roots(&mut conn, &t.prefix).await,
        ["running", "implicit", "recent", "touched"].into_iter().map(str::to_owned).collect()
    );
    for kept in ["pn:running.a", "pn:running.b", "pc:running", "pn:touched.late"] {
        assert!(after.contains(kept), "{kept} kept");
    }
}

async fn a_crowd_of_unfinished_old_trees_does_not_hide_finished_ones(t: &Target) {
    let store = t.store();
    let now = now_ms();
    let old = now - 10 * HOUR_MS;
    let mut changes: Vec<Change> =
        (0..12).map(|i| change(&format!("stuck{i}"), Update::new().status("running"), old + i)).collect();
    changes.push(change("done", Update::new().status("finished"), old + 100));
    store.apply(&changes).await.unwrap();
    // A run looks at ten times its limit of roots at most, then the next run goes on from there.
    let app = t.trimmer(&["--progress-retention=1h", "--purge-limit=1"]).await;
    assert_eq!(trim_once(&app.deps(), now).await.unwrap().trees_purged, 0);
    assert_eq!(trim_once(&app.deps(), now).await.unwrap().trees_purged, 1);
    let mut conn = t.connection();
    assert_eq!(roots(&mut conn, &t.prefix).await.len(), 12);
}

async fn of_two_trimmers_on_one_prefix_only_the_lease_holder_acts(t: &Target) {
    let (a, b) = (t.trimmer(&["--interval=50ms"]).await, t.trimmer(&["--interval=50ms"]).await);
    // Step by step, also when both run at the same moment: exactly one acts each round.
    let (deps_a, deps_b) = (a.deps(), b.deps());
    for _ in 0..20 {
        let (ra, rb) = tokio::join!(trim_once(&deps_a, now_ms()), trim_once(&deps_b, now_ms()));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(u8::from(ra.acted()) + u8::from(rb.acted()), 1, "{:?} / {:?}", ra.lease, rb.lease);
    }
    let holder: String =
        redis::cmd("GET").arg(t.key("trimmer:lease")).query_async(&mut t.connection()).await.unwrap();
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
        redis::cmd("GET").arg(t.key("trimmer:lease")).query_async(&mut t.connection()).await.unwrap();
    assert_eq!(holder, second_name);
    stop_second.cancel();
    second_run.await.unwrap().unwrap();
}

async fn data_streams_go_with_their_purged_request_and_stay_with_the_others(t: &Target) {
    let requests = Requests::new(t).await;
    let blobs = BlobStore::new(t.connection(), requests.layout());
    let now = now_ms();
    let old = now - 2 * HOUR_MS;
    let done = requests.with_streams(&blobs, None, old).await;
    let running = requests.with_streams(&blobs, None, old).await;
    requests.run(&done, RequestState::Succeeded, old).await;

    let app = t.trimmer(&["--request-retention=1h"]).await;
    assert_eq!(trim_once(&app.deps(), now).await.unwrap().records_purged, 1);
    for name in ["a", "b"] {
        for key in cairn_redis::blobs::keys(&blobs.stream_key(&done, name)) {
            assert!(!requests.exists(&key).await, "{key} went with its request");
        }
        for key in cairn_redis::blobs::keys(&blobs.stream_key(&running, name)) {
            assert!(requests.exists(&key).await, "{key} of an unfinished request stays");
        }
    }
}

async fn an_abandoned_uploads_tree_goes_once_its_upload_is_gone(t: &Target) {
    let store = t.store();
    let now = now_ms();
    let old = now - 10 * HOUR_MS;
    let running = || Update::new().progress(0.4).status("running").field("bytes", 4).field("total_bytes", 10);
    store
        .apply(&[change("_uploads.gone", running(), old), change("_uploads.alive", running(), old)])
        .await
        .unwrap();
    let mut conn = t.connection();
    // The upload's key is in its partition's slot on a cluster, not in its tree's.
    let upload = BlobStore::new(t.connection(), &t.layout()).upload_key("alive");
    let _: () = redis::cmd("HSET").arg(upload).arg("offset").arg(4).query_async(&mut conn).await.unwrap();
    let app = t.trimmer(&["--progress-retention=1h"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    assert_eq!(report.trees_purged, 1, "{report:?}");
    assert_eq!(roots(&mut conn, &t.prefix).await, HashSet::from(["_uploads.alive".to_owned()]));
}
