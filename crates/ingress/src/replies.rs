//! Replies: how a client waiting with `Prefer: wait` learns at once that its request finished.
//!
//! Each ingress replica has a reply stream of its own, `{prefix}:replies:{replica}`, named in the
//! records it submits; the processor's commit script `XADD`s `{id, state}` there when a request
//! ends. One reader per replica follows only that stream (no replica reads or deletes another's
//! replies) on a dedicated connection (on a Redis Cluster, a cluster connection of its own), because
//! `XREAD BLOCK` would stall every command queued behind it on the shared one, and wakes the
//! [`Waiters`] registered for the id.
//!
//! Replies are at most once: one `XADD`ed while the reader reconnects may be missed. A waiter
//! therefore also re-reads the record on a timer, and every waiter is woken after a reconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_error::Retries;
use cairn_redis::requests::RequestQueue;
use cairn_redis::{RedisConfig, RedisConnection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long one `XREAD` blocks; the reader then loops, so shutdown and dead connections are
/// noticed at least this often.
const BLOCK: Duration = Duration::from_secs(5);
/// Bound on one `XREAD` beyond its block time: a server that stops answering (paused,
/// partitioned) is given up on and the connection made again.
const READ_SLACK: Duration = Duration::from_secs(5);
/// Entries taken per read.
const BATCH: usize = 256;
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// The waiters of each request id, each with its registration token.
type ById = HashMap<String, Vec<(u64, Arc<Notify>)>>;

/// Who waits for which request. A request may have several waiters (the same idempotent
/// submission waited on twice, a `GET` long-poll) and a waiter may be woken several times; each
/// waiter has a [`Notify`] of its own, whose stored permit means a wake-up between two waits is
/// never lost.
#[derive(Default)]
pub struct Waiters {
    next: AtomicU64,
    by_id: Mutex<ById>,
}

impl Waiters {
    /// Registers interest in `id` until the returned guard is dropped. Register before the
    /// request is submitted: the reply can be faster than the submitting call returns.
    pub fn register(self: &Arc<Self>, id: &str) -> Waiter {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.lock().entry(id.to_owned()).or_default().push((token, notify.clone()));
        Waiter { waiters: self.clone(), id: id.to_owned(), token, notify }
    }

    /// Wakes every waiter of `id`; how many there were.
    pub fn wake(&self, id: &str) -> usize {
        let by_id = self.lock();
        let Some(waiters) = by_id.get(id) else { return 0 };
        for (_, notify) in waiters {
            notify.notify_one();
        }
        waiters.len()
    }

    /// Wakes every waiter, so each re-reads its record: replies may have been missed.
    pub fn wake_all(&self) {
        for (_, notify) in self.lock().values().flatten() {
            notify.notify_one();
        }
    }

    /// Number of requests waited for.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ById> {
        // The map stays consistent even if a holder panicked: every change is one call.
        self.by_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Interest in one request's reply; unregistered on drop.
pub struct Waiter {
    waiters: Arc<Waiters>,
    id: String,
    token: u64,
    notify: Arc<Notify>,
}

impl Waiter {
    /// Returns once a reply for the request arrived (at once if one arrived since the last call).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut by_id = self.waiters.lock();
        if let Some(waiters) = by_id.get_mut(&self.id) {
            waiters.retain(|(token, _)| *token != self.token);
            if waiters.is_empty() {
                by_id.remove(&self.id);
            }
        }
    }
}

/// Follows this replica's reply stream until `shutdown`, waking waiters; reconnects with backoff
/// whenever Redis goes away. Starts with replies added from now on.
pub async fn run_reader(
    redis: RedisConfig,
    stream: String,
    waiters: Arc<Waiters>,
    shutdown: CancellationToken,
) {
    let mut last_id = format!("{}-0", cairn_progress::now_ms());
    let mut retries = Retries::doubling(FIRST_RETRY, MAX_RETRY);
    let mut conn: Option<RedisConnection> = None;
    info!(stream = %stream, "reading replies");
    while !shutdown.is_cancelled() {
        if conn.is_none() {
            let connected = tokio::select! {
                () = shutdown.cancelled() => return,
                connected = redis.dedicated_connection() => connected,
            };
            match connected {
                Ok(reader) => {
                    conn = Some(reader);
                    // Replies added while we were away may be lost: let every waiter look.
                    waiters.wake_all();
                }
                Err(error) => {
                    let delay = retries.failed();
                    warn!(%error, retry_in = ?delay, "cannot connect to redis to read replies");
                    pause(&shutdown, delay).await;
                    continue;
                }
            }
        }
        let reader = conn.as_mut().expect("connected above");
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            read = tokio::time::timeout(
                BLOCK + READ_SLACK,
                RequestQueue::read_replies(reader, &stream, &last_id, BATCH, BLOCK.as_millis() as usize),
            ) => read,
        };
        match read {
            Ok(Ok(replies)) => {
                retries.succeeded();
                for (entry_id, request_id) in replies {
                    let woken = waiters.wake(&request_id);
                    debug!(request = %request_id, woken, "reply received");
                    metrics::counter!("cairn_ingress_replies_total").increment(1);
                    last_id = entry_id;
                }
            }
            Ok(Err(error)) => {
                let delay = retries.failed();
                warn!(%error, retry_in = ?delay, "cannot read replies; reconnecting");
                conn = None;
                pause(&shutdown, delay).await;
            }
            Err(_) => {
                warn!(timeout = ?(BLOCK + READ_SLACK), "redis did not answer a reply read; reconnecting");
                conn = None;
            }
        }
    }
}

async fn pause(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(delay) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_before_the_wait_is_kept() {
        let waiters = Arc::new(Waiters::default());
        let waiter = waiters.register("a");
        assert_eq!(waiters.wake("a"), 1);
        tokio::time::timeout(Duration::from_secs(1), waiter.notified()).await.expect("stored wake-up");
    }

    #[tokio::test]
    async fn every_waiter_of_an_id_is_woken_and_only_those() {
        let waiters = Arc::new(Waiters::default());
        let (a1, a2, b) = (waiters.register("a"), waiters.register("a"), waiters.register("b"));
        assert_eq!(waiters.len(), 2);
        assert_eq!(waiters.wake("a"), 2);
        a1.notified().await;
        a2.notified().await;
        let pending = tokio::time::timeout(Duration::from_millis(50), b.notified()).await;
        assert!(pending.is_err(), "b was not replied to");
        waiters.wake_all();
        b.notified().await;
        assert_eq!(waiters.wake("nobody"), 0);
    }

    #[tokio::test]
    async fn dropping_a_waiter_unregisters_it() {
        let waiters = Arc::new(Waiters::default());
        let first = waiters.register("a");
        let second = waiters.register("a");
        drop(first);
        assert_eq!(waiters.wake("a"), 1);
        second.notified().await;
        drop(second);
        assert_eq!(waiters.len(), 0);
        assert_eq!(waiters.wake("a"), 0);
    }
}
