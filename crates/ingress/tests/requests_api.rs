//! The request API end to end: ingress → Redis request queue → request processor → replies and
//! progress (processor → AMQP → aggregator → Redis), each test with its own key prefix and vhost.

mod common;

use cairn_progress::now_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cairn_progress::Update;
use cairn_testkit::{RedisServer, wait_until};
use common::{Options, Reply, Stack, WAIT, handlers_file};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use redis::AsyncCommands as _;
use request_processor::handlers::Echo;
use request_processor::{Context, Handler, HandlerError, HandlerSet};
use reqwest::Method;
use serde_json::{Value, json};

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).map(|v| v.to_str().expect("ASCII header"))
}

fn id_of(reply: &Reply) -> String {
    reply.json["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {}: {}", reply.status, reply.json))
        .to_owned()
}

/// Fails every attempt for good, counting them.
struct Nope(Arc<AtomicU32>);

impl Handler for Nope {
    fn handle<'a>(&'a self, _ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        async { Err(HandlerError::Permanent("nope".into())) }.boxed()
    }
}

/// Runs until it is told to stop.
struct Block;

impl Handler for Block {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async {
            ctx.cancel.cancelled().await;
            Err(HandlerError::Retryable("stopped".into()))
        }
        .boxed()
    }
}

/// Reports progress 0.4 on the request's own node, then runs until it is told to stop.
struct ReportThenBlock;

impl Handler for ReportThenBlock {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async {
            ctx.report(Update::new().progress(0.4));
            ctx.cancel.cancelled().await;
            Err(HandlerError::Retryable("stopped".into()))
        }
        .boxed()
    }
}

async fn xlen(stack: &Stack, key: &str) -> u64 {
    redis::cmd("XLEN").arg(stack.ns().key(key)).query_async(&mut stack.redis().await).await.expect("XLEN")
}

/// Every key of the stack's prefix matching `{prefix}:{pattern}`.
async fn keys(stack: &Stack, pattern: &str) -> Vec<String> {
    let mut redis = stack.redis().await;
    let pattern = stack.ns().key(pattern);
    let (mut cursor, mut found) = (0u64, Vec::new());
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await
            .expect("SCAN");
        found.extend(page);
        if next == 0 {
            return found;
        }
        cursor = next;
    }
}

#[tokio::test]
async fn echo_round_trip_with_prefer_wait() {
    let stack = Stack::with(Options::with_processor()).await;
    let reply = stack.submit(&json!({"handler": "echo", "payload": {"x": 1}}), Some(10)).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(header(&reply, "preference-applied"), Some("wait=10"));
    let id = id_of(&reply);
    assert_eq!(header(&reply, "location"), Some(format!("/v1/requests/{id}").as_str()));
    assert_eq!(reply.json["state"], "succeeded");
    assert_eq!(reply.json["progress"].as_f64(), Some(1.0), "succeeded is done, whatever the node shows yet");
    assert_eq!(reply.json["result"], json!({"x": 1}));
    assert_eq!(reply.json["attempts"], 1);
    assert_eq!(reply.json["handler"], "echo");
    let key = format!("_requests.{id}");
    assert_eq!(reply.json["progress_key"], key);
    assert_eq!(reply.json["progress_url"], format!("/status/{key}"));
    assert!(reply.json["finished_at"].as_i64().unwrap() >= reply.json["created_at"].as_i64().unwrap());

    // Reports travel over AMQP and the aggregator: asynchronous.
    wait_until("the progress node is finished", WAIT, || async {
        let node = stack.get(&format!("/status/{key}")).await;
        node.status == 200 && node.json["status"] == "finished" && node.json["progress"].as_f64() == Some(1.0)
    })
    .await
    .expect("progress reported");
    let node = stack.get(&format!("/status/{key}")).await;
    assert_eq!(node.json["request_id"], id.as_str());
    assert_eq!(node.json["handler"], "echo");
    assert_eq!(node.json["state"], "succeeded");
    let view = stack.request_state(&id, None).await;
    assert_eq!(view.status, 200);
    assert_eq!(view.json["progress"].as_f64(), Some(1.0), "{}", view.json);
}

#[tokio::test]
async fn accepted_then_long_poll() {
    let stack = Stack::with(Options::with_processor()).await;
    let reply = stack.submit(&json!({"handler": "echo", "payload": "hi", "max_attempts": 2}), None).await;
    assert_eq!(reply.status, 202, "{}", reply.json);
    let id = id_of(&reply);
    assert_eq!(header(&reply, "location"), Some(format!("/v1/requests/{id}").as_str()));
    assert_eq!(header(&reply, "preference-applied"), None);
    let key = format!("_requests.{id}");
    assert_eq!(
        reply.json,
        json!({"id": id, "state": "queued", "progress_key": key, "progress_url": format!("/status/{key}")})
    );

    let done = stack.request_state(&id, Some(10)).await;
    assert_eq!(done.status, 200, "{}", done.json);
    assert_eq!(done.json["state"], "succeeded");
    assert_eq!(done.json["result"], "hi");
    assert_eq!(done.json["max_attempts"], 2);
    assert_eq!(header(&done, "preference-applied"), Some("wait=10"));

    let (_, metrics) = stack.text("/metrics").await;
    assert!(metrics.lines().any(|l| l.starts_with("cairn_requests_submitted_total")), "{metrics}");
}

#[tokio::test]
async fn replies_reach_the_waiting_replica_directly() {
    // Polling is off (once an hour): only the reply stream can end the wait in time.
    let options = Options::with_processor().arg("--reply-poll-interval", "1h").arg("--replica", "replica-a");
    let stack = Stack::with(options).await;
    assert_eq!(stack.replica, "replica-a");
    for n in 0..3 {
        let started = Instant::now();
        let reply = stack.submit(&json!({"handler": "echo", "payload": n}), Some(10)).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        assert_eq!(reply.json["result"], n);
        assert!(started.elapsed() < Duration::from_secs(9), "woken by the reply: {:?}", started.elapsed());
    }
    // The reader only reads: replies stay in this replica's stream (capped and expiring there).
    assert_eq!(xlen(&stack, "replies:replica-a").await, 3);
}

#[tokio::test]
async fn an_idempotency_key_names_one_request() {
    let stack = Stack::start().await;
    let body = json!({"handler": "echo", "payload": {"order": 42}, "idempotency_key": "order-42"});
    let replies = futures::future::join_all((0..20).map(|_| stack.submit(&body, None))).await;
    let first = id_of(&replies[0]);
    for reply in &replies {
        assert_eq!(reply.status, 202, "{}", reply.json);
        assert_eq!(id_of(reply), first);
        assert_eq!(reply.json["state"], "queued");
    }
    assert_eq!(xlen(&stack, "requests").await, 1, "one stream entry");
    // The repeats wrote no progress node: it is written in the step that creates the request.
    let only_first = [stack.ns().key(&format!("pn:_requests.{first}"))];
    assert_eq!(keys(&stack, "pn:_requests.*").await, only_first);

    let other = json!({"handler": "echo", "payload": {"order": 43}, "idempotency_key": "order-42"});
    let conflict = stack.submit(&other, None).await;
    assert_eq!(conflict.status, 409, "{}", conflict.json);
    assert_eq!(
        conflict.error(),
        "idempotency key \"order-42\" was already used with a different request body"
    );
    assert_eq!(keys(&stack, "pn:_requests.*").await, only_first, "a conflict writes no node");
    let again = stack.submit(&body, None).await;
    assert_eq!((again.status, id_of(&again)), (202, first));
    assert_eq!(xlen(&stack, "requests").await, 1);
}

#[tokio::test]
async fn bad_input_is_a_4xx_naming_the_problem() {
    let stack = Stack::start().await;
    let huge = format!(r#"{{"handler": "echo", "payload": "{}"}}"#, "x".repeat(3 * 1024 * 1024));
    let cases: [(&str, u16, &str); 10] = [
        (r#"{"handler": "nope"}"#, 400, "unknown handler \"nope\"; this deployment has: echo"),
        (
            r#"{"handler": "echo", "progress_key": "_portal"}"#,
            400,
            "field \"progress_key\": \"_portal\" is a namespace",
        ),
        (
            r#"{"handler": "echo", "progress_key": "a._x"}"#,
            400,
            "field \"progress_key\": \"a._x\" is a namespace",
        ),
        (r#"{"payload": {}}"#, 400, "field \"handler\" is required"),
        (r#"{"handler": "echo", "max_attempts": "3"}"#, 400, "field \"max_attempts\": must be an integer"),
        (r#"{"handler": "echo", "timeout_ms": -1}"#, 400, "field \"timeout_ms\": must be an integer"),
        (r#"{"handlr": "echo"}"#, 400, "unknown field \"handlr\""),
        (r#"{"handler": "#, 400, "request is not valid JSON"),
        (r#"[{"handler": "echo"}]"#, 400, "request must be a JSON object"),
        (&huge, 413, "2097152 bytes"),
    ];
    for (body, status, problem) in cases {
        let request = stack
            .request(Method::POST, "/v1/requests")
            .header("content-type", "application/json")
            .body(body.to_owned());
        let reply = stack.send(request).await;
        let shown: String = body.chars().take(60).collect();
        assert_eq!(reply.status, status, "{shown}: {}", reply.json);
        assert!(reply.error().contains(problem), "{shown}: {}", reply.error());
    }
    let unknown = stack.submit(&json!({"handlr": "echo"}), None).await;
    assert!(unknown.error().contains("did you mean \"handler\"?"), "{}", unknown.error());
    assert_eq!(xlen(&stack, "requests").await, 0, "nothing was queued");

    let reply = stack.request_state("not-an-id", None).await;
    assert_eq!(reply.status, 400, "{}", reply.json);
    assert!(reply.error().starts_with("invalid request id \"not-an-id\""), "{}", reply.error());
    let missing = "0190f5c2-7b8e-4c3d-9a2b-123456789abc";
    let reply = stack.request_state(missing, None).await;
    assert_eq!((reply.status, &reply.json), (404, &json!({"id": missing, "missing": true})));
    let reply = stack.send(stack.request(Method::DELETE, &format!("/v1/requests/{missing}"))).await;
    assert_eq!((reply.status, &reply.json), (404, &json!({"id": missing, "missing": true})));
    let reply = stack.send(stack.request(Method::POST, &format!("/v1/dead-letters/{missing}/retry"))).await;
    assert_eq!(reply.status, 404, "{}", reply.json);
    for (query, problem) in
        [("limit=0", "limit must be an integer from 1 to 1000"), ("after=abc", "after must be")]
    {
        let reply = stack.get(&format!("/v1/dead-letters?{query}")).await;
        assert_eq!(reply.status, 400, "{query}: {}", reply.json);
        assert!(reply.error().starts_with(problem), "{query}: {}", reply.error());
    }

    let (_, metrics) = stack.text("/metrics").await;
    for reason in ["unknown_handler", "invalid", "too_large"] {
        let series = format!("cairn_requests_rejected_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
}

#[tokio::test]
async fn a_canceled_queued_request_never_runs() {
    let mut stack = Stack::with(Options::default().arg("--max-wait", "1s")).await;
    let reply = stack.submit(&json!({"handler": "echo", "payload": {"x": 1}}), Some(30)).await;
    // Nothing runs it yet: the wait, cut to --max-wait, ends with the usual 202.
    assert_eq!(reply.status, 202, "{}", reply.json);
    assert_eq!(header(&reply, "preference-applied"), Some("wait=1"));
    let id = id_of(&reply);
    let key = format!("_requests.{id}");
    let node = stack.get(&format!("/status/{key}")).await;
    assert_eq!(node.status, 200, "the node exists before any processor reports: {}", node.json);
    assert_eq!((&node.json["status"], &node.json["state"]), (&json!("waiting"), &json!("queued")));
    assert_eq!(node.json["request_id"], id.as_str());
    let polled = stack.request_state(&id, Some(1)).await;
    assert_eq!((polled.status, &polled.json["state"]), (200, &json!("queued")));

    let reply = stack.send(stack.request(Method::DELETE, &format!("/v1/requests/{id}"))).await;
    assert_eq!((reply.status, &reply.json), (200, &json!({"id": id, "state": "canceled"})));
    let view = stack.request_state(&id, None).await;
    assert_eq!(view.json["state"], "canceled");
    assert_eq!(view.json["cancel_requested"], true);
    let node = stack.get(&format!("/status/{key}")).await;
    assert_eq!(node.json["status"], "canceled");
    let again = stack.send(stack.request(Method::DELETE, &format!("/v1/requests/{id}"))).await;
    assert_eq!(again.status, 409, "{}", again.json);
    assert_eq!(again.error(), format!("request {id} already finished: it is canceled"));

    stack.start_processor(request_processor::handlers::default_handlers()).await;
    // A request queued after the canceled one finishing means the canceled entry was delivered.
    let later = id_of(&stack.submit(&json!({"handler": "echo", "payload": 2}), None).await);
    wait_until("the later request succeeds", WAIT, || async {
        stack.request_state(&later, None).await.json["state"] == "succeeded"
    })
    .await
    .expect("the processor runs requests");
    let pending: i64 = redis::cmd("XPENDING")
        .arg(stack.ns().key("requests"))
        .arg("processors")
        .query_async::<Vec<redis::Value>>(&mut stack.redis().await)
        .await
        .map(|summary| redis::from_redis_value(summary[0].clone()).unwrap())
        .unwrap();
    assert_eq!(pending, 0, "every entry was acknowledged");
    let view = stack.request_state(&id, None).await;
    assert_eq!(view.json["state"], "canceled");
    assert_eq!(view.json["attempts"], 0, "never ran: {}", view.json);
    assert!(view.json.get("result").is_none(), "{}", view.json);
}

#[tokio::test]
async fn a_running_request_is_canceled_through_its_processor() {
    let (_dir, handlers) = handlers_file(&["block"]);
    let options =
        Options::default().handlers(HandlerSet::new().with("block", Block)).arg("--handlers", &handlers);
    let stack = Stack::with(options).await;
    let id = id_of(&stack.submit(&json!({"handler": "block"}), None).await);
    wait_until("the request runs", WAIT, || async {
        stack.request_state(&id, None).await.json["state"] == "running"
    })
    .await
    .expect("the processor starts it");
    let reply = stack.send(stack.request(Method::DELETE, &format!("/v1/requests/{id}"))).await;
    assert_eq!(reply.status, 202, "{}", reply.json);
    assert_eq!(reply.json, json!({"id": id, "state": "running", "cancel_requested": true}));
    let view = stack.request_state(&id, Some(10)).await;
    assert_eq!(view.json["state"], "canceled", "{}", view.json);
}

#[tokio::test]
async fn heartbeats_carry_the_handlers_progress_and_show_on_the_node() {
    let (_dir, handlers) = handlers_file(&["report"]);
    let options = Options::default()
        .handlers(HandlerSet::new().with("report", ReportThenBlock))
        .arg("--handlers", &handlers);
    let stack = Stack::with(options).await;
    let submitted = now_ms();
    let id = id_of(&stack.submit(&json!({"handler": "report"}), None).await);
    let record = stack.ns().key(&format!("req:{id}"));
    // The processor beats every 200 ms: the record gets the time and the progress it carries.
    wait_until("a heartbeat carried the progress", WAIT, || async {
        let carried: Option<String> =
            stack.redis().await.hget(&record, "heartbeat_progress").await.expect("HGET");
        carried.as_deref() == Some("0.4")
    })
    .await
    .expect("heartbeat progress stored");
    let view = stack.request_state(&id, None).await;
    assert_eq!(view.json["state"], "running", "{}", view.json);
    assert!(view.json["heartbeat_at"].as_i64().is_some_and(|at| at >= submitted), "{}", view.json);
    assert_eq!(view.json["progress"].as_f64(), Some(0.4), "{}", view.json);
    // The node shows the last heartbeat time as well (it travels with the processor's reports).
    let key = format!("/status/_requests.{id}");
    wait_until("the node shows a heartbeat", WAIT, || async {
        stack.get(&key).await.json["heartbeat_ms"].as_i64().is_some_and(|at| at >= submitted)
    })
    .await
    .expect("heartbeat time on the node");
    let node = stack.get(&key).await;
    assert_eq!((node.json["status"].as_str(), node.json["progress"].as_f64()), (Some("running"), Some(0.4)));
    let reply = stack.send(stack.request(Method::DELETE, &format!("/v1/requests/{id}"))).await;
    assert_eq!(reply.status, 202, "{}", reply.json);
}

#[tokio::test]
async fn backpressure_is_a_503_with_retry_after() {
    let stack = Stack::with(Options::default().arg("--max-lag", "3")).await;
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..12 {
        let reply = stack.submit(&json!({"handler": "echo"}), None).await;
        match reply.status {
            202 => accepted += 1,
            503 => {
                refused = Some(reply);
                break;
            }
            other => panic!("unexpected {other}: {}", reply.json),
        }
        if accepted >= 4 {
            // The lag is cached for up to 500 ms.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    let refused = refused.expect("a 503 within 12 submissions");
    assert!(accepted >= 4, "the lag had to pass 3: {accepted} accepted");
    assert_eq!(header(&refused, "retry-after"), Some("1"));
    assert!(
        refused.error().starts_with("too many requests are waiting to be processed"),
        "{}",
        refused.error()
    );
    assert!(refused.error().contains("the limit is 3"), "{}", refused.error());
}

#[tokio::test]
async fn redis_away_is_a_503_and_the_ingress_recovers() {
    let mut server = RedisServer::new().await;
    let stack = Stack::ingress_on(&server.url(), &[]).await;
    let body = json!({"handler": "echo", "payload": 1});
    wait_until("a submission is accepted", WAIT, || async { stack.submit(&body, None).await.status == 202 })
        .await
        .expect("the ingress talks to redis");

    server.stop();
    for _ in 0..2 {
        let started = Instant::now();
        let reply = stack.submit(&body, None).await;
        let elapsed = started.elapsed();
        assert_eq!(reply.status, 503, "{}", reply.json);
        assert_eq!(header(&reply, "retry-after"), Some("1"));
        assert_eq!(reply.error(), "the request queue is unavailable; retry shortly");
        assert!(elapsed < Duration::from_secs(6), "answered in {elapsed:?}");
    }
    let reply = stack.request_state("0190f5c2-7b8e-4c3d-9a2b-123456789abc", None).await;
    assert_eq!(reply.status, 503, "{}", reply.json);

    server.restart().await;
    // The restarted server lost everything (no persistence): the group is made again.
    wait_until("submissions are accepted again", WAIT, || async {
        stack.submit(&body, None).await.status == 202
    })
    .await
    .expect("the ingress recovers without a restart");
    let accepted = stack.submit(&body, None).await;
    assert_eq!(accepted.status, 202, "{}", accepted.json);
    let view = stack.request_state(&id_of(&accepted), None).await;
    assert_eq!((view.status, &view.json["state"]), (200, &json!("queued")));
}

#[tokio::test]
async fn dead_letters_are_listed_inspected_and_retried() {
    let runs = Arc::new(AtomicU32::new(0));
    let (_dir, handlers) = handlers_file(&["echo", "nope"]);
    let processor = HandlerSet::new().with("echo", Echo).with("nope", Nope(runs.clone()));
    let stack = Stack::with(Options::default().handlers(processor).arg("--handlers", &handlers)).await;

    let dead = stack.submit(&json!({"handler": "nope", "payload": 1}), Some(10)).await;
    assert_eq!(dead.status, 200, "{}", dead.json);
    let id = id_of(&dead);
    assert_eq!(
        (&dead.json["state"], &dead.json["error"], &dead.json["attempts"]),
        (&json!("dead"), &json!("nope"), &json!(1))
    );
    let first_finish = dead.json["finished_at"].as_i64().unwrap();

    let list = stack.get("/v1/dead-letters").await;
    assert_eq!(list.status, 200, "{}", list.json);
    let items = list.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", list.json);
    assert_eq!((&items[0]["id"], &items[0]["error"]), (&json!(id), &json!("nope")));
    assert!(items[0]["entry_id"].is_string() && items[0]["time"].as_i64().unwrap() >= first_finish - 1000);
    assert_eq!(list.json["next"], Value::Null);

    let letter = stack.get(&format!("/v1/dead-letters/{id}")).await;
    assert_eq!((letter.status, &letter.json["state"]), (200, &json!("dead")));
    let ok = id_of(&stack.submit(&json!({"handler": "echo", "payload": 2}), Some(10)).await);
    let not_dead = stack.get(&format!("/v1/dead-letters/{ok}")).await;
    assert_eq!(not_dead.status, 404, "{}", not_dead.json);
    assert_eq!(not_dead.error(), format!("request {ok} is not a dead letter: it is succeeded"));
    let retry_ok = stack.send(stack.request(Method::POST, &format!("/v1/dead-letters/{ok}/retry"))).await;
    assert_eq!(retry_ok.status, 409, "{}", retry_ok.json);
    assert!(retry_ok.error().contains("is not dead (it is succeeded)"), "{}", retry_ok.error());

    let retry = stack.send(stack.request(Method::POST, &format!("/v1/dead-letters/{id}/retry"))).await;
    assert_eq!((retry.status, &retry.json), (202, &json!({"id": id, "state": "queued"})));
    wait_until("the retry dies again", WAIT, || async {
        let view = stack.request_state(&id, Some(1)).await;
        view.json["state"] == "dead"
            && view.json["finished_at"].as_i64().unwrap_or(0) >= first_finish
            && runs.load(Ordering::SeqCst) == 2
    })
    .await
    .expect("the retried request runs and dies");
    let view = stack.request_state(&id, None).await;
    assert_eq!(
        (&view.json["attempts"], &view.json["error"]),
        (&json!(1), &json!("nope")),
        "attempts start over"
    );

    // Two dead letters now (the same request died twice), newest first, one page at a time.
    let first = stack.get("/v1/dead-letters?limit=1").await;
    let next = first.json["next"].as_str().expect("a full page has a next cursor").to_owned();
    assert_eq!(first.json["items"][0]["entry_id"], next.as_str());
    assert_eq!(
        first.json["items"][0]["entry_id"],
        stack.get("/v1/dead-letters").await.json["items"][0]["entry_id"]
    );
    let second = stack.get(&format!("/v1/dead-letters?limit=1&after={next}")).await;
    assert_eq!(second.json["items"][0]["id"], id.as_str());
    assert_eq!(second.json["items"][0]["entry_id"], items[0]["entry_id"], "the older letter comes second");
    let last = second.json["next"].as_str().unwrap().to_owned();
    let end = stack.get(&format!("/v1/dead-letters?limit=1&after={last}")).await;
    assert_eq!(end.json, json!({"items": [], "next": null}));
}

/// A request's own node ends in its record's terminal state even when the processor cannot
/// report anything over AMQP: the request queue writes it in the step that stores the outcome,
/// to the request's own `progress_key` (also when canceled before it ran).
#[tokio::test]
async fn terminal_states_reach_the_node_without_rabbitmq() {
    let mut stack = Stack::start().await;
    stack
        .start_processor_on(
            request_processor::handlers::default_handlers(),
            "amqp://guest:guest@127.0.0.1:1/%2f",
        )
        .await;
    let done =
        stack.submit(&json!({"handler": "echo", "payload": 1, "progress_key": "_t.job1"}), Some(10)).await;
    assert_eq!(done.status, 200, "{}", done.json);
    let node = stack.get("/status/_t.job1").await;
    assert_eq!(node.status, 200, "{}", node.json);
    assert_eq!(
        (&node.json["status"], &node.json["state"], &node.json["progress"]),
        (&json!("finished"), &json!("succeeded"), &json!(1))
    );
    assert_eq!(node.json["handler"], "echo");

    let mut idle = Stack::start().await;
    let queued =
        idle.submit(&json!({"handler": "echo", "payload": 1, "progress_key": "_t.job2"}), None).await;
    let id = queued.json["id"].as_str().unwrap().to_owned();
    let canceled = idle.send(idle.request(Method::DELETE, &format!("/v1/requests/{id}"))).await;
    assert_eq!(canceled.status, 200, "{}", canceled.json);
    let node = idle.get("/status/_t.job2").await;
    assert_eq!(
        (&node.json["status"], &node.json["state"]),
        (&json!("canceled"), &json!("canceled")),
        "{}",
        node.json
    );
    assert_eq!(idle.get(&format!("/status/_requests.{id}")).await.status, 404, "nothing at the default key");
    // A processor that later receives the canceled entry acks it and writes nothing else.
    idle.start_processor_on(
        request_processor::handlers::default_handlers(),
        "amqp://guest:guest@127.0.0.1:1/%2f",
    )
    .await;
    stack.stop().await;
}

/// The request API on a Redis Cluster of three masters, the request queue in three partitions
/// (one slot each): the same answers as on one Redis, whichever partition a request falls in.
mod cluster {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use common::CLUSTER_PARTITIONS;

    /// Most submissions a test makes to see requests in more than one partition; the chance of
    /// 60 random ids in one of three partitions is 3⁻⁵⁹.
    const MAX_TRIES: usize = 60;

    fn partition(stack: &Stack, id: &str) -> u16 {
        stack.queues().layout().partition_of(id)
    }

    /// The stream entry id of each request's latest submission, by id (from its record).
    async fn entries(stack: &Stack, ids: &[String]) -> BTreeMap<String, String> {
        let wanted: Vec<&str> = ids.iter().map(String::as_str).collect();
        let records = stack.queues().records(&wanted).await.expect("records");
        ids.iter()
            .zip(records)
            .map(|(id, record)| (id.clone(), record.and_then(|r| r.entry_id).expect("a queued record")))
            .collect()
    }

    /// Every item of the listing `path` (which names a `limit`), following `next` to the end.
    async fn all_items(stack: &Stack, path: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut page_path = path.to_owned();
        loop {
            let page = stack.get(&page_path).await;
            assert_eq!(page.status, 200, "{page_path}: {}", page.json);
            items.extend(page.json["items"].as_array().expect("items").iter().cloned());
            match page.json["next"].as_str() {
                Some(next) => page_path = format!("{path}&after={next}"),
                None => return items,
            }
        }
    }

    /// The ids of every item of the listing `path`.
    async fn all_pages(stack: &Stack, path: &str) -> Vec<String> {
        let items = all_items(stack, path).await;
        items.iter().map(|item| item["id"].as_str().expect("id").to_owned()).collect()
    }

    #[tokio::test]
    async fn requests_in_every_partition_run_and_answer_their_waiting_clients() {
        // Polling is off (once an hour): only the reply can end a wait in time.
        let options = Options::with_processor().on_cluster().arg("--reply-poll-interval", "1h");
        let stack = Stack::with(options).await;
        let mut partitions = BTreeSet::new();
        for n in 0..MAX_TRIES {
            let reply = stack.submit(&json!({"handler": "echo", "payload": n}), Some(10)).await;
            assert_eq!(reply.status, 200, "{}", reply.json);
            assert_eq!((&reply.json["state"], &reply.json["result"]), (&json!("succeeded"), &json!(n)));
            partitions.insert(partition(&stack, &id_of(&reply)));
            if partitions.len() == usize::from(CLUSTER_PARTITIONS) {
                break;
            }
        }
        assert_eq!(partitions.len(), usize::from(CLUSTER_PARTITIONS), "{partitions:?}");

        // Accepted, then a long poll answered by the reply; the node is finished (in its tree's slot).
        let accepted = stack.submit(&json!({"handler": "echo", "payload": "hi"}), None).await;
        assert_eq!(accepted.status, 202, "{}", accepted.json);
        let id = id_of(&accepted);
        let done = stack.request_state(&id, Some(10)).await;
        assert_eq!((&done.json["state"], &done.json["result"]), (&json!("succeeded"), &json!("hi")));
        wait_until("the progress node is finished", WAIT, || async {
            stack.get(&format!("/status/_requests.{id}")).await.json["status"] == "finished"
        })
        .await
        .expect("progress reported");

        // An idempotency key names one request, in the key's partition.
        let body = json!({"handler": "echo", "payload": {"order": 7}, "idempotency_key": "order-7"});
        let replies = futures::future::join_all((0..8).map(|_| stack.submit(&body, None))).await;
        let first = id_of(&replies[0]);
        assert!(replies.iter().all(|reply| id_of(reply) == first), "one id for one key");
        assert_eq!(partition(&stack, &first), stack.queues().layout().partition_of("order-7"));
        let conflict =
            stack.submit(&json!({"handler": "echo", "payload": 8, "idempotency_key": "order-7"}), None).await;
        assert_eq!(conflict.status, 409, "{}", conflict.json);
        assert_eq!(stack.request_state(&first, Some(10)).await.json["state"], "succeeded");
    }

    #[tokio::test]
    async fn a_canceled_queued_request_on_a_cluster_never_runs() {
        let mut stack = Stack::with(Options::default().on_cluster()).await;
        let mut queued = Vec::new();
        for _ in 0..MAX_TRIES {
            queued.push(id_of(&stack.submit(&json!({"handler": "echo", "payload": 1}), None).await));
            let used: BTreeSet<u16> = queued.iter().map(|id| partition(&stack, id)).collect();
            if used.len() > 1 {
                break;
            }
        }
        // The first and the last are in different partitions: cancel both.
        let canceled = [queued[0].clone(), queued[queued.len() - 1].clone()];
        for id in &canceled {
            let reply = stack.send(stack.request(Method::DELETE, &format!("/v1/requests/{id}"))).await;
            assert_eq!((reply.status, &reply.json), (200, &json!({"id": id, "state": "canceled"})));
            let node = stack.get(&format!("/status/_requests.{id}")).await;
            assert_eq!((&node.json["status"], &node.json["state"]), (&json!("canceled"), &json!("canceled")));
            let again = stack.send(stack.request(Method::DELETE, &format!("/v1/requests/{id}"))).await;
            assert_eq!(again.status, 409, "{}", again.json);
        }

        stack.start_processor(request_processor::handlers::default_handlers()).await;
        for id in queued.iter().filter(|id| !canceled.contains(id)) {
            let view = stack.request_state(id, Some(10)).await;
            assert_eq!(view.json["state"], "succeeded", "{}", view.json);
        }
        // A request queued after the canceled ones, in each partition, finishing means the
        // canceled entries were delivered (and only acknowledged).
        let mut later = BTreeSet::new();
        for _ in 0..MAX_TRIES {
            let reply = stack.submit(&json!({"handler": "echo", "payload": 2}), Some(10)).await;
            assert_eq!(reply.json["state"], "succeeded", "{}", reply.json);
            later.insert(partition(&stack, &id_of(&reply)));
            if canceled.iter().all(|id| later.contains(&partition(&stack, id))) {
                break;
            }
        }
        for id in &canceled {
            let view = stack.request_state(id, None).await;
            assert_eq!((&view.json["state"], &view.json["attempts"]), (&json!("canceled"), &json!(0)));
        }
    }

    #[tokio::test]
    async fn dead_letters_of_every_partition_are_listed_newest_first_and_retried() {
        let runs = Arc::new(AtomicU32::new(0));
        let (_dir, handlers) = handlers_file(&["echo", "nope"]);
        let processor = HandlerSet::new().with("echo", Echo).with("nope", Nope(runs.clone()));
        let options = Options::default().on_cluster().handlers(processor).arg("--handlers", &handlers);
        let stack = Stack::with(options).await;
        let mut dead = Vec::new();
        for n in 0..MAX_TRIES {
            let reply = stack.submit(&json!({"handler": "nope", "payload": n}), Some(10)).await;
            assert_eq!((reply.status, &reply.json["state"]), (200, &json!("dead")), "{}", reply.json);
            dead.push(id_of(&reply));
            let used: BTreeSet<u16> = dead.iter().map(|id| partition(&stack, id)).collect();
            if used.len() > 1 && dead.len() >= 3 {
                break;
            }
        }

        // Newest first across the partitions' dead-letter streams, whole or a letter a page.
        let newest_first: Vec<String> = dead.iter().rev().cloned().collect();
        let letters = all_items(&stack, "/v1/dead-letters?limit=1000").await;
        let entry_of = |letter: &Value| {
            (letter["id"].as_str().unwrap().to_owned(), letter["entry_id"].as_str().unwrap().to_owned())
        };
        let letter_entries: BTreeMap<String, String> = letters.iter().map(entry_of).collect();
        let listed: Vec<String> = letters.iter().map(|letter| entry_of(letter).0).collect();
        assert_same_order(&listed, &newest_first, &letter_entries);
        let paged = all_pages(&stack, "/v1/dead-letters?limit=1").await;
        assert_eq!(paged, listed);
        let letter = stack.get(&format!("/v1/dead-letters/{}", dead[0])).await;
        assert_eq!((letter.status, &letter.json["state"]), (200, &json!("dead")));

        // The oldest, retried, dies again and is the newest letter; it is listed twice now.
        let oldest = &dead[0];
        let retry =
            stack.send(stack.request(Method::POST, &format!("/v1/dead-letters/{oldest}/retry"))).await;
        assert_eq!((retry.status, &retry.json), (202, &json!({"id": oldest, "state": "queued"})));
        wait_until("the retry dies again", WAIT, || async {
            stack.request_state(oldest, Some(1)).await.json["state"] == "dead"
                && runs.load(Ordering::SeqCst) as usize == dead.len() + 1
        })
        .await
        .expect("the retried request runs and dies");
        let listed = all_pages(&stack, "/v1/dead-letters?limit=2").await;
        assert_eq!(listed.len(), dead.len() + 1, "{listed:?}");
        assert_eq!(&listed[0], oldest, "the retry's letter is the newest");
        assert_eq!(&listed[listed.len() - 1], oldest, "its first letter is still the oldest");
    }

    #[tokio::test]
    async fn requests_of_every_partition_are_listed_newest_first_and_paged() {
        let stack = Stack::with(Options::default().on_cluster()).await;
        let mut submitted = Vec::new();
        for n in 0..MAX_TRIES {
            submitted
                .push(id_of(&stack.submit(&json!({"handler": "echo", "payload": {"n": n}}), None).await));
            let used: BTreeSet<u16> = submitted.iter().map(|id| partition(&stack, id)).collect();
            if used.len() == usize::from(CLUSTER_PARTITIONS) && submitted.len() >= 7 {
                break;
            }
        }
        let newest_first: Vec<String> = submitted.iter().rev().cloned().collect();
        let listed = all_pages(&stack, "/v1/requests?limit=1000").await;
        assert_same_order(&listed, &newest_first, &entries(&stack, &submitted).await);
        for limit in [1, 2, 3] {
            let paged = all_pages(&stack, &format!("/v1/requests?limit={limit}")).await;
            assert_eq!(paged, listed, "pages of {limit}");
        }

        // Filters, reads by id and the payload reach each request's partition.
        let canceled = &submitted[1];
        let reply = stack.send(stack.request(Method::DELETE, &format!("/v1/requests/{canceled}"))).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        assert_eq!(
            all_pages(&stack, "/v1/requests?state=canceled&limit=5").await,
            std::slice::from_ref(canceled)
        );
        for (n, id) in submitted.iter().enumerate() {
            let payload = stack.get(&format!("/v1/requests/{id}/payload")).await;
            assert_eq!((payload.status, payload.json), (200, json!({"n": n})));
        }
    }

    /// `listed` holds the ids of `expected` once each, in its order but for ids whose entries
    /// (`entry`, by id) share an entry id: entries of two partitions' streams can, and then
    /// either may come first.
    fn assert_same_order(listed: &[String], expected: &[String], entry: &BTreeMap<String, String>) {
        let sorted = |ids: &[String]| ids.iter().cloned().collect::<BTreeSet<_>>();
        assert_eq!(sorted(listed), sorted(expected), "the same requests");
        assert_eq!(listed.len(), expected.len(), "each once: {listed:?}");
        let entries = |ids: &[String]| ids.iter().map(|id| entry[id].clone()).collect::<Vec<_>>();
        assert_eq!(entries(listed), entries(expected), "newest first: {listed:?}");
    }
}

/// An ingress configured with another partition count than the queue was made with stops, naming
/// both, while a request is unfinished: with another count its id would lead to another partition.
#[tokio::test]
async fn an_ingress_with_another_partition_count_stops_while_requests_are_unfinished() {
    let stack = Stack::start().await;
    stack.queues().prepare().await.unwrap();
    let queued = stack.submit(&json!({"handler": "echo", "payload": 1}), None).await;
    assert_eq!(queued.status, 202, "{}", queued.json);
    let app = stack.build_ingress(&["--request-partitions", "4"]).await;
    let stopped = tokio::time::timeout(WAIT, app.run(tokio_util::sync::CancellationToken::new()))
        .await
        .expect("the ingress stops by itself");
    let error = stopped.expect_err("another partition count is refused").to_string();
    assert!(
        error.contains("CAIRN_REQUEST_PARTITIONS=4, but")
            && error.contains("made with CAIRN_REQUEST_PARTITIONS=1")
            && error.contains("1 of its requests are not finished"),
        "{error}"
    );
    // The stack's own ingress still takes requests.
    let another = stack.submit(&json!({"handler": "echo", "payload": 2}), None).await;
    assert_eq!(another.status, 202, "{}", another.json);
}
