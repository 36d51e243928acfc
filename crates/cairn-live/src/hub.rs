//! One hub per watched tree: a task that reads the tree's change feed once for all of this
//! process's subscribers of the tree, keeps each subscriber's set of changed keys, and sends
//! each one coalesced events at most every `interval`.
//!
//! Invariants:
//! - A subscriber's events follow its feed position (`floor`): entries at or before it are
//!   already shown (by its snapshot or earlier events) and ignored; entries after it are all
//!   seen, because the hub reads its tree's feed from the lowest position any subscriber had
//!   when it joined, and snapshots and resumes happen in this task, between feed reads.
//! - Per subscriber the hub holds keys, never events: between two events a node is sent once,
//!   with the state read at send time (terminal states included: the newest state is read).
//! - A subscriber whose queue is full is skipped; its keys wait for the next flush after it
//!   read (it wakes the hub). Past `max_pending` keys it gets a fresh snapshot instead.

use cairn_progress::now_ms;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_progress::Key;
use cairn_progress::view::NodeView;
use cairn_redis::StoreError;
use cairn_redis::progress::ReadOptions;
use cairn_redis::progress::feed::{FeedEntry, FeedId, Notice, Since};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::warn;

use crate::{COALESCED_COUNTER, EVENTS_COUNTER, Event, EventKind, Inner, Watch};

/// Feed entries read per call on the live path.
const FETCH_COUNT: usize = 1000;
/// How often running nodes are checked for having stalled.
const STALL_CHECK: Duration = Duration::from_secs(1);
/// Pause after a Redis error before the hub tries again.
const RETRY: Duration = Duration::from_millis(500);

pub(crate) struct SubSpec {
    pub id: u64,
    pub watch: Watch,
    pub tx: mpsc::Sender<Event>,
}

enum Cmd {
    Add(SubSpec),
    Remove(u64),
}

#[derive(Default)]
struct Notes {
    /// Newest entry id a notice announced.
    latest: Option<FeedId>,
    /// The tree (and its feed) was purged.
    dropped: bool,
    /// Read the feed whatever the notices said.
    resync: bool,
}

struct Shared {
    cmds: mpsc::UnboundedSender<Cmd>,
    wake: Notify,
    notes: Mutex<Notes>,
}

/// What the rest of the process holds of a hub.
#[derive(Clone)]
pub(crate) struct HubHandle(Arc<Shared>);

impl HubHandle {
    pub fn add(&self, spec: SubSpec) {
        let _ = self.0.cmds.send(Cmd::Add(spec));
        self.0.wake.notify_one();
    }

    pub fn remove(&self, id: u64) {
        let _ = self.0.cmds.send(Cmd::Remove(id));
        self.0.wake.notify_one();
    }

    pub fn wake(&self) {
        self.0.wake.notify_one();
    }

    pub fn notice(&self, notice: Notice) {
        {
            let mut notes = self.0.notes.lock().expect("notes lock");
            match notice {
                Notice::Entry(id) => notes.latest = notes.latest.max(Some(id)),
                Notice::Dropped => notes.dropped = true,
            }
        }
        self.0.wake.notify_one();
    }

    pub fn resync(&self) {
        self.0.notes.lock().expect("notes lock").resync = true;
        self.0.wake.notify_one();
    }
}

pub(crate) fn spawn(root: String, inner: Arc<Inner>) -> HubHandle {
    let (cmds, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared { cmds, wake: Notify::new(), notes: Mutex::new(Notes::default()) });
    let hub = Hub {
        root,
        shared: shared.clone(),
        inner,
        cmds: rx,
        subs: Vec::new(),
        read_from: None,
        last_flush: None,
        running: HashMap::new(),
        next_stall_check: Instant::now() + STALL_CHECK,
    };
    tokio::spawn(hub.run());
    HubHandle(shared)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Needs a snapshot (first event, after a gap, or after overflowing).
    Snapshot,
    /// Needs the feed's entries after this id.
    Resume(FeedId),
    Live,
}

struct Sub {
    id: u64,
    key: Key,
    depth: usize,
    limit: u32,
    tx: mpsc::Sender<Event>,
    phase: Phase,
    /// Feed position this subscriber's state follows (see the module's invariants).
    floor: FeedId,
    /// Id of the last event sent.
    last_sent: Option<FeedId>,
    /// Changed keys in the subtree not yet sent.
    pending: HashSet<String>,
    /// Deleted keys in (or above) the subtree not yet sent.
    deleted: BTreeSet<String>,
    /// Id of the newest entry behind `pending` / `deleted`.
    pending_id: Option<FeedId>,
    /// The watched node does not exist (yet): its next appearance is sent as a snapshot.
    awaiting: bool,
}

impl Sub {
    fn new(spec: SubSpec) -> Sub {
        let phase = match spec.watch.after {
            Some(after) => Phase::Resume(after),
            None => Phase::Snapshot,
        };
        Sub {
            id: spec.id,
            depth: spec.watch.depth as usize,
            limit: spec.watch.limit,
            key: spec.watch.key,
            tx: spec.tx,
            phase,
            floor: FeedId::ZERO,
            last_sent: spec.watch.after,
            pending: HashSet::new(),
            deleted: BTreeSet::new(),
            pending_id: None,
            awaiting: false,
        }
    }

    /// Whether `key` is the watched node or a descendant within the watch's depth.
    fn in_scope(&self, key: &str) -> bool {
        let own = self.key.as_str();
        match key.strip_prefix(own) {
            Some("") => true,
            Some(rest) if rest.starts_with('.') => rest.bytes().filter(|b| *b == b'.').count() < self.depth,
            _ => false,
        }
    }

    /// Takes one feed entry into the pending sets.
    fn absorb(&mut self, entry: &FeedEntry, max_pending: usize) {
        if entry.id <= self.floor || self.phase != Phase::Live {
            return;
        }
        self.floor = entry.id;
        let own = self.key.as_str();
        let mut touched = false;
        for gone in &entry.deleted {
            if gone == own || own.strip_prefix(gone.as_str()).is_some_and(|rest| rest.starts_with('.')) {
                self.deleted.insert(own.to_owned());
                self.pending.clear();
                self.awaiting = true;
                touched = true;
            } else if self.in_scope(gone) {
                self.deleted.insert(gone.clone());
                touched = true;
            }
        }
        for key in &entry.changed {
            if !self.in_scope(key) {
                continue;
            }
            if self.awaiting {
                // The watched node (re)appeared: show it whole.
                self.phase = Phase::Snapshot;
                self.pending.clear();
                self.deleted.clear();
                return;
            }
            touched = true;
            if !self.pending.insert(key.clone()) {
                metrics::counter!(COALESCED_COUNTER).increment(1);
            }
        }
        if touched {
            self.pending_id = Some(entry.id);
        }
        if self.pending.len() > max_pending {
            self.phase = Phase::Snapshot;
            self.pending.clear();
            self.deleted.clear();
        }
    }

    fn has_news(&self) -> bool {
        !self.pending.is_empty() || !self.deleted.is_empty()
    }

    fn send(&mut self, event: Event) -> bool {
        let kind = event.kind;
        let id = event.id;
        if self.tx.try_send(event).is_err() {
            return false;
        }
        metrics::counter!(EVENTS_COUNTER, "type" => kind.as_str()).increment(1);
        self.last_sent = Some(id);
        true
    }
}

struct Hub {
    root: String,
    shared: Arc<Shared>,
    inner: Arc<Inner>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    subs: Vec<Sub>,
    /// Position of the tree's feed read so far (`None` until the first subscriber started).
    read_from: Option<FeedId>,
    last_flush: Option<Instant>,
    /// Running nodes sent to subscribers and not yet stalled: update time and stall threshold.
    running: HashMap<String, (i64, i64)>,
    next_stall_check: Instant,
}

impl Hub {
    async fn run(mut self) {
        loop {
            if !self.take_commands() {
                return;
            }
            let mut deadline = self.next_stall_check;
            match self.step().await {
                Ok(Some(flush_at)) => deadline = deadline.min(flush_at),
                Ok(None) => {}
                Err(error) => {
                    warn!(%error, root = %self.root, "live hub cannot read Redis; retrying");
                    deadline = Instant::now() + RETRY;
                }
            }
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return,
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Applies added and removed subscribers; `false` when the hub has none left and is gone.
    fn take_commands(&mut self) -> bool {
        loop {
            while let Ok(cmd) = self.cmds.try_recv() {
                match cmd {
                    Cmd::Add(spec) => self.subs.push(Sub::new(spec)),
                    Cmd::Remove(id) => self.subs.retain(|sub| sub.id != id),
                }
            }
            self.subs.retain(|sub| !sub.tx.is_closed());
            if !self.subs.is_empty() {
                return true;
            }
            let mut hubs = self.inner.hubs.lock().expect("hubs lock");
            if !self.cmds.is_empty() {
                continue; // someone subscribed meanwhile
            }
            hubs.remove(&self.root);
            return false;
        }
    }

    /// One round: start new subscribers, read the feed, push stalls, flush if due. Returns when
    /// the next flush is due if keys are waiting for it.
    async fn step(&mut self) -> Result<Option<Instant>, StoreError> {
        self.start_subscribers().await?;
        self.read_feed().await?;
        let now = Instant::now();
        if self.subs.iter().any(|sub| sub.phase != Phase::Live && sub.tx.capacity() > 0) {
            return Ok(Some(now)); // a snapshot to read: next round, at once
        }
        if now >= self.next_stall_check {
            self.push_stalls();
            self.next_stall_check = now + STALL_CHECK;
        }
        if !self.subs.iter().any(|sub| sub.has_news() && sub.tx.capacity() >= 2) {
            return Ok(None);
        }
        let due = self.last_flush.map_or(now, |at| at + self.inner.settings.interval);
        if now < due {
            return Ok(Some(due));
        }
        self.flush().await?;
        self.last_flush = Some(Instant::now());
        Ok(None)
    }

    async fn start_subscribers(&mut self) -> Result<(), StoreError> {
        let feed = self.inner.feed.clone();
        for i in 0..self.subs.len() {
            match self.subs[i].phase {
                Phase::Live => continue,
                // its queue is full: it wakes the hub when it read
                _ if self.subs[i].tx.capacity() == 0 => continue,
                Phase::Resume(after) => match feed.since(&self.root, after).await? {
                    Since::Gap => self.snapshot(i).await?,
                    Since::Entries(entries) => {
                        let max_pending = self.inner.settings.max_pending;
                        let sub = &mut self.subs[i];
                        sub.phase = Phase::Live;
                        sub.floor = after;
                        for entry in &entries {
                            sub.absorb(entry, max_pending);
                        }
                        if sub.phase == Phase::Snapshot {
                            self.snapshot(i).await?;
                        }
                    }
                },
                Phase::Snapshot => self.snapshot(i).await?,
            }
            let floor = self.subs[i].floor;
            self.read_from = Some(self.read_from.map_or(floor, |from| from.min(floor)));
        }
        Ok(())
    }

    async fn snapshot(&mut self, i: usize) -> Result<(), StoreError> {
        let sub = &self.subs[i];
        let options = ReadOptions { depth: sub.depth as u32, limit: sub.limit, after: None };
        let (id, node) = self.inner.feed.snapshot(&sub.key, &options).await?;
        let sub = &mut self.subs[i];
        sub.pending.clear();
        sub.deleted.clear();
        sub.pending_id = None;
        sub.floor = id;
        match node {
            Some(node) => {
                let event = Event {
                    kind: EventKind::Snapshot,
                    id,
                    key: sub.key.to_string(),
                    nodes: vec![node],
                    deleted: Vec::new(),
                };
                track_running(&mut self.running, &event.nodes, self.inner.settings.stall_after);
                if sub.send(event) {
                    sub.phase = Phase::Live;
                    sub.awaiting = false;
                }
                // else: its queue is full; the snapshot is read again next round
            }
            None => {
                sub.phase = Phase::Live;
                sub.awaiting = true;
                if sub.last_sent.is_some() {
                    // It had seen the node (it resumed): the node went away meanwhile.
                    let key = sub.key.to_string();
                    sub.send(Event {
                        kind: EventKind::Delete,
                        id,
                        key: key.clone(),
                        nodes: Vec::new(),
                        deleted: vec![key],
                    });
                }
            }
        }
        Ok(())
    }

    async fn read_feed(&mut self) -> Result<(), StoreError> {
        let (latest, dropped, resync) = {
            let mut notes = self.shared.notes.lock().expect("notes lock");
            let taken = (notes.latest, notes.dropped, notes.resync);
            *notes = Notes { latest: notes.latest, ..Notes::default() };
            taken
        };
        if dropped {
            for sub in &mut self.subs {
                if sub.phase == Phase::Live && !sub.awaiting {
                    sub.deleted.insert(sub.key.to_string());
                    sub.pending.clear();
                    sub.awaiting = true;
                    sub.pending_id = sub.pending_id.or(sub.last_sent);
                }
            }
        }
        let Some(mut from) = self.read_from else { return Ok(()) };
        if !resync && latest.is_none_or(|latest| latest <= from) {
            return Ok(());
        }
        let max_pending = self.inner.settings.max_pending;
        loop {
            let entries = self.inner.feed.entries_after(&self.root, from, FETCH_COUNT).await?;
            for entry in &entries {
                for sub in &mut self.subs {
                    sub.absorb(entry, max_pending);
                }
            }
            if let Some(last) = entries.last() {
                from = last.id;
                self.read_from = Some(from);
            }
            if entries.len() < FETCH_COUNT {
                return Ok(());
            }
        }
    }

    /// Running nodes silent past their threshold go to their subscribers once more, now
    /// carrying `_stalled`.
    fn push_stalls(&mut self) {
        let now = now_ms();
        let stalled: Vec<String> = self
            .running
            .iter()
            .filter(|(_, (updated, after))| now - updated > *after)
            .map(|(key, _)| key.clone())
            .collect();
        for key in stalled {
            self.running.remove(&key);
            for sub in &mut self.subs {
                if sub.phase == Phase::Live && sub.in_scope(&key) {
                    sub.pending.insert(key.clone());
                }
            }
        }
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        let ready: Vec<usize> = (0..self.subs.len())
            .filter(|&i| self.subs[i].has_news() && self.subs[i].tx.capacity() >= 2)
            .collect();
        let mut keys: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        let mut limit = 1;
        for &i in &ready {
            limit = limit.max(self.subs[i].limit);
            for key in &self.subs[i].pending {
                if seen.insert(key.as_str()) {
                    keys.push(key.clone());
                }
            }
        }
        let nodes = self.inner.feed.read_nodes(&keys, limit).await?;
        let states: HashMap<String, NodeView> =
            keys.into_iter().zip(nodes).filter_map(|(key, node)| Some((key, node?))).collect();
        let stall_after = self.inner.settings.stall_after;
        for i in ready {
            let sub = &mut self.subs[i];
            let mut changed: Vec<&String> =
                sub.pending.iter().filter(|key| states.contains_key(*key)).collect();
            // Parents first (SCA order): by depth, then by key for a stable order.
            changed.sort_by(|a, b| {
                (a.matches('.').count(), a.as_str()).cmp(&(b.matches('.').count(), b.as_str()))
            });
            let mut nodes: Vec<NodeView> = changed.into_iter().map(|key| states[key].clone()).collect();
            if sub.limit < limit {
                for node in &mut nodes {
                    trim_children(node, sub.limit);
                }
            }
            let id = sub.pending_id.or(sub.last_sent).unwrap_or(sub.floor);
            let key = sub.key.to_string();
            if !sub.deleted.is_empty() {
                // With an update following, the delete carries the previous id: a client that
                // disconnects between the two resumes before both.
                let delete_id = if nodes.is_empty() { id } else { sub.last_sent.unwrap_or(id) };
                let deleted = std::mem::take(&mut sub.deleted).into_iter().collect();
                sub.send(Event {
                    kind: EventKind::Delete,
                    id: delete_id,
                    key: key.clone(),
                    nodes: Vec::new(),
                    deleted,
                });
            }
            if !nodes.is_empty() {
                track_running(&mut self.running, &nodes, stall_after);
                sub.send(Event { kind: EventKind::Update, id, key, nodes, deleted: Vec::new() });
            }
            sub.pending.clear();
            sub.pending_id = None;
        }
        Ok(())
    }
}

/// Keeps the children page of a node read with a larger limit to `limit` keys.
fn trim_children(node: &mut NodeView, limit: u32) {
    let limit = limit as usize;
    if node.children.len() > limit {
        node.children.truncate(limit);
        node.next_after = node.children.last().cloned();
    }
}

/// Remembers every running node (and its snapshot's running descendants) to push it again once
/// it stalls; forgets nodes that stopped running.
fn track_running(running: &mut HashMap<String, (i64, i64)>, nodes: &[NodeView], default: Duration) {
    for node in nodes {
        if node.status() == Some("running") {
            running.insert(node.key.clone(), (node.update_time, stall_after_ms(node, default)));
        } else {
            running.remove(&node.key);
        }
        track_running(running, &node.tasks, default);
    }
}

/// The node's own `stall_after_ms`, else the default.
pub fn stall_after_ms(node: &NodeView, default: Duration) -> i64 {
    node.fields
        .get("stall_after_ms")
        .and_then(serde_json::Value::as_f64)
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map_or(default.as_millis() as i64, |ms| ms as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(key: &str, depth: u32) -> Sub {
        let (tx, _rx) = mpsc::channel(4);
        let watch = Watch { key: Key::parse(key).unwrap(), depth, limit: 100, after: None };
        let mut sub = Sub::new(SubSpec { id: 1, watch, tx });
        sub.phase = Phase::Live;
        sub
    }

    fn entry(id: u64, changed: &[&str], deleted: &[&str]) -> FeedEntry {
        FeedEntry {
            id: FeedId { ms: id, seq: 0 },
            changed: changed.iter().map(|k| k.to_string()).collect(),
            deleted: deleted.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn scope_is_the_key_and_its_descendants_to_the_depth() {
        let s = sub("_t.a", 2);
        assert!(s.in_scope("_t.a"));
        assert!(s.in_scope("_t.a.b"));
        assert!(!s.in_scope("_t.a.b.c"), "depth 2 is the node and its children");
        assert!(!s.in_scope("_t.ab"));
        assert!(!s.in_scope("_t"));
        assert!(sub("_t.a", 1).in_scope("_t.a") && !sub("_t.a", 1).in_scope("_t.a.b"));
    }

    #[test]
    fn entries_coalesce_into_keys_and_old_ones_are_ignored() {
        let mut s = sub("_t.a", 8);
        s.floor = FeedId { ms: 5, seq: 0 };
        s.absorb(&entry(4, &["_t.a.x"], &[]), 100);
        assert!(s.pending.is_empty(), "at or before the floor: already shown");
        for id in 6..1006 {
            s.absorb(&entry(id, &["_t.a.b", "_t.a", "_t"], &[]), 100);
        }
        assert_eq!(s.pending.len(), 2, "a thousand entries, two keys");
        assert_eq!(s.pending_id, Some(FeedId { ms: 1005, seq: 0 }));
        s.absorb(&entry(2000, &["_t.a"], &["_t.a.b"]), 100);
        assert_eq!(s.deleted.iter().collect::<Vec<_>>(), ["_t.a.b"]);
    }

    #[test]
    fn too_many_keys_turn_into_a_snapshot_and_a_deleted_watch_awaits() {
        let mut s = sub("_t.a", 8);
        let keys: Vec<String> = (0..11).map(|i| format!("_t.a.k{i}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        s.absorb(&entry(1, &refs, &[]), 10);
        assert_eq!(s.phase, Phase::Snapshot);
        assert!(s.pending.is_empty());

        let mut s = sub("_t.a.b", 8);
        s.absorb(&entry(1, &["_t.a"], &["_t.a"]), 10);
        assert_eq!(
            s.deleted.iter().collect::<Vec<_>>(),
            ["_t.a.b"],
            "an ancestor's delete names the watched key"
        );
        assert!(s.awaiting);
        s.absorb(&entry(2, &["_t.a.b"], &[]), 10);
        assert_eq!(s.phase, Phase::Snapshot, "it came back: a snapshot shows it");
    }
}
