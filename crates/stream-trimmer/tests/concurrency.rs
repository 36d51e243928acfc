//! The trimmer under load: producers, two in-process request processors, a "ghost" consumer
//! that takes entries and never answers (so the processors must reclaim them), a probe that
//! scans the pending lists with XAUTOCLAIM, and the trimmer every 200 ms with `maxlen 10` exact.
//! Every request produced must succeed, and no pending entry may ever be trimmed away. It runs on
//! one Redis with one and with three request partitions, and on a Redis Cluster of three masters
//! with three partitions (each partition's stream its own slot, trimmed on its own).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_progress::now_ms;
use cairn_redis::requests::SubmitOutcome;
use cairn_requests::{RequestRecord, RequestState, Submission};
use cairn_testkit::{AmqpVhost, wait_until};
use clap::Parser;
use common::{Target, metrics};
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply};
use serde_json::json;
use stream_trimmer::trim_once;
use tokio_util::sync::CancellationToken;

const LOAD: Duration = Duration::from_secs(5);

on_redis_and_cluster!(trimming_under_load_never_loses_a_request);

async fn trimming_under_load_never_loses_a_request(target: &Target) {
    let vhost = AmqpVhost::new().await;
    let queues = target.queues();
    queues.ensure_groups().await.unwrap();
    let streams: Vec<String> = queues.partitions().iter().map(|q| q.names().stream.clone()).collect();
    let stop_services = CancellationToken::new();
    let _stop_services = stop_services.clone().drop_guard();

    let mut processors = Vec::new();
    for name in ["p1", "p2"] {
        let config = request_processor::Config::try_parse_from([
            "request-processor".to_owned(),
            format!("--redis-url={}", target.config.url),
            format!("--redis-cluster={}", target.is_cluster()),
            format!("--key-prefix={}", target.prefix),
            format!("--request-partitions={}", target.partitions),
            format!("--amqp-url={}", vhost.url),
            "--admin-addr=127.0.0.1:0".into(),
            format!("--name={name}"),
            "--concurrency=8".into(),
            "--heartbeat-interval=200ms".into(),
            "--lease-timeout=1s".into(),
        ])
        .unwrap();
        let app = request_processor::App::build(config).await.unwrap();
        processors.push(tokio::spawn(app.run(stop_services.clone())));
    }
    let trimmer = target.trimmer(&["--interval=200ms", "--policy=requests=maxlen:10,exact"]).await;
    let deps = trimmer.deps();
    let mut reports = trimmer.subscribe();
    let trimmer_run = tokio::spawn(trimmer.run(stop_services.clone()));
    let trimmed = Arc::new(AtomicU64::new(0));
    let counting = {
        let trimmed = trimmed.clone();
        tokio::spawn(async move {
            while let Ok(report) = reports.recv().await {
                trimmed.fetch_add(report.trimmed(), Ordering::SeqCst);
            }
        })
    };

    let stop_load = CancellationToken::new();
    let started = Instant::now();
    let producers: Vec<_> = (0..2)
        .map(|_| {
            let (queues, stop) = (queues.clone(), stop_load.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while !stop.is_cancelled() {
                    let id = queues.new_id(None);
                    let record = RequestRecord::queued(
                        id.clone(),
                        Submission::new("echo", json!({"id": id})),
                        3,
                        now_ms(),
                    );
                    let outcome = queues.of(&id).submit(&record, None, 60_000, None).await.unwrap();
                    assert!(matches!(outcome, SubmitOutcome::Created { .. }));
                    ids.push(id);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                ids
            })
        })
        .collect();
    // Takes a few entries of one partition after another now and then and never answers: they
    // stay pending until a processor reclaims them after the lease timeout, while the trimmer
    // runs every 200 ms. (One stream per read: on a cluster the partitions are in other slots.)
    let ghost = {
        let (mut conn, streams, stop) = (target.connection(), streams.clone(), stop_load.clone());
        tokio::spawn(async move {
            let mut taken = BTreeSet::new();
            for stream in streams.iter().cycle() {
                if stop.is_cancelled() {
                    break;
                }
                // Blocked like the processors, it gets its turn when entries arrive.
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("processors")
                    .arg("ghost")
                    .arg("COUNT")
                    .arg(3)
                    .arg("BLOCK")
                    .arg(200)
                    .arg("STREAMS")
                    .arg(stream)
                    .arg(">")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let entries = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
                taken.extend(entries.map(|e| (stream.clone(), e.id)));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            taken
        })
    };
    // Scans every partition's pending list without claiming anything (min idle 1 h): XAUTOCLAIM
    // reports the ids of pending entries that are no longer in the stream.
    let probe = {
        let (mut conn, streams, stop) = (target.connection(), streams.clone(), stop_services.clone());
        tokio::spawn(async move {
            let mut deleted = Vec::new();
            while !stop.is_cancelled() {
                for stream in &streams {
                    let mut cursor = "0-0".to_owned();
                    loop {
                        let reply: StreamAutoClaimReply = redis::AsyncCommands::xautoclaim_options(
                            &mut conn,
                            stream,
                            "processors",
                            "probe",
                            3_600_000,
                            &cursor,
                            StreamAutoClaimOptions::default().count(1000),
                        )
                        .await
                        .unwrap();
                        deleted.extend(reply.deleted_ids.into_iter().map(|id| format!("{stream} {id}")));
                        if reply.next_stream_id == "0-0" {
                            break;
                        }
                        cursor = reply.next_stream_id;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            deleted
        })
    };

    tokio::time::sleep(LOAD).await;
    stop_load.cancel();
    let mut produced = Vec::new();
    for producer in producers {
        produced.extend(producer.await.unwrap());
    }
    let ghost_taken = ghost.await.unwrap();
    assert!(produced.len() > 200, "only {} requests in {:?}", produced.len(), started.elapsed());
    assert!(!ghost_taken.is_empty(), "the ghost consumer took entries");
    for queue in queues.partitions() {
        let in_partition = produced.iter().filter(|id| queues.of(id).names() == queue.names()).count();
        assert!(in_partition > 20, "only {in_partition} requests in {}", queue.names().stream);
    }

    wait_until("every request produced has succeeded", Duration::from_secs(90), || async {
        let refs: Vec<&str> = produced.iter().map(String::as_str).collect();
        let records = queues.records(&refs).await.unwrap();
        records.iter().all(|r| r.as_ref().is_some_and(|r| r.state == RequestState::Succeeded))
    })
    .await
    .unwrap();
    for id in &produced {
        let record = queues.record(id).await.unwrap().unwrap();
        assert_eq!(record.result, Some(json!({"id": id})), "{id}");
    }

    // The ghost never acked: its entries were done by the processors only after they reclaimed
    // them, and nothing of theirs is pending any more.
    let mut conn = target.connection();
    for stream in &streams {
        let pending: redis::streams::StreamPendingReply =
            redis::cmd("XPENDING").arg(stream).arg("processors").query_async(&mut conn).await.unwrap();
        assert_eq!(pending.count(), 0, "{stream} still has pending entries");
    }

    // With everything acked, a run trims every partition's stream down to the policy.
    let report = trim_once(&deps, now_ms()).await.unwrap();
    stop_services.cancel();
    let deleted = probe.await.unwrap();
    trimmer_run.await.unwrap().unwrap();
    for processor in processors {
        processor.await.unwrap().unwrap();
    }
    counting.abort();

    eprintln!(
        "produced {} in {} partitions, ghost took {}, trimmed {} while loaded",
        produced.len(),
        target.partitions,
        ghost_taken.len(),
        trimmed.load(Ordering::SeqCst)
    );
    assert!(deleted.is_empty(), "pending entries were trimmed away: {deleted:?}");
    let page = metrics();
    assert!(
        !page.lines().any(|l| l.starts_with("cairn_requests_pending_trimmed_total") && !l.ends_with(" 0")),
        "processors found trimmed pending entries:\n{page}"
    );
    assert!(
        trimmed.load(Ordering::SeqCst) + report.trimmed() > produced.len() as u64 / 2,
        "the trimmer kept the streams short while the load ran"
    );
    for stream in &streams {
        let length = report.streams.iter().find(|s| &s.key == stream).map(|s| s.outcome.length);
        assert_eq!(length, Some(10), "{stream} after the last run");
    }
}
