//! Heartbeats, one loop per partition: every in-flight run's lease is renewed each
//! `heartbeat_interval`, carrying the progress its handler last reported; a run whose lease was
//! lost, or whose cancellation was requested, is told to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cairn_progress::{Key, Update};
use cairn_redis::requests::{Heartbeat, QueueError, Renewal};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::registry::{Registry, Stop};
use super::{Deps, Partition};
use cairn_progress::now_ms;

/// Renews the leases of this processor's runs of one partition in Redis until `stop` fires.
pub(super) async fn heartbeat_loop(deps: Arc<Deps>, partition: Arc<Partition>, stop: CancellationToken) {
    let every = deps.settings.lease.heartbeat_interval;
    let renew = |running: Vec<Renewal>| {
        let (deps, partition) = (deps.clone(), partition.clone());
        async move { partition.queue.heartbeat(&deps.settings.consumer, &running, now_ms()).await }
    };
    // a renewal shows on the node too (coalesced with the run's reports)
    let renewed = |key: Key| deps.publisher.publish(key, Update::new().field("heartbeat_ms", now_ms()));
    beat(every, &partition.registry, &stop, renew, renewed).await;
}

/// The loop itself, over any lease store: `renew` answers one [`Heartbeat`] per renewal, and
/// `renewed` hears of each run whose lease was renewed.
async fn beat<R, F>(
    every: Duration,
    registry: &Registry,
    stop: &CancellationToken,
    mut renew: R,
    mut renewed: impl FnMut(Key),
) where
    R: FnMut(Vec<Renewal>) -> F,
    F: Future<Output = Result<Vec<Heartbeat>, QueueError>>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (running, keys): (Vec<Renewal>, Vec<Key>) = registry.renewals().into_iter().unzip();
        if running.is_empty() {
            continue;
        }
        let count = running.len();
        let entries: Vec<_> = running.iter().map(|r| r.entry.clone()).collect();
        match renew(running).await {
            Ok(beats) => {
                for ((entry, key), beat) in entries.iter().zip(keys).zip(beats) {
                    match beat {
                        Heartbeat::Renewed => {}
                        Heartbeat::CancelRequested => registry.signal(entry, Stop::Canceled),
                        Heartbeat::Lost => {
                            warn!(request = %entry.request_id, "lease lost to another processor; stopping the run");
                            registry.signal(entry, Stop::Lost);
                            continue;
                        }
                    }
                    renewed(key);
                }
            }
            Err(error) => warn!(%error, running = count, "cannot renew leases"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use cairn_redis::requests::Entry;
    use tokio::time::Instant;

    use super::*;

    fn entry(n: u32) -> Entry {
        Entry { entry_id: format!("{n}-0"), request_id: format!("r{n}") }
    }

    /// Renewals happen once per interval, and their answers reach the runs: a cancellation
    /// request and a lost lease stop the run with that reason, a Redis error stops nothing.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_renew_each_interval_and_stop_runs() {
        let every = Duration::from_secs(5);
        let registry = Registry::default();
        let (a, b) = (entry(1), entry(2));
        let a_signals = registry.insert(&a, &Key::parse("_t.a").unwrap());
        let b_signals = registry.insert(&b, &Key::parse("_t.b").unwrap());
        let calls: Arc<Mutex<Vec<(Duration, usize)>>> = Arc::default();
        let renewed_keys: Arc<Mutex<Vec<String>>> = Arc::default();
        let start = Instant::now();
        let stop = CancellationToken::new();
        let task = {
            let (registry, calls, renewed_keys, stop) =
                (registry.clone(), calls.clone(), renewed_keys.clone(), stop.clone());
            tokio::spawn(async move {
                let renew = |running: Vec<Renewal>| {
                    let calls = calls.clone();
                    async move {
                        let n = {
                            let mut calls = calls.lock().unwrap();
                            calls.push((start.elapsed(), running.len()));
                            calls.len()
                        };
                        let answer = |e: &Entry, first: Heartbeat, second: Heartbeat| {
                            if e.entry_id == "1-0" { first } else { second }
                        };
                        match n {
                            1 => Ok(running.iter().map(|_| Heartbeat::Renewed).collect()),
                            2 => Err(QueueError::Protocol("redis away".into())),
                            3 => Ok(running
                                .iter()
                                .map(|r| answer(&r.entry, Heartbeat::CancelRequested, Heartbeat::Lost))
                                .collect()),
                            _ => Ok(running.iter().map(|_| Heartbeat::Renewed).collect()),
                        }
                    }
                };
                let renewed = |key: Key| renewed_keys.lock().unwrap().push(key.to_string());
                beat(every, &registry, &stop, renew, renewed).await;
            })
        };

        // Just before the third tick: two renewals, neither run told to stop.
        tokio::time::sleep(every * 2 - Duration::from_millis(1)).await;
        assert_eq!(*calls.lock().unwrap(), [(Duration::ZERO, 2), (every, 2)]);
        assert_eq!(a_signals.reason(), None);
        assert_eq!(b_signals.reason(), None);

        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(calls.lock().unwrap().last(), Some(&(every * 2, 2)));
        assert_eq!(a_signals.reason(), Some(Stop::Canceled));
        assert_eq!(b_signals.reason(), Some(Stop::Lost));
        let mut keys = renewed_keys.lock().unwrap().clone();
        keys.sort();
        // first tick both renewed; third tick only the canceled run's lease was renewed
        assert_eq!(keys, ["_t.a", "_t.a", "_t.b"]);

        // Runs that ended leave the registry; an empty registry asks Redis nothing.
        registry.remove(&a);
        registry.remove(&b);
        tokio::time::sleep(every * 3).await;
        assert_eq!(calls.lock().unwrap().len(), 3);
        stop.cancel();
        task.await.unwrap();
    }
}
