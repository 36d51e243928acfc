//! Live progress end to end (docs/contract.md §2 Live): SSE from an ingress whose updates come through every
//! writer (REST, gRPC, AMQP single and burst, a request's lifecycle), against the real Redis and
//! RabbitMQ, each test with its own key prefix and vhost.

mod common;

use std::time::{Duration, Instant};

use cairn_progress::{Key, Update};
use common::{Options, Stack, WAIT};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// One server-sent event.
#[derive(Debug, Clone)]
struct Ev {
    event: String,
    id: String,
    data: Value,
}

/// A minimal EventSource: reads `event:`, `id:` and `data:` lines, skips comments.
struct Sse {
    response: reqwest::Response,
    buf: String,
    done: bool,
}

impl Sse {
    async fn open(base: &str, path: &str, last_event_id: Option<&str>) -> Sse {
        let client = reqwest::Client::new();
        let mut request = client.get(format!("{base}{path}"));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("ingress answers");
        assert_eq!(response.status(), 200, "GET {path}");
        let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        Sse { response, buf: String::new(), done: false }
    }

    /// The next event, `None` when the stream ended; fails after `wait`.
    async fn next_within(&mut self, wait: Duration) -> Option<Ev> {
        tokio::time::timeout(wait, self.next()).await.unwrap_or_else(|_| panic!("no event within {wait:?}"))
    }

    /// The next event if one comes within `wait`.
    async fn maybe_next(&mut self, wait: Duration) -> Option<Ev> {
        tokio::time::timeout(wait, self.next()).await.ok().flatten()
    }

    async fn next(&mut self) -> Option<Ev> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = Ev { event: "message".into(), id: String::new(), data: Value::Null };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                ev.data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("event data {data:?}: {e}"));
                return Some(ev);
            }
            if self.done {
                return None;
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) | Err(_) => self.done = true,
            }
        }
    }

    /// Reads events until `pred` holds for one, returning all read; fails after `wait`.
    async fn until(&mut self, wait: Duration, mut pred: impl FnMut(&Ev) -> bool) -> Vec<Ev> {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = tokio::time::timeout(left, self.next())
                .await
                .unwrap_or_else(|_| panic!("condition not met within {wait:?}; events: {seen:#?}"))
                .unwrap_or_else(|| panic!("stream ended; events: {seen:#?}"));
            let hit = pred(&ev);
            seen.push(ev);
            if hit {
                return seen;
            }
        }
    }
}

/// The node with `key` in an update's array.
fn node<'a>(ev: &'a Ev, key: &str) -> Option<&'a Value> {
    ev.data.as_array()?.iter().find(|n| n["key"] == key)
}

/// Drops the fields that depend on the time of reading, and writes every number as a float
/// (`0` and `0.0` are the same JSON number).
fn without_age(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(k, _)| k != "_age_ms" && k != "_stalled")
                .map(|(k, v)| (k, without_age(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_age).collect()),
        Value::Number(n) => json!(n.as_f64().unwrap()),
        other => other,
    }
}

fn close(v: &Value, want: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - want).abs() < 1e-9)
}

/// A publishing channel, once the aggregator consumes its queue.
async fn amqp(stack: &Stack) -> lapin::Channel {
    let conn = Connection::connect(stack.amqp_url(), ConnectionProperties::default()).await.expect("amqp");
    let deadline = Instant::now() + WAIT;
    let channel = loop {
        let channel = conn.create_channel().await.expect("channel");
        // Its one shard queue is declared, bound and consumed once the aggregator consumes.
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let declared = channel.queue_declare("progress.0".into(), passive, FieldTable::default()).await;
        if declared.is_ok_and(|queue| queue.consumer_count() > 0) {
            break channel;
        }
        assert!(Instant::now() < deadline, "the aggregator never consumed its queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    // The connection lives as long as the channel's owner needs it.
    std::mem::forget(conn);
    channel
}

async fn publish_amqp(channel: &lapin::Channel, routing_key: &str, body: &Value) {
    let props = BasicProperties::default().with_content_type("application/json".into());
    cairn_testkit::publish_progress(channel, routing_key, body.to_string().as_bytes(), props).await;
}

const EVENT_WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn the_snapshot_equals_get_and_rest_updates_arrive_parents_first() {
    let stack = Stack::start().await;
    stack.publish("_t.job.a", json!({"progress": 0.5, "status": "running"})).await;
    stack.publish("_t.job.b", json!({"progress": 0})).await;

    let mut sse = Sse::open(&stack.base, "/status/_t.job/events", None).await;
    let snapshot = sse.next_within(EVENT_WAIT).await.unwrap();
    assert_eq!(snapshot.event, "snapshot");
    assert!(!snapshot.id.is_empty());
    let get = stack.get("/status/_t.job?depth=8").await;
    assert_eq!(without_age(snapshot.data.clone()), without_age(get.json.clone()));
    assert!(snapshot.data["_age_ms"].as_i64().is_some(), "{}", snapshot.data);
    assert!(snapshot.data["tasks"][0]["_age_ms"].as_i64().is_some());

    stack.publish("_t.job.a", json!({"progress": 1, "status": "finished"})).await;
    let events =
        sse.until(EVENT_WAIT, |ev| node(ev, "_t.job.a").is_some_and(|a| a["status"] == "finished")).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "update");
    assert!(last.id > snapshot.id || last.id.len() > snapshot.id.len(), "{} after {}", last.id, snapshot.id);
    let keys: Vec<&str> = last.data.as_array().unwrap().iter().map(|n| n["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["_t.job", "_t.job.a"], "parents first, only what changed");
    assert!(close(&node(last, "_t.job").unwrap()["progress"], 0.5));
    assert!(node(last, "_t.job.a").unwrap()["_age_ms"].as_i64().is_some());
}

#[tokio::test]
async fn amqp_single_and_burst_and_grpc_updates_arrive() {
    let stack = Stack::with(Options::default()).await;
    stack.publish("_t.w.a", json!({"progress": 0})).await;
    let mut sse = Sse::open(&stack.base, "/status/_t.w/events?depth=2", None).await;
    assert_eq!(sse.next_within(EVENT_WAIT).await.unwrap().event, "snapshot");
    let channel = amqp(&stack).await;

    publish_amqp(&channel, "_t.w.a", &json!({"progress": 0.3})).await;
    sse.until(EVENT_WAIT, |ev| node(ev, "_t.w.a").is_some_and(|a| a["progress"] == 0.3)).await;

    let burst = json!([{"key": "_t.w.b", "progress": 0.4}, {"key": "_t.w.c", "progress": 0.6, "msg": "hi"}]);
    publish_amqp(&channel, "_t.w", &burst).await;
    let (mut got_b, mut got_c) = (false, false);
    sse.until(EVENT_WAIT, |ev| {
        got_b |= node(ev, "_t.w.b").is_some_and(|b| b["progress"] == 0.4);
        got_c |= node(ev, "_t.w.c").is_some_and(|c| c["progress"] == 0.6 && c["msg"] == "hi");
        got_b && got_c
    })
    .await;

    let grpc = ingress::Aggregator::connect_lazy(&stack.aggregator_url, WAIT).unwrap();
    let update = Update::from_slice(br#"{"progress": 0.9, "status": "running"}"#).unwrap();
    grpc.update(&Key::parse("_t.w.a").unwrap(), &update, None).await.expect("gRPC update");
    sse.until(EVENT_WAIT, |ev| node(ev, "_t.w.a").is_some_and(|a| a["progress"] == 0.9)).await;
}

#[tokio::test]
async fn a_requests_lifecycle_arrives_and_an_unknown_key_waits() {
    let stack = Stack::with(Options::with_processor()).await;
    // Watched before it exists: the stream waits, then starts with a snapshot.
    let mut sse = Sse::open(&stack.base, "/status/_life.r1/events", None).await;
    assert!(sse.maybe_next(Duration::from_millis(300)).await.is_none(), "nothing to show yet");
    let reply = stack
        .submit(&json!({"handler": "echo", "payload": {"x": 1}, "progress_key": "_life.r1"}), None)
        .await;
    assert_eq!(reply.status, 202, "{}", reply.json);
    let first = sse.next_within(EVENT_WAIT).await.unwrap();
    assert_eq!(first.event, "snapshot", "{first:?}");
    sse.until(EVENT_WAIT * 2, |ev| {
        let n = if ev.event == "snapshot" { Some(&ev.data) } else { node(ev, "_life.r1") };
        n.is_some_and(|n| n["status"] == "finished")
    })
    .await;
}

#[tokio::test]
async fn two_thousand_updates_to_one_key_give_few_events_ending_in_the_final_state() {
    let stack = Stack::with(Options::default()).await;
    stack.publish("_t.hot.k", json!({"progress": 0})).await;
    let mut sse = Sse::open(&stack.base, "/status/_t.hot/events", None).await;
    assert_eq!(sse.next_within(EVENT_WAIT).await.unwrap().event, "snapshot");
    let channel = amqp(&stack).await;
    let started = Instant::now();
    for i in 1..=2000 {
        let mut body = json!({"progress": f64::from(i) / 2000.0});
        if i == 2000 {
            body["status"] = json!("finished");
        }
        publish_amqp(&channel, "_t.hot.k", &body).await;
    }
    let events =
        sse.until(EVENT_WAIT * 3, |ev| node(ev, "_t.hot.k").is_some_and(|k| k["status"] == "finished")).await;
    let elapsed = started.elapsed().as_secs_f64();
    let last = events.last().unwrap();
    assert_eq!(node(last, "_t.hot.k").unwrap()["progress"], 1.0);
    assert!(close(&node(last, "_t.hot").unwrap()["progress"], 1.0));
    let allowed = (elapsed * 10.0).ceil() as usize + 2;
    assert!(events.len() <= allowed, "{} events in {elapsed:.1} s (at most {allowed})", events.len());
    assert!(sse.maybe_next(Duration::from_millis(500)).await.is_none(), "nothing after the final state");
}

#[tokio::test]
async fn resuming_after_an_event_id_delivers_exactly_what_was_missed() {
    let stack = Stack::start().await;
    stack.publish("_t.r.a", json!({"progress": 0.1})).await;
    stack.publish("_t.r.b", json!({"progress": 0.1})).await;
    stack.publish("_t.r.c", json!({"progress": 0.1})).await;
    let mut sse = Sse::open(&stack.base, "/status/_t.r/events", None).await;
    let snapshot = sse.next_within(EVENT_WAIT).await.unwrap();
    drop(sse);

    stack.publish("_t.r.a", json!({"progress": 0.5})).await;
    stack.publish("_t.r.a", json!({"progress": 0.7})).await;
    stack.publish("_t.r.b", json!({"progress": 0.2, "status": "finished"})).await;

    let mut last = String::new();
    for (path, header) in [
        (format!("/status/_t.r/events?after={}", snapshot.id), None),
        ("/status/_t.r/events?after=1-0".to_owned(), Some(snapshot.id.as_str())),
    ] {
        let mut sse = Sse::open(&stack.base, &path, header).await;
        let missed = sse.next_within(EVENT_WAIT).await.unwrap();
        assert_eq!(missed.event, "update", "{missed:?}");
        let keys: Vec<&str> =
            missed.data.as_array().unwrap().iter().map(|n| n["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["_t.r", "_t.r.a", "_t.r.b"], "what changed, newest state, parents first; not c");
        assert_eq!(node(&missed, "_t.r.a").unwrap()["progress"], 0.7);
        assert_eq!(node(&missed, "_t.r.b").unwrap()["status"], "finished");
        assert!(sse.maybe_next(Duration::from_millis(500)).await.is_none(), "nothing more was missed");
        last = missed.id;
    }
    // Resuming after that update misses nothing and repeats nothing.
    let mut again = Sse::open(&stack.base, "/status/_t.r/events", Some(&last)).await;
    assert!(again.maybe_next(Duration::from_millis(500)).await.is_none());
    stack.publish("_t.r.c", json!({"progress": 0.3})).await;
    let next = again.next_within(EVENT_WAIT).await.unwrap();
    assert_eq!(next.event, "update");
    assert_eq!(node(&next, "_t.r.c").unwrap()["progress"], 0.3);
}

#[tokio::test]
async fn a_client_further_behind_than_the_log_gets_a_snapshot() {
    let stack = Stack::start().await;
    stack.publish("_t.old.a", json!({"progress": 0.1})).await;
    let mut sse = Sse::open(&stack.base, "/status/_t.old/events", None).await;
    let first = sse.next_within(EVENT_WAIT).await.unwrap();
    drop(sse);
    for i in 0..5 {
        stack.publish("_t.old.a", json!({"progress": 0.2 + f64::from(i) / 10.0})).await;
    }
    // The log keeps only the newest entry now (as if retention had trimmed it).
    let mut redis = stack.redis().await;
    let _: i64 = redis::cmd("XTRIM")
        .arg(stack.ns().key("pf:_t.old"))
        .arg("MAXLEN")
        .arg(1)
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut sse = Sse::open(&stack.base, "/status/_t.old/events", Some(&first.id)).await;
    let ev = sse.next_within(EVENT_WAIT).await.unwrap();
    assert_eq!(ev.event, "snapshot", "never a silent gap: {ev:?}");
    assert!(close(&ev.data["tasks"][0]["progress"], 0.6), "{}", ev.data);
    // An id the log never had (or long forgotten) gets a snapshot too.
    let mut sse = Sse::open(&stack.base, "/status/_t.old/events?after=1-0", None).await;
    assert_eq!(sse.next_within(EVENT_WAIT).await.unwrap().event, "snapshot");
    // A malformed one is refused, naming it.
    let reply = stack.get("/status/_t.old/events?after=yesterday").await;
    assert_eq!(reply.status, 400);
    assert!(reply.error().contains("after"), "{}", reply.error());
}

#[tokio::test]
async fn a_deleted_subtree_gives_a_delete_event() {
    let stack = Stack::start().await;
    stack.publish("_t.d.a", json!({"progress": 1})).await;
    stack.publish("_t.d.b.x", json!({"progress": 0})).await;
    let mut sse = Sse::open(&stack.base, "/status/_t.d/events", None).await;
    sse.next_within(EVENT_WAIT).await.unwrap();
    assert_eq!(stack.delete("_t.d.b").await.status, 200);
    let events = sse.until(EVENT_WAIT, |ev| ev.event == "delete").await;
    let delete = events.last().unwrap();
    assert_eq!(delete.data, json!(["_t.d.b"]));
    let update = sse.next_within(EVENT_WAIT).await.unwrap();
    assert_eq!(update.event, "update");
    assert!(close(&node(&update, "_t.d").unwrap()["progress"], 1.0), "the parent without b: {update:?}");

    // The watched node itself going away.
    let mut sub = Sse::open(&stack.base, "/status/_t.d.a/events", None).await;
    sub.next_within(EVENT_WAIT).await.unwrap();
    assert_eq!(stack.delete("_t.d").await.status, 200);
    let gone = sub.until(EVENT_WAIT, |ev| ev.event == "delete").await;
    assert_eq!(gone.last().unwrap().data, json!(["_t.d.a"]));
}

#[tokio::test]
async fn an_update_through_one_ingress_reaches_a_subscriber_of_another() {
    let stack = Stack::start().await;
    stack.publish("_t.x.a", json!({"progress": 0})).await;
    let stop = CancellationToken::new();
    let second = stack.another_ingress(&stop).await;
    let mut sse = Sse::open(&second, "/status/_t.x/events", None).await;
    assert_eq!(sse.next_within(EVENT_WAIT).await.unwrap().event, "snapshot");
    stack.publish("_t.x.a", json!({"progress": 0.8})).await;
    sse.until(EVENT_WAIT, |ev| node(ev, "_t.x.a").is_some_and(|a| a["progress"] == 0.8)).await;

    stop.cancel();
    assert!(sse.next_within(EVENT_WAIT).await.is_none(), "shutdown ends the stream");
}

#[tokio::test]
async fn a_subscriber_survives_an_ingress_restart_by_resuming() {
    let stack = Stack::start().await;
    stack.publish("_t.rs.a", json!({"progress": 0})).await;
    let stop = CancellationToken::new();
    let first = stack.another_ingress(&stop).await;
    let mut sse = Sse::open(&first, "/status/_t.rs/events", None).await;
    let snapshot = sse.next_within(EVENT_WAIT).await.unwrap();
    stop.cancel();
    assert!(sse.next_within(EVENT_WAIT).await.is_none(), "shutdown ends the stream promptly");
    stack.publish("_t.rs.a", json!({"progress": 0.4})).await;
    let restarted = stack.another_ingress(&CancellationToken::new()).await;
    let mut sse = Sse::open(&restarted, "/status/_t.rs/events", Some(&snapshot.id)).await;
    let missed = sse.next_within(EVENT_WAIT).await.unwrap();
    assert_eq!(missed.event, "update");
    assert_eq!(node(&missed, "_t.rs.a").unwrap()["progress"], 0.4);
}

#[tokio::test]
async fn shutdown_ends_the_stream_and_does_not_hold_the_grace_period() {
    let stack = Stack::start().await;
    let base = stack.base.clone();
    let mut sse = Sse::open(&base, "/status/_t.s/events", None).await;
    let started = Instant::now();
    stack.stop().await;
    assert!(sse.next_within(EVENT_WAIT).await.is_none());
    assert!(started.elapsed() < Duration::from_secs(5), "stopped in {:?} (grace is 5 s)", started.elapsed());
}

#[tokio::test]
async fn a_slow_reader_gets_a_bounded_number_of_events_with_the_final_states() {
    let stack = Stack::with(Options::default()).await;
    stack.publish("_t.slow.k0", json!({"progress": 0})).await;
    let mut sse = Sse::open(&stack.base, "/status/_t.slow/events", None).await;
    assert_eq!(sse.next_within(EVENT_WAIT).await.unwrap().event, "snapshot");
    // Heavy updates while the client reads nothing for seconds.
    let channel = amqp(&stack).await;
    let started = Instant::now();
    for round in 1..=20 {
        let burst: Vec<Value> = (0..50)
            .map(|k| json!({"key": format!("_t.slow.k{k}"), "progress": f64::from(round) / 20.0}))
            .collect();
        publish_amqp(&channel, "_t.slow", &Value::Array(burst)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let events =
        sse.until(EVENT_WAIT, |ev| node(ev, "_t.slow").is_some_and(|n| close(&n["progress"], 1.0))).await;
    let allowed = (elapsed * 10.0).ceil() as usize + 6;
    assert!(events.len() <= allowed, "{} events (at most {allowed})", events.len());
    // Every key's final state arrived.
    let mut finals = std::collections::HashMap::new();
    for ev in &events {
        for n in ev.data.as_array().unwrap() {
            finals.insert(n["key"].as_str().unwrap().to_owned(), n["progress"].as_f64().unwrap());
        }
    }
    for k in 0..50 {
        assert_eq!(finals.get(&format!("_t.slow.k{k}")), Some(&1.0), "k{k}");
    }
}

#[tokio::test]
async fn the_subscriber_cap_answers_503_with_retry_after() {
    let stack = Stack::with(Options::default().arg("--max-live-subscribers", "1")).await;
    let _first = Sse::open(&stack.base, "/status/_t.cap/events", None).await;
    // The gauge counts it (other tests of this process may hold subscribers too).
    let (_, metrics) = stack.text("/metrics").await;
    let gauge = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cairn_live_subscribers "))
        .unwrap_or_else(|| panic!("no cairn_live_subscribers in {metrics}"));
    assert!(gauge.trim().parse::<f64>().unwrap() >= 1.0, "{gauge}");
    let reply = stack.get("/status/_t.cap/events").await;
    assert_eq!(reply.status, 503, "{}", reply.json);
    assert!(reply.headers.contains_key("retry-after"));
    assert!(reply.error().contains("live subscribers"), "{}", reply.error());
    drop(_first);
    // The slot is free again once the first stream is gone.
    cairn_testkit::wait_until("a free slot", WAIT, || async {
        let client = reqwest::Client::new();
        let r = client.get(format!("{}/status/_t.cap/events", stack.base)).send().await.unwrap();
        r.status() == 200
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_running_node_that_goes_silent_is_pushed_as_stalled() {
    let stack = Stack::start().await;
    stack.publish("_t.st.a", json!({"status": "running", "progress": 0.1, "stall_after_ms": 300})).await;
    let mut sse = Sse::open(&stack.base, "/status/_t.st/events", None).await;
    let snapshot = sse.next_within(EVENT_WAIT).await.unwrap();
    assert!(
        snapshot.data["tasks"][0].get("_stalled").is_none() || snapshot.data["tasks"][0]["_stalled"] == true
    );
    let events = sse.until(EVENT_WAIT, |ev| node(ev, "_t.st.a").is_some_and(|a| a["_stalled"] == true)).await;
    let a = node(events.last().unwrap(), "_t.st.a").unwrap();
    assert!(a["_age_ms"].as_i64().unwrap() > 300, "{a}");
    // GET shows it too.
    let get = stack.get("/status/_t.st.a").await;
    assert_eq!(get.json["_stalled"], true, "{}", get.json);
    // Hearing from it again clears it.
    stack.publish("_t.st.a", json!({"progress": 0.2})).await;
    let events = sse.until(EVENT_WAIT, |ev| node(ev, "_t.st.a").is_some_and(|a| a["progress"] == 0.2)).await;
    assert!(node(events.last().unwrap(), "_t.st.a").unwrap().get("_stalled").is_none());
}

mod ws {
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    use super::*;

    type Socket =
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

    async fn recv(socket: &mut Socket) -> Value {
        loop {
            let message = tokio::time::timeout(EVENT_WAIT, socket.next()).await.expect("a message in time");
            match message.expect("socket open").expect("message") {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Close(_) => panic!("socket closed"),
                _ => {}
            }
        }
    }

    async fn send(socket: &mut Socket, body: Value) {
        socket.send(Message::Text(body.to_string().into())).await.unwrap();
    }

    #[tokio::test]
    async fn websocket_subscriptions_follow_the_sse_rules_and_bad_messages_get_errors() {
        let stack = Stack::start().await;
        stack.publish("_t.ws.a", json!({"progress": 0.1})).await;
        stack.publish("_t.other.b", json!({"progress": 0.1})).await;
        let url = stack.base.replace("http://", "ws://") + "/ws";
        let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.expect("websocket");

        send(&mut socket, json!({"op": "subscribe", "key": "_t.ws", "depth": 2})).await;
        let snapshot = recv(&mut socket).await;
        assert_eq!(snapshot["type"], "snapshot");
        assert_eq!(snapshot["key"], "_t.ws");
        let get = stack.get("/status/_t.ws?depth=2").await;
        assert_eq!(without_age(snapshot["nodes"][0].clone()), without_age(get.json));

        send(&mut socket, json!({"op": "subscribe", "key": "_t.other"})).await;
        assert_eq!(recv(&mut socket).await["key"], "_t.other");

        // A bad message is answered with an error; the socket stays open.
        send(&mut socket, json!({"op": "subscribe", "key": "a..b"})).await;
        let error = recv(&mut socket).await;
        assert_eq!(error["type"], "error");
        assert!(error["message"].as_str().unwrap().contains("a..b"), "{error}");
        socket.send(Message::Text("not json".into())).await.unwrap();
        assert_eq!(recv(&mut socket).await["type"], "error");

        stack.publish("_t.ws.a", json!({"progress": 0.9})).await;
        let update = recv(&mut socket).await;
        assert_eq!(update["type"], "update");
        assert_eq!(update["key"], "_t.ws");
        let keys: Vec<&str> =
            update["nodes"].as_array().unwrap().iter().map(|n| n["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["_t.ws", "_t.ws.a"]);

        // After unsubscribing, its changes no longer come; the other subscription's do.
        send(&mut socket, json!({"op": "unsubscribe", "key": "_t.ws"})).await;
        stack.publish("_t.ws.a", json!({"progress": 1})).await;
        stack.publish("_t.other.b", json!({"progress": 0.5})).await;
        let next = recv(&mut socket).await;
        assert_eq!(next["key"], "_t.other", "{next}");

        // Resume on a new socket after the last id: exactly what was missed.
        let (mut again, _) = tokio_tungstenite::connect_async(&url).await.expect("websocket");
        send(&mut again, json!({"op": "subscribe", "key": "_t.ws", "after": update["id"]})).await;
        let missed = recv(&mut again).await;
        assert_eq!(missed["type"], "update");
        assert!(close(&missed["nodes"][1]["progress"], 1.0), "{missed}");
    }

    #[tokio::test]
    async fn a_cross_site_websocket_or_socket_io_is_refused_unless_its_origin_is_listed() {
        let stack = Stack::with(Options::default().arg("--allowed-origins", "https://ui.example")).await;
        let url = stack.base.replace("http://", "ws://") + "/ws";
        let mut request = url.as_str().into_client_request().unwrap();
        request.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
        let refused = tokio_tungstenite::connect_async(request).await.unwrap_err();
        assert!(refused.to_string().contains("403"), "{refused}");
        let mut request = url.as_str().into_client_request().unwrap();
        request.headers_mut().insert("origin", "https://ui.example".parse().unwrap());
        tokio_tungstenite::connect_async(request).await.expect("a listed origin is let in");
        let mut request = url.as_str().into_client_request().unwrap();
        let same = stack.base.clone();
        request.headers_mut().insert("origin", same.parse().unwrap());
        tokio_tungstenite::connect_async(request).await.expect("same origin is let in");
        // socket.io's handshake likewise.
        let handshake = format!("{}/socket.io/?EIO=4&transport=polling", stack.base);
        let client = reqwest::Client::new();
        let refused = client.get(&handshake).header("origin", "https://evil.example").send().await.unwrap();
        assert_eq!(refused.status(), 403);
        let allowed = client.get(&handshake).header("origin", "https://ui.example").send().await.unwrap();
        assert_eq!(allowed.status(), 200);
    }
}

/// SCA's own browser client (socket.io-client 1.7, Engine.IO 3) and a current 4.x join a tree
/// root and receive `update` arrays for AMQP updates published as SCA's producers publish them.
/// Needs Node and the npm packages of `tests/socketio` (installed here when missing).
#[tokio::test]
async fn socket_io_clients_1_7_and_4_receive_updates_for_amqp_progress() {
    use std::process::Stdio;

    use tokio::io::AsyncBufReadExt as _;

    let dir = common::socket_io_clients().await;
    let stack = Stack::with(Options::default()).await;
    stack.publish("_portal.job1.task1", json!({"progress": 0, "status": "waiting"})).await;
    let channel = amqp(&stack).await;
    for version in ["sio1", "sio4"] {
        let mut child = tokio::process::Command::new("node")
            .arg("client.js")
            .args([version, &stack.base, "_portal.job1", "_portal.job1.task1"])
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first =
            tokio::time::timeout(EVENT_WAIT, lines.next_line()).await.expect("ready in time").unwrap();
        assert_eq!(first.as_deref(), Some(r#"{"ready":true}"#), "{version}");
        // As SCA's producers do: one message per update, routed by the key.
        publish_amqp(
            &channel,
            "_portal.job1.task1",
            &json!({"progress": 0.5, "status": "running", "msg": "half"}),
        )
        .await;
        publish_amqp(&channel, "_portal.job1.task1", &json!({"progress": 1, "status": "finished"})).await;
        let mut updates = Vec::new();
        while let Some(line) =
            tokio::time::timeout(EVENT_WAIT, lines.next_line()).await.expect("a line in time").unwrap()
        {
            let event: Value = serde_json::from_str(&line).unwrap();
            assert!(event.get("error").is_none(), "{version}: {event}");
            updates.push(event);
        }
        let status = child.wait().await.unwrap();
        assert!(status.success(), "{version}: {updates:?}");
        let last = &updates.last().unwrap()["update"];
        assert_eq!(last[0]["key"], "_portal.job1", "{version}: parents first: {last}");
        // Ready for the other client: a fresh start state.
        stack.publish("_portal.job1.task1", json!({"progress": 0, "status": "waiting"})).await;
    }
}

/// The live feed on a Redis Cluster of three masters (every tree's change log in its root's slot,
/// the request queue in three partitions): SSE and socket.io as on one Redis.
mod cluster {
    use super::*;

    #[tokio::test]
    async fn sse_follows_a_tree_a_requests_lifecycle_and_resumes_on_a_cluster() {
        let stack = Stack::with(Options::with_processor().on_cluster()).await;
        stack.publish("_t.job.a", json!({"progress": 0.5, "status": "running"})).await;
        stack.publish("_t.job.b", json!({"progress": 0})).await;
        let mut sse = Sse::open(&stack.base, "/status/_t.job/events", None).await;
        let snapshot = sse.next_within(EVENT_WAIT).await.unwrap();
        assert_eq!(snapshot.event, "snapshot");
        let get = stack.get("/status/_t.job?depth=8").await;
        assert_eq!(without_age(snapshot.data.clone()), without_age(get.json));

        // Another tree (another slot) changes too; only this one's changes arrive, parents first.
        stack.publish("_t.other.a", json!({"progress": 0.3})).await;
        stack.publish("_t.job.a", json!({"progress": 1, "status": "finished"})).await;
        let events =
            sse.until(EVENT_WAIT, |ev| node(ev, "_t.job.a").is_some_and(|a| a["status"] == "finished")).await;
        let last = events.last().unwrap();
        let keys: Vec<&str> =
            last.data.as_array().unwrap().iter().map(|n| n["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["_t.job", "_t.job.a"]);
        assert!(events.iter().all(|ev| node(ev, "_t.other.a").is_none()), "{events:?}");
        assert!(close(&node(last, "_t.job").unwrap()["progress"], 0.5));

        // Resuming after that event through another replica delivers exactly what was missed.
        drop(sse);
        stack.publish("_t.job.b", json!({"progress": 0.4})).await;
        let stop = CancellationToken::new();
        let second = stack.another_ingress(&stop).await;
        let mut resumed = Sse::open(&second, "/status/_t.job/events", Some(&last.id)).await;
        let missed = resumed.next_within(EVENT_WAIT).await.unwrap();
        assert_eq!(missed.event, "update", "{missed:?}");
        let keys: Vec<&str> =
            missed.data.as_array().unwrap().iter().map(|n| n["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["_t.job", "_t.job.b"]);
        // An update through the first replica reaches the second's subscriber.
        stack.publish("_t.job.b", json!({"progress": 0.9})).await;
        resumed.until(EVENT_WAIT, |ev| node(ev, "_t.job.b").is_some_and(|b| b["progress"] == 0.9)).await;
        stop.cancel();

        // A request's node, watched before it exists, shows its lifecycle to the end.
        let mut life = Sse::open(&stack.base, "/status/_life.r1/events", None).await;
        let reply = stack
            .submit(&json!({"handler": "echo", "payload": {"x": 1}, "progress_key": "_life.r1"}), None)
            .await;
        assert_eq!(reply.status, 202, "{}", reply.json);
        assert_eq!(life.next_within(EVENT_WAIT).await.unwrap().event, "snapshot");
        life.until(EVENT_WAIT * 2, |ev| {
            let n = if ev.event == "snapshot" { Some(&ev.data) } else { node(ev, "_life.r1") };
            n.is_some_and(|n| n["status"] == "finished")
        })
        .await;
    }

    /// A current socket.io client joined to a tree root receives `update` arrays for updates
    /// published over AMQP, as SCA's producers publish them. Needs Node and the npm packages of
    /// `tests/socketio` (installed here when missing).
    #[tokio::test]
    async fn a_socket_io_client_receives_updates_on_a_cluster() {
        use std::process::Stdio;

        use tokio::io::AsyncBufReadExt as _;

        let dir = common::socket_io_clients().await;
        let stack = Stack::with(Options::default().on_cluster()).await;
        stack.publish("_portal.job1.task1", json!({"progress": 0, "status": "waiting"})).await;
        let channel = amqp(&stack).await;
        let mut child = tokio::process::Command::new("node")
            .arg("client.js")
            .args(["sio4", &stack.base, "_portal.job1", "_portal.job1.task1"])
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first =
            tokio::time::timeout(EVENT_WAIT, lines.next_line()).await.expect("ready in time").unwrap();
        assert_eq!(first.as_deref(), Some(r#"{"ready":true}"#));
        publish_amqp(&channel, "_portal.job1.task1", &json!({"progress": 0.5, "status": "running"})).await;
        publish_amqp(&channel, "_portal.job1.task1", &json!({"progress": 1, "status": "finished"})).await;
        let mut updates = Vec::new();
        while let Some(line) =
            tokio::time::timeout(EVENT_WAIT, lines.next_line()).await.expect("a line in time").unwrap()
        {
            let event: Value = serde_json::from_str(&line).unwrap();
            assert!(event.get("error").is_none(), "{event}");
            updates.push(event);
        }
        assert!(child.wait().await.unwrap().success(), "{updates:?}");
        let last = &updates.last().unwrap()["update"];
        assert_eq!(last[0]["key"], "_portal.job1", "parents first: {last}");
    }
}
