//! (a) The broker ceiling: how fast RabbitMQ hands a lapin consumer that does nothing the same
//! single-update messages that (b) applies. The queue is a plain durable queue bound to a topic
//! exchange with `#`, pre-filled with persistent messages; the consumer has the aggregator's
//! prefetch and acks `multiple` every `--ack-every` deliveries.

use std::time::Instant;

use anyhow::{Context as _, ensure};
use cairn_testkit::AmqpVhost;
use futures::StreamExt as _;
use lapin::ExchangeKind;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use serde_json::{Map, Value, json};

use super::{Args, Publisher, connect, properties, queue_len, rate, redis_url, round, single_message};
use crate::system::{Probe, us_per_item};

const EXCHANGE: &str = "bench";
const QUEUE: &str = "bench.broker";

pub(super) async fn measure(args: &Args) -> anyhow::Result<Map<String, Value>> {
    let vhost = AmqpVhost::new().await;
    let conn = connect(&vhost.url).await?;
    let setup = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    setup.exchange_declare(EXCHANGE.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    setup.queue_declare(QUEUE.into(), durable, FieldTable::default()).await?;
    setup
        .queue_bind(
            QUEUE.into(),
            EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let n = args.messages;
    eprintln!("cairn-bench: (a) publishing {n} messages with confirms");
    let mut publisher = Publisher::new(&conn, args.confirm_window).await?;
    let published = Instant::now();
    for i in 0..n {
        let (routing_key, body) = single_message(i);
        publisher.publish(EXCHANGE, &routing_key, &body, properties()).await?;
    }
    publisher.finish().await?;
    let publish_elapsed = published.elapsed();
    let queued = queue_len(&setup, QUEUE).await?;
    ensure!(queued == n, "queue {QUEUE} holds {queued} messages after publishing {n}");

    eprintln!("cairn-bench: (a) draining with a no-op consumer");
    let mut probe = Probe::new(&redis_url()).await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(args.prefetch, BasicQosOptions::default()).await?;
    let before = probe.sample().await?;
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(QUEUE.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let mut received = 0;
    while received < n {
        let delivery = consumer.next().await.context("the broker ended the consumer")??;
        received += 1;
        if received % args.ack_every == 0 || received == n {
            delivery.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let elapsed = started.elapsed();
    let after = probe.sample().await?;
    let _ = conn.close(200, "benchmark done".into()).await;
    let per_s = rate(n, elapsed);
    eprintln!("cairn-bench: (a) {per_s} messages/s");

    let mut out = Map::new();
    out.insert("a_broker_msgs_per_s".into(), json!(per_s));
    out.insert("a_drain_s".into(), json!(round(elapsed.as_secs_f64(), 3)));
    out.insert("a_publish_msgs_per_s".into(), json!(rate(n, publish_elapsed)));
    let cpu = after.since(&before);
    out.insert("a_cpu_us_per_msg".into(), us_per_item(&cpu, n));
    out.insert("a_cpu".into(), cpu);
    Ok(out)
}
