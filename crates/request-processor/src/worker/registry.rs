//! The in-flight runs of this processor, and how each is told to stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cairn_progress::Key;
use cairn_redis::requests::{Entry, Renewal};
use tokio_util::sync::CancellationToken;

use crate::handler::LastProgress;

/// Why a run was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Cancellation was requested: the run ends as `canceled`.
    Canceled,
    /// Another processor owns the entry now: the run stores nothing.
    Lost,
    /// The process is stopping: the run stores nothing; its lease runs out and it is reclaimed.
    Shutdown,
}

struct Running {
    request_id: String,
    progress_key: Key,
    signals: RunSignals,
}

/// What a run shares with the registry: how it is told to stop, and where its handler's
/// progress is left for the heartbeats.
#[derive(Clone)]
pub(super) struct RunSignals {
    pub(super) cancel: CancellationToken,
    stop: Arc<Mutex<Option<Stop>>>,
    pub(super) progress: Arc<LastProgress>,
}

impl RunSignals {
    pub(super) fn new() -> RunSignals {
        RunSignals {
            cancel: CancellationToken::new(),
            stop: Arc::new(Mutex::new(None)),
            progress: Arc::new(LastProgress::new()),
        }
    }

    /// Tells the run to stop, keeping the first reason it was given.
    pub(super) fn stop(&self, reason: Stop) {
        self.stop.lock().expect("stop lock").get_or_insert(reason);
        self.cancel.cancel();
    }

    /// The first reason the run was told to stop, if it was.
    pub(super) fn reason(&self) -> Option<Stop> {
        *self.stop.lock().expect("stop lock")
    }
}

/// The in-flight runs, by entry id.
#[derive(Default, Clone)]
pub(super) struct Registry(Arc<Mutex<HashMap<String, Running>>>);

impl Registry {
    pub(super) fn insert(&self, entry: &Entry, progress_key: &Key) -> RunSignals {
        let signals = RunSignals::new();
        let running = Running {
            request_id: entry.request_id.clone(),
            progress_key: progress_key.clone(),
            signals: signals.clone(),
        };
        self.0.lock().expect("registry lock").insert(entry.entry_id.clone(), running);
        signals
    }

    pub(super) fn contains(&self, entry: &Entry) -> bool {
        self.0.lock().expect("registry lock").contains_key(&entry.entry_id)
    }

    pub(super) fn remove(&self, entry: &Entry) {
        self.0.lock().expect("registry lock").remove(&entry.entry_id);
    }

    /// Every run's lease renewal, with the progress its handler last reported, and its node.
    pub(super) fn renewals(&self) -> Vec<(Renewal, Key)> {
        let map = self.0.lock().expect("registry lock");
        map.iter()
            .map(|(e, r)| {
                let entry = Entry { entry_id: e.clone(), request_id: r.request_id.clone() };
                (Renewal { entry, progress: r.signals.progress.get() }, r.progress_key.clone())
            })
            .collect()
    }

    pub(super) fn signal(&self, entry: &Entry, reason: Stop) {
        if let Some(running) = self.0.lock().expect("registry lock").get(&entry.entry_id) {
            running.signals.stop(reason);
        }
    }

    pub(super) fn signal_all(&self, reason: Stop) {
        for running in self.0.lock().expect("registry lock").values() {
            running.signals.stop(reason);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.0.lock().expect("registry lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stop_reason_wins() {
        let registry = Registry::default();
        let entry = Entry { entry_id: "1-0".into(), request_id: "r".into() };
        let signals = registry.insert(&entry, &Key::parse("_t.r").unwrap());
        assert!(registry.contains(&entry));
        assert_eq!(signals.reason(), None);
        registry.signal(&entry, Stop::Canceled);
        registry.signal_all(Stop::Shutdown);
        assert_eq!(signals.reason(), Some(Stop::Canceled));
        assert!(signals.cancel.is_cancelled());
        registry.remove(&entry);
        assert_eq!(registry.len(), 0);
    }
}
