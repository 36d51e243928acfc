//! The custom handler's sub-steps appear in the progress tree and roll up into the request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_progress::Key;
use cairn_redis::progress::ReadOptions;
use cairn_redis::requests::{QueueNames, RequestQueue};
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_requests::{RequestRecord, RequestState, Submission, new_request_id};
use cairn_testkit::{AmqpVhost, RedisNamespace, wait_until};
use clap::Parser;
use request_processor::HandlerSet;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn steps_report_sub_progress_that_rolls_up() {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let common = [
        format!("--redis-url={}", ns.url),
        format!("--key-prefix={}", ns.prefix),
        format!("--amqp-url={}", vhost.url),
        "--shards=1".to_owned(),
    ];
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();

    let mut args = vec![
        "progress-aggregator".to_owned(),
        "--grpc-addr=127.0.0.1:0".into(),
        "--admin-addr=127.0.0.1:0".into(),
    ];
    args.extend(common.iter().cloned());
    let aggregator =
        progress_aggregator::App::build(progress_aggregator::Config::try_parse_from(args).unwrap())
            .await
            .unwrap();
    tokio::spawn(aggregator.run(cancel.clone()));

    let mut args = vec![
        "request-processor".to_owned(),
        "--admin-addr=127.0.0.1:0".into(),
        "--heartbeat-interval=200ms".into(),
        "--lease-timeout=2s".into(),
    ];
    args.extend(common.iter().filter(|a| !a.starts_with("--shards")).cloned());
    let config = request_processor::Config::try_parse_from(args).unwrap();
    let handlers = HandlerSet::new().with("steps", example_processor::Steps);
    let processor = request_processor::App::build_with_handlers(config, handlers).await.unwrap();
    tokio::spawn(processor.run(cancel.clone()));

    let redis = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
    let queue =
        RequestQueue::new(redis.manager().unwrap(), QueueNames::new(&ns.prefix, "requests", "processors"));
    let store = ProgressStore::new(redis.manager().unwrap(), ns.prefix.clone());
    let id = new_request_id();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let record = RequestRecord::queued(
        id.clone(),
        Submission::new("steps", json!({"steps": 3, "step_ms": 300})),
        3,
        now,
    );
    queue.ensure_group().await.unwrap();
    queue.submit(&record, None, 60_000, None).await.unwrap();

    let key = Key::parse(&format!("_requests.{id}")).unwrap();
    // Mid-way: some steps done, the request's progress strictly between 0 and 1.
    wait_until("partial progress rolls up", Duration::from_secs(20), || async {
        let node = store.get(&key, &ReadOptions::depth(2)).await.unwrap();
        node.is_some_and(|n| n.child_count == 3 && n.progress().is_some_and(|p| p > 0.0 && p < 1.0))
    })
    .await
    .unwrap();
    wait_until("request succeeded", Duration::from_secs(20), || async {
        queue.record(&id).await.unwrap().is_some_and(|r| r.state == RequestState::Succeeded)
    })
    .await
    .unwrap();
    // The request's node shows `finished` as soon as the outcome is stored (the request queue
    // writes it); the steps' own last reports come over AMQP and may land just after.
    wait_until("final progress applied", Duration::from_secs(20), || async {
        let node = store.get(&key, &ReadOptions::depth(2)).await.unwrap();
        node.is_some_and(|n| {
            n.status() == Some("finished")
                && n.progress() == Some(1.0)
                && n.counts.get("finished") == Some(&3)
        })
    })
    .await
    .unwrap();
    let node = store.get(&key, &ReadOptions::depth(2)).await.unwrap().unwrap();
    assert_eq!(node.counts.get("finished"), Some(&3), "every step finished: {:?}", node.counts);
    let record = queue.record(&id).await.unwrap().unwrap();
    assert_eq!(record.result, Some(json!({"steps_done": 3})));
}

#[test]
fn bad_payloads_are_permanent_errors_naming_the_field() {
    for payload in [json!({}), json!({"steps": 0, "step_ms": 1}), json!({"steps": 2, "step_ms": "x"})] {
        let error = example_processor::Steps::parse(&payload).unwrap_err();
        assert!(
            matches!(error, request_processor::HandlerError::Permanent(ref m) if m.contains("steps") || m.contains("step_ms")),
            "{error:?}"
        );
    }
}
