//! Trimming runs against real Redis, one Redis and a Redis Cluster alike (`common::Target`):
//! safety capping on every partition of the request stream, policies by length and age, streams
//! without groups, vanished streams, idle consumers, metrics and the admin port.

mod common;

use std::time::Duration;

use cairn_progress::now_ms;
use cairn_redis::streams::{LeaseState, registry_key};
use cairn_requests::{RequestRecord, Submission};
use cairn_testkit::wait_until;
use common::{Target, add, create_group, ids, metrics, read};
use serde_json::json;
use stream_trimmer::trim_once;
use tokio_util::sync::CancellationToken;

on_redis_and_cluster!(
    pending_and_undelivered_entries_survive_maxlen_zero_and_the_run_is_capped,
    every_partition_of_the_request_stream_keeps_its_unacked_entries_under_its_streams_policy,
    the_slowest_group_decides_and_maxlen_keeps_the_newest,
    streams_without_groups_are_trimmed_by_age_and_approximately,
    vanished_streams_leave_the_registry_and_keep_policies_keep_everything,
    idle_consumers_without_entries_are_removed_and_owners_never,
    metrics_and_admin_port_report_the_streams,
    a_lease_not_renewed_passes_to_another_replica,
    a_partition_count_other_than_the_queues_is_reported,
);

/// A stream id as the pair of numbers it orders by (`"1-10"` comes after `"1-9"`, unlike text).
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or_else(|| panic!("not a stream id: {id}"));
    (ms.parse().expect("ms part"), seq.parse().expect("sequence part"))
}

async fn pending_and_undelivered_entries_survive_maxlen_zero_and_the_run_is_capped(t: &Target) {
    let mut conn = t.connection();
    let key = t.key("requests");
    create_group(&mut conn, &key, "processors").await;
    let all = add(&mut conn, &registry_key(&t.prefix), &key, 10).await;
    // Entries 0..4 delivered; 0 and 1 acked, 2..4 pending; 5..9 undelivered.
    assert_eq!(read(&mut conn, &key, "processors", "c1", 5).await, all[..5]);
    let _: () = redis::cmd("XACK")
        .arg(&key)
        .arg("processors")
        .arg(&all[0])
        .arg(&all[1])
        .query_async(&mut conn)
        .await
        .unwrap();

    let app = t.trimmer(&["--policy=requests=maxlen:0,exact"]).await;
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    assert!(report.acted(), "{report:?}");
    assert_eq!(report.capped(), ["requests"]);
    let stream = report.stream("requests").unwrap();
    assert_eq!(stream.outcome.trimmed, 2, "only the acked entries go: {stream:?}");
    assert_eq!(stream.outcome.safe.as_deref(), Some(all[2].as_str()), "the oldest pending entry");
    assert_eq!(stream.outcome.applied, stream.outcome.safe);
    let target = stream.outcome.target.as_deref().expect("a target");
    assert!(stream_id(target) > stream_id(&all[9]), "maxlen 0 asks for everything: {target} vs {}", all[9]);
    assert_eq!(ids(&mut conn, &key).await, all[2..]);
    let group = &stream.outcome.groups[0];
    assert_eq!((group.name.as_str(), group.pending, group.lag), ("processors", 3, Some(5)));
    assert!(metrics().contains("cairn_trimmer_capped_total{stream=\"requests\"}"), "{}", metrics());

    // Once everything delivered is acked and nothing waits, the stream may be emptied.
    let delivered = read(&mut conn, &key, "processors", "c1", 10).await;
    assert_eq!(delivered, all[5..]);
    let _: () =
        redis::cmd("XACK").arg(&key).arg("processors").arg(&all[2..]).query_async(&mut conn).await.unwrap();
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    assert!(report.capped().is_empty(), "{report:?}");
    assert_eq!(report.stream("requests").unwrap().outcome.trimmed, 8);
    assert!(ids(&mut conn, &key).await.is_empty());
}

/// Per partition of the request stream, as the processors leave it: two entries acked, two
/// pending, two not yet delivered. `requests=maxlen:0,exact` applies to every partition
/// (`requests:1` on one Redis, `requests{p1}` on a cluster) and removes the acked ones only.
async fn every_partition_of_the_request_stream_keeps_its_unacked_entries_under_its_streams_policy(
    t: &Target,
) {
    let queues = t.queues();
    queues.ensure_groups().await.unwrap();
    let mut conn = t.connection();
    let mut entries = Vec::new();
    for queue in queues.partitions() {
        let p = queue.names().partition;
        let mut sent = Vec::new();
        for i in 0..6 {
            let id = queues.new_id_in(Some(p));
            let record =
                RequestRecord::queued(id.clone(), Submission::new("echo", json!({"i": i})), 3, now_ms());
            let outcome = queue.submit(&record, None, 60_000, None).await.unwrap();
            let cairn_redis::requests::SubmitOutcome::Created { entry_id } = outcome else {
                panic!("{outcome:?}")
            };
            sent.push(entry_id);
        }
        let stream = &queue.names().stream;
        assert_eq!(read(&mut conn, stream, "processors", "c1", 4).await, sent[..4]);
        let _: () = redis::cmd("XACK")
            .arg(stream)
            .arg("processors")
            .arg(&sent[..2])
            .query_async(&mut conn)
            .await
            .unwrap();
        entries.push(sent);
    }

    let app = t.trimmer(&["--policy=requests=maxlen:0,exact"]).await;
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    for (queue, sent) in queues.partitions().iter().zip(&entries) {
        let stream = &queue.names().stream;
        let name = t.name(stream);
        let trimmed = report.stream(name).unwrap_or_else(|| panic!("{name} is trimmed: {report:?}"));
        assert_eq!((trimmed.policy.max_len, trimmed.policy.exact), (Some(0), true), "{name}");
        assert_eq!(trimmed.outcome.trimmed, 2, "only the acked entries of {name} go");
        assert!(trimmed.outcome.capped, "{name}");
        assert_eq!(
            trimmed.outcome.safe.as_deref(),
            Some(sent[2].as_str()),
            "{name}: the oldest pending entry"
        );
        assert_eq!(ids(&mut conn, stream).await, sent[2..], "{name}");
        let group = &trimmed.outcome.groups[0];
        assert_eq!((group.pending, group.lag), (2, Some(2)), "{name}");
    }

    // Everything delivered and acked: every partition may be emptied.
    for (queue, sent) in queues.partitions().iter().zip(&entries) {
        let stream = &queue.names().stream;
        assert_eq!(read(&mut conn, stream, "processors", "c1", 10).await, sent[4..]);
        let _: () = redis::cmd("XACK")
            .arg(stream)
            .arg("processors")
            .arg(&sent[2..])
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    assert!(report.capped().is_empty(), "{report:?}");
    for queue in queues.partitions() {
        let stream = &queue.names().stream;
        assert_eq!(report.stream(t.name(stream)).unwrap().outcome.trimmed, 4);
        assert!(ids(&mut conn, stream).await.is_empty(), "{stream}");
    }
}

async fn the_slowest_group_decides_and_maxlen_keeps_the_newest(t: &Target) {
    let mut conn = t.connection();
    let key = t.key("events");
    create_group(&mut conn, &key, "fast").await;
    create_group(&mut conn, &key, "slow").await;
    let all = add(&mut conn, &registry_key(&t.prefix), &key, 20).await;
    // fast: everything delivered and acked; slow: 12 delivered and acked, nothing pending.
    read(&mut conn, &key, "fast", "f", 20).await;
    let _: () = redis::cmd("XACK").arg(&key).arg("fast").arg(&all).query_async(&mut conn).await.unwrap();
    read(&mut conn, &key, "slow", "s", 12).await;
    let _: () =
        redis::cmd("XACK").arg(&key).arg("slow").arg(&all[..12]).query_async(&mut conn).await.unwrap();

    let app = t.trimmer(&["--policy=ev*=maxlen:5,exact"]).await;
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    let stream = report.stream("events").unwrap();
    assert!(stream.outcome.capped);
    assert_eq!(stream.outcome.trimmed, 12, "up to the first entry slow has not received");
    assert_eq!(ids(&mut conn, &key).await, all[12..]);

    read(&mut conn, &key, "slow", "s", 20).await;
    let _: () =
        redis::cmd("XACK").arg(&key).arg("slow").arg(&all[12..]).query_async(&mut conn).await.unwrap();
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    assert!(!report.stream("events").unwrap().outcome.capped);
    assert_eq!(ids(&mut conn, &key).await, all[15..], "exactly the newest 5");
}

async fn streams_without_groups_are_trimmed_by_age_and_approximately(t: &Target) {
    let mut conn = t.connection();
    let registry = registry_key(&t.prefix);
    let replies = t.key("replies:ingress-1");
    let now = now_ms();
    // Three entries two hours old, two recent.
    for (i, ms) in
        [now - 7_200_000, now - 7_200_000, now - 7_100_000, now - 1_000, now].into_iter().enumerate()
    {
        let _: String = redis::cmd("XADD")
            .arg(&replies)
            .arg(format!("{ms}-{i}"))
            .arg("n")
            .arg(i)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SADD").arg(&registry).arg(&replies).query_async(&mut conn).await.unwrap();
    // A long stream trimmed approximately: Redis drops whole nodes only, never below the target.
    let events = t.key("events");
    add(&mut conn, &registry, &events, 1_000).await;
    // Dead letters are kept until retried or deleted (CAIRN_DEAD_RETENTION=forever).
    let dead = t.key("dead");
    add(&mut conn, &registry, &dead, 100).await;

    let app = t.trimmer(&["--policy=replies:*=maxage:1h,exact", "--default-policy=maxlen:10"]).await;
    let report = trim_once(&app.deps(), now).await.unwrap();
    let stream = report.stream("replies:ingress-1").unwrap();
    assert_eq!(stream.outcome.trimmed, 3, "{stream:?}");
    assert_eq!(stream.outcome.safe, None, "no groups: nothing holds trimming back");
    assert_eq!(ids(&mut conn, &replies).await.len(), 2);
    let events = report.stream("events").unwrap();
    assert!(!events.policy.exact);
    assert!(events.outcome.trimmed > 0 && events.outcome.length >= 10, "{events:?}");
    assert_eq!(events.outcome.length + events.outcome.trimmed, 1_000);
    assert_eq!(ids(&mut conn, &dead).await.len(), 100, "the dead-letter stream is kept whole");
}

async fn vanished_streams_leave_the_registry_and_keep_policies_keep_everything(t: &Target) {
    let mut conn = t.connection();
    let registry = registry_key(&t.prefix);
    add(&mut conn, &registry, &t.key("audit"), 50).await;
    let _: () =
        redis::cmd("SADD").arg(&registry).arg(t.key("replies:gone")).query_async(&mut conn).await.unwrap();
    let app = t.trimmer(&["--policy=audit=keep", "--default-policy=maxlen:1,exact"]).await;
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    assert_eq!(report.unregistered, ["replies:gone"]);
    let audit = report.stream("audit").unwrap();
    assert_eq!((audit.outcome.trimmed, audit.outcome.length, audit.outcome.target.as_deref()), (0, 50, None));
    let members: Vec<String> = redis::cmd("SMEMBERS").arg(&registry).query_async(&mut conn).await.unwrap();
    assert_eq!(members, [t.key("audit")]);
}

async fn idle_consumers_without_entries_are_removed_and_owners_never(t: &Target) {
    let mut conn = t.connection();
    let key = t.key("requests");
    create_group(&mut conn, &key, "processors").await;
    add(&mut conn, &registry_key(&t.prefix), &key, 1).await;
    assert_eq!(read(&mut conn, &key, "processors", "owner", 1).await.len(), 1);
    let created: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&key)
        .arg("processors")
        .arg("idle")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(created, 1);
    let app = t.trimmer(&["--consumer-idle=100ms"]).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    let removed: Vec<&str> = report.consumers_removed.iter().map(|c| c.removed.consumer.as_str()).collect();
    assert_eq!(removed, ["idle"]);
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&key)
        .arg("processors")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(consumers.len(), 1, "the owner of a pending entry stays");
}

async fn metrics_and_admin_port_report_the_streams(t: &Target) {
    let mut conn = t.connection();
    let key = t.key("metered");
    create_group(&mut conn, &key, "readers").await;
    add(&mut conn, &registry_key(&t.prefix), &key, 30).await;
    read(&mut conn, &key, "readers", "r", 4).await;
    let app = t.trimmer(&["--interval=50ms", "--policy=metered=maxlen:1,exact"]).await;
    let mut reports = app.subscribe();
    let admin = app.admin_addr();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    let report = reports.recv().await.unwrap();
    assert!(report.acted());
    let page = metrics();
    for line in [
        "cairn_stream_length{stream=\"metered\"} 30",
        "cairn_stream_group_pending{stream=\"metered\",group=\"readers\"} 4",
        "cairn_stream_group_lag{stream=\"metered\",group=\"readers\"} 26",
        "cairn_trimmer_trimmed_total{stream=\"metered\"} 0",
        "cairn_trimmer_last_run_timestamp_seconds",
    ] {
        assert!(page.contains(line), "{line} missing in:\n{page}");
    }
    cairn_runtime::healthcheck(&format!("http://{admin}/healthz")).await.unwrap();
    cairn_runtime::healthcheck(&format!("http://{admin}/readyz")).await.unwrap();
    shutdown.cancel();
    running.await.unwrap().unwrap();
    // Shutdown hands the lease back at once.
    let holder: Option<String> =
        redis::cmd("GET").arg(t.key("trimmer:lease")).query_async(&mut conn).await.unwrap();
    assert_eq!(holder, None);
    assert!(matches!(report.lease, LeaseState::Acquired));
}

async fn a_lease_not_renewed_passes_to_another_replica(t: &Target) {
    let (a, b) = (t.trimmer(&["--interval=100ms"]).await, t.trimmer(&["--interval=100ms"]).await);
    assert_eq!(trim_once(&a.deps(), now_ms()).await.unwrap().lease, LeaseState::Acquired);
    assert_eq!(trim_once(&a.deps(), now_ms()).await.unwrap().lease, LeaseState::Renewed);
    let idle = trim_once(&b.deps(), now_ms()).await.unwrap();
    assert_eq!(idle.lease, LeaseState::HeldBy(a.instance().to_owned()));
    assert!(idle.streams.is_empty() && !idle.acted());
    // a stops renewing (a crash): b takes over once three intervals passed.
    wait_until("b takes the lease", Duration::from_secs(5), || async {
        trim_once(&b.deps(), now_ms()).await.unwrap().acted()
    })
    .await
    .unwrap();
    assert!(!trim_once(&a.deps(), now_ms()).await.unwrap().acted());
}

async fn a_partition_count_other_than_the_queues_is_reported(t: &Target) {
    let app = t.trimmer(&[]).await;
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    assert!(report.errors.is_empty(), "nothing recorded, nothing to say: {report:?}");
    let key = cairn_redis::keys::requests::partitions(&t.prefix, "requests");
    let mut conn = t.connection();
    let _: () = redis::cmd("SET").arg(&key).arg(t.partitions).query_async(&mut conn).await.unwrap();
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    assert!(report.errors.is_empty(), "the queue's own count: {report:?}");
    let other = t.partitions + 2;
    let _: () = redis::cmd("SET").arg(&key).arg(other).query_async(&mut conn).await.unwrap();
    let report = trim_once(&app.deps(), now_ms()).await.unwrap();
    let expected = format!(
        "CAIRN_REQUEST_PARTITIONS={}, but the request queue records {other} partitions",
        t.partitions
    );
    assert!(report.errors.iter().any(|e| e.contains(&expected)), "{:?}", report.errors);
    assert!(report.acted(), "the run goes on: {report:?}");
}
