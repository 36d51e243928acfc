//! Intake: the reader's own connection and its reconnection backoff, permits for what is read,
//! and how a failed read is classified.

use std::sync::Arc;
use std::time::Duration;

use cairn_error::{Backoff, Retries};
use cairn_redis::requests::QueueError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Most entries read or reclaimed at once.
pub(super) const MAX_BATCH: usize = 256;

/// How long past its block time a read of the request stream may take before the reader counts
/// Redis as gone.
pub(super) const READ_SLACK: Duration = Duration::from_secs(5);

/// Delays between tries to reconnect or read again while Redis is away: exponential with full
/// jitter from 100 ms, at most 2 s, so many processors do not come back at once.
const RECONNECT: Backoff =
    Backoff { base: Duration::from_millis(100), max: Duration::from_secs(2), factor: 2.0 };

/// Failures of the reader in a row, and how long to wait after each.
#[derive(Debug)]
pub(super) struct Reconnect {
    retries: Retries,
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect { retries: Retries::jittered(RECONNECT) }
    }
}

impl Reconnect {
    /// Counts a failure; the delay before the next try.
    pub(super) fn failed(&mut self) -> Duration {
        self.retries.failed()
    }

    pub(super) fn succeeded(&mut self) {
        self.retries.succeeded();
    }

    /// Waits `delay` unless `shutdown` fires first (then `false`).
    pub(super) async fn wait(delay: Duration, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

/// `first` and as many more free permits as there are, up to [`MAX_BATCH`] in all: what is
/// read with them can start at once.
pub(super) fn take_permits(
    permits: &Arc<Semaphore>,
    first: OwnedSemaphorePermit,
) -> Vec<OwnedSemaphorePermit> {
    let mut batch = vec![first];
    top_up(permits, &mut batch);
    batch
}

/// Adds free permits to `batch`, without waiting, until it holds [`MAX_BATCH`] or none is free.
pub(super) fn top_up(permits: &Arc<Semaphore>, batch: &mut Vec<OwnedSemaphorePermit>) {
    while batch.len() < MAX_BATCH {
        match permits.clone().try_acquire_owned() {
            Ok(permit) => batch.push(permit),
            Err(_) => break,
        }
    }
}

/// How a partition's reader holds the processor's permits (its one concurrency limit) while
/// its blocking read waits for entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holding {
    /// The only partition: its reader blocks holding every free permit, so one read takes as
    /// many entries as can start (no other reader needs them meanwhile).
    All,
    /// One partition of several: its reader blocks holding one permit, so a reader waiting on
    /// an idle partition never keeps the permits a busy one needs. Once an entry arrived it
    /// takes the permits free then and reads more without waiting.
    One,
}

impl Holding {
    pub(super) fn of(partitions: usize) -> Holding {
        if partitions > 1 { Holding::One } else { Holding::All }
    }

    /// Of the permits `held`, how many the blocking read keeps (it reads as many entries).
    pub(super) fn while_blocked(self, held: usize) -> usize {
        match self {
            Holding::All => held,
            Holding::One => held.min(1),
        }
    }

    /// Whether a blocking read that brought `read` entries is followed by a read without
    /// waiting, with the permits free by then.
    pub(super) fn reads_more(self, read: usize) -> bool {
        self == Holding::One && read > 0
    }
}

/// Whether the read failed because the consumer group is gone (Redis came back without our
/// data): Redis's `NOGROUP` error code, never its message.
pub(super) fn group_missing(error: &QueueError) -> bool {
    matches!(error, QueueError::Redis(e) if e.code() == Some("NOGROUP"))
}

/// The error of a read that took longer than its block time and slack.
pub(super) fn read_timed_out() -> QueueError {
    QueueError::Redis(redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "redis did not answer a blocking read in time",
    )))
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[test]
    fn reconnect_delays_grow_to_the_cap_and_reset() {
        let mut reconnect = Reconnect::default();
        let caps: Vec<u128> = (1..=7)
            .map(|n| {
                let delay = reconnect.failed();
                let cap = RECONNECT.cap(n);
                assert!(delay <= cap, "failure {n}: {delay:?} > {cap:?}");
                cap.as_millis()
            })
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(reconnect.retries.failures(), 7);
        reconnect.succeeded();
        assert_eq!(reconnect.retries.failures(), 0);
        assert!(reconnect.failed() <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_wait_sleeps_unless_shut_down() {
        let shutdown = CancellationToken::new();
        let start = Instant::now();
        assert!(Reconnect::wait(Duration::from_millis(1500), &shutdown).await);
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
        let stopper = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                shutdown.cancel();
            })
        };
        assert!(!Reconnect::wait(Duration::from_secs(2), &shutdown).await);
        assert_eq!(start.elapsed(), Duration::from_millis(1800));
        stopper.await.unwrap();
    }

    #[test]
    fn permits_are_batched_up_to_what_is_free() {
        let permits = Arc::new(Semaphore::new(3));
        let held = permits.clone().try_acquire_owned().unwrap();
        let first = permits.clone().try_acquire_owned().unwrap();
        assert_eq!(take_permits(&permits, first).len(), 2);
        drop(held);
        let many = Arc::new(Semaphore::new(1000));
        let first = many.clone().try_acquire_owned().unwrap();
        let batch = take_permits(&many, first);
        assert_eq!(batch.len(), MAX_BATCH);
        assert_eq!(many.available_permits(), 1000 - MAX_BATCH);
        drop(batch);
        assert_eq!(many.available_permits(), 1000);
    }

    #[test]
    fn one_partition_blocks_with_every_permit() {
        let holding = Holding::of(1);
        assert_eq!(holding, Holding::All);
        assert_eq!(holding.while_blocked(64), 64);
        assert!(!holding.reads_more(64), "what one read brought is all it could start");
    }

    /// Three partitions, eight permits: the readers of two idle partitions each wait holding one
    /// permit, and the busy partition's reader, its first entry read, runs the other six.
    #[test]
    fn readers_of_idle_partitions_leave_the_permits_to_a_busy_one() {
        let holding = Holding::of(3);
        assert_eq!(holding, Holding::One);
        let permits = Arc::new(Semaphore::new(8));
        let blocked = |permits: &Arc<Semaphore>| {
            let first = permits.clone().try_acquire_owned().expect("a permit is free");
            let mut batch = take_permits(permits, first);
            batch.truncate(holding.while_blocked(batch.len()));
            batch
        };
        let idle_a = blocked(&permits);
        let idle_b = blocked(&permits);
        assert_eq!((idle_a.len(), idle_b.len()), (1, 1));
        let mut busy = blocked(&permits);
        assert_eq!(busy.len(), 1, "the busy reader reads one entry first");
        assert!(holding.reads_more(1));
        assert!(!holding.reads_more(0), "an empty read is followed by nothing");
        top_up(&permits, &mut busy);
        assert_eq!(busy.len(), 6, "every permit the idle readers do not hold");
        assert_eq!(permits.available_permits(), 0);
        drop(idle_a);
        assert_eq!(permits.available_permits(), 1, "an idle reader's read ended: its permit is free");
    }

    #[test]
    fn a_missing_group_is_known_by_its_error_code() {
        let nogroup = redis::make_extension_error(
            "NOGROUP".into(),
            Some("No such key 'p:requests' or consumer group 'processors'".into()),
        );
        assert!(group_missing(&QueueError::Redis(nogroup)));
        // The same words in another error's text are not the code.
        let other = redis::make_extension_error("ERR".into(), Some("NOGROUP mentioned".into()));
        assert!(!group_missing(&QueueError::Redis(other)));
        assert!(!group_missing(&read_timed_out()));
        assert!(!group_missing(&QueueError::Protocol("NOGROUP".into())));
    }
}
