//! Live progress (docs/contract.md §2 Live): fans the Redis change feed out to this process's subscribers.
//!
//! One reader per process tails the notification stream `P:pfeed` on a dedicated connection
//! ([`cairn_redis::progress::feed`]). Subscribers are grouped by tree root into hubs
//! (`hub.rs`): one task per watched tree reads that tree's feed entries once, for all its
//! subscribers, and keeps for each subscriber only the *set* of changed node keys in its subtree
//! (key prefix + depth). At most every `interval` (100 ms: ≤ 10 events a second) it reads the
//! newest state of the union of those keys in one Redis call and sends each subscriber one
//! `update`, parents first. A subscriber that does not read keeps accumulating keys, never
//! events: its memory is bounded by its subtree's changed nodes, and past `max_pending` keys it
//! gets a fresh snapshot instead. Transports (SSE, WebSocket, socket.io, gRPC `Watch`) adapt
//! [`Subscription`]s; none of them talks to Redis.

mod hub;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_error::Retries;
use cairn_progress::Key;
use cairn_progress::view::NodeView;
use cairn_redis::progress::feed::{Feed, NotificationReader};
use cairn_redis::{RedisConfig, RedisConnection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use cairn_redis::progress::feed::{BadFeedId, FeedId};

use crate::hub::{HubHandle, SubSpec};

/// Metric names (docs/contract.md §5).
pub const SUBSCRIBERS_GAUGE: &str = "cairn_live_subscribers";
pub const EVENTS_COUNTER: &str = "cairn_live_events_total";
pub const COALESCED_COUNTER: &str = "cairn_live_coalesced_total";

/// The live settings a service takes from flags or `CAIRN_*` variables.
#[derive(clap::Args, Debug, Clone)]
pub struct LiveArgs {
    /// Live subscribers (SSE streams, WebSocket subscriptions, gRPC watches) this process serves
    /// at once; more are refused (HTTP 503 with `Retry-After`, gRPC `UNAVAILABLE`).
    #[arg(long = "max-live-subscribers", env = "CAIRN_MAX_LIVE_SUBSCRIBERS", default_value_t = 10_000)]
    pub max_subscribers: usize,
    /// A `running` node silent longer than this is shown stalled (`_stalled: true`); a node's own
    /// `stall_after_ms` field overrides it.
    #[arg(long = "stall-after", env = "CAIRN_STALL_AFTER", default_value = "60s", value_parser = cairn_runtime::parse_duration)]
    pub stall_after: Duration,
}

impl LiveArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            max_subscribers: self.max_subscribers,
            stall_after: self.stall_after,
            ..Settings::default()
        }
    }
}

/// How the fan-out behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Shortest time between two events of one subscriber.
    pub interval: Duration,
    /// Subscribers this process accepts at once; more get [`LiveError::Full`].
    pub max_subscribers: usize,
    /// Changed keys a subscriber may accumulate before it gets a fresh snapshot instead.
    pub max_pending: usize,
    /// A running node silent longer than this is stalled (unless it says `stall_after_ms`).
    pub stall_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            interval: Duration::from_millis(100),
            max_subscribers: 10_000,
            max_pending: 10_000,
            stall_after: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("too many live subscribers on this replica (at most {0}); try again later")]
    Full(usize),
    #[error("depth must be between 1 and 8, got {0}")]
    BadDepth(u32),
    #[error("limit must be between 1 and 1000, got {0}")]
    BadLimit(u32),
}

impl cairn_error::ServiceError for LiveError {
    fn kind(&self) -> cairn_error::ErrorKind {
        match self {
            LiveError::Full(_) => cairn_error::ErrorKind::Unavailable,
            LiveError::BadDepth(_) | LiveError::BadLimit(_) => cairn_error::ErrorKind::BadRequest,
        }
    }
}

/// What to watch: the subtree at `key`, `depth` levels deep (as a read's depth), children pages
/// of `limit`, resuming after the event id `after` (else starting with a snapshot).
#[derive(Debug, Clone)]
pub struct Watch {
    pub key: Key,
    pub depth: u32,
    pub limit: u32,
    pub after: Option<FeedId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Snapshot,
    Update,
    Delete,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Snapshot => "snapshot",
            EventKind::Update => "update",
            EventKind::Delete => "delete",
        }
    }
}

/// One event of a subscription.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// Resume after this id to get what follows this event.
    pub id: FeedId,
    /// The watched key.
    pub key: String,
    /// `snapshot`: the watched node read to the watch's depth; `update`: the newest state of
    /// each changed node (read to depth 1), parents first.
    pub nodes: Vec<NodeView>,
    /// `delete`: keys whose subtrees went away (the watched key itself when it went).
    pub deleted: Vec<String>,
}

/// The live fan-out of one process. Cheap to clone.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    feed: Feed,
    settings: Settings,
    hubs: Mutex<HashMap<String, HubHandle>>,
    subscribers: AtomicUsize,
    next_id: AtomicU64,
    shutdown: CancellationToken,
}

impl Live {
    /// Starts the notification reader (its own Redis connection from `redis`); `conn` serves the
    /// short reads (one Redis or a cluster, as `redis` says). Everything stops, and every
    /// subscription ends, when `shutdown` fires.
    pub fn start(
        redis: RedisConfig,
        conn: impl Into<RedisConnection>,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Live {
        // Listed in /metrics from the start; added to, not set, so another Live in the same
        // process (tests, `cairn dev`) never resets what this one counts.
        metrics::gauge!(SUBSCRIBERS_GAUGE).increment(0.0);
        let inner = Arc::new(Inner {
            feed: Feed::new(conn, redis.prefix.clone()),
            settings,
            hubs: Mutex::new(HashMap::new()),
            subscribers: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            shutdown,
        });
        tokio::spawn(read_notifications(redis, inner.clone()));
        Live { inner }
    }

    /// Fires when the process shuts down (every subscription then ends).
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Subscribers open now.
    pub fn subscribers(&self) -> usize {
        self.inner.subscribers.load(Ordering::Relaxed)
    }

    /// Starts watching. The first event is a `snapshot` (or, resuming, what was missed after
    /// `after`, or a snapshot when the feed no longer holds it); a key with no node yet waits.
    pub fn subscribe(&self, watch: Watch) -> Result<Subscription, LiveError> {
        if !(1..=8).contains(&watch.depth) {
            return Err(LiveError::BadDepth(watch.depth));
        }
        if !(1..=1000).contains(&watch.limit) {
            return Err(LiveError::BadLimit(watch.limit));
        }
        let inner = &self.inner;
        let max = inner.settings.max_subscribers;
        if inner
            .subscribers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .is_err()
        {
            return Err(LiveError::Full(max));
        }
        metrics::gauge!(SUBSCRIBERS_GAUGE).increment(1.0);
        // Room for a delete and an update of one flush; the hub sends only when both fit.
        let (tx, rx) = mpsc::channel(4);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let root = watch.key.root().to_string();
        let hub = {
            let mut hubs = inner.hubs.lock().expect("hubs lock");
            let hub = hubs.entry(root.clone()).or_insert_with(|| hub::spawn(root, inner.clone())).clone();
            // Sent under the map's lock: a hub leaves the map only after checking, under the
            // same lock, that no subscriber is on its way in.
            hub.add(SubSpec { id, watch, tx });
            hub
        };
        Ok(Subscription { rx, hub, id, inner: inner.clone() })
    }
}

/// A live subscription; ends (`None`) when the process shuts down. Dropping it unsubscribes.
pub struct Subscription {
    rx: mpsc::Receiver<Event>,
    hub: HubHandle,
    id: u64,
    inner: Arc<Inner>,
}

impl Subscription {
    /// The next event, or `None` once the process shuts down.
    pub async fn next(&mut self) -> Option<Event> {
        let event = tokio::select! {
            () = self.inner.shutdown.cancelled() => return None,
            event = self.rx.recv() => event?,
        };
        // Room again in this subscriber's queue: what piled up meanwhile can go.
        self.hub.wake();
        Some(event)
    }

    /// Turns the subscription into a stream of events.
    pub fn into_stream(self) -> impl futures::Stream<Item = Event> + Send + 'static {
        futures::stream::unfold(self, |mut sub| async move { sub.next().await.map(|event| (event, sub)) })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(self.id);
        self.inner.subscribers.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(SUBSCRIBERS_GAUGE).decrement(1.0);
    }
}

/// The process's one reader of `P:pfeed`: wakes the hub of every tree a notice names. After a
/// reconnect, or when it fell behind further than `P:pfeed` keeps, every hub re-reads its tree's
/// feed from where it was, so nothing is missed.
async fn read_notifications(redis: RedisConfig, inner: Arc<Inner>) {
    let mut retries = Retries::doubling(Duration::from_millis(100), Duration::from_secs(5));
    let mut first = true;
    'connect: loop {
        let started = async {
            let conn = redis.dedicated_connection().await.map_err(cairn_redis::StoreError::from)?;
            NotificationReader::start(conn, &inner.feed).await
        };
        let mut reader = tokio::select! {
            () = inner.shutdown.cancelled() => return,
            started = started => match started {
                Ok(reader) => reader,
                Err(error) => {
                    let delay = retries.failed();
                    warn!(%error, retry_in = ?delay, "cannot start the live feed reader");
                    tokio::select! {
                        () = inner.shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            },
        };
        retries.succeeded();
        if first {
            info!("live feed reader started");
            first = false;
        } else {
            info!("live feed reader reconnected");
            resync_all(&inner);
        }
        loop {
            // A Redis that does not answer within its block time and a margin is treated as
            // gone: reconnect (and re-read every watched tree) rather than wait for ever.
            let read = tokio::select! {
                () = inner.shutdown.cancelled() => return,
                read = tokio::time::timeout(Duration::from_secs(10), reader.next(5_000, 1_000)) => read,
            };
            let Ok(read) = read else {
                warn!("live feed reader got no answer from Redis within 10 s; reconnecting");
                continue 'connect;
            };
            match read {
                Ok(notices) => {
                    if notices.lost {
                        warn!(
                            "live feed reader fell behind the notification stream; re-reading every watched tree"
                        );
                        resync_all(&inner);
                    }
                    let hubs = inner.hubs.lock().expect("hubs lock");
                    for (root, notice) in notices.notices {
                        if let Some(hub) = hubs.get(&root) {
                            hub.notice(notice);
                        }
                    }
                }
                Err(error) => {
                    warn!(%error, "live feed reader lost Redis; reconnecting");
                    break;
                }
            }
        }
    }
}

fn resync_all(inner: &Inner) {
    for hub in inner.hubs.lock().expect("hubs lock").values() {
        hub.resync();
    }
}
