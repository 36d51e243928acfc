//! The AMQP side: consumes the shard queues, applies updates to Redis, acks only after they are
//! stored, dead-letters what can never apply, and reconnects by itself when RabbitMQ goes away.
//!
//! Order: each shard queue has a single active consumer and one batch is handled at a time per
//! shard, in delivery order, so updates with one routing key are applied in publish order even
//! with several aggregator replicas. A failed batch is never acked: RabbitMQ redelivers it, and
//! applying an update again leaves the same tree.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_amqp::{Topology, connect_with_retry, explain, name};
use cairn_progress::parse_message;
use cairn_redis::progress::{Change, ProgressStore};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Header a Cairn publisher sets: the update time (ms epoch) to store, so a redelivered message
/// leaves the identical tree. Messages without it (SCA publishers) get the time they are applied.
pub const TIME_HEADER: &str = "cairn-time-ms";
/// Headers added to a dead-lettered message: why, and where it was going.
pub const ERROR_HEADER: &str = "x-cairn-error";
pub const ROUTING_KEY_HEADER: &str = "x-cairn-routing-key";

/// Most updates sent to Redis in one script call, so one call never blocks Redis for long.
const MAX_UPDATES_PER_CALL: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("dead-letter publish was not confirmed by the broker")]
    NotConfirmed,
    #[error("consumer stream ended")]
    Ended,
    #[error("shutting down before the batch was stored")]
    Shutdown,
}

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub messages: usize,
    pub updates: usize,
    pub dead_lettered: usize,
}

/// Settings of the consuming side.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub url: String,
    pub topology: Topology,
    pub prefetch: u16,
    pub batch: usize,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn header_time(properties: &BasicProperties) -> Option<i64> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(TIME_HEADER))? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// A batch parsed and validated, its invalid messages already dead-lettered: what is left is to
/// store its updates and ack it.
pub struct Prepared {
    changes: Vec<Change>,
    last: Option<Delivery>,
    report: BatchReport,
}

/// One step of the consumer: parse, dead-letter the invalid, store the rest, then ack the batch.
/// Redis failures are retried (with backoff) until they succeed or `cancel` fires; the batch is
/// acked only once every update of it is stored.
pub async fn handle_batch(
    store: &ProgressStore,
    dead_letters: &Channel,
    topology: &Topology,
    deliveries: Vec<Delivery>,
    cancel: &CancellationToken,
) -> Result<BatchReport, ConsumeError> {
    let prepared = prepare_batch(dead_letters, topology, deliveries).await?;
    commit_batch(store, prepared, cancel).await
}

/// The first half of [`handle_batch`]: parse and validate; dead-letter (confirmed) the invalid.
pub async fn prepare_batch(
    dead_letters: &Channel,
    topology: &Topology,
    deliveries: Vec<Delivery>,
) -> Result<Prepared, ConsumeError> {
    let mut report = BatchReport { messages: deliveries.len(), ..BatchReport::default() };
    let mut changes = Vec::new();
    let now = now_ms();
    for delivery in &deliveries {
        match parse_message(delivery.routing_key.as_str(), &delivery.data) {
            Ok(updates) => {
                let time_ms = header_time(&delivery.properties).unwrap_or(now);
                changes.extend(updates.into_iter().map(|(key, update)| Change { key, update, time_ms }));
            }
            Err(error) => {
                warn!(routing_key = %delivery.routing_key, %error, "dead-lettering invalid progress message");
                let reason = format!("{error} (routing key {:?})", delivery.routing_key.as_str());
                dead_letter(dead_letters, topology, delivery, &reason).await?;
                report.dead_lettered += 1;
            }
        }
    }
    report.updates = changes.len();
    Ok(Prepared { changes, last: deliveries.into_iter().last(), report })
}

/// The second half of [`handle_batch`]: store every update, then ack the batch (`multiple`).
pub async fn commit_batch(
    store: &ProgressStore,
    prepared: Prepared,
    cancel: &CancellationToken,
) -> Result<BatchReport, ConsumeError> {
    let Prepared { changes, last, report } = prepared;
    let Some(last) = last else { return Ok(report) };
    for chunk in changes.chunks(MAX_UPDATES_PER_CALL) {
        store_with_retry(store, chunk, cancel).await?;
    }
    last.acker.ack(BasicAckOptions { multiple: true }).await?;
    metrics::counter!("cairn_progress_messages_total", "outcome" => "applied")
        .increment((report.messages - report.dead_lettered) as u64);
    metrics::counter!("cairn_progress_messages_total", "outcome" => "dead_lettered")
        .increment(report.dead_lettered as u64);
    metrics::counter!("cairn_progress_updates_applied_total").increment(report.updates as u64);
    Ok(report)
}

async fn store_with_retry(
    store: &ProgressStore,
    changes: &[Change],
    cancel: &CancellationToken,
) -> Result<(), ConsumeError> {
    let mut delay = Duration::from_millis(50);
    loop {
        match store.apply(changes).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                metrics::counter!("cairn_progress_store_failures_total").increment(1);
                warn!(%error, retry_in = ?delay, updates = changes.len(), "cannot store progress; retrying");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(ConsumeError::Shutdown),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn dead_letter(
    channel: &Channel,
    topology: &Topology,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), ConsumeError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(ROUTING_KEY_HEADER.into(), AMQPValue::LongString(delivery.routing_key.as_str().into()));
    let properties = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
    let confirm = channel
        .basic_publish(
            name(&topology.dead_letter_exchange()),
            delivery.routing_key.clone(),
            BasicPublishOptions::default(),
            &delivery.data,
            properties,
        )
        .await?
        .await?;
    if confirm.is_ack() { Ok(()) } else { Err(ConsumeError::NotConfirmed) }
}

/// Keeps consumers running on every shard queue until `cancel` fires, reconnecting (and
/// re-declaring the topology) whenever the connection is lost. `connected` tells readiness.
pub async fn run(
    store: ProgressStore,
    settings: ConsumerSettings,
    connected: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        let Some(conn) = connect_with_retry(&settings.url, &cancel).await else { break };
        let started = Instant::now();
        match consume(&conn, &store, &settings, &connected, &cancel).await {
            Ok(()) => info!("progress consumers stopped"),
            Err(error) => warn!(error = %error, "progress consumers lost their connection; reconnecting"),
        }
        connected.store(false, Ordering::SeqCst);
        metrics::gauge!("cairn_aggregator_amqp_connected").set(0.0);
        let _ = conn.close(200, "aggregator stopping or reconnecting".into()).await;
        if started.elapsed() > Duration::from_secs(10) {
            delay = Duration::from_millis(100);
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn consume(
    conn: &Connection,
    store: &ProgressStore,
    settings: &ConsumerSettings,
    connected: &AtomicBool,
    cancel: &CancellationToken,
) -> Result<(), ConsumeError> {
    let setup = conn.create_channel().await?;
    settings.topology.declare(&setup).await.inspect_err(|e| {
        warn!(error = %explain(e), "cannot declare the progress topology");
    })?;
    let mut shards = JoinSet::new();
    // Stops this connection's shards (shutdown, or one shard failing): each finishes the store
    // in flight before returning, so no store of this connection outlives it.
    let stop = cancel.child_token();
    for queue in settings.topology.queues() {
        let channel = conn.create_channel().await?;
        channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(name(&queue), name(""), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        let dead_letters = conn.create_channel().await?;
        dead_letters.confirm_select(ConfirmSelectOptions::default()).await?;
        let (store, topology, batch, cancel) =
            (store.clone(), settings.topology.clone(), settings.batch, stop.clone());
        shards.spawn(async move {
            let mut batches = consumer.ready_chunks(batch.max(1));
            // One batch is stored while the next is parsed: Redis and this process overlap.
            // Stores (and acks) stay in delivery order: a batch starts storing only after the
            // one before it is stored and acked.
            let mut in_flight: Option<tokio::task::JoinHandle<Result<BatchReport, ConsumeError>>> = None;
            let result = loop {
                // Shutdown stops intake between batches; a batch in hand is finished first.
                let next = tokio::select! {
                    () = cancel.cancelled() => break Ok(()),
                    next = batches.next() => next,
                };
                let Some(results) = next else { break Err(ConsumeError::Ended) };
                let mut deliveries = Vec::with_capacity(results.len());
                let mut failure = None;
                for result in results {
                    match result {
                        Ok(delivery) => deliveries.push(delivery),
                        Err(e) => failure = Some(e),
                    }
                }
                let prepared = match prepare_batch(&dead_letters, &topology, deliveries).await {
                    Ok(prepared) => prepared,
                    Err(error) => break Err(error),
                };
                if let Some(previous) = in_flight.take() {
                    match previous.await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => break Err(error),
                        Err(_) => break Err(ConsumeError::Ended),
                    }
                }
                let (store, cancel) = (store.clone(), cancel.clone());
                in_flight = Some(tokio::spawn(async move {
                    let started = Instant::now();
                    let report = commit_batch(&store, prepared, &cancel).await;
                    metrics::histogram!("cairn_progress_batch_seconds")
                        .record(started.elapsed().as_secs_f64());
                    report
                }));
                if let Some(e) = failure {
                    break Err(e.into());
                }
            };
            if let Some(previous) = in_flight.take() {
                match previous.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Err(error),
                    Err(_) => return Err(ConsumeError::Ended),
                }
            }
            result
        });
    }
    connected.store(true, Ordering::SeqCst);
    metrics::gauge!("cairn_aggregator_amqp_connected").set(1.0);
    info!(queues = settings.topology.queues().len(), "consuming progress");
    // Any shard failing means the connection (or its channels) is gone: start over.
    let mut outcome = Ok(());
    if let Some(joined) = shards.join_next().await {
        outcome = joined.unwrap_or(Err(ConsumeError::Ended));
    }
    connected.store(false, Ordering::SeqCst);
    if cancel.is_cancelled() {
        // Let every shard finish the batch it holds (the caller bounds this by the grace period).
        while let Some(joined) = shards.join_next().await {
            if let Ok(Err(error)) = joined {
                warn!(%error, "shard stopped with an error during shutdown");
            }
        }
        return Ok(());
    }
    stop.cancel();
    while shards.join_next().await.is_some() {}
    outcome
}
