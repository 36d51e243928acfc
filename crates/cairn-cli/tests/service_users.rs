//! The users of `deploy/redis/users.acl` and `deploy/rabbitmq/definitions.json` suffice and keep
//! each service to its rights. A redis-server of this test's own loads the ACL file (plus an
//! all-rights user for the harness) and each service connects as its own user with the
//! development password whose hash the file holds; on the shared RabbitMQ, the aggregator and the
//! processor connect as users with the definitions' permission patterns on a vhost of the test's
//! own. A request runs end to end (ingress → queue → processor → result, its progress over AMQP),
//! a progress update goes through ingress and the aggregator, the stream-trimmer does a full run;
//! Redis's ACL log shows that nothing was refused, and what lies outside a user's rights is.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use cairn_amqp::{ProgressPublisher, PublisherConfig};
use cairn_progress::{Key, Update};
use cairn_testkit::{AmqpVhost, RedisServer, wait_until};
use clap::Parser as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// The harness's own user, added to a copy of the file.
const ADMIN: (&str, &str) = ("cairn-test", "cairn-test");

/// Each service's user and its development password (deploy/redis/README.md).
const USERS: [(&str, &str); 4] = [
    ("ingress", "cairn-dev-ingress"),
    ("request-processor", "cairn-dev-request-processor"),
    ("progress-aggregator", "cairn-dev-progress-aggregator"),
    ("stream-trimmer", "cairn-dev-stream-trimmer"),
];

fn acl_file(dir: &tempfile::TempDir) -> PathBuf {
    let deployed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/redis/users.acl");
    let rules = std::fs::read_to_string(&deployed).expect("deploy/redis/users.acl");
    let path = dir.path().join("users.acl");
    let (user, password) = ADMIN;
    std::fs::write(&path, format!("{rules}user {user} on >{password} ~* &* +@all\n")).expect("ACL file");
    path
}

/// A user on `vhost` with the permissions `deploy/rabbitmq/definitions.json` gives `user`.
async fn amqp_url(vhost: &AmqpVhost, user: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/rabbitmq/definitions.json");
    let definitions: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("definitions.json")).expect("JSON");
    let permissions = definitions["permissions"]
        .as_array()
        .expect("permissions")
        .iter()
        .find(|p| p["user"] == user && p["vhost"] == "/")
        .unwrap_or_else(|| panic!("definitions.json gives {user} no permissions on /"));
    let pattern = |what: &str| permissions[what].as_str().expect("a pattern").to_owned();
    vhost.add_user(user, &pattern("configure"), &pattern("write"), &pattern("read")).await
}

fn url(server: &RedisServer, service: &str) -> String {
    let (user, password) = USERS.iter().find(|(u, _)| *u == service).expect("a service of USERS");
    format!("redis://{user}:{password}@127.0.0.1:{}", server.port())
}

/// Runs `command` as the URL's user, which Redis must refuse with `NOPERM`.
async fn refusal(url: &str, command: &[&str]) {
    let client = redis::Client::open(url).expect("URL");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connects");
    let mut cmd = redis::cmd(command[0]);
    cmd.arg(&command[1..]);
    let error = cmd.query_async::<redis::Value>(&mut conn).await.expect_err("refused");
    assert_eq!(error.code(), Some("NOPERM"), "{command:?} is refused for lack of rights: {error}");
}

#[tokio::test]
async fn each_service_runs_with_its_own_redis_user() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = RedisServer::builder().acl_file(acl_file(&dir), ADMIN.0, ADMIN.1).start().await;
    let vhost = AmqpVhost::new().await;
    let handlers = tempfile::Builder::new().suffix(".toml").tempfile().expect("handlers file");
    std::fs::write(handlers.path(), "[handlers.echo]\nkind = \"echo\"\n").expect("handlers file");
    let cancel = CancellationToken::new();
    let aggregator_amqp = amqp_url(&vhost, "progress-aggregator").await;
    let processor_amqp = amqp_url(&vhost, "request-processor").await;

    let aggregator = progress_aggregator::Config::try_parse_from([
        "progress-aggregator",
        "--grpc-addr=127.0.0.1:0",
        "--admin-addr=127.0.0.1:0",
        &format!("--redis-url={}", url(&server, "progress-aggregator")),
        &format!("--amqp-url={aggregator_amqp}"),
        "--shards=1",
        "--grace=5s",
    ])
    .expect("aggregator config");
    let aggregator = progress_aggregator::App::build(aggregator).await.expect("aggregator builds");
    let aggregator_url = format!("http://{}", aggregator.grpc_addr());
    let aggregator_ready = format!("http://{}/readyz", aggregator.admin_addr());
    let mut tasks = vec![tokio::spawn(aggregator.run(cancel.clone()))];

    let processor = request_processor::Config::try_parse_from([
        "request-processor",
        &format!("--redis-url={}", url(&server, "request-processor")),
        &format!("--amqp-url={processor_amqp}"),
        "--admin-addr=127.0.0.1:0",
        "--grace=2s",
    ])
    .expect("processor config");
    let processor = request_processor::App::build_with_handlers(processor, common::handlers())
        .await
        .expect("processor builds");
    let processor_ready = format!("http://{}/readyz", processor.admin_addr());
    tasks.push(tokio::spawn(processor.run(cancel.clone())));

    let ingress = ingress::Config::try_parse_from([
        "ingress",
        "--addr=127.0.0.1:0",
        "--admin-addr=127.0.0.1:0",
        &format!("--redis-url={}", url(&server, "ingress")),
        &format!("--aggregator-url={aggregator_url}"),
        &format!("--handlers={}", handlers.path().display()),
        "--grace=5s",
    ])
    .expect("ingress config");
    let ingress = ingress::App::build(ingress).await.expect("ingress builds");
    let base = format!("http://{}", ingress.local_addr());
    tasks.push(tokio::spawn(ingress.run(cancel.clone())));

    let http = reqwest::Client::builder().timeout(WAIT).build().expect("http client");
    for ready in [format!("{base}/readyz"), aggregator_ready, processor_ready] {
        wait_until(&ready, WAIT, || async { http.get(&ready).send().await.is_ok_and(|r| r.status() == 200) })
            .await
            .expect("each service is ready with its own Redis user");
    }

    // A request, end to end.
    let reply = http
        .post(format!("{base}/v1/requests"))
        .header("prefer", "wait=10")
        .json(&json!({"handler": "echo", "payload": {"acl": 1}}))
        .send()
        .await
        .expect("submit");
    assert_eq!(reply.status(), StatusCode::OK);
    let reply: Value = reply.json().await.expect("JSON");
    assert_eq!((&reply["state"], &reply["result"]), (&json!("succeeded"), &json!({"acl": 1})), "{reply}");
    let id = reply["id"].as_str().expect("id").to_owned();
    let record: Value =
        http.get(format!("{base}/v1/requests/{id}")).send().await.expect("read").json().await.expect("JSON");
    assert_eq!(record["state"], "succeeded", "{record}");

    // Progress published as the processor's RabbitMQ user, applied by the aggregator as its own.
    let publisher = ProgressPublisher::start(PublisherConfig::new(processor_amqp.as_str(), "progress"));
    publisher.publish(Key::parse("acl.amqp").expect("key"), Update::new().progress(0.75));
    publisher.close(WAIT).await.expect("the broker confirmed the processor's user's publish");
    let progress = format!("{base}/status/acl.amqp");
    wait_until("the update applied over AMQP", WAIT, || async {
        let node: Value = http.get(&progress).send().await.expect("read").json().await.expect("JSON");
        node["progress"].as_f64() == Some(0.75)
    })
    .await
    .expect("progress the processor's user publishes reaches Redis through the aggregator's user");

    // A progress update through ingress and the aggregator.
    let posted = http.post(format!("{base}/status/acl.job")).json(&json!({"progress": 0.5})).send().await;
    assert_eq!(posted.expect("post").status(), StatusCode::OK);
    let node: Value =
        http.get(format!("{base}/status/acl.job")).send().await.expect("read").json().await.expect("JSON");
    assert_eq!(node["progress"].as_f64(), Some(0.5), "{node}");

    // A full run of the stream-trimmer (lease, registry, trims, purges, idle consumers).
    let trimmer = stream_trimmer::Config::try_parse_from([
        "stream-trimmer",
        "--admin-addr=127.0.0.1:0",
        &format!("--redis-url={}", url(&server, "stream-trimmer")),
    ])
    .expect("trimmer config");
    let trimmer = stream_trimmer::App::build(trimmer).await.expect("trimmer builds");
    let now_ms = i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
    )
    .expect("ms");
    let report = stream_trimmer::trim_once(&trimmer.deps(), now_ms).await.expect("a trim run");
    assert!(report.acted(), "the trimmer took the lease: {report:?}");
    assert!(report.errors.is_empty(), "the trim run failed somewhere: {:?}", report.errors);
    assert!(!report.streams.is_empty(), "the requests stream was trimmed: {report:?}");

    cancel.cancel();
    for task in tasks {
        tokio::time::timeout(WAIT, task).await.expect("service stops").expect("task").expect("run");
    }

    // Nothing any service ran was refused.
    let admin = redis::Client::open(server.url()).expect("URL");
    let mut admin = admin.get_multiplexed_async_connection().await.expect("admin connects");
    let log: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query_async(&mut admin).await.expect("ACL LOG");
    assert!(log.is_empty(), "Redis refused commands of a service: {log:?}");

    // What lies outside a user's rights is refused.
    let ingress = url(&server, "ingress");
    for command in [&["FLUSHALL"][..], &["KEYS", "*"], &["CONFIG", "GET", "*"], &["GET", "other:key"]] {
        refusal(&ingress, command).await;
    }
    let trimmer = url(&server, "stream-trimmer");
    refusal(&trimmer, &["XREADGROUP", "GROUP", "g", "c", "STREAMS", "cairn:requests", ">"]).await;
    let anonymous = format!("redis://127.0.0.1:{}", server.port());
    refusal(&anonymous, &["GET", "cairn:requests"]).await;

    // The processor may not declare queues (or read any).
    let conn = lapin::Connection::connect(&processor_amqp, lapin::ConnectionProperties::default())
        .await
        .expect("the processor's user connects");
    let channel = conn.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare("other".into(), lapin::options::QueueDeclareOptions::default(), Default::default())
        .await;
    let error = declared.map(drop).expect_err("refused").to_string();
    assert!(error.contains("ACCESS_REFUSED"), "queue.declare as request-processor: {error}");
}
