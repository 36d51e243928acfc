//! Redis over `rediss://` and RabbitMQ over `amqps://`: a redis-server with a TLS port and a
//! RabbitMQ node with a TLS listener, both of this test's own, serving a certificate signed by a
//! CA the test made. With `CAIRN_REDIS_TLS_CA_FILE` / `CAIRN_AMQP_TLS_CA_FILE` naming that CA,
//! progress published over `amqps://` is applied by the aggregator to Redis over `rediss://`;
//! without the CA the handshake is refused, saying why. A Redis Cluster that speaks only TLS
//! (client ports and cluster bus) serves the aggregator through `rediss://` seeds and that CA.

use std::path::Path;
use std::time::Duration;

use cairn_amqp::{Endpoint, ProgressPublisher, PublisherConfig};
use cairn_progress::{Key, Update};
use cairn_redis::progress::ReadOptions;
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_testkit::{
    AmqpVhost, RabbitNode, RedisCluster, RedisServer, TestCerts, publish_progress, unique_name, wait_until,
};
use clap::Parser;
use lapin::{BasicProperties, ConnectionProperties};
use progress_aggregator::{App, Config};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn aggregator_config(redis_url: &str, prefix: &str, amqp_url: &str, ca: &Path) -> Config {
    let ca = ca.display().to_string();
    Config::try_parse_from([
        "progress-aggregator",
        "--grpc-addr=127.0.0.1:0",
        "--admin-addr=127.0.0.1:0",
        &format!("--redis-url={redis_url}"),
        &format!("--redis-tls-ca-file={ca}"),
        &format!("--key-prefix={prefix}"),
        &format!("--amqp-url={amqp_url}"),
        &format!("--amqp-tls-ca-file={ca}"),
        "--shards=1",
        "--grace=5s",
    ])
    .expect("valid config")
}

#[tokio::test]
async fn progress_flows_over_tls_with_the_configured_ca() {
    let certs = TestCerts::new();
    let redis = RedisServer::builder().tls(&certs).start().await;
    let rabbit = RabbitNode::with_tls(&certs).await;
    let prefix = unique_name("tls");

    let app = App::build(aggregator_config(&redis.tls_url(), &prefix, &rabbit.tls_url(), &certs.ca_file()))
        .await
        .expect("aggregator builds");
    let ready = format!("http://{}/readyz", app.admin_addr());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(app.run(cancel.clone()));
    wait_until("aggregator ready over TLS", WAIT, || {
        let ready = ready.clone();
        async move { cairn_runtime::healthcheck(&ready).await.is_ok() }
    })
    .await
    .expect("the aggregator connects to Redis and RabbitMQ over TLS");

    // Cairn's own publisher over amqps://, the store over rediss://.
    let endpoint = Endpoint::new(rabbit.tls_url()).with_ca_file(&certs.ca_file()).expect("CA file");
    let publisher = ProgressPublisher::start(PublisherConfig::new(endpoint, "progress"));
    let job = Key::parse("tls.job").expect("key");
    publisher.publish(job.clone(), Update::new().progress(0.25).status("encrypted"));
    publisher.close(WAIT).await.expect("the broker confirmed the update over TLS");

    let config = RedisConfig::new(redis.tls_url(), prefix.clone()).with_tls_ca_file(certs.ca_file());
    let store = ProgressStore::new(config.manager().expect("TLS client"), prefix);
    wait_until("the update applied over TLS", WAIT, || async {
        let node = store.get(&job, &ReadOptions::default()).await.expect("read over rediss://");
        node.and_then(|n| n.progress()) == Some(0.25)
    })
    .await
    .expect("progress published over amqps:// reaches Redis over rediss://");

    // The broker presents a certificate of an unknown CA: without the CA file, no connection.
    let refused = Endpoint::new(rabbit.tls_url())
        .connect(ConnectionProperties::default())
        .await
        .map(drop)
        .expect_err("a certificate of an unknown CA is refused");
    let text = format!("{refused:#}").to_lowercase();
    assert!(text.contains("certificate"), "the AMQP error names the certificate: {text}");

    cancel.cancel();
    task.await.expect("aggregator task").expect("aggregator run");
}

#[tokio::test]
async fn redis_over_tls_without_the_ca_is_refused_naming_the_certificate() {
    let certs = TestCerts::new();
    let redis = RedisServer::builder().tls(&certs).start().await;

    let mut trusted =
        RedisConfig::new(redis.tls_url(), "t").with_tls_ca_file(certs.ca_file()).manager().unwrap();
    cairn_redis::ping(&mut trusted).await.expect("PING over rediss:// with the CA");

    let untrusted = RedisConfig::new(redis.tls_url(), "t");
    let error = untrusted.dedicated().await.map(drop).expect_err("an unknown CA is refused");
    let text = error.to_string().to_lowercase();
    assert!(text.contains("certificate"), "the Redis error names the certificate: {text}");
    let mut manager = untrusted.manager().expect("a lazy client");
    let error = cairn_redis::ping(&mut manager).await.expect_err("an unknown CA is refused");
    assert!(
        error.to_lowercase().contains("certificate"),
        "the readiness error names the certificate: {error}"
    );
}

#[tokio::test]
async fn a_redis_cluster_over_tls_serves_the_aggregator_with_the_configured_ca() {
    let certs = TestCerts::new();
    let cluster = RedisCluster::with_tls(&certs).await;
    assert!(cluster.urls().iter().all(|url| url.starts_with("rediss://")), "{}", cluster.url());
    let vhost = AmqpVhost::new().await;
    let prefix = unique_name("tlsc");
    let ca = certs.ca_file().display().to_string();
    let config = Config::try_parse_from([
        "progress-aggregator",
        "--grpc-addr=127.0.0.1:0",
        "--admin-addr=127.0.0.1:0",
        &format!("--redis-url={}", cluster.url()),
        "--redis-cluster=true",
        &format!("--redis-tls-ca-file={ca}"),
        &format!("--key-prefix={prefix}"),
        &format!("--amqp-url={}", vhost.url),
        "--shards=1",
        "--grace=5s",
    ])
    .expect("valid config");
    let app = App::build(config).await.expect("aggregator builds");
    let ready = format!("http://{}/readyz", app.admin_addr());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(app.run(cancel.clone()));
    wait_until("aggregator ready on the TLS cluster", WAIT, || {
        let ready = ready.clone();
        async move { cairn_runtime::healthcheck(&ready).await.is_ok() }
    })
    .await
    .expect("the aggregator connects to the cluster over TLS");

    // Twelve trees: their slots fall on every master, so each node's connection is TLS.
    let (_amqp, channel) = vhost.progress_publisher().await;
    let burst: Vec<String> =
        (0..12).map(|i| format!(r#"{{"key": "_s.t{i}.step", "progress": 0.5}}"#)).collect();
    let properties = BasicProperties::default().with_content_type("application/json".into());
    publish_progress(&channel, "_s", format!("[{}]", burst.join(",")).as_bytes(), properties).await;

    let config = RedisConfig::cluster(cluster.url(), prefix.clone()).with_tls_ca_file(certs.ca_file());
    let store = ProgressStore::new(config.connection().expect("TLS cluster client"), prefix.clone());
    wait_until("every tree applied over TLS", WAIT, || async {
        for i in 0..12 {
            let key = Key::parse(&format!("_s.t{i}")).expect("key");
            let node = store.get(&key, &ReadOptions::default()).await.expect("read over rediss://");
            if node.and_then(|n| n.progress()) != Some(0.5) {
                return false;
            }
        }
        true
    })
    .await
    .expect("progress published over AMQP reaches every master over rediss://");
    let counts = cluster.key_counts().await;
    assert!(counts.iter().all(|&n| n > 0), "every master holds trees, read over TLS: {counts:?}");

    // The nodes present a certificate of an unknown CA: without the CA file, no connection, and
    // the readiness check says why (not just that no node was found).
    let untrusted = RedisConfig::cluster(cluster.url(), prefix).connection().expect("a lazy client");
    let error = untrusted.ready().await.expect_err("an unknown CA is refused");
    assert!(
        error.to_lowercase().contains("certificate"),
        "the readiness error names the certificate: {error}"
    );

    cancel.cancel();
    task.await.expect("aggregator task").expect("aggregator run");
}

#[tokio::test]
async fn unusable_ca_files_are_refused_at_start_naming_the_variable() {
    let certs = TestCerts::new();
    let missing = certs.dir().join("missing.pem");
    let not_pem = certs.dir().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();

    let redis = |url: &str, ca: &Path| {
        RedisConfig::new(url, "t").with_tls_ca_file(ca).manager().map(drop).expect_err("refused").to_string()
    };
    let text = redis("rediss://127.0.0.1:1", &missing);
    assert!(text.contains("cannot read CAIRN_REDIS_TLS_CA_FILE"), "{text}");
    let text = redis("rediss://127.0.0.1:1", &not_pem);
    assert!(text.contains("CAIRN_REDIS_TLS_CA_FILE") && text.contains("no PEM certificate"), "{text}");
    let text = redis("redis://127.0.0.1:1", &certs.ca_file());
    assert!(text.contains("does not start with rediss://"), "{text}");

    let amqp = |url: &str, ca: &Path| {
        Endpoint::new(url).with_ca_file(ca).map(drop).expect_err("refused").to_string()
    };
    let text = amqp("amqps://127.0.0.1:1/%2f", &missing);
    assert!(text.contains("cannot read CAIRN_AMQP_TLS_CA_FILE"), "{text}");
    let text = amqp("amqps://127.0.0.1:1/%2f", &not_pem);
    assert!(text.contains("CAIRN_AMQP_TLS_CA_FILE") && text.contains("no PEM certificate"), "{text}");
    let text = amqp("amqp://127.0.0.1:1/%2f", &certs.ca_file());
    assert!(text.contains("does not start with amqps://"), "{text}");

    // The service refuses to start with it, naming the variable.
    let config = aggregator_config("rediss://127.0.0.1:1", "t", "amqps://127.0.0.1:1/%2f", &missing);
    let error = App::build(config).await.map(drop).expect_err("no start with a missing CA file");
    assert!(format!("{error:#}").contains("CAIRN_REDIS_TLS_CA_FILE"), "{error:#}");
}
