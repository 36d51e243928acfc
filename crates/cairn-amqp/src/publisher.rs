//! The coalescing burst publisher: how Cairn's own producers report progress over AMQP.
//!
//! [`ProgressPublisher::publish`] never blocks and never fails. It folds the update into the
//! pending state of its key ([`Update::merge`], later fields win), so memory is bounded by the
//! number of distinct keys waiting, however fast a producer reports. Every
//! [`PublisherConfig::interval`] (100 ms: at most ~10 bursts a second, docs/contract.md §2) a background task
//! sends what is pending: one burst per route ([`Key::burst_route`]: the tree root, or the
//! namespace holding it, so a thousand `_requests.{id}` trees make one message), routing key =
//! the route, body = the updates of that route in first-seen order (split every
//! [`PublisherConfig::max_burst`] updates), persistent, `mandatory`, with publisher confirms.
//!
//! Delivery: an update leaves the buffer only when the broker confirmed the message holding it.
//! A nack, a return (no queue bound), a timeout or a lost connection puts the unconfirmed updates
//! back in front of what arrived meanwhile (older fields under newer ones), and the publisher
//! reconnects with capped exponential backoff; while RabbitMQ is away everything stays buffered.
//! One flush runs at a time and takes everything pending, so a key's older state is never sent
//! after its newer state. [`ProgressPublisher::close`] is the final flush; dropping the last
//! handle without it makes the background task try one last flush before it stops.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use cairn_error::Retries;
use cairn_progress::{Key, MAX_BURST_BYTES, MAX_BURST_UPDATES, Update, encode_burst};
use futures::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{Endpoint, name};

/// Header carrying the flush time (ms since the epoch). The aggregator uses it as the update
/// time, so a redelivered message leaves the identical tree.
pub const TIME_HEADER: &str = "cairn-time-ms";

/// Header carrying the W3C trace context of (the first traced update in) the message.
pub const TRACEPARENT_HEADER: &str = "traceparent";

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where and how often a [`ProgressPublisher`] sends.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Where RabbitMQ is (`amqp://user:pass@host:port/vhost`, or `amqps://` with its CA).
    pub endpoint: Endpoint,
    /// Durable topic exchange the bursts go to (default `progress`).
    pub exchange: String,
    /// Time between two flushes of the background task: at most one burst per route per interval.
    pub interval: Duration,
    /// Most updates in one message; a route with more pending keys is sent as several messages
    /// (also cut at `cairn_progress`'s `MAX_BURST_UPDATES` and `MAX_BURST_BYTES`).
    pub max_burst: usize,
    /// How long one attempt may wait for the broker (connecting, declaring, confirms) before
    /// its messages count as not delivered and stay buffered.
    pub confirm_timeout: Duration,
    /// Most keys buffered. While RabbitMQ is away a processor reports about new requests all
    /// the time; past this bound the oldest keys' states are dropped (a tenth at a time), so
    /// memory stays bounded. Terminal request states do not depend on them: the request queue
    /// writes those to the node itself.
    pub max_pending: usize,
}

impl PublisherConfig {
    /// Defaults: a flush every 100 ms, at most 1000 updates a message, 10 s for confirms.
    pub fn new(endpoint: impl Into<Endpoint>, exchange: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            exchange: exchange.into(),
            interval: Duration::from_millis(100),
            max_burst: 1000,
            confirm_timeout: Duration::from_secs(10),
            max_pending: 100_000,
        }
    }
}

/// Why a flush did not deliver everything. The updates concerned stay buffered and are retried.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot reach rabbitmq to publish progress ({pending} keys stay buffered): {error}")]
    Unavailable { pending: usize, error: lapin::Error },
    #[error("rabbitmq did not answer within {after:?} ({pending} keys stay buffered)")]
    Timeout { after: Duration, pending: usize },
    #[error("rabbitmq did not confirm {updates} progress updates ({pending} keys stay buffered): {reason}")]
    NotConfirmed { updates: usize, pending: usize, reason: String },
    #[error(
        "exchange `{exchange}` has no queue bound for routing key `{routing_key}`, so rabbitmq \
         returned {updates} progress updates (start the aggregator or bind a queue; {pending} keys \
         stay buffered)"
    )]
    Unroutable { exchange: String, routing_key: String, updates: usize, pending: usize },
    #[error(
        "{undelivered} progress updates were not delivered within the close timeout of {timeout:?}: {last}"
    )]
    Undelivered { undelivered: usize, timeout: Duration, last: Box<PublishError> },
}

/// Handle to a coalescing publisher; clones share one buffer, one connection and one
/// background task. See the module documentation for the delivery contract.
#[derive(Clone)]
pub struct ProgressPublisher {
    handle: Arc<Handle>,
}

/// Owned only by the [`ProgressPublisher`] clones, so its drop means the last handle is gone.
struct Handle {
    inner: Arc<Inner>,
    task: StdMutex<Option<JoinHandle<()>>>,
    /// Stops the background task after one last flush (the last handle was dropped).
    stop: CancellationToken,
    /// Stops the background task after its current flush; `close` sends the rest itself.
    closing: CancellationToken,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Not closed: the task makes one last bounded flush, then stops.
        self.stop.cancel();
    }
}

struct Inner {
    config: PublisherConfig,
    pending: StdMutex<Pending>,
    /// The sending side: whoever holds it is the only flush in progress.
    sender: Mutex<Sender>,
    connected: AtomicBool,
}

/// Latest state of every key waiting to be sent, in first-seen order, at most `max` keys.
struct Pending {
    entries: Vec<(Key, Update)>,
    index: HashMap<Key, usize>,
    max: usize,
    /// Keys dropped since the count was last reported.
    dropped: u64,
    /// The W3C `traceparent` of the latest traced update of a key, sent in the AMQP headers of
    /// the message carrying it; at most `max` keys, emptied by each flush.
    traces: HashMap<Key, String>,
}

impl Pending {
    fn new(max: usize) -> Self {
        Pending {
            entries: Vec::new(),
            index: HashMap::new(),
            max: max.max(1),
            dropped: 0,
            traces: HashMap::new(),
        }
    }

    /// Makes room for one more key by dropping the oldest tenth.
    fn make_room(&mut self) {
        let drop = (self.max / 10).max(1).min(self.entries.len());
        for (key, _) in self.entries.drain(..drop) {
            self.traces.remove(&key);
        }
        self.dropped += drop as u64;
        self.index = self.entries.iter().enumerate().map(|(i, (key, _))| (key.clone(), i)).collect();
    }

    /// Folds `update` into the key's pending state. Should the merged state break the update
    /// limits (too many fields or bytes in all), the later update replaces it: a burst holding
    /// an invalid update would be dead-lettered with every other key in it.
    fn add(&mut self, key: Key, update: &Update) {
        match self.index.get(&key) {
            Some(&i) => {
                let state = &mut self.entries[i].1;
                state.merge(update);
                if let Err(e) = state.validate() {
                    warn!(key = %key, error = %e, "merged progress state too large; keeping the latest update only");
                    *state = update.clone();
                }
            }
            None => {
                if self.entries.len() >= self.max {
                    self.make_room();
                }
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, update.clone()));
            }
        }
    }

    fn take(&mut self) -> Vec<(Key, Update)> {
        self.index.clear();
        std::mem::take(&mut self.entries)
    }

    /// Puts unsent updates back before the ones that arrived since they were taken.
    fn restore(&mut self, older: Vec<(Key, Update)>) {
        if older.is_empty() {
            return;
        }
        let newer = self.take();
        for (key, update) in older.into_iter().chain(newer) {
            self.add(key, &update);
        }
    }
}

struct Link {
    connection: Connection,
    channel: Channel,
}

impl Link {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

struct Sender {
    link: Option<Link>,
    /// The background task waits until then after a failure.
    retry_at: Option<Instant>,
    retries: Retries,
}

impl Sender {
    fn new() -> Sender {
        Sender { link: None, retry_at: None, retries: Retries::doubling(FIRST_BACKOFF, MAX_BACKOFF) }
    }

    fn failed(&mut self) {
        self.retry_at = Some(Instant::now() + self.retries.failed());
    }

    fn succeeded(&mut self) {
        self.retry_at = None;
        self.retries.succeeded();
    }

    /// How long the background task will wait after the next failure.
    fn retry_in(&self) -> Duration {
        self.retries.backoff().cap(self.retries.failures().saturating_add(1))
    }
}

/// Updates taken out of the buffer for one flush. Whatever is not marked confirmed goes back to
/// the buffer on drop, also when the flush future is cancelled (a caller's timeout).
struct InFlight<'a> {
    inner: &'a Inner,
    /// Grouped by route ([`group_by_route`]); `routes` are the groups.
    batch: Vec<(Key, Update)>,
    routes: Vec<Burst>,
    confirmed: Vec<bool>,
    /// Trace context by key (see [`Pending::traces`]); the unsent keys' go back with them.
    traces: HashMap<Key, String>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let unsent: Vec<_> = std::mem::take(&mut self.batch)
            .into_iter()
            .zip(&self.confirmed)
            .filter(|(_, confirmed)| !**confirmed)
            .map(|(entry, _)| entry)
            .collect();
        let mut pending = self.inner.lock_pending();
        for (key, _) in &unsent {
            if let Some(traceparent) = self.traces.remove(key) {
                pending.traces.entry(key.clone()).or_insert(traceparent);
            }
        }
        pending.restore(unsent);
    }
}

/// The updates `batch[range]`, all under `route`: one route's group, or one message of it.
struct Burst {
    route: Key,
    range: Range<usize>,
}

enum Failure {
    /// The connection or channel is unusable (error, nack, timeout): reconnect.
    Broken(PublishError),
    /// The broker works but had nowhere to route the message: keep the connection.
    Returned(PublishError),
}

impl ProgressPublisher {
    /// Spawns the background task: it connects (retrying forever with backoff; the caller never
    /// sees a failure), declares the durable topic exchange, enables publisher confirms and,
    /// every `interval`, flushes what is pending. Must be called inside a tokio runtime.
    pub fn start(config: PublisherConfig) -> Self {
        let inner = Arc::new(Inner {
            pending: StdMutex::new(Pending::new(config.max_pending)),
            config,
            sender: Mutex::new(Sender::new()),
            connected: AtomicBool::new(false),
        });
        let (stop, closing) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(run(inner.clone(), stop.clone(), closing.clone()));
        let task = StdMutex::new(Some(task));
        Self { handle: Arc::new(Handle { inner, task, stop, closing }) }
    }

    /// Buffers the update: merged into the pending state of its key, so only the latest value of
    /// each field is sent. Never blocks on the network and never fails. An update that breaks
    /// the limits of docs/contract.md §2 is logged and dropped here, so it cannot get a whole burst
    /// dead-lettered with the valid updates of other keys.
    pub fn publish(&self, key: Key, update: Update) {
        self.publish_traced(key, update, None);
    }

    /// [`publish`](Self::publish), within the trace `traceparent` (W3C): the message carrying
    /// the key's update has that `traceparent` in its AMQP headers (when one message carries
    /// several traced keys, the first one's), so the aggregator's span continues the trace.
    pub fn publish_traced(&self, key: Key, update: Update, traceparent: Option<&str>) {
        if let Err(e) = update.validate() {
            warn!(key = %key, error = %e, "dropping invalid progress update");
            return;
        }
        let mut pending = self.handle.inner.lock_pending();
        if let Some(traceparent) = traceparent
            && (pending.traces.len() < pending.max || pending.traces.contains_key(&key))
        {
            pending.traces.insert(key.clone(), traceparent.to_owned());
        }
        pending.add(key, &update);
    }

    /// Sends everything pending now (connecting first if needed) and waits for the broker's
    /// confirms. On `Err` the unconfirmed updates stay buffered and will be retried.
    pub async fn flush(&self) -> Result<(), PublishError> {
        let inner = &self.handle.inner;
        let mut sender = inner.sender.lock().await;
        inner.flush_locked(&mut sender).await
    }

    /// The final flush: stops the background task, then retries until everything published
    /// before `close` is confirmed, or gives up after `timeout` with
    /// [`PublishError::Undelivered`]. Either way the connection is closed; updates still
    /// buffered are only sent by a later [`flush`](Self::flush).
    pub async fn close(&self, timeout: Duration) -> Result<(), PublishError> {
        let deadline = Instant::now() + timeout;
        self.handle.closing.cancel();
        let task = self.handle.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task {
            // Let a periodic flush in progress finish; past the deadline, interrupting it is
            // safe: the updates it holds go back to the buffer.
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        let inner = &self.handle.inner;
        let mut last = None;
        let result = tokio::time::timeout_at(deadline, async {
            let mut retries = Retries::doubling(FIRST_BACKOFF, Duration::from_secs(1));
            loop {
                let mut sender = inner.sender.lock().await;
                let delay = match inner.flush_locked(&mut sender).await {
                    Ok(()) => return,
                    Err(e) => {
                        let delay = retries.failed();
                        debug!(error = %e, retry_in = ?delay, "final progress flush failed");
                        last = Some(e);
                        delay
                    }
                };
                drop(sender);
                tokio::time::sleep(delay).await;
            }
        })
        .await;
        inner.disconnect().await;
        match result {
            Ok(()) => Ok(()),
            Err(_) => {
                let undelivered = self.pending();
                let last = last.unwrap_or(PublishError::Timeout { after: timeout, pending: undelivered });
                warn!(undelivered, error = %last, "progress publisher closed with undelivered updates");
                Err(PublishError::Undelivered { undelivered, timeout, last: Box::new(last) })
            }
        }
    }

    /// Number of keys waiting to be sent (in flight ones excluded).
    pub fn pending(&self) -> usize {
        self.handle.inner.lock_pending().entries.len()
    }

    /// True while the publisher holds an open connection with confirms enabled.
    pub fn is_connected(&self) -> bool {
        self.handle.inner.connected.load(Ordering::Relaxed)
    }
}

async fn run(inner: Arc<Inner>, stop: CancellationToken, closing: CancellationToken) {
    let mut ticker = tokio::time::interval(inner.config.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = closing.cancelled() => return,
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let mut sender = inner.sender.lock().await;
        inner.tick(&mut sender).await;
    }
    let pending = inner.lock_pending().entries.len();
    if pending > 0 {
        let mut sender = inner.sender.lock().await;
        if let Err(e) = inner.flush_locked(&mut sender).await {
            warn!(error = %e, "progress publisher dropped without close; last flush failed");
        }
    }
    inner.disconnect().await;
}

impl Inner {
    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave `Pending` half-updated in a way that
        // matters more than losing progress reports, so keep going.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One period of the background task: notice a dead connection, reconnect when the backoff
    /// allows, and flush.
    async fn tick(&self, sender: &mut Sender) {
        {
            let mut pending = self.lock_pending();
            metrics::gauge!("cairn_publisher_buffered_keys").set(pending.entries.len() as f64);
            if pending.dropped > 0 {
                warn!(
                    dropped = pending.dropped,
                    max = pending.max,
                    "progress buffer full; dropped the oldest keys' states"
                );
                metrics::counter!("cairn_publisher_dropped_total").increment(pending.dropped);
                pending.dropped = 0;
            }
        }
        if sender.link.as_ref().is_some_and(|link| !link.healthy()) {
            warn!(pending = self.lock_pending().entries.len(), "rabbitmq connection lost; reconnecting");
            self.drop_link(sender);
            sender.failed();
        }
        if sender.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let pending = self.lock_pending().entries.len();
        if pending == 0 {
            if sender.link.is_some() {
                sender.succeeded();
            } else if let Err(e) = self.ensure_link(sender).await {
                warn!(error = %e, retry_in = ?sender.retry_in(), "cannot connect to rabbitmq");
                sender.failed();
            }
            return;
        }
        if let Err(e) = self.flush_locked(sender).await {
            let pending = self.lock_pending().entries.len();
            warn!(error = %e, pending, retry_in = ?sender.retry_in(), "progress publish failed; will retry");
        }
    }

    /// Sends everything pending on the (re)established link and waits for the confirms. The
    /// buffer is taken only once connected, so updates stay counted in `pending` meanwhile.
    async fn flush_locked(&self, sender: &mut Sender) -> Result<(), PublishError> {
        if self.lock_pending().entries.is_empty() {
            return Ok(());
        }
        let link = match self.ensure_link(sender).await {
            Ok(link) => link,
            Err(e) => {
                sender.failed();
                return Err(self.with_pending(e));
            }
        };
        let (batch, traces) = {
            let mut pending = self.lock_pending();
            (pending.take(), std::mem::take(&mut pending.traces))
        };
        if batch.is_empty() {
            return Ok(());
        }
        let confirmed = vec![false; batch.len()];
        let (batch, routes) = group_by_route(batch);
        let mut flight = InFlight { inner: self, batch, routes, confirmed, traces };
        match self.send(link, &mut flight).await {
            Ok(updates) => {
                metrics::counter!("cairn_progress_published_total").increment(updates as u64);
                sender.succeeded();
                Ok(())
            }
            Err(failure) => {
                let unsent = flight.confirmed.iter().filter(|c| !**c).count();
                metrics::counter!("cairn_progress_publish_failures_total").increment(unsent as u64);
                drop(flight);
                let error = match failure {
                    Failure::Broken(e) => {
                        self.drop_link(sender);
                        e
                    }
                    Failure::Returned(e) => e,
                };
                sender.failed();
                Err(self.with_pending(error))
            }
        }
    }

    /// Publishes every burst of the flight, then waits for all confirms. Returns the number of
    /// updates confirmed; on failure, the confirmed ones are marked and the rest go back.
    async fn send(&self, link: &Link, flight: &mut InFlight<'_>) -> Result<usize, Failure> {
        let elements: Vec<Vec<u8>> = flight.batch.iter().map(encode_element).collect();
        let max = self.config.max_burst.clamp(1, MAX_BURST_UPDATES);
        let bursts = split(&flight.routes, &elements, max);
        let now_ms = cairn_progress::now_ms();
        let mut headers = FieldTable::default();
        headers.insert(TIME_HEADER.into(), AMQPValue::LongLongInt(now_ms));
        let exchange = name(&self.config.exchange);
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let wait = self.config.confirm_timeout;

        let mut confirms = Vec::with_capacity(bursts.len());
        for burst in &bursts {
            let body = assemble(&elements[burst.range.clone()]);
            let trace = flight.batch[burst.range.clone()].iter().find_map(|(key, _)| flight.traces.get(key));
            let headers = match trace {
                Some(traceparent) => {
                    let mut headers = headers.clone();
                    headers.insert(
                        TRACEPARENT_HEADER.into(),
                        AMQPValue::LongString(traceparent.as_str().into()),
                    );
                    headers
                }
                None => headers.clone(),
            };
            let properties = BasicProperties::default()
                .with_content_type(name("application/json"))
                .with_delivery_mode(2)
                .with_message_id(name(&uuid::Uuid::now_v7().to_string()))
                .with_headers(headers);
            let published = timeout(
                wait,
                link.channel.basic_publish(
                    exchange.clone(),
                    name(burst.route.as_str()),
                    options,
                    &body,
                    properties,
                ),
            )
            .await;
            match published {
                Ok(Ok(confirm)) => confirms.push(confirm),
                Ok(Err(e)) => {
                    // Nothing from this burst on was sent; settle the ones before it.
                    let failure = Failure::Broken(PublishError::Unavailable { pending: 0, error: e });
                    self.settle(flight, &bursts[..confirms.len()], confirms, wait).await?;
                    return Err(failure);
                }
                Err(_) => {
                    return Err(Failure::Broken(PublishError::Timeout { after: wait, pending: 0 }));
                }
            }
        }
        self.settle(flight, &bursts, confirms, wait).await
    }

    /// Waits for the confirms of `bursts` and marks their updates confirmed.
    async fn settle(
        &self,
        flight: &mut InFlight<'_>,
        bursts: &[Burst],
        confirms: Vec<PublisherConfirm>,
        wait: Duration,
    ) -> Result<usize, Failure> {
        let Ok(results) = timeout(wait, join_all(confirms)).await else {
            return Err(Failure::Broken(PublishError::Timeout { after: wait, pending: 0 }));
        };
        let mut delivered = 0;
        let mut failure = None;
        for (burst, result) in bursts.iter().zip(results) {
            let updates = burst.range.len();
            let problem = match result {
                Ok(Confirmation::Ack(None)) => None,
                Ok(Confirmation::Ack(Some(returned))) => Some(Failure::Returned(PublishError::Unroutable {
                    exchange: self.config.exchange.clone(),
                    routing_key: returned.delivery.routing_key.to_string(),
                    updates,
                    pending: 0,
                })),
                Ok(Confirmation::Nack(_)) => Some(Failure::Broken(PublishError::NotConfirmed {
                    updates,
                    pending: 0,
                    reason: "the broker answered nack".into(),
                })),
                Ok(Confirmation::NotRequested) => Some(Failure::Broken(PublishError::NotConfirmed {
                    updates,
                    pending: 0,
                    reason: "publisher confirms are not enabled on the channel".into(),
                })),
                Err(e) => Some(Failure::Broken(PublishError::NotConfirmed {
                    updates,
                    pending: 0,
                    reason: e.to_string(),
                })),
            };
            match problem {
                None => {
                    flight.confirmed[burst.range.clone()].fill(true);
                    delivered += updates;
                }
                // A broken link outranks a return: it decides whether to reconnect.
                Some(p @ Failure::Broken(_)) => failure = Some(p),
                Some(p @ Failure::Returned(_)) => {
                    if failure.is_none() {
                        failure = Some(p);
                    }
                }
            }
        }
        failure.map_or(Ok(delivered), Err)
    }

    /// The healthy link, or a new one: connected, exchange declared, confirms enabled.
    async fn ensure_link<'s>(&self, sender: &'s mut Sender) -> Result<&'s Link, PublishError> {
        let link = match sender.link.take() {
            Some(link) if link.healthy() => link,
            _ => {
                self.connected.store(false, Ordering::Relaxed);
                let wait = self.config.confirm_timeout;
                let link = match timeout(wait, self.connect()).await {
                    Ok(Ok(link)) => link,
                    Ok(Err(error)) => return Err(PublishError::Unavailable { pending: 0, error }),
                    Err(_) => return Err(PublishError::Timeout { after: wait, pending: 0 }),
                };
                info!(exchange = %self.config.exchange, "progress publisher connected to rabbitmq");
                self.connected.store(true, Ordering::Relaxed);
                link
            }
        };
        Ok(sender.link.insert(link))
    }

    async fn connect(&self) -> Result<Link, lapin::Error> {
        let properties =
            ConnectionProperties::default().with_connection_name("cairn-progress-publisher".into());
        let connection = self.config.endpoint.connect(properties).await?;
        let channel = connection.create_channel().await?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(
                name(&self.config.exchange),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Link { connection, channel })
    }

    /// Forgets the link; dropping the lapin handles closes the connection if it is still open.
    fn drop_link(&self, sender: &mut Sender) {
        sender.link = None;
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Closes the connection politely (bounded), for the end of the publisher's life.
    async fn disconnect(&self) {
        let mut sender = self.sender.lock().await;
        if let Some(link) = sender.link.take() {
            let closing = link.connection.close(200, name("progress publisher closed"));
            if let Ok(Err(e)) = timeout(Duration::from_secs(1), closing).await {
                debug!(error = %e, "closing rabbitmq connection failed");
            }
        }
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Fills in how many keys are buffered now that the failed updates are back.
    fn with_pending(&self, mut error: PublishError) -> PublishError {
        let now = self.lock_pending().entries.len();
        match &mut error {
            PublishError::Unavailable { pending, .. }
            | PublishError::Timeout { pending, .. }
            | PublishError::NotConfirmed { pending, .. }
            | PublishError::Unroutable { pending, .. } => *pending = now,
            PublishError::Undelivered { .. } => {}
        }
        error
    }
}

/// Reorders the batch so that each route's updates are contiguous, routes in first-seen order and
/// updates of one route in their first-seen order; also returns each route's range of it.
fn group_by_route(batch: Vec<(Key, Update)>) -> (Vec<(Key, Update)>, Vec<Burst>) {
    let mut routes: Vec<(Key, Vec<(Key, Update)>)> = Vec::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    for (key, update) in batch {
        let route = key.burst_route();
        let i = *index.entry(route.clone()).or_insert_with(|| {
            routes.push((route, Vec::new()));
            routes.len() - 1
        });
        routes[i].1.push((key, update));
    }
    let (mut grouped, mut groups) = (Vec::new(), Vec::with_capacity(routes.len()));
    for (route, updates) in routes {
        let start = grouped.len();
        grouped.extend(updates);
        groups.push(Burst { route, range: start..grouped.len() });
    }
    (grouped, groups)
}

/// One burst element (`{"key": …, fields…}`): [`encode_burst`] of a single update without its
/// brackets, so that the flush encodes every update once and can size messages by bytes.
fn encode_element(entry: &(Key, Update)) -> Vec<u8> {
    let mut array = encode_burst(std::slice::from_ref(entry));
    array.pop();
    array.remove(0);
    array
}

/// The burst body of consecutive elements: the same bytes as [`encode_burst`] of their updates.
fn assemble(elements: &[Vec<u8>]) -> Vec<u8> {
    let len = elements.iter().map(|e| e.len() + 1).sum::<usize>() + 1;
    let mut body = Vec::with_capacity(len);
    body.push(b'[');
    for (i, element) in elements.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(element);
    }
    body.push(b']');
    body
}

/// Cuts each route's group into messages of at most `max` updates and [`MAX_BURST_BYTES`].
fn split(routes: &[Burst], elements: &[Vec<u8>], max: usize) -> Vec<Burst> {
    let mut bursts = Vec::new();
    for group in routes {
        let mut start = group.range.start;
        // One byte for the opening bracket, one per separator or the closing bracket.
        let mut bytes = 1;
        for i in group.range.clone() {
            let size = elements[i].len() + 1;
            if i > start && (i - start >= max || bytes + size > MAX_BURST_BYTES) {
                bursts.push(Burst { route: group.route.clone(), range: start..i });
                (start, bytes) = (i, 1);
            }
            bytes += size;
        }
        bursts.push(Burst { route: group.route.clone(), range: start..group.range.end });
    }
    bursts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key::parse(s).unwrap()
    }

    fn keys(entries: &[(Key, Update)]) -> Vec<&str> {
        entries.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn pending_merges_per_key_in_first_seen_order() {
        let mut pending = Pending::new(100);
        pending.add(key("_t.a"), &Update::new().progress(0.1).status("running"));
        pending.add(key("_t.b"), &Update::new().progress(0.2));
        pending.add(key("_t.a"), &Update::new().progress(0.3));
        let taken = pending.take();
        assert_eq!(keys(&taken), ["_t.a", "_t.b"]);
        assert_eq!(taken[0].1, Update::new().progress(0.3).status("running"));
        assert!(pending.take().is_empty());
    }

    #[test]
    fn a_full_buffer_drops_its_oldest_keys() {
        let mut pending = Pending::new(20);
        for i in 0..25 {
            pending.add(key(&format!("_t.k{i}")), &Update::new().progress(0.5));
        }
        // each time 20 keys are held and a new one comes, the oldest two (a tenth) go
        assert_eq!(pending.dropped, 6);
        assert_eq!(pending.entries.len(), 19);
        assert_eq!(pending.entries[0].0.as_str(), "_t.k6");
        pending.add(key("_t.k24"), &Update::new().progress(1.0));
        let taken = pending.take();
        assert_eq!(
            taken.last().map(|(k, u)| (k.as_str(), u.progress)),
            Some(("_t.k24", Some(1.0))),
            "a known key merges"
        );
        assert!(!keys(&taken).contains(&"_t.k0"), "the oldest went first");
        assert_eq!(pending.index.len(), 0);
    }

    #[test]
    fn restore_puts_older_state_under_newer_fields() {
        let mut pending = Pending::new(100);
        pending.add(key("_t.new"), &Update::new().progress(0.9));
        pending.add(key("_t.a"), &Update::new().progress(0.5));
        pending.restore(vec![
            (key("_t.a"), Update::new().progress(0.2).msg("older")),
            (key("_t.b"), Update::new().progress(0.1)),
        ]);
        let taken = pending.take();
        assert_eq!(keys(&taken), ["_t.a", "_t.b", "_t.new"]);
        assert_eq!(taken[0].1, Update::new().progress(0.5).msg("older"));
    }

    #[test]
    fn groups_by_route_and_splits_bursts() {
        let batch: Vec<_> = ["a.x", "_t.r1", "b.z", "a.y", "a", "_t.r2.s", "b"]
            .into_iter()
            .map(|k| (key(k), Update::new().progress(0.5)))
            .collect();
        let (grouped, routes) = group_by_route(batch);
        assert_eq!(keys(&grouped), ["a.x", "a.y", "a", "_t.r1", "_t.r2.s", "b.z", "b"]);
        let elements: Vec<_> = grouped.iter().map(encode_element).collect();
        let bursts = split(&routes, &elements, 2);
        let shape: Vec<_> = bursts.iter().map(|b| (b.route.as_str(), b.range.clone())).collect();
        // the trees of namespace _t (_t.r1, _t.r2) travel together, as `_t`
        assert_eq!(shape, [("a", 0..2), ("a", 2..3), ("_t", 3..5), ("b", 5..7)]);
        for burst in &bursts {
            assert_eq!(assemble(&elements[burst.range.clone()]), encode_burst(&grouped[burst.range.clone()]));
        }
    }

    #[test]
    fn splits_bursts_by_bytes() {
        // 200 updates of ~60 KiB each: far more than one body may hold.
        let big = "x".repeat(60 * 1024);
        let batch: Vec<_> = (0..200)
            .map(|i| (key(&format!("_t.a.k{i}")), Update::new().field("blob", big.as_str())))
            .collect();
        let (batch, routes) = group_by_route(batch);
        let elements: Vec<_> = batch.iter().map(encode_element).collect();
        let bursts = split(&routes, &elements, 1000);
        assert!(bursts.len() > 1);
        let mut next = 0;
        for burst in &bursts {
            assert_eq!(burst.range.start, next);
            next = burst.range.end;
            assert!(assemble(&elements[burst.range.clone()]).len() <= MAX_BURST_BYTES);
        }
        assert_eq!(next, batch.len());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut sender = Sender::new();
        for _ in 0..10 {
            sender.failed();
        }
        assert_eq!(sender.retry_in(), MAX_BACKOFF);
        assert!(sender.retry_at.is_some());
        sender.succeeded();
        assert_eq!((sender.retry_in(), sender.retry_at), (FIRST_BACKOFF, None));
    }
}
