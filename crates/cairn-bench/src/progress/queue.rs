//! (b) and (c): how fast one aggregator (`--shards 1`, so one queue as in (a)) applies a backlog;
//! (c) also with `--aggregators N --shards S`, replicas sharing the shard queues.
//!
//! Method: start an aggregator once so it declares its topology, stop it, pre-fill `progress.0`
//! through the `progress` exchange (publisher confirms), then a marker message to
//! `_bench.done`; start a fresh aggregator on a fresh key prefix and time from its start until
//! the marker is in Redis. One queue with one consumer applies in order, so the marker lands
//! last. The time includes the aggregator's start (connecting, declaring: tens of ms).

use std::time::{Duration, Instant};

use anyhow::ensure;
use cairn_progress::now_ms;
use cairn_progress::{Key, Update, encode_burst};
use cairn_redis::ProgressStore;
use cairn_redis::progress::ReadOptions;
use cairn_testkit::{AmqpVhost, RedisNamespace};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use progress_aggregator::consumer::TIME_HEADER;
use serde_json::{Map, Value, json};

use super::{
    Aggregator, Args, DEAD_LETTER_QUEUE, DRAIN_TIMEOUT, EXCHANGE, MARKER_BODY, MARKER_KEY, Publisher,
    connect, key, properties, queue_len, rate, round, single_message, store, wait_for_key,
};
use crate::system::{Probe, us_per_item};

/// One message to pre-fill.
struct Message {
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

/// What a timed drain measured.
struct Drained {
    elapsed: Duration,
    publish_elapsed: Duration,
    dead_lettered: u64,
    cpu: Value,
}

/// (b): the single-update messages of (a), applied into a depth-4 tree.
pub(super) async fn measure_single(args: &Args) -> anyhow::Result<Map<String, Value>> {
    let n = args.messages;
    let messages = (0..n).map(|i| {
        let (routing_key, body) = single_message(i);
        Message { routing_key, body, properties: properties() }
    });
    let drained = prefill_and_drain(args, "b", n, messages, Fleet::one(), &[]).await?;
    // The marker is one more single-update message.
    let per_s = rate(n + 1, drained.elapsed);
    eprintln!("cairn-bench: (b) {per_s} single updates/s");
    let mut out = Map::new();
    out.insert("b_single_updates_per_s".into(), json!(per_s));
    out.insert("b_drain_s".into(), json!(round(drained.elapsed.as_secs_f64(), 3)));
    out.insert("b_publish_msgs_per_s".into(), json!(rate(n + 1, drained.publish_elapsed)));
    out.insert("b_dead_lettered".into(), json!(drained.dead_lettered));
    out.insert("b_cpu_us_per_msg".into(), us_per_item(&drained.cpu, n + 1));
    out.insert("b_cpu".into(), drained.cpu);
    Ok(out)
}

/// (c): bursts from `--burst-producers` producers, each owning a depth-4 subtree
/// `_bench.c{j}.x{..}.y{..}.z{..}` and sending the latest progress of every one of its leaves
/// in turn, as a coalescing producer does.
pub(super) async fn measure_bursts(args: &Args) -> anyhow::Result<Map<String, Value>> {
    let size = args.burst_size;
    let bursts = args.burst_updates.div_ceil(size);
    let updates = bursts * size;
    let leaves: Vec<Vec<Key>> = (0..args.burst_producers)
        .map(|j| {
            (0..size)
                .map(|u| key(&format!("_bench.c{j}.x{}.y{}.z{}", u / 100, u / 10 % 10, u % 10)))
                .collect::<anyhow::Result<_>>()
        })
        .collect::<anyhow::Result<_>>()?;
    let rounds = bursts.div_ceil(args.burst_producers);
    let mut headers = FieldTable::default();
    // As Cairn's publisher does: the time to store, so a redelivery leaves the same tree.
    headers.insert(TIME_HEADER.into(), AMQPValue::LongLongInt(now_ms()));
    let messages = (0..bursts).map(move |m| {
        let j = m % args.burst_producers;
        let progress = ((m / args.burst_producers + 1) as f64 / rounds as f64).min(1.0);
        let burst: Vec<(Key, Update)> =
            leaves[j as usize].iter().map(|leaf| (leaf.clone(), Update::new().progress(progress))).collect();
        Message {
            routing_key: format!("_bench.c{j}"),
            body: encode_burst(&burst),
            properties: properties().with_headers(headers.clone()),
        }
    });
    // Every producer's subtree ends at progress 1: with several shards the marker alone does
    // not say that every queue is drained.
    let roots: Vec<Key> =
        (0..args.burst_producers).map(|j| key(&format!("_bench.c{j}"))).collect::<anyhow::Result<_>>()?;
    let fleet = Fleet { aggregators: args.aggregators, shards: args.shards };
    let drained = prefill_and_drain(args, "c", bursts, messages, fleet, &roots).await?;
    let per_s = rate(updates + 1, drained.elapsed);
    eprintln!("cairn-bench: (c) {per_s} burst updates/s");
    let mut out = Map::new();
    out.insert("c_burst_updates_per_s".into(), json!(per_s));
    out.insert("c_burst_msgs_per_s".into(), json!(rate(bursts + 1, drained.elapsed)));
    out.insert("c_drain_s".into(), json!(round(drained.elapsed.as_secs_f64(), 3)));
    out.insert("c_updates".into(), json!(updates));
    out.insert("c_dead_lettered".into(), json!(drained.dead_lettered));
    out.insert("c_aggregators".into(), json!(args.aggregators));
    out.insert("c_shards".into(), json!(args.shards));
    out.insert("c_cpu_us_per_update".into(), us_per_item(&drained.cpu, updates + 1));
    out.insert("c_cpu".into(), drained.cpu);
    Ok(out)
}

/// How many aggregators drain, over how many shard queues.
#[derive(Clone, Copy)]
struct Fleet {
    aggregators: u16,
    shards: u16,
}

impl Fleet {
    fn one() -> Fleet {
        Fleet { aggregators: 1, shards: 1 }
    }

    fn queues(self) -> impl Iterator<Item = String> {
        (0..self.shards).map(|shard| format!("progress.{shard}"))
    }
}

async fn prefill_and_drain(
    args: &Args,
    label: &str,
    count: u64,
    messages: impl Iterator<Item = Message>,
    fleet: Fleet,
    finished: &[Key],
) -> anyhow::Result<Drained> {
    let (ns, vhost) = (RedisNamespace::new(), AmqpVhost::new().await);
    let declaring = Aggregator::start_replica(&ns, &vhost, args, fleet.shards, 0).await?;
    declaring.wait_ready().await?;
    declaring.stop().await?;

    eprintln!("cairn-bench: ({label}) publishing {count} messages and the marker with confirms");
    let conn = connect(&vhost.url).await?;
    let mut publisher = Publisher::new(&conn, args.confirm_window).await?;
    let published = Instant::now();
    for message in messages {
        publisher.publish(EXCHANGE, &message.routing_key, &message.body, message.properties).await?;
    }
    publisher.publish(EXCHANGE, MARKER_KEY, MARKER_BODY, properties()).await?;
    publisher.finish().await?;
    let publish_elapsed = published.elapsed();
    let check = conn.create_channel().await?;
    let mut queued = 0;
    for queue in fleet.queues() {
        queued += queue_len(&check, &queue).await?;
    }
    ensure!(queued == count + 1, "the shard queues hold {queued} messages, expected {}", count + 1);

    eprintln!("cairn-bench: ({label}) draining with {} fresh aggregator(s)", fleet.aggregators);
    let store = store(&ns)?;
    let marker = key(MARKER_KEY)?;
    let mut probe = Probe::new(&ns.url).await?;
    let before = probe.sample().await?;
    let started = Instant::now();
    let mut aggregators = Vec::new();
    for index in 0..fleet.aggregators {
        aggregators.push(Aggregator::start_replica(&ns, &vhost, args, fleet.shards, index).await?);
    }
    wait_for_key(&store, &marker, DRAIN_TIMEOUT).await?;
    for root in finished {
        wait_for_progress(&store, root, DRAIN_TIMEOUT).await?;
    }
    let elapsed = started.elapsed();
    let after = probe.sample().await?;
    for aggregator in aggregators {
        aggregator.stop().await?;
    }
    let dead_lettered = queue_len(&check, DEAD_LETTER_QUEUE).await?;
    for queue in fleet.queues() {
        let left = queue_len(&check, &queue).await?;
        ensure!(left == 0, "{queue} still holds {left} messages after the drain");
    }
    let _ = conn.close(200, "benchmark done".into()).await;
    eprintln!("cairn-bench: ({label}) cleaning up the key prefix and vhost");
    Ok(Drained { elapsed, publish_elapsed, dead_lettered, cpu: after.since(&before) })
}

/// Waits until `key`'s progress is 1.
async fn wait_for_progress(store: &ProgressStore, key: &Key, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let node = store.get(key, &ReadOptions::default()).await?;
        if node.and_then(|n| n.progress()).is_some_and(|p| p >= 1.0 - cairn_progress::EPSILON) {
            return Ok(());
        }
        ensure!(started.elapsed() < timeout, "{key} did not reach progress 1 within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
