//! The AMQP side: consumes the shard queues, applies updates to Redis, acks only after they are
//! stored, dead-letters what can never apply, and reconnects by itself when RabbitMQ goes away.
//!
//! Order: each shard queue has a single active consumer and one batch is handled at a time per
//! shard, in delivery order, so updates with one routing key are applied in publish order even
//! with several aggregator replicas, which share the shards ([`crate::shards`]). A failed batch is never acked: RabbitMQ redelivers it, and
//! applying an update again leaves the same tree.

use cairn_progress::now_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cairn_amqp::{Endpoint, Topology, connect_with_retry, explain, name};
use cairn_error::{Retries, ServiceError as _};
use cairn_progress::parse_message;
use cairn_redis::progress::{Change, ProgressStore, StoreError};
use cairn_redis::streams::LeaseState;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::shards::{ShardLeases, fair_share, plan};

/// Header a Cairn publisher sets: the update time (ms epoch) to store, so a redelivered message
/// leaves the identical tree. Messages without it (SCA publishers) get the time they are applied.
pub const TIME_HEADER: &str = "cairn-time-ms";
/// Header carrying the W3C trace context of the processor span that published the message.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Headers added to a dead-lettered message: why, and where it was going.
pub const ERROR_HEADER: &str = "x-cairn-error";
pub const ROUTING_KEY_HEADER: &str = "x-cairn-routing-key";

/// Most updates sent to Redis in one script call, so one call never blocks Redis for long.
const MAX_UPDATES_PER_CALL: usize = 2000;

/// How far ahead of this process's clock a publisher's `cairn-time-ms` may be. Later times are
/// clamped to it: a clock in the future would otherwise pin a tree against purging.
const MAX_CLOCK_AHEAD_MS: i64 = 60_000;

/// How long a shard may fail to store its batch (Redis answering errors, or away) before the
/// aggregator reports itself not ready.
const STALL_AFTER: Duration = Duration::from_secs(5);

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

/// Shards that cannot store their batch: their count shows in readiness and a metric.
#[derive(Debug, Default)]
pub struct Stalls(AtomicUsize);

impl Stalls {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn enter(&self) {
        let now = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::gauge!("cairn_progress_shards_stalled").set(now as f64);
    }

    fn leave(&self) {
        let now = self.0.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::gauge!("cairn_progress_shards_stalled").set(now as f64);
    }
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
    pub endpoint: Endpoint,
    pub topology: Topology,
    pub prefetch: u16,
    pub batch: usize,
}

/// The publisher's time of a message, never more than [`MAX_CLOCK_AHEAD_MS`] ahead of `now` and
/// never before the epoch.
fn header_time(properties: &BasicProperties, now: i64) -> Option<i64> {
    let headers = properties.headers().as_ref()?;
    let time = match headers.inner().get(&ShortString::from(TIME_HEADER))? {
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).unwrap_or(i64::MAX),
        _ => return None,
    };
    Some(time.clamp(0, now.saturating_add(MAX_CLOCK_AHEAD_MS)))
}

/// The W3C trace context a message carries (the processor's span that reported it).
fn header_traceparent(properties: &BasicProperties) -> Option<&str> {
    match properties.headers().as_ref()?.inner().get(&ShortString::from(TRACEPARENT_HEADER))? {
        AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
        _ => None,
    }
}

/// A batch parsed and validated, its invalid messages already dead-lettered: what is left is to
/// store its updates and ack it.
pub struct Prepared {
    changes: Vec<Change>,
    /// Each valid message and the range of `changes` it holds, in delivery order.
    messages: Vec<(Delivery, Range<usize>)>,
    last: Option<lapin::Acker>,
    report: BatchReport,
    /// One span per message that carries a trace context, continuing it until the batch is
    /// stored and acked.
    spans: Vec<tracing::Span>,
}

/// Where a shard sends what can never apply: a confirming channel and the topology's dead-letter
/// exchange.
#[derive(Clone)]
pub struct DeadLetters {
    pub channel: Channel,
    pub topology: Topology,
}

/// The first half of a batch's handling: parse and validate; dead-letter (confirmed) the invalid.
pub async fn prepare_batch(
    dead_letters: &DeadLetters,
    deliveries: Vec<Delivery>,
) -> Result<Prepared, ConsumeError> {
    let mut report = BatchReport { messages: deliveries.len(), ..BatchReport::default() };
    let mut changes = Vec::new();
    let mut messages = Vec::with_capacity(deliveries.len());
    let now = now_ms();
    let last = deliveries.last().map(|d| d.acker.clone());
    let mut spans = Vec::new();
    for delivery in deliveries {
        match parse_message(delivery.routing_key.as_str(), &delivery.data) {
            Ok(updates) => {
                if let Some(traceparent) = header_traceparent(&delivery.properties) {
                    let span = tracing::info_span!(
                        "apply progress",
                        otel.kind = "consumer",
                        messaging.destination.name = %delivery.routing_key,
                        cairn.updates = updates.len(),
                    );
                    cairn_runtime::telemetry::continue_trace(&span, Some(traceparent));
                    spans.push(span);
                }
                let time_ms = header_time(&delivery.properties, now).unwrap_or(now);
                let start = changes.len();
                changes.extend(updates.into_iter().map(|(key, update)| Change { key, update, time_ms }));
                messages.push((delivery, start..changes.len()));
            }
            Err(error) => {
                warn!(routing_key = %delivery.routing_key, %error, "dead-lettering invalid progress message");
                let reason = format!("{error} (routing key {:?})", delivery.routing_key.as_str());
                dead_letter(dead_letters, &delivery, &reason).await?;
                report.dead_lettered += 1;
            }
        }
    }
    report.updates = changes.len();
    Ok(Prepared { changes, messages, last, report, spans })
}

/// The second half: store every update, then ack the batch (`multiple`).
///
/// Messages go to Redis in calls of whole messages (up to `MAX_UPDATES_PER_CALL` updates, more
/// only for one message that big). When Redis refuses a call (a script error, which would recur
/// on every retry), its messages are applied one at a time and the ones refused are
/// dead-lettered with the reason, so one message never holds up the shard.
pub async fn commit_batch(
    store: &ProgressStore,
    dead_letters: &DeadLetters,
    prepared: Prepared,
    stalls: &Stalls,
    cancel: &CancellationToken,
) -> Result<BatchReport, ConsumeError> {
    let Prepared { changes, messages, last, mut report, spans } = prepared;
    let Some(last) = last else { return Ok(report) };
    let mut first = 0;
    while first < messages.len() {
        let start = messages[first].1.start;
        let mut end = first + 1;
        while end < messages.len() && messages[end].1.end - start <= MAX_UPDATES_PER_CALL {
            end += 1;
        }
        let group = &messages[first..end];
        let range = start..group[group.len() - 1].1.end;
        if let Err(error) = store_in_calls(store, &changes[range], stalls, cancel).await? {
            warn!(%error, messages = group.len(), "redis refused a progress batch; applying its messages one by one");
            for (delivery, range) in group {
                if let Err(error) = store_in_calls(store, &changes[range.clone()], stalls, cancel).await? {
                    warn!(routing_key = %delivery.routing_key, %error, "dead-lettering a progress message redis refused");
                    let reason = format!(
                        "could not be applied: {error} (routing key {:?})",
                        delivery.routing_key.as_str()
                    );
                    dead_letter(dead_letters, delivery, &reason).await?;
                    report.dead_lettered += 1;
                    report.updates -= range.len();
                }
            }
        }
        first = end;
    }
    last.ack(BasicAckOptions { multiple: true }).await?;
    metrics::counter!("cairn_progress_messages_total", "outcome" => "applied")
        .increment((report.messages - report.dead_lettered) as u64);
    metrics::counter!("cairn_progress_messages_total", "outcome" => "dead_lettered")
        .increment(report.dead_lettered as u64);
    metrics::counter!("cairn_progress_updates_applied_total").increment(report.updates as u64);
    drop(spans);
    Ok(report)
}

/// Stores `changes` in calls of at most [`MAX_UPDATES_PER_CALL`]; `Ok(Err(..))` when Redis
/// refused one of them (the calls before it are stored).
async fn store_in_calls(
    store: &ProgressStore,
    changes: &[Change],
    stalls: &Stalls,
    cancel: &CancellationToken,
) -> Result<Result<(), StoreError>, ConsumeError> {
    for chunk in changes.chunks(MAX_UPDATES_PER_CALL) {
        if let Err(refused) = store_with_retry(store, chunk, stalls, cancel).await? {
            return Ok(Err(refused));
        }
    }
    Ok(Ok(()))
}

/// Stores one call's changes, retrying with backoff while Redis is away (a shard failing longer
/// than [`STALL_AFTER`] counts as stalled meanwhile). `Ok(Err(..))` when Redis refused the call.
async fn store_with_retry(
    store: &ProgressStore,
    changes: &[Change],
    stalls: &Stalls,
    cancel: &CancellationToken,
) -> Result<Result<(), StoreError>, ConsumeError> {
    let mut retries = Retries::doubling(Duration::from_millis(50), Duration::from_secs(2));
    let started = Instant::now();
    let mut stalled = false;
    let result = loop {
        let delay = match store.apply(changes).await {
            Ok(()) => break Ok(Ok(())),
            // A failure that cannot pass by itself goes back to be split and dead-lettered.
            Err(error) if !error.kind().is_retryable() => {
                metrics::counter!("cairn_progress_store_refusals_total").increment(1);
                break Ok(Err(error));
            }
            Err(error) => {
                metrics::counter!("cairn_progress_store_failures_total").increment(1);
                let delay = retries.failed();
                warn!(%error, retry_in = ?delay, updates = changes.len(), "cannot store progress; retrying");
                delay
            }
        };
        if !stalled && started.elapsed() >= STALL_AFTER {
            stalled = true;
            stalls.enter();
        }
        tokio::select! {
            () = cancel.cancelled() => break Err(ConsumeError::Shutdown),
            () = tokio::time::sleep(delay) => {}
        }
    };
    if stalled {
        stalls.leave();
    }
    result
}

async fn dead_letter(
    dead_letters: &DeadLetters,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), ConsumeError> {
    let DeadLetters { channel, topology } = dead_letters;
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

/// Keeps consumers running on this replica's share of the shard queues until `cancel` fires,
/// reconnecting (and re-declaring the topology) whenever the connection is lost. `connected`
/// tells readiness. Shards are shared with the other replicas through `leases` (see
/// [`crate::shards`]); on shutdown this replica stops its shards and hands their leases back.
pub async fn run(
    store: ProgressStore,
    settings: ConsumerSettings,
    leases: ShardLeases,
    connected: Arc<AtomicBool>,
    stalls: Arc<Stalls>,
    cancel: CancellationToken,
) {
    let mut retries = Retries::doubling(Duration::from_millis(100), Duration::from_secs(5));
    let mut owner = Owner::new(leases);
    while !cancel.is_cancelled() {
        let Some(conn) = connect_with_retry(&settings.endpoint, &cancel).await else { break };
        let started = Instant::now();
        match consume(&conn, &store, &settings, &mut owner, &connected, &stalls, &cancel).await {
            Ok(()) => info!("progress consumers stopped"),
            Err(error) => warn!(error = %error, "progress consumers lost their connection; reconnecting"),
        }
        connected.store(false, Ordering::SeqCst);
        metrics::gauge!("cairn_aggregator_amqp_connected").set(0.0);
        let _ = conn.close(200, "aggregator stopping or reconnecting".into()).await;
        // A connection that lasted counts as a success: the next drop waits the first delay.
        if started.elapsed() > Duration::from_secs(10) {
            retries.succeeded();
        }
        let delay = retries.failed();
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    owner.hand_back_all().await;
}

/// The shards this replica holds, and the consumers running on them.
struct Owner {
    leases: ShardLeases,
    /// Shards whose lease this replica holds.
    held: BTreeSet<u16>,
    /// The consumer of each held shard on the current connection, with its stop token.
    running: BTreeMap<u16, (CancellationToken, JoinHandle<Result<(), ConsumeError>>)>,
}

impl Owner {
    fn new(leases: ShardLeases) -> Self {
        Self { leases, held: BTreeSet::new(), running: BTreeMap::new() }
    }

    fn set_owned(&self, shard: u16, owned: bool) {
        metrics::gauge!("cairn_aggregator_shard_owned", "shard" => shard.to_string()).set(if owned {
            1.0
        } else {
            0.0
        });
    }

    /// Stops one shard's consumer: it finishes the batch in hand, and its channel closes, which
    /// gives its unacked messages back to the queue in order.
    async fn stop(&mut self, shard: u16) {
        if let Some((token, handle)) = self.running.remove(&shard) {
            token.cancel();
            if let Ok(Err(error)) = handle.await {
                warn!(shard, %error, "shard stopped with an error");
            }
        }
    }

    /// Renews the leases held, aims at the fair share (handing back or taking shards), and
    /// returns the shards to start consuming.
    async fn rebalance(&mut self, shards: u16) -> Vec<u16> {
        let members = match self.leases.heartbeat(now_ms()).await {
            Ok(members) => members,
            Err(error) => {
                // Redis away: keep what is running (the leases run out on their own if this lasts).
                warn!(%error, "cannot announce this aggregator replica in redis; keeping its shards");
                return Vec::new();
            }
        };
        metrics::gauge!("cairn_aggregator_replicas").set(members as f64);
        for shard in self.held.clone() {
            match self.leases.acquire_or_renew(shard).await {
                Ok(LeaseState::HeldBy(other)) => {
                    warn!(shard, holder = %other, "lost the lease of a shard; stopping it");
                    self.stop(shard).await;
                    self.held.remove(&shard);
                    self.set_owned(shard, false);
                }
                Ok(_) => {}
                Err(error) => warn!(shard, %error, "cannot renew a shard lease"),
            }
        }
        let target = fair_share(shards, members);
        let plan = plan(shards, &self.held, target, self.leases.start());
        for shard in plan.release {
            self.stop(shard).await;
            if let Err(error) = self.leases.release(shard).await {
                warn!(shard, %error, "cannot hand a shard lease back; it runs out by itself");
            }
            self.held.remove(&shard);
            self.set_owned(shard, false);
            info!(shard, members, "handed a shard to another replica");
        }
        for shard in plan.candidates {
            if self.held.len() >= target {
                break;
            }
            match self.leases.acquire_or_renew(shard).await {
                Ok(state) if state.is_held() => {
                    self.held.insert(shard);
                    self.set_owned(shard, true);
                    info!(shard, members, "took a shard");
                }
                Ok(_) => {}
                Err(error) => warn!(shard, %error, "cannot take a shard lease"),
            }
        }
        self.held.iter().filter(|shard| !self.running.contains_key(shard)).copied().collect()
    }

    /// Stops every consumer (they finish their batches) without handing the leases back: the
    /// connection is being replaced, and the next one consumes the same shards.
    async fn stop_all(&mut self) {
        for shard in self.running.keys().copied().collect::<Vec<_>>() {
            self.stop(shard).await;
        }
    }

    /// Shutdown: stops everything, then hands every lease back so the others take over at once.
    async fn hand_back_all(&mut self) {
        self.stop_all().await;
        for shard in std::mem::take(&mut self.held) {
            let _ = self.leases.release(shard).await;
            self.set_owned(shard, false);
        }
        let _ = self.leases.leave().await;
    }
}

async fn consume(
    conn: &Connection,
    store: &ProgressStore,
    settings: &ConsumerSettings,
    owner: &mut Owner,
    connected: &AtomicBool,
    stalls: &Arc<Stalls>,
    cancel: &CancellationToken,
) -> Result<(), ConsumeError> {
    let setup = conn.create_channel().await?;
    settings.topology.declare(&setup).await.inspect_err(|e| {
        warn!(error = %explain(e), "cannot declare the progress topology");
    })?;
    connected.store(true, Ordering::SeqCst);
    metrics::gauge!("cairn_aggregator_amqp_connected").set(1.0);
    let queues = settings.topology.queues();
    let shards = queues.len() as u16;
    info!(queues = queues.len(), instance = owner.leases.instance(), "consuming progress");
    // A shard consumer that ends by itself means the connection (or its channel) is gone.
    let (failed_tx, mut failed) = tokio::sync::mpsc::channel::<(u16, ConsumeError)>(queues.len().max(1));
    let mut ticks = tokio::time::interval(owner.leases.ttl() / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            () = cancel.cancelled() => break Ok(()),
            Some((shard, error)) = failed.recv() => {
                warn!(shard, %error, "a shard consumer failed");
                break Err(error);
            }
            _ = ticks.tick() => {
                for shard in owner.rebalance(shards).await {
                    let token = cancel.child_token();
                    let queue = queues[usize::from(shard)].clone();
                    let task = match run_shard(conn, queue, store.clone(), settings, stalls.clone(), token.clone()).await {
                        Ok(task) => task,
                        Err(error) => {
                            let _ = failed_tx.try_send((shard, error));
                            break;
                        }
                    };
                    let failed_tx = failed_tx.clone();
                    let stopped = token.clone();
                    let handle = tokio::spawn(async move {
                        let result = task.await;
                        if result.is_err() && !stopped.is_cancelled() {
                            let _ = failed_tx.try_send((shard, ConsumeError::Ended));
                        }
                        result
                    });
                    owner.running.insert(shard, (token, handle));
                }
            }
        }
    };
    connected.store(false, Ordering::SeqCst);
    // Each shard finishes the batch it holds (on shutdown, the caller bounds this by the grace
    // period) before the connection goes.
    owner.stop_all().await;
    outcome
}

/// Starts consuming one shard queue on `conn`: returns the consumer's future, which runs until
/// `stop` fires (then finishes the batch in hand, closes its channel so RabbitMQ gives the
/// messages it prefetched back to the queue, and returns) or the channel fails.
async fn run_shard(
    conn: &Connection,
    queue: String,
    store: ProgressStore,
    settings: &ConsumerSettings,
    stalls: Arc<Stalls>,
    stop: CancellationToken,
) -> Result<impl std::future::Future<Output = Result<(), ConsumeError>> + Send + 'static, ConsumeError> {
    let channel = conn.create_channel().await?;
    channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await?;
    let consumer = channel
        .basic_consume(name(&queue), name(""), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let confirm = conn.create_channel().await?;
    confirm.confirm_select(ConfirmSelectOptions::default()).await?;
    let dead_letters = DeadLetters { channel: confirm, topology: settings.topology.clone() };
    let batch = settings.batch;
    Ok(async move {
        let mut batches = consumer.ready_chunks(batch.max(1));
        // One batch is stored while the next is parsed: Redis and this process overlap.
        // Stores (and acks) stay in delivery order: a batch starts storing only after the
        // one before it is stored and acked.
        let mut in_flight: Option<tokio::task::JoinHandle<Result<BatchReport, ConsumeError>>> = None;
        let result = loop {
            // A stop ends intake between batches; a batch in hand is finished first.
            let next = tokio::select! {
                () = stop.cancelled() => break Ok(()),
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
            let prepared = match prepare_batch(&dead_letters, deliveries).await {
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
            let (store, dead_letters, stalls, stop) =
                (store.clone(), dead_letters.clone(), stalls.clone(), stop.clone());
            in_flight = Some(tokio::spawn(async move {
                let started = Instant::now();
                let report = commit_batch(&store, &dead_letters, prepared, &stalls, &stop).await;
                metrics::histogram!("cairn_progress_batch_seconds").record(started.elapsed().as_secs_f64());
                report
            }));
            if let Some(e) = failure {
                break Err(e.into());
            }
        };
        let last = match in_flight.take() {
            Some(previous) => match previous.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(ConsumeError::Ended),
            },
            None => Ok(()),
        };
        // Closing the channel hands back what was prefetched but not acked, in queue order.
        let _ = channel.close(200, "shard stopped".into()).await;
        result.and(last)
    })
}
