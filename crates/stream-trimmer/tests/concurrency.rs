//! The trimmer under load: producers, two in-process request processors, a "ghost" consumer
//! that takes entries and never answers (so the processors must reclaim them), a probe that
//! scans the pending list with XAUTOCLAIM, and the trimmer every 200 ms with `maxlen 10` exact.
//! Every request produced must succeed, and no pending entry may ever be trimmed away.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_progress::now_ms;
use cairn_redis::RedisConfig;
use cairn_redis::requests::{QueueNames, RequestQueue, SubmitOutcome};
use cairn_requests::{RequestRecord, RequestState, Submission, new_request_id};
use cairn_testkit::{AmqpVhost, RedisNamespace, wait_until};
use clap::Parser;
use common::{metrics, trimmer};
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply};
use serde_json::json;
use stream_trimmer::trim_once;
use tokio_util::sync::CancellationToken;

const LOAD: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trimming_under_load_never_loses_a_request() {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let names = QueueNames::new(&ns.prefix, "requests", "processors");
    let stream = names.stream.clone();
    let queue =
        RequestQueue::new(RedisConfig::new(ns.url.clone(), ns.prefix.clone()).manager().unwrap(), names);
    queue.ensure_group().await.unwrap();
    let stop_services = CancellationToken::new();
    let _stop_services = stop_services.clone().drop_guard();

    let mut processors = Vec::new();
    for name in ["p1", "p2"] {
        let config = request_processor::Config::try_parse_from([
            "request-processor".to_owned(),
            format!("--redis-url={}", ns.url),
            format!("--key-prefix={}", ns.prefix),
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
    let trimmer = trimmer(&ns, &["--interval=200ms", "--policy=requests=maxlen:10,exact"]).await;
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
            let (queue, stop) = (queue.clone(), stop_load.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while !stop.is_cancelled() {
                    let id = new_request_id();
                    let record = RequestRecord::queued(
                        id.clone(),
                        Submission::new("echo", json!({"id": id})),
                        3,
                        now_ms(),
                    );
                    let outcome = queue.submit(&record, None, 60_000, None).await.unwrap();
                    assert!(matches!(outcome, SubmitOutcome::Created { .. }));
                    ids.push(id);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                ids
            })
        })
        .collect();
    // Takes a few entries now and then and never answers: they stay pending until a processor
    // reclaims them after the lease timeout, while the trimmer runs every 200 ms.
    let ghost = {
        let (mut conn, stream, stop) = (ns.connection().await, stream.clone(), stop_load.clone());
        tokio::spawn(async move {
            let mut taken = 0;
            while !stop.is_cancelled() {
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
                    .arg(&stream)
                    .arg(">")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                taken += reply.map_or(0, |r| r.keys.iter().map(|k| k.ids.len()).sum());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            taken
        })
    };
    // Scans the whole pending list without claiming anything (min idle 1 h): XAUTOCLAIM reports
    // the ids of pending entries that are no longer in the stream.
    let probe = {
        let (mut conn, stream, stop) = (ns.connection().await, stream.clone(), stop_services.clone());
        tokio::spawn(async move {
            let mut deleted = Vec::new();
            while !stop.is_cancelled() {
                let mut cursor = "0-0".to_owned();
                loop {
                    let reply: StreamAutoClaimReply = redis::AsyncCommands::xautoclaim_options(
                        &mut conn,
                        &stream,
                        "processors",
                        "probe",
                        3_600_000,
                        &cursor,
                        StreamAutoClaimOptions::default().count(1000),
                    )
                    .await
                    .unwrap();
                    deleted.extend(reply.deleted_ids);
                    if reply.next_stream_id == "0-0" {
                        break;
                    }
                    cursor = reply.next_stream_id;
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
    assert!(ghost_taken > 0, "the ghost consumer took entries");

    wait_until("every request produced has succeeded", Duration::from_secs(90), || async {
        let mut done = 0;
        for id in &produced {
            if queue.record(id).await.unwrap().is_some_and(|r| r.state == RequestState::Succeeded) {
                done += 1;
            }
        }
        done == produced.len()
    })
    .await
    .unwrap();
    for id in &produced {
        let record = queue.record(id).await.unwrap().unwrap();
        assert_eq!(record.result, Some(json!({"id": id})), "{id}");
    }

    // With everything acked, a run trims the stream down to the policy.
    let report = trim_once(&deps, now_ms()).await.unwrap();
    let final_length = report.stream("requests").map(|s| s.outcome.length);
    stop_services.cancel();
    let deleted = probe.await.unwrap();
    trimmer_run.await.unwrap().unwrap();
    for processor in processors {
        processor.await.unwrap().unwrap();
    }
    counting.abort();

    eprintln!(
        "produced {}, ghost took {ghost_taken}, trimmed {} while loaded",
        produced.len(),
        trimmed.load(Ordering::SeqCst)
    );
    assert!(deleted.is_empty(), "pending entries were trimmed away: {deleted:?}");
    let page = metrics();
    assert!(
        !page.lines().any(|l| l.starts_with("cairn_requests_pending_trimmed_total") && !l.ends_with(" 0")),
        "processors found trimmed pending entries:\n{page}"
    );
    assert!(
        page.lines().any(|l| l.starts_with("cairn_requests_reclaimed_total") && !l.ends_with(" 0")),
        "the ghost's entries were reclaimed by the processors:\n{page}"
    );
    assert!(
        trimmed.load(Ordering::SeqCst) + report.trimmed() > produced.len() as u64 / 2,
        "the trimmer kept the stream short while the load ran"
    );
    assert_eq!(final_length, Some(10));
}
