//! The aggregator against the real Redis and RabbitMQ, each test in its own key prefix and vhost.

use std::time::Duration;

use cairn_progress::Key;
use cairn_proto::map_to_struct;
use cairn_proto::v1::progress_client::ProgressClient;
use cairn_proto::v1::{DeleteRequest, GetRequest, UpdateRequest};
use cairn_redis::progress::ReadOptions;
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_testkit::{AmqpVhost, RedisNamespace, publish_progress, wait_until};
use clap::Parser;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use progress_aggregator::consumer::{ERROR_HEADER, TIME_HEADER};
use progress_aggregator::{App, Config};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// One running aggregator; stops when dropped.
struct Running {
    grpc: String,
    admin: String,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("aggregator task").expect("aggregator run");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(ns: &RedisNamespace, vhost: &AmqpVhost, shards: u16) -> Running {
    start_with(ns, vhost, shards, &[]).await
}

async fn start_with(ns: &RedisNamespace, vhost: &AmqpVhost, shards: u16, extra: &[&str]) -> Running {
    let config = Config::try_parse_from(
        [
            "progress-aggregator",
            "--grpc-addr=127.0.0.1:0",
            "--admin-addr=127.0.0.1:0",
            &format!("--redis-url={}", ns.url),
            &format!("--key-prefix={}", ns.prefix),
            &format!("--amqp-url={}", vhost.url),
            &format!("--shards={shards}"),
            "--grace=5s",
        ]
        .into_iter()
        .chain(extra.iter().copied()),
    )
    .expect("valid config");
    let app = App::build(config).await.expect("aggregator builds");
    let grpc = format!("http://{}", app.grpc_addr());
    let admin = format!("http://{}", app.admin_addr());
    let cancel = CancellationToken::new();
    let task = Some(tokio::spawn(app.run(cancel.clone())));
    let running = Running { grpc, admin, cancel, task };
    let ready = format!("{}/readyz", running.admin);
    wait_until("aggregator ready", WAIT, || {
        let ready = ready.clone();
        async move { cairn_runtime::healthcheck(&ready).await.is_ok() }
    })
    .await
    .expect("aggregator becomes ready");
    running
}

fn store(ns: &RedisNamespace) -> ProgressStore {
    let config = RedisConfig::new(ns.url.clone(), ns.prefix.clone());
    ProgressStore::new(config.manager().expect("redis url"), ns.prefix.clone())
}

fn key(s: &str) -> Key {
    Key::parse(s).expect("valid key")
}

/// Publishes one message and waits for the broker's confirm.
async fn publish(channel: &Channel, routing_key: &str, body: &[u8], headers: Option<FieldTable>) {
    let mut properties = BasicProperties::default().with_content_type("application/json".into());
    if let Some(headers) = headers {
        properties = properties.with_headers(headers);
    }
    publish_progress(channel, routing_key, body, properties).await;
}

async fn progress_of(store: &ProgressStore, k: &str) -> Option<f64> {
    store.get(&key(k), &ReadOptions::default()).await.expect("read").and_then(|n| n.progress())
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_while_good_ones_apply() {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let _aggregator = start(&ns, &vhost, 1).await;
    let (_conn, channel) = vhost.progress_publisher().await;
    let store = store(&ns);

    publish(&channel, "_t.job.a", br#"{"progress": 0.1}"#, None).await;
    publish(&channel, "_t.job.a", b"{not json", None).await;
    publish(&channel, "_t.job.a", br#"{"progress": 2}"#, None).await;
    publish(&channel, "bad..key", br#"{"progress": 0.3}"#, None).await;
    publish(&channel, "_t.job", br#"[{"key": "_t.other", "progress": 0.3}]"#, None).await;
    publish(&channel, "_t.job.a", br#"{"progress": 0.5}"#, None).await;
    publish(&channel, "_t.job.b", br#"{"progress": 1}"#, None).await;

    wait_until("good updates applied", WAIT, || async {
        progress_of(&store, "_t.job.b").await == Some(1.0)
            && progress_of(&store, "_t.job.a").await == Some(0.5)
    })
    .await
    .unwrap();
    assert_eq!(progress_of(&store, "_t.job").await, Some(0.75));
    assert_eq!(progress_of(&store, "_t.other").await, None, "a burst outside its subtree applies nothing");

    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while reasons.len() < 4 && tokio::time::Instant::now() < deadline {
        match vhost.get_message("progress.dead").await {
            Some(message) => reasons
                .push(message["properties"]["headers"][ERROR_HEADER].as_str().unwrap_or_default().to_owned()),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(reasons.len(), 4, "four dead letters: {reasons:?}");
    assert!(reasons[0].contains("JSON"), "reason names the problem: {}", reasons[0]);
    assert!(reasons[1].contains("progress"), "reason names the field: {}", reasons[1]);
    assert!(reasons[2].contains("bad..key"), "reason names the routing key: {}", reasons[2]);
    assert!(reasons[3].contains("_t.other"), "reason names the key outside the subtree: {}", reasons[3]);
    assert_eq!(vhost.get_message("progress.dead").await, None, "exactly the four poison messages");
}

/// With `CAIRN_AMQP_QUEUE_TYPE=quorum` the shard and dead-letter queues are quorum queues (a
/// classic declaration of the same name is refused), and updates and dead letters flow as before.
#[tokio::test]
async fn quorum_queues_carry_updates_and_dead_letters() {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let aggregator = start_with(&ns, &vhost, 2, &["--queue-type=quorum"]).await;
    let (conn, channel) = vhost.progress_publisher().await;
    let store = store(&ns);
    publish(&channel, "_t.q.a", br#"{"progress": 0.5}"#, None).await;
    publish(&channel, "_t.q.b", b"{not json", None).await;
    publish(&channel, "_t.q.b", br#"{"progress": 1}"#, None).await;
    wait_until("updates applied through quorum queues", WAIT, || async {
        progress_of(&store, "_t.q").await == Some(0.75)
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let letter = loop {
        if let Some(message) = vhost.get_message("progress.dead").await {
            break message;
        }
        assert!(tokio::time::Instant::now() < deadline, "the poison message reaches progress.dead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(letter["properties"]["headers"][ERROR_HEADER].as_str().unwrap_or_default().contains("JSON"));
    for queue in ["progress.0", "progress.1", "progress.dead"] {
        let classic = conn.create_channel().await.unwrap();
        let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
        let refused = classic.queue_declare(queue.into(), durable, FieldTable::default()).await;
        let error = refused.expect_err("a classic declaration of a quorum queue is refused").to_string();
        assert!(error.contains("inequivalent arg"), "{queue}: {error}");
    }
    aggregator.stop().await;
}

/// A valid message that Redis refuses (here: its node's key holds a string) is dead-lettered
/// with the reason, and the messages around it, on the same shard, still apply.
#[tokio::test]
async fn a_message_redis_refuses_is_dead_lettered_and_the_shard_goes_on() {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let _aggregator = start(&ns, &vhost, 1).await;
    let (_conn, channel) = vhost.progress_publisher().await;
    let store = store(&ns);
    let mut redis = ns.connection().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{}:pn:_t.bad.x", ns.prefix))
        .arg("not a hash")
        .query_async(&mut redis)
        .await
        .unwrap();

    publish(&channel, "_t.ok.a", br#"{"progress": 0.1}"#, None).await;
    publish(&channel, "_t.bad.x", br#"{"progress": 0.5}"#, None).await;
    publish(
        &channel,
        "_t.ok",
        br#"[{"key": "_t.ok.a", "progress": 0.9}, {"key": "_t.ok.b", "progress": 1}]"#,
        None,
    )
    .await;
    wait_until("the messages after the refused one applied", WAIT, || async {
        progress_of(&store, "_t.ok.a").await == Some(0.9) && progress_of(&store, "_t.ok.b").await == Some(1.0)
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let dead = loop {
        if let Some(message) = vhost.get_message("progress.dead").await {
            break message;
        }
        assert!(tokio::time::Instant::now() < deadline, "the refused message is dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead["routing_key"], "_t.bad.x");
    let reason = dead["properties"]["headers"][ERROR_HEADER].as_str().unwrap_or_default();
    assert!(reason.contains("could not be applied") && reason.contains("WRONGTYPE"), "reason: {reason}");
    assert_eq!(vhost.get_message("progress.dead").await, None, "only the refused message");
}

/// grpc.health.v1 says what /readyz says: NOT_SERVING while Redis hangs, SERVING again after.
#[tokio::test]
async fn grpc_health_follows_a_hung_redis() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let mut server = cairn_testkit::RedisServer::new().await;
    let (ns, vhost) = (RedisNamespace::with_url(server.url()), AmqpVhost::new().await);
    let aggregator = start(&ns, &vhost, 1).await;
    let channel =
        tonic::transport::Endpoint::from_shared(aggregator.grpc.clone()).unwrap().connect().await.unwrap();
    let health = HealthClient::new(channel);
    let status_is = |wanted: ServingStatus| {
        let health = health.clone();
        move || {
            let mut health = health.clone();
            async move {
                let status = health.check(HealthCheckRequest { service: "cairn.v1.Progress".into() }).await;
                status.is_ok_and(|s| s.into_inner().status() == wanted)
            }
        }
    };
    wait_until("SERVING", WAIT, status_is(ServingStatus::Serving)).await.unwrap();
    server.pause();
    wait_until("NOT_SERVING while redis hangs", WAIT, status_is(ServingStatus::NotServing)).await.unwrap();
    server.resume();
    wait_until("SERVING again", WAIT, status_is(ServingStatus::Serving)).await.unwrap();
}

#[tokio::test]
async fn a_duplicated_message_does_not_double_count() {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let _aggregator = start(&ns, &vhost, 1).await;
    let (_conn, channel) = vhost.progress_publisher().await;
    let store = store(&ns);
    let mut headers = FieldTable::default();
    headers.insert(TIME_HEADER.into(), AMQPValue::LongLongInt(1_700_000_000_000));
    let burst = json!([
        {"key": "_t.r.a", "progress": 0.5, "weight": 2, "status": "running", "msg": "half"},
        {"key": "_t.r.b", "progress": 1, "status": "finished"},
    ])
    .to_string();

    publish(&channel, "_t.r", burst.as_bytes(), Some(headers.clone())).await;
    wait_until("burst applied", WAIT, || async { progress_of(&store, "_t.r.b").await == Some(1.0) })
        .await
        .unwrap();
    let once = store.get(&key("_t.r"), &ReadOptions::depth(2)).await.unwrap().unwrap();
    let sums_once = store.sums(&key("_t.r")).await.unwrap();

    publish(&channel, "_t.r", burst.as_bytes(), Some(headers.clone())).await;
    publish(&channel, "_t.r.c", br#"{"progress": 0}"#, None).await;
    wait_until("marker applied", WAIT, || async { progress_of(&store, "_t.r.c").await.is_some() })
        .await
        .unwrap();
    store.delete(&key("_t.r.c"), 1_700_000_000_000).await.unwrap();

    let mut twice = store.get(&key("_t.r"), &ReadOptions::depth(2)).await.unwrap().unwrap();
    twice.update_time = once.update_time; // only the marker's deletion touched the root's time
    assert_eq!(twice, once, "the replayed burst left the identical tree");
    assert_eq!(store.sums(&key("_t.r")).await.unwrap(), sums_once);
    // (2·0.5 + 1·1) / 3
    assert!((once.progress().unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(once.counts.get("running"), Some(&1));
    assert_eq!(once.counts.get("finished"), Some(&1));
}

#[tokio::test]
async fn survives_the_broker_closing_its_connection_without_losing_confirmed_updates() {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let aggregator = start(&ns, &vhost, 2).await;
    let store = store(&ns);
    let total = 200;
    for i in 0..total {
        if i == total / 2 {
            vhost.close_connections().await;
        }
        // A fresh publishing connection each time the broker closed ours.
        let (conn, channel) = vhost.progress_publisher().await;
        publish(&channel, &format!("_t.c.k{i}"), br#"{"progress": 1, "status": "finished"}"#, None).await;
        conn.close(200, "done".into()).await.ok();
    }
    wait_until("every confirmed update applied", Duration::from_secs(60), || async {
        let node = store.get(&key("_t.c"), &ReadOptions::default()).await.unwrap();
        node.is_some_and(|n| n.child_count == total && n.counts.get("finished") == Some(&total))
    })
    .await
    .unwrap();
    assert_eq!(progress_of(&store, "_t.c").await, Some(1.0));
    let ready = format!("{}/readyz", aggregator.admin);
    assert!(cairn_runtime::healthcheck(&ready).await.is_ok(), "ready again after reconnecting");
    aggregator.stop().await;
}

#[tokio::test]
async fn two_aggregators_keep_per_key_order_across_a_failover() {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let first = start(&ns, &vhost, 4).await;
    let second = start(&ns, &vhost, 4).await;
    let (_conn, channel) = vhost.progress_publisher().await;
    let store = store(&ns);
    let (keys, steps) = (8, 60);
    for step in 0..steps {
        if step == steps / 2 {
            // The active consumer goes away mid-stream; the standby takes over its shards.
            first.cancel.cancel();
        }
        for k in 0..keys {
            let body = json!({"seq": step, "progress": f64::from(step) / f64::from(steps - 1)}).to_string();
            publish(&channel, &format!("_t.o.k{k}"), body.as_bytes(), None).await;
        }
    }
    wait_until("last update of every key applied", Duration::from_secs(60), || async {
        let mut done = true;
        for k in 0..keys {
            let node = store.get(&key(&format!("_t.o.k{k}")), &ReadOptions::default()).await.unwrap();
            done &= node.is_some_and(|n| n.fields.get("seq") == Some(&json!(steps - 1)));
        }
        done
    })
    .await
    .unwrap();
    // Give a reordered straggler the chance to overwrite a final state, then check again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for k in 0..keys {
        let node = store.get(&key(&format!("_t.o.k{k}")), &ReadOptions::default()).await.unwrap().unwrap();
        assert_eq!(node.fields.get("seq"), Some(&json!(steps - 1)), "key k{k} ends at its last update");
        assert_eq!(node.progress(), Some(1.0));
    }
    second.stop().await;
}

#[tokio::test]
async fn grpc_progress_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let aggregator = start(&ns, &vhost, 1).await;
    let channel =
        tonic::transport::Endpoint::from_shared(aggregator.grpc.clone()).unwrap().connect().await.unwrap();

    // Health follows readiness (checked every second): SERVING once Redis and RabbitMQ answer.
    let health = HealthClient::new(channel.clone());
    for service in ["", "cairn.v1.Progress"] {
        wait_until(&format!("health of {service:?} is SERVING"), WAIT, || {
            let mut health = health.clone();
            async move {
                let status = health.check(HealthCheckRequest { service: service.into() }).await;
                status.is_ok_and(|s| s.into_inner().status() == ServingStatus::Serving)
            }
        })
        .await
        .unwrap();
    }

    let services = reflection_services(channel.clone()).await;
    assert!(services.contains(&"cairn.v1.Progress".to_string()), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health".to_string()), "{services:?}");
    let services = reflection_services_v1alpha(channel.clone()).await;
    assert!(services.contains(&"cairn.v1.Progress".to_string()), "{services:?}");

    let mut client = ProgressClient::new(channel);
    let fields = |v: Value| Some(map_to_struct(v.as_object().unwrap()));
    let node = client
        .update(UpdateRequest { key: "_g.job.step".into(), fields: fields(json!({"progress": 0.5, "n": 3})) })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert_eq!(node.progress, Some(0.5));
    assert_eq!(node.fields.get("n").and_then(|v| cairn_proto::value_to_json(v).as_i64()), Some(3));

    let bad = client
        .update(UpdateRequest { key: "_g.job.step".into(), fields: fields(json!({"progress": "x"})) })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("progress"), "{}", bad.message());
    let bad = client.update(UpdateRequest { key: "a..b".into(), fields: None }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let job = client
        .get(GetRequest { key: "_g.job".into(), depth: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert_eq!(job.progress, Some(0.5));
    assert_eq!(job.children, vec!["_g.job.step".to_string()]);
    assert_eq!(job.tasks.len(), 1);

    let missing = client.get(GetRequest { key: "_g.nope".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let removed = client.delete(DeleteRequest { key: "_g.job".into() }).await.unwrap().into_inner().removed;
    assert_eq!(removed, 2);

    // The calls above show in the gRPC server's RED metrics, by method and status.
    let metrics = admin_get(&aggregator.admin, "/metrics").await;
    for line in [
        r#"grpc_server_handled_total{grpc_service="cairn.v1.Progress",grpc_method="Update",grpc_code="OK"}"#,
        r#"grpc_server_handled_total{grpc_service="cairn.v1.Progress",grpc_method="Update",grpc_code="InvalidArgument"}"#,
        r#"grpc_server_handled_total{grpc_service="cairn.v1.Progress",grpc_method="Get",grpc_code="NotFound"}"#,
        r#"grpc_server_handling_seconds_bucket{grpc_service="cairn.v1.Progress",grpc_method="Delete",le="+Inf"}"#,
    ] {
        assert!(metrics.lines().any(|l| l.starts_with(line)), "{line} missing in:\n{metrics}");
    }
    aggregator.stop().await;
}

/// The body of `GET {base}{path}` on an admin port (`base` is `http://host:port`).
async fn admin_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or(answer)
}

async fn reflection_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut stream = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().expect("one response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn reflection_services_v1alpha(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut stream = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().expect("one response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn next_event(
    events: &mut tonic::Streaming<cairn_proto::v1::WatchEvent>,
) -> Option<cairn_proto::v1::WatchEvent> {
    tokio::time::timeout(WAIT, events.message()).await.expect("an event in time").unwrap()
}

/// `Watch` through the generated client: snapshot, then updates from gRPC and AMQP, a delete,
/// and resume after an event id.
#[tokio::test]
async fn watch_streams_a_snapshot_then_coalesced_updates_and_resumes() {
    use cairn_proto::v1::WatchRequest;

    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let aggregator = start(&ns, &vhost, 1).await;
    let channel =
        tonic::transport::Endpoint::from_shared(aggregator.grpc.clone()).unwrap().connect().await.unwrap();
    let mut client = ProgressClient::new(channel);
    let fields = |v: Value| Some(map_to_struct(v.as_object().unwrap()));
    client
        .update(UpdateRequest { key: "_w.job.a".into(), fields: fields(json!({"progress": 0.5})) })
        .await
        .unwrap();

    let watch = WatchRequest { key: "_w.job".into(), depth: 2, ..WatchRequest::default() };
    let mut events = client.watch(watch.clone()).await.unwrap().into_inner();
    let snapshot = next_event(&mut events).await.expect("snapshot");
    assert_eq!((snapshot.r#type.as_str(), snapshot.key.as_str()), ("snapshot", "_w.job"));
    assert_eq!(snapshot.nodes[0].tasks[0].progress, Some(0.5));
    assert!(snapshot.nodes[0].age_ms.is_some());

    client
        .update(UpdateRequest {
            key: "_w.job.b".into(),
            fields: fields(json!({"progress": 1, "status": "running"})),
        })
        .await
        .unwrap();
    let update = next_event(&mut events).await.expect("update");
    assert_eq!(update.r#type, "update");
    let keys: Vec<&str> = update.nodes.iter().map(|n| n.key.as_str()).collect();
    assert_eq!(keys, ["_w.job", "_w.job.b"], "parents first, what changed");
    assert_eq!(update.nodes[0].progress, Some(0.75));

    client.delete(DeleteRequest { key: "_w.job.a".into() }).await.unwrap();
    let delete = next_event(&mut events).await.expect("delete");
    assert_eq!(delete.r#type, "delete");
    assert_eq!(delete.nodes[0].key, "_w.job.a");
    drop(events);

    // Resume after the update: the delete and the parent it changed, nothing before.
    let resume = WatchRequest { after: update.id.clone(), ..watch };
    let mut events = client.watch(resume).await.unwrap().into_inner();
    let first = next_event(&mut events).await.unwrap();
    assert_eq!((first.r#type.as_str(), first.nodes[0].key.as_str()), ("delete", "_w.job.a"));
    let second = next_event(&mut events).await.unwrap();
    assert_eq!(second.r#type, "update");
    assert_eq!(second.nodes[0].progress, Some(1.0));

    let bad = client
        .watch(WatchRequest { key: "_w.job".into(), after: "soon".into(), ..WatchRequest::default() })
        .await;
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);

    // Shutdown ends the stream (it must not hold the grace period).
    aggregator.stop().await;
    assert!(
        tokio::time::timeout(WAIT, events.message())
            .await
            .expect("ends in time")
            .map_or(true, |m| m.is_none())
    );
}

/// A client that knows nothing of Cairn's proto but what server reflection tells it: it reads
/// `cairn.v1.Progress`'s descriptor, encodes a `WatchRequest` by the field numbers found there,
/// calls `Watch` and decodes the events' `type`, `id` and `key` the same way.
#[tokio::test]
async fn watch_works_for_a_client_built_from_server_reflection() {
    use prost::Message as _;
    use prost_types::FileDescriptorProto;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let aggregator = start(&ns, &vhost, 1).await;
    store(&ns)
        .apply(&[cairn_redis::progress::Change {
            key: key("_r.job.a"),
            update: cairn_progress::Update::from_slice(br#"{"progress": 0.25}"#).unwrap(),
            time_ms: 1,
        }])
        .await
        .unwrap();
    let channel =
        tonic::transport::Endpoint::from_shared(aggregator.grpc.clone()).unwrap().connect().await.unwrap();

    // What reflection says.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("cairn.v1.Progress".into())),
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let mut answers =
        reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor")
    };
    let file = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .find(|file| file.package() == "cairn.v1")
        .expect("cairn.v1's file");
    let service = file.service.iter().find(|s| s.name() == "Progress").unwrap();
    let method = service.method.iter().find(|m| m.name() == "Watch").expect("Watch is described");
    assert!(method.server_streaming() && !method.client_streaming());
    assert_eq!(method.input_type(), ".cairn.v1.WatchRequest");
    let field = |message: &str, name: &str| -> u32 {
        let message = file.message_type.iter().find(|m| m.name() == message).unwrap();
        message.field.iter().find(|f| f.name() == name).unwrap().number() as u32
    };

    // A request encoded by hand from those numbers: key (string), depth (varint).
    let mut body = Vec::new();
    prost::encoding::string::encode(field("WatchRequest", "key"), &"_r.job".to_owned(), &mut body);
    prost::encoding::uint32::encode(field("WatchRequest", "depth"), &2, &mut body);
    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut events = grpc
        .server_streaming(tonic::Request::new(body), path.parse().unwrap(), RawCodec)
        .await
        .unwrap()
        .into_inner();
    let event = tokio::time::timeout(WAIT, events.message()).await.unwrap().unwrap().expect("an event");
    // Decode the strings of the event by the reflected numbers.
    let mut strings = std::collections::HashMap::new();
    let mut buf = event.as_slice();
    while !buf.is_empty() {
        let (number, wire) = prost::encoding::decode_key(&mut buf).unwrap();
        let len = prost::encoding::decode_varint(&mut buf).unwrap() as usize;
        assert_eq!(wire, prost::encoding::WireType::LengthDelimited);
        strings.entry(number).or_insert_with(|| buf[..len].to_vec());
        buf = &buf[len..];
    }
    let text = |name: &str| String::from_utf8(strings[&field("WatchEvent", name)].clone()).unwrap();
    assert_eq!(text("type"), "snapshot");
    assert_eq!(text("key"), "_r.job");
    assert!(text("id").contains('-'), "an event id: {}", text("id"));
}

/// Passes message bytes through untouched (the reflected client encodes them itself).
#[derive(Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}
