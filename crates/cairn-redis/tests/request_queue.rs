//! The request queue's functions with several partitions, on real Redis and on a Redis Cluster of
//! three masters (the same tests on both, `common::Target`): every request lands in its own
//! partition, each call touches one slot, and what a cluster's call leaves to its caller (the
//! request's progress node, the reply) is written all the same.

mod common;

use std::collections::BTreeSet;

use cairn_progress::{Key, Update};
use cairn_redis::progress::ReadOptions;
use cairn_redis::requests::{
    CancelOutcome, Commit, Entry, QueueLayout, RequestQueue, RequestQueues, RetryOutcome, Start,
    SubmitOutcome,
};
use cairn_requests::{RequestRecord, RequestState, Submission};
use common::Target;
use redis::AsyncCommands;
use serde_json::json;

on_redis_and_cluster!(
    requests_spread_over_partitions_run_and_answer,
    idempotency_keys_find_their_request_in_its_partition,
    dead_letters_and_listings_merge_across_partitions,
    a_canceled_queued_request_is_answered_and_shown,
    the_partition_count_changes_only_when_no_request_is_unfinished,
);

const PARTITIONS: u16 = 4;

fn queues(target: &Target) -> RequestQueues {
    let layout = QueueLayout::new(&target.prefix, "requests", "processors").with_partitions(PARTITIONS);
    RequestQueues::new(target.connection(), layout)
}

fn submission(idempotency_key: Option<&str>) -> Submission {
    Submission {
        handler: "echo".to_owned(),
        payload: json!({"n": 1}),
        progress_key: None,
        max_attempts: Some(1),
        timeout_ms: None,
        idempotency_key: idempotency_key.map(str::to_owned),
        streams: Default::default(),
    }
}

/// Submits a new request (its node saying `queued`) with the reply going to `reply_to`.
async fn submit(queues: &RequestQueues, reply_to: Option<&str>) -> RequestRecord {
    let record = RequestRecord::queued(queues.new_id(None), submission(None), 1, 1_000);
    let queue = queues.of(&record.id);
    let first = Update::new().status("queued");
    let outcome = queue.submit(&record, reply_to, 60_000, Some(&first)).await.unwrap();
    assert!(matches!(outcome, SubmitOutcome::Created { .. }), "{outcome:?}");
    record
}

/// Reads every new entry of one partition as `consumer`.
async fn read_all(target: &Target, queue: &RequestQueue, consumer: &str) -> Vec<Entry> {
    let mut conn = target.config.dedicated_connection().await.unwrap();
    queue.read_new(&mut conn, consumer, 100, 1).await.unwrap()
}

async fn node_status(target: &Target, key: &Key) -> Option<String> {
    let node = target.store().get(key, &ReadOptions::default()).await.unwrap()?;
    node.fields.get("status").and_then(|s| s.as_str()).map(str::to_owned)
}

async fn requests_spread_over_partitions_run_and_answer(target: &Target) {
    let queues = queues(target);
    queues.ensure_groups().await.unwrap();
    let reply_stream = cairn_redis::keys::requests::replies(&target.prefix, "replica-1");
    let mut records = Vec::new();
    for _ in 0..24 {
        records.push(submit(&queues, Some(&reply_stream)).await);
    }
    let used: BTreeSet<u16> = records.iter().map(|r| queues.layout().partition_of(&r.id)).collect();
    assert!(used.len() > 1, "24 ids fell in one partition: {used:?}");
    for record in &records {
        assert_eq!(
            node_status(target, &record.progress_key).await.as_deref(),
            Some("queued"),
            "{}",
            record.id
        );
    }

    // Each partition's reader sees exactly its own requests; start, renew and commit them.
    let mut seen = BTreeSet::new();
    for queue in queues.partitions() {
        let entries = read_all(target, queue, "p1").await;
        for entry in &entries {
            assert_eq!(queues.layout().partition_of(&entry.request_id), queue.names().partition);
            seen.insert(entry.request_id.clone());
        }
        if entries.is_empty() {
            continue;
        }
        let starts = queue.start("p1", &entries, 2_000).await.unwrap();
        assert!(starts.iter().all(|s| matches!(s, Start::Run { attempt: 1, .. })), "{starts:?}");
        let renewals: Vec<_> = entries
            .iter()
            .map(|entry| cairn_redis::requests::Renewal { entry: entry.clone(), progress: Some(0.5) })
            .collect();
        let beats = queue.heartbeat("p1", &renewals, 2_500).await.unwrap();
        assert!(beats.iter().all(|b| *b == cairn_redis::requests::Heartbeat::Renewed), "{beats:?}");
        // Another consumer cannot commit them: the fence holds per partition.
        let commits: Vec<Commit> = entries
            .iter()
            .map(|entry| Commit {
                entry: entry.clone(),
                state: RequestState::Succeeded,
                result: Some(json!({"ok": entry.request_id})),
                error: None,
            })
            .collect();
        assert!(queue.commit("intruder", &commits, 2_900).await.unwrap().iter().all(|stored| !stored));
        assert!(queue.commit("p1", &commits, 3_000).await.unwrap().iter().all(|stored| *stored));
    }
    let all: BTreeSet<String> = records.iter().map(|r| r.id.clone()).collect();
    assert_eq!(seen, all);

    // Every request is stored as succeeded, its node says finished, and its reply arrived.
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    for (record, stored) in records.iter().zip(queues.records(&ids).await.unwrap()) {
        let stored = stored.unwrap_or_else(|| panic!("{} has no record", record.id));
        assert_eq!(stored.state, RequestState::Succeeded);
        assert_eq!(stored.result, Some(json!({"ok": record.id})));
        assert_eq!(node_status(target, &record.progress_key).await.as_deref(), Some("finished"));
    }
    let mut conn = target.config.dedicated_connection().await.unwrap();
    let replies = RequestQueue::read_replies(&mut conn, &reply_stream, "0", 1000, 1).await.unwrap();
    let answered: BTreeSet<String> = replies.into_iter().map(|(_, id)| id).collect();
    assert_eq!(answered, all);
    let ttl: i64 = target.connection().pttl(&reply_stream).await.unwrap();
    assert!(ttl > 0, "the reply stream expires with its replica: {ttl}");
    let registry = cairn_redis::keys::retention::registry(&target.prefix);
    let registered: BTreeSet<String> = target.connection().smembers(&registry).await.unwrap();
    assert!(registered.contains(&reply_stream), "{registered:?}");
    for queue in queues.partitions() {
        assert!(registered.contains(&queue.names().stream), "{registered:?}");
    }
    assert_eq!(queues.lag().await.unwrap(), Some(0));
}

async fn idempotency_keys_find_their_request_in_its_partition(target: &Target) {
    let queues = queues(target);
    queues.ensure_groups().await.unwrap();
    for key in ["order-1", "order-2", "order-3", "order-4", "order-5"] {
        let id = queues.new_id(Some(key));
        let record = RequestRecord::queued(id.clone(), submission(Some(key)), 1, 1_000);
        let outcome = queues.of(&id).submit(&record, None, 60_000, None).await.unwrap();
        assert!(matches!(outcome, SubmitOutcome::Created { .. }), "{outcome:?}");
        assert_eq!(queues.idempotent(key, &record.fingerprint).await.unwrap(), Some((id.clone(), true)));
        // A repeat with a fresh id is answered with the first one, from the key's partition.
        let again = RequestRecord::queued(queues.new_id(Some(key)), submission(Some(key)), 1, 2_000);
        let outcome = queues.of(&again.id).submit(&again, None, 60_000, None).await.unwrap();
        assert_eq!(outcome, SubmitOutcome::Existing { id: id.clone() });
        let mut changed = submission(Some(key));
        changed.payload = json!({"n": 2});
        let conflict = RequestRecord::queued(queues.new_id(Some(key)), changed, 1, 3_000);
        let outcome = queues.of(&conflict.id).submit(&conflict, None, 60_000, None).await.unwrap();
        assert_eq!(outcome, SubmitOutcome::Conflict { id });
    }
}

async fn dead_letters_and_listings_merge_across_partitions(target: &Target) {
    let queues = queues(target);
    queues.ensure_groups().await.unwrap();
    let mut records = Vec::new();
    for _ in 0..12 {
        records.push(submit(&queues, None).await);
        // distinct milliseconds, so newest-first is the submission order reversed
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let newest: Vec<String> =
        queues.newest(None, 100).await.unwrap().into_iter().map(|e| e.request_id).collect();
    let expected: Vec<String> = records.iter().rev().map(|r| r.id.clone()).collect();
    assert_eq!(newest, expected);
    // Paging by entry id walks all partitions without a gap or a repeat.
    let first = queues.newest(None, 5).await.unwrap();
    let rest = queues.newest(Some(&first[4].entry_id), 100).await.unwrap();
    let paged: Vec<String> = first.iter().chain(&rest).map(|e| e.request_id.clone()).collect();
    assert_eq!(paged, expected);

    // Every request fails for good (one attempt): each partition dead-letters its own.
    for queue in queues.partitions() {
        let entries = read_all(target, queue, "p1").await;
        if entries.is_empty() {
            continue;
        }
        queue.start("p1", &entries, 2_000).await.unwrap();
        let commits: Vec<Commit> = entries
            .iter()
            .map(|entry| Commit {
                entry: entry.clone(),
                state: RequestState::Dead,
                result: None,
                error: Some(format!("boom {}", entry.request_id)),
            })
            .collect();
        queue.commit("p1", &commits, 3_000).await.unwrap();
    }
    let letters = queues.dead_letters("-", 100).await.unwrap();
    let dead: BTreeSet<String> = letters.iter().map(|l| l.request_id.clone()).collect();
    assert_eq!(dead, records.iter().map(|r| r.id.clone()).collect());
    assert!(letters.iter().all(|l| l.error == format!("boom {}", l.request_id)));
    for record in &records {
        assert_eq!(node_status(target, &record.progress_key).await.as_deref(), Some("failed"));
    }

    // A retried dead letter runs again in its own partition.
    let retried = &records[0];
    let outcome = queues.retry_dead(&retried.id, 4_000).await.unwrap();
    assert!(matches!(outcome, RetryOutcome::Queued { .. }), "{outcome:?}");
    let entries = read_all(target, queues.of(&retried.id), "p2").await;
    assert_eq!(entries.iter().map(|e| e.request_id.as_str()).collect::<Vec<_>>(), vec![retried.id.as_str()]);
    assert_eq!(queues.retry_dead(&retried.id, 4_000).await.unwrap(), RetryOutcome::NotDead("queued".into()));
}

async fn a_canceled_queued_request_is_answered_and_shown(target: &Target) {
    let queues = queues(target);
    queues.ensure_groups().await.unwrap();
    let reply_stream = cairn_redis::keys::requests::replies(&target.prefix, "replica-2");
    let record = submit(&queues, Some(&reply_stream)).await;
    assert_eq!(queues.cancel(&record.id, 1_500).await.unwrap(), CancelOutcome::Canceled);
    assert_eq!(
        queues.cancel(&record.id, 1_600).await.unwrap(),
        CancelOutcome::AlreadyFinished("canceled".into())
    );
    assert_eq!(queues.cancel("no-such-request", 1_600).await.unwrap(), CancelOutcome::Missing);
    assert_eq!(node_status(target, &record.progress_key).await.as_deref(), Some("canceled"));
    let mut conn = target.config.dedicated_connection().await.unwrap();
    let replies = RequestQueue::read_replies(&mut conn, &reply_stream, "0", 10, 1).await.unwrap();
    assert_eq!(replies.into_iter().map(|(_, id)| id).collect::<Vec<_>>(), vec![record.id.clone()]);
    // The processor that receives the entry acks it without running it.
    let queue = queues.of(&record.id);
    let entries = read_all(target, queue, "p1").await;
    assert_eq!(queue.start("p1", &entries, 2_000).await.unwrap(), vec![Start::Skip]);
    assert_eq!(queues.lag().await.unwrap(), Some(0));
}

/// On a cluster a finished entry is acked only once its reply (and node) are written: when that
/// fails — or its processor dies first — the entry stays pending, and the processor that
/// reclaims it finds the request finished, tells again and acks.
#[tokio::test]
async fn on_a_cluster_an_entry_is_acked_only_after_what_its_step_left_is_written() {
    let target = Target::cluster().await;
    let queues = queues(&target);
    queues.ensure_groups().await.unwrap();
    let reply_stream = cairn_redis::keys::requests::replies(&target.prefix, "replica-3");
    let record = submit(&queues, Some(&reply_stream)).await;
    let queue = queues.of(&record.id);
    let entries = read_all(&target, queue, "p1").await;
    assert!(matches!(queue.start("p1", &entries, 2_000).await.unwrap()[..], [Start::Run { .. }]));

    // The reply stream's key holds a string: the reply cannot be written.
    let mut conn = target.connection();
    let _: () = conn.set(&reply_stream, "not a stream").await.unwrap();
    let commit =
        Commit { entry: entries[0].clone(), state: RequestState::Succeeded, result: None, error: None };
    assert_eq!(queue.commit("p1", &[commit], 3_000).await.unwrap(), vec![true]);
    let stored = queues.records(&[record.id.as_str()]).await.unwrap().remove(0).unwrap();
    assert_eq!(stored.state, RequestState::Succeeded);
    let pending: redis::streams::StreamPendingReply =
        conn.xpending(&queue.names().stream, &queue.names().group).await.unwrap();
    assert_eq!(pending.count(), 1, "the entry waits for its reply");

    // Once the reply can be written, whoever reclaims the entry answers and acks it.
    let _: () = conn.del(&reply_stream).await.unwrap();
    let reclaimed = queue.reclaim("p2", 0, 10).await.unwrap();
    assert_eq!(reclaimed, entries);
    assert_eq!(queue.start("p2", &reclaimed, 4_000).await.unwrap(), vec![Start::Skip]);
    let pending: redis::streams::StreamPendingReply =
        conn.xpending(&queue.names().stream, &queue.names().group).await.unwrap();
    assert_eq!(pending.count(), 0);
    assert_eq!(node_status(&target, &record.progress_key).await.as_deref(), Some("finished"));
    let mut dedicated = target.config.dedicated_connection().await.unwrap();
    let replies = RequestQueue::read_replies(&mut dedicated, &reply_stream, "0", 10, 1).await.unwrap();
    assert_eq!(replies.into_iter().map(|(_, id)| id).collect::<Vec<_>>(), vec![record.id.clone()]);
}

async fn the_partition_count_changes_only_when_no_request_is_unfinished(target: &Target) {
    let queues = queues(target);
    let key = cairn_redis::keys::requests::partitions(&target.prefix, "requests");
    assert_eq!(queues.check_partitions().await.unwrap(), None, "the first count is recorded");
    let recorded: String = target.connection().get(&key).await.unwrap();
    assert_eq!(recorded, PARTITIONS.to_string());
    queues.prepare().await.unwrap();

    let two = RequestQueues::new(
        target.connection(),
        QueueLayout::new(&target.prefix, "requests", "processors").with_partitions(2),
    );
    let refused = |error: cairn_redis::requests::QueueError, unfinished: u64| {
        let text = error.to_string();
        assert!(
            matches!(error, cairn_redis::requests::QueueError::PartitionsChanged { configured: 2, recorded: 4, unfinished: u, .. } if u == unfinished),
            "{text}"
        );
        assert!(text.contains("CAIRN_REQUEST_PARTITIONS=4"), "{text}");
    };
    // Queued, then delivered and running: unfinished either way.
    let record = submit(&queues, None).await;
    refused(two.prepare().await.unwrap_err(), 1);
    let queue = queues.of(&record.id);
    let entries = read_all(target, queue, "p1").await;
    queue.start("p1", &entries, 2_000).await.unwrap();
    refused(two.check_partitions().await.unwrap_err(), 1);
    let recorded: String = target.connection().get(&key).await.unwrap();
    assert_eq!(recorded, "4", "a refused count is not recorded");

    let commit =
        Commit { entry: entries[0].clone(), state: RequestState::Succeeded, result: None, error: None };
    assert_eq!(queue.commit("p1", &[commit], 3_000).await.unwrap(), vec![true]);
    assert_eq!(two.check_partitions().await.unwrap(), Some(4), "nothing unfinished: the change is taken");
    let recorded: String = target.connection().get(&key).await.unwrap();
    assert_eq!(recorded, "2");
    assert_eq!(two.check_partitions().await.unwrap(), None);
}
