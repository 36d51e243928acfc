//! The aggregator on a Redis Cluster of three masters (docs/contract.md §8): progress published
//! over AMQP lands in trees spread over the cluster's slots, a burst of many namespaced trees is
//! applied tree by tree, every root is indexed, and readiness answers through the cluster.

use std::time::Duration;

use cairn_progress::Key;
use cairn_redis::progress::ReadOptions;
use cairn_redis::{ProgressStore, RedisConfig};
use cairn_testkit::{AmqpVhost, RedisCluster, publish_progress, unique_name, wait_until};
use clap::Parser as _;
use lapin::BasicProperties;
use progress_aggregator::{App, Config};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn updates_over_amqp_land_in_a_cluster() {
    let cluster = RedisCluster::new().await;
    let vhost = AmqpVhost::new().await;
    let prefix = unique_name("agg");
    let config = Config::try_parse_from([
        "progress-aggregator",
        "--grpc-addr=127.0.0.1:0",
        "--admin-addr=127.0.0.1:0",
        &format!("--redis-url={}", cluster.url()),
        "--redis-cluster=true",
        &format!("--key-prefix={prefix}"),
        &format!("--amqp-url={}", vhost.url),
        "--shards=2",
        "--grace=5s",
    ])
    .expect("valid config");
    let app = App::build(config).await.expect("aggregator builds");
    let ready = format!("http://{}/readyz", app.admin_addr());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(app.run(cancel.clone()));
    wait_until("aggregator ready", WAIT, || {
        let ready = ready.clone();
        async move { cairn_runtime::healthcheck(&ready).await.is_ok() }
    })
    .await
    .expect("the aggregator becomes ready on the cluster");

    let (_amqp, channel) = vhost.progress_publisher().await;
    let publish = |routing_key: &'static str, body: String| {
        let channel = channel.clone();
        async move {
            let properties = BasicProperties::default().with_content_type("application/json".into());
            publish_progress(&channel, routing_key, body.as_bytes(), properties).await;
        }
    };
    publish("_c.job.a", r#"{"progress": 0.5}"#.to_owned()).await;
    publish("_c.job.b", r#"{"progress": 1, "status": "finished"}"#.to_owned()).await;
    // One burst, 40 trees of the `_r` namespace: 40 roots in as many slots.
    let burst: Vec<String> =
        (0..40).map(|i| format!(r#"{{"key": "_r.t{i}.step", "progress": 0.25}}"#)).collect();
    publish("_r", format!("[{}]", burst.join(","))).await;

    let store = ProgressStore::new(
        RedisConfig::cluster(cluster.url(), prefix.clone()).connection().unwrap(),
        prefix.clone(),
    );
    let progress = |key: &'static str| {
        let store = store.clone();
        async move {
            store
                .get(&Key::parse(key).unwrap(), &ReadOptions::default())
                .await
                .unwrap()
                .and_then(|n| n.progress())
        }
    };
    wait_until("both steps and the whole burst", WAIT, || async {
        progress("_c.job").await == Some(0.75) && progress("_r.t39").await == Some(0.25)
    })
    .await
    .unwrap();
    for i in 0..40 {
        let root = format!("_r.t{i}");
        let node = store.get(&Key::parse(&root).unwrap(), &ReadOptions::default()).await.unwrap();
        assert_eq!(node.and_then(|n| n.progress()), Some(0.25), "{root}");
    }
    let mut conn = store_connection(&cluster, &prefix);
    let roots: usize =
        redis::cmd("ZCARD").arg(format!("{prefix}:proots")).query_async(&mut conn).await.unwrap();
    assert_eq!(roots, 41, "every root is indexed, after its tree's call");

    cancel.cancel();
    task.await.expect("aggregator task").expect("aggregator run");
}

fn store_connection(cluster: &RedisCluster, prefix: &str) -> cairn_redis::RedisConnection {
    RedisConfig::cluster(cluster.url(), prefix).connection().unwrap()
}
