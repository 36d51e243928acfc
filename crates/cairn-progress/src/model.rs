//! [`Tree`], the in-memory reference model of progress aggregation. Stores (the Redis Lua
//! scripts) are tested against it, so it follows the algorithm literally rather than cleverly:
//! apply the fields to the node, then walk up [`Key::parent`] adjusting each parent's running
//! sums by its child's change in contribution and rolling the parent's progress up from them.
//!
//! Sums are adjusted in this order of operations, which stores should reproduce to compare
//! exactly: `sum_w += w_new - w_old` and `sum_wp += wp_new - wp_old`.
//!
//! Each node also has a [`Pace`]: how fast it moves and when it should finish (`_eta`). A leaf
//! measures its own rate; a parent's rate is its children's, weighted (`Σwᵢ·rateᵢ / Σwᵢ`, kept
//! as a running sum like the others), so its ETA follows its weighted remaining work.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Number, Value};

use crate::aggregate::{EPSILON, contribution, rollup};
use crate::key::Key;
use crate::update::Update;

/// One node of the tree with the server's bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Every user field set on this node, well-known ones (`progress`, `weight`, `status`,
    /// `msg`, `name`) included, as JSON.
    pub fields: BTreeMap<String, Value>,
    /// Creation time, ms since the epoch.
    pub start_time: i64,
    /// Time of the last update of this node or of any descendant, ms since the epoch.
    pub update_time: i64,
    /// The latest `msg` posted to this node or any descendant (`_last_msg` in docs/contract.md).
    pub last_msg: Option<String>,
    /// Direct children: the nodes whose [`Key::parent`] is this node.
    pub children: BTreeSet<Key>,
    /// `Σwᵢ` over the direct children.
    pub sum_w: f64,
    /// `Σwᵢ·pᵢ` over the direct children.
    pub sum_wp: f64,
    /// Direct children by status; children without a status are not counted, and no count is 0.
    pub counts: BTreeMap<String, u64>,
    /// True when `progress` was last written by a roll-up, false when posted directly.
    pub progress_from_children: bool,
    /// The progress last posted on this node itself: what it shows while its children weigh
    /// nothing (`Σwᵢ = 0`, or no children left).
    pub own_progress: Option<Value>,
    /// How fast it moves, and its ETA.
    pub pace: Pace,
    /// `Σwᵢ·rateᵢ` over the direct children (a child without a rate adds 0).
    pub sum_wr: f64,
    /// How many direct children add more than 0 to `sum_wr`; while none does, `sum_wr` is 0.
    pub rated_children: u64,
}

/// How fast a node's progress moves and when it should reach 1 (docs/contract.md §2 "Is it stuck?").
///
/// A leaf (or a parent whose children weigh nothing) measures its own rate: an exponential
/// moving average of the progress it gained per millisecond, sampled at most once per
/// [`ETA_SAMPLE_MS`] from an anchor (the time and progress of the last sample). A parent whose
/// children weigh something takes the weighted mean of its children's rates, which is how fast
/// its own progress moves while they keep their pace; it has no anchor. Either way the ETA is
/// `now + (1 − p) / rate`, and a node that is finished, failed, canceled or at progress 1 has
/// neither rate nor ETA.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pace {
    /// Progress per millisecond, when known (always > 0).
    pub rate: Option<f64>,
    /// The last sample of a node's own rate: `(time_ms, progress)`.
    pub anchor: Option<(i64, f64)>,
    /// When the node should finish, ms since the epoch (`_eta` in docs/contract.md).
    pub eta: Option<i64>,
}

/// A node's own rate is sampled at most this often: a node updated a thousand times a second
/// costs a comparison.
pub const ETA_SAMPLE_MS: i64 = 1000;

fn is_terminal(status: Option<&str>) -> bool {
    matches!(status, Some("finished" | "failed" | "canceled"))
}

fn eta(now_ms: i64, progress: f64, rate: f64) -> i64 {
    (now_ms as f64 + (1.0 - progress) / rate).floor() as i64
}

impl Pace {
    /// A node's own rate after its progress moved to `progress` at `now_ms`.
    fn measure(&mut self, now_ms: i64, progress: f64, terminal: bool) {
        if terminal || progress >= 1.0 {
            if self.anchor.is_some() {
                *self = Pace::default();
            }
            return;
        }
        match self.anchor {
            // no anchor yet, or it went back: start measuring again (an update older than the
            // anchor, from a replayed batch, never moves it)
            None => self.anchor = Some((now_ms, progress)),
            Some((at, from)) if progress < from && now_ms >= at => self.anchor = Some((now_ms, progress)),
            Some((at, from)) => {
                if now_ms - at < ETA_SAMPLE_MS || progress == from {
                    return;
                }
                let instant = (progress - from) / (now_ms - at) as f64;
                let rate = self.rate.map_or(instant, |rate| 0.3 * instant + 0.7 * rate);
                *self = Pace {
                    rate: Some(rate),
                    anchor: Some((now_ms, progress)),
                    eta: Some(eta(now_ms, progress, rate)),
                };
            }
        }
    }
}

impl Node {
    fn new(now_ms: i64) -> Node {
        Node {
            fields: BTreeMap::new(),
            start_time: now_ms,
            update_time: now_ms,
            last_msg: None,
            children: BTreeSet::new(),
            sum_w: 0.0,
            sum_wp: 0.0,
            counts: BTreeMap::new(),
            progress_from_children: false,
            own_progress: None,
            pace: Pace::default(),
            sum_wr: 0.0,
            rated_children: 0,
        }
    }

    pub fn progress(&self) -> Option<f64> {
        self.fields.get("progress").and_then(Value::as_f64)
    }

    pub fn weight(&self) -> Option<f64> {
        self.fields.get("weight").and_then(Value::as_f64)
    }

    pub fn status(&self) -> Option<&str> {
        self.fields.get("status").and_then(Value::as_str)
    }

    pub fn msg(&self) -> Option<&str> {
        self.fields.get("msg").and_then(Value::as_str)
    }

    pub fn name(&self) -> Option<&str> {
        self.fields.get("name").and_then(Value::as_str)
    }

    /// What this node adds to its parent's sums, `(w, w·p)`.
    pub fn contribution(&self) -> (f64, f64) {
        contribution(self.weight(), self.progress())
    }

    /// The node as the API shows it: its fields plus `key`, `start_time`, `update_time`,
    /// `_counts` and, once any message was posted in its subtree, `_last_msg`.
    pub fn to_json(&self, key: &Key) -> Value {
        let mut map: serde_json::Map<String, Value> =
            self.fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        map.insert("key".to_owned(), Value::String(key.to_string()));
        map.insert("start_time".to_owned(), self.start_time.into());
        map.insert("update_time".to_owned(), self.update_time.into());
        let counts = self.counts.iter().map(|(status, n)| (status.clone(), Value::from(*n))).collect();
        map.insert("_counts".to_owned(), Value::Object(counts));
        if let Some(msg) = &self.last_msg {
            map.insert("_last_msg".to_owned(), Value::String(msg.clone()));
        }
        Value::Object(map)
    }

    fn state(&self) -> ChildState {
        let (w, wp) = self.contribution();
        let wr = w * self.pace.rate.unwrap_or(0.0);
        ChildState { w, wp, wr, status: self.status().map(str::to_owned) }
    }

    /// Refreshes the pace at `now_ms`; `moved`: its progress or status just changed.
    fn refresh_pace(&mut self, now_ms: i64, moved: bool) {
        let progress = self.progress().unwrap_or(0.0);
        let terminal = is_terminal(self.status());
        if self.sum_w > EPSILON {
            let rate = self.sum_wr / self.sum_w;
            self.pace = if rate > 0.0 && progress < 1.0 && !terminal {
                Pace { rate: Some(rate), anchor: None, eta: Some(eta(now_ms, progress, rate)) }
            } else {
                Pace::default()
            };
            return;
        }
        if self.pace.rate.is_some() && self.pace.anchor.is_none() {
            // its rate came from children it no longer has, or that weigh nothing
            self.pace = Pace::default();
        }
        if moved {
            self.pace.measure(now_ms, progress, terminal);
        }
    }

    fn count(&mut self, status: &Option<String>) {
        if let Some(status) = status {
            *self.counts.entry(status.clone()).or_insert(0) += 1;
        }
    }

    fn uncount(&mut self, status: &Option<String>) {
        if let Some(status) = status
            && let Some(n) = self.counts.get_mut(status)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(status);
            }
        }
    }
}

/// What a child brings to its parent.
#[derive(Debug, Clone)]
struct ChildState {
    w: f64,
    wp: f64,
    /// `w·rate`
    wr: f64,
    status: Option<String>,
}

/// How a child changed, as its parent sees it.
enum ChildChange {
    Created(ChildState),
    Changed(ChildState, ChildState),
    Removed(ChildState),
}

/// The whole progress forest in memory: every node by key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tree {
    nodes: BTreeMap<Key, Node>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    pub fn get(&self, key: &Key) -> Option<&Node> {
        self.nodes.get(key)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.nodes.keys()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&Key, &Node)> {
        self.nodes.iter()
    }

    /// Applies one (validated) update at `now_ms` and rolls it up. Returns the keys it touched,
    /// the node first, then its ancestors nearest first.
    pub fn apply(&mut self, key: &Key, update: &Update, now_ms: i64) -> Vec<Key> {
        let created = !self.nodes.contains_key(key);
        let node = self.nodes.entry(key.clone()).or_insert_with(|| Node::new(now_ms));
        let before = node.state();
        let status_before = node.fields.get("status").cloned();
        for (name, value) in update.fields() {
            node.fields.insert(name, value);
        }
        if update.progress.is_some() {
            node.progress_from_children = false;
            node.own_progress = node.fields.get("progress").cloned();
        }
        node.update_time = now_ms;
        if let Some(msg) = &update.msg {
            node.last_msg = Some(msg.clone());
        }
        let moved = update.progress.is_some() || node.fields.get("status") != status_before.as_ref();
        node.refresh_pace(now_ms, moved);
        let after = node.state();
        let change = if created { ChildChange::Created(after) } else { ChildChange::Changed(before, after) };
        let mut touched = vec![key.clone()];
        self.propagate(key, change, update.msg.as_deref(), now_ms, &mut touched);
        touched
    }

    /// Removes `key` and its whole subtree (the nodes reached through `children`; keys below a
    /// namespace segment, such as `a._x.y` under `a`, are separate trees and stay). Its parent
    /// drops it from its sums and counts and the change rolls up. Returns how many nodes were
    /// removed, 0 when `key` does not exist.
    pub fn delete(&mut self, key: &Key, now_ms: i64) -> usize {
        let Some(node) = self.nodes.get(key) else {
            return 0;
        };
        let state = node.state();
        let mut removed = 0;
        let mut pending = vec![key.clone()];
        while let Some(next) = pending.pop() {
            if let Some(node) = self.nodes.remove(&next) {
                removed += 1;
                pending.extend(node.children);
            }
        }
        let mut touched = Vec::new();
        self.propagate(key, ChildChange::Removed(state), None, now_ms, &mut touched);
        removed
    }

    /// Walks from `child` to its root, folding each level's change into the next parent.
    fn propagate(
        &mut self,
        child: &Key,
        mut change: ChildChange,
        msg: Option<&str>,
        now_ms: i64,
        touched: &mut Vec<Key>,
    ) {
        let mut child = child.clone();
        while let Some(parent_key) = child.parent() {
            let created = !self.nodes.contains_key(&parent_key);
            if created && matches!(change, ChildChange::Removed(_)) {
                // Only reachable from a tree that already broke its invariants.
                return;
            }
            let parent = self.nodes.entry(parent_key.clone()).or_insert_with(|| Node::new(now_ms));
            let before = parent.state();
            let progress_before = parent.progress();
            let (wr_new, wr_old) = match &change {
                ChildChange::Created(new) => (new.wr, 0.0),
                ChildChange::Changed(old, new) => (new.wr, old.wr),
                ChildChange::Removed(old) => (0.0, old.wr),
            };
            parent.sum_wr += wr_new - wr_old;
            parent.rated_children =
                (parent.rated_children + u64::from(wr_new > 0.0)).saturating_sub(u64::from(wr_old > 0.0));
            if parent.rated_children == 0 {
                parent.sum_wr = 0.0;
            }
            match &change {
                ChildChange::Created(new) => {
                    parent.children.insert(child.clone());
                    parent.sum_w += new.w;
                    parent.sum_wp += new.wp;
                    parent.count(&new.status);
                }
                ChildChange::Changed(old, new) => {
                    parent.sum_w += new.w - old.w;
                    parent.sum_wp += new.wp - old.wp;
                    if old.status != new.status {
                        parent.uncount(&old.status);
                        parent.count(&new.status);
                    }
                }
                ChildChange::Removed(old) => {
                    parent.children.remove(&child);
                    parent.sum_w -= old.w;
                    parent.sum_wp -= old.wp;
                    parent.uncount(&old.status);
                    if parent.children.is_empty() {
                        // its last child gone, a parent keeps the progress it last had
                        if let Some(last) = parent.fields.get("progress") {
                            parent.own_progress = Some(last.clone());
                        }
                    }
                }
            }
            if parent.children.is_empty() {
                parent.sum_w = 0.0;
                parent.sum_wp = 0.0;
                parent.sum_wr = 0.0;
                parent.rated_children = 0;
            }
            // Σw > 0: the weighted mean; otherwise the progress posted on the node itself, or
            // none. Never "whatever it showed before": that would make the result depend on
            // history, and a replayed batch could change it.
            if let Some(p) = rollup(parent.sum_w, parent.sum_wp) {
                let value = Number::from_f64(p).map_or(Value::Null, Value::Number);
                parent.fields.insert("progress".to_owned(), value);
                parent.progress_from_children = true;
            } else {
                match parent.own_progress.clone() {
                    Some(own) => parent.fields.insert("progress".to_owned(), own),
                    None => parent.fields.remove("progress"),
                };
                parent.progress_from_children = false;
            }
            parent.update_time = now_ms;
            if let Some(msg) = msg {
                parent.last_msg = Some(msg.to_owned());
            }
            let progress_after = parent.progress();
            parent.refresh_pace(now_ms, progress_after.is_some() && progress_after != progress_before);
            let after = parent.state();
            change = if created { ChildChange::Created(after) } else { ChildChange::Changed(before, after) };
            touched.push(parent_key.clone());
            child = parent_key;
        }
    }

    /// Recomputes every parent's sums and counts from its current children and checks the
    /// links both ways; names the first node that disagrees.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (key, node) in &self.nodes {
            if let Some(parent) = key.parent() {
                match self.nodes.get(&parent) {
                    None => return Err(format!("node {key} exists but its parent {parent} does not")),
                    Some(p) if !p.children.contains(key) => {
                        return Err(format!("parent {parent} does not list its child {key}"));
                    }
                    Some(_) => {}
                }
            }
            let mut sum_w = 0.0;
            let mut sum_wp = 0.0;
            let mut sum_wr = 0.0;
            let mut rated = 0;
            let mut counts = BTreeMap::<String, u64>::new();
            for child in &node.children {
                if child.parent().as_ref() != Some(key) {
                    return Err(format!("node {key} lists {child}, which is not its child"));
                }
                let Some(c) = self.nodes.get(child) else {
                    return Err(format!("node {key} lists its child {child}, which does not exist"));
                };
                let state = c.state();
                sum_w += state.w;
                sum_wp += state.wp;
                sum_wr += state.wr;
                rated += u64::from(state.wr > 0.0);
                if let Some(status) = c.status() {
                    *counts.entry(status.to_owned()).or_insert(0) += 1;
                }
            }
            if node.children.is_empty() && (node.sum_w != 0.0 || node.sum_wp != 0.0) {
                return Err(format!("node {key} has no children but sums ({}, {})", node.sum_w, node.sum_wp));
            }
            if !close(node.sum_w, sum_w) || !close(node.sum_wp, sum_wp) {
                return Err(format!(
                    "node {key} has sums ({}, {}) but its children add up to ({sum_w}, {sum_wp})",
                    node.sum_w, node.sum_wp
                ));
            }
            if node.rated_children != rated || !close(node.sum_wr, sum_wr) {
                return Err(format!(
                    "node {key} has Σw·rate {} over {} children but its children add up to {sum_wr} over {rated}",
                    node.sum_wr, node.rated_children
                ));
            }
            if node.pace.eta.is_some() != node.pace.rate.is_some()
                || node.pace.rate.is_some_and(|rate| rate <= 0.0)
                || (node.pace.rate.is_some() && (is_terminal(node.status()) || node.progress() >= Some(1.0)))
            {
                return Err(format!("node {key} has pace {:?} with status {:?}", node.pace, node.status()));
            }
            if node.counts != counts {
                return Err(format!(
                    "node {key} has counts {:?} but its children add up to {counts:?}",
                    node.counts
                ));
            }
            if let Some(p) = node.progress()
                && !(0.0..=1.0).contains(&p)
            {
                return Err(format!("node {key} has progress {p} outside [0, 1]"));
            }
            if node.progress_from_children
                && let Some(expected) = rollup(node.sum_w, node.sum_wp)
                && node.progress().is_none_or(|p| (p - expected).abs() > 1e-12)
            {
                return Err(format!(
                    "node {key} has progress {:?} but its sums roll up to {expected}",
                    node.progress()
                ));
            }
        }
        Ok(())
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(s: &str) -> Key {
        Key::parse(s).unwrap()
    }

    fn progress(tree: &Tree, k: &str) -> Option<f64> {
        tree.get(&key(k)).unwrap().progress()
    }

    fn assert_close(actual: Option<f64>, expected: f64) {
        let actual = actual.expect("progress is set");
        assert!((actual - expected).abs() < 1e-12, "{actual} != {expected}");
    }

    fn apply(tree: &mut Tree, k: &str, update: Update, now: i64) {
        tree.apply(&key(k), &update, now);
        tree.check_invariants().unwrap();
    }

    #[test]
    fn a_leaf_measures_its_own_rate() {
        let mut tree = Tree::new();
        apply(&mut tree, "_e.job", Update::new().progress(0.1).status("running"), 10_000);
        assert_eq!(tree.get(&key("_e.job")).unwrap().pace.eta, None, "one sample is no rate");
        apply(&mut tree, "_e.job", Update::new().progress(0.15), 10_500);
        assert_eq!(tree.get(&key("_e.job")).unwrap().pace.eta, None, "sampled at most once a second");
        apply(&mut tree, "_e.job", Update::new().progress(0.2), 11_000);
        // 0.1 per second, 0.8 to go: eight more seconds.
        assert_eq!(tree.get(&key("_e.job")).unwrap().pace.eta, Some(19_000));
        apply(&mut tree, "_e.job", Update::new().progress(0.5), 12_000);
        // an average leaning to the newest rate: 0.3·0.3 + 0.7·0.1 = 0.16 per second
        let pace = tree.get(&key("_e.job")).unwrap().pace;
        assert!((pace.rate.unwrap() - 0.16e-3).abs() < 1e-15, "{pace:?}");
        assert_eq!(pace.eta, Some((12_000.0 + 0.5 / pace.rate.unwrap()).floor() as i64));
        apply(&mut tree, "_e.job", Update::new().progress(1.0).status("finished"), 13_000);
        assert_eq!(tree.get(&key("_e.job")).unwrap().pace, Pace::default());
    }

    #[test]
    fn a_parent_takes_its_pace_from_its_children() {
        let mut tree = Tree::new();
        // Four equal steps; one runs at 0.1 per second, the others have not started.
        for step in ["c", "d"] {
            apply(&mut tree, &format!("_e.job.{step}"), Update::new().status("waiting"), 1_000);
        }
        apply(&mut tree, "_e.job.b", Update::new(), 1_000);
        apply(&mut tree, "_e.job.a", Update::new().progress(0.0).status("running"), 10_000);
        apply(&mut tree, "_e.job.a", Update::new().progress(0.1), 11_000);
        let job = tree.get(&key("_e.job")).unwrap();
        // the job moves at a quarter of its running step's pace: 0.025 per second, 0.975 to go
        assert!((job.pace.rate.unwrap() - 0.025e-3).abs() < 1e-15, "{:?}", job.pace);
        assert_eq!(job.pace.eta, Some(11_000 + 39_000));
        assert_eq!(job.pace.anchor, None);
        // Its own history would say otherwise: its progress moved 0.025 in one second, the same
        // here, but a second step starting doubles the parent's pace at once.
        apply(&mut tree, "_e.job.b", Update::new().progress(0.0).status("running"), 11_000);
        apply(&mut tree, "_e.job.b", Update::new().progress(0.1), 12_000);
        let job = tree.get(&key("_e.job")).unwrap();
        assert!((job.pace.rate.unwrap() - 0.05e-3).abs() < 1e-15, "{:?}", job.pace);
        // The rates roll up another level, weighted: the job weighs 3 of its root's 4.
        apply(&mut tree, "_e.other", Update::new().weight(1.0), 12_000);
        let root_rate = tree.get(&key("_e")).map(|n| n.pace.rate);
        assert_eq!(root_rate, None, "_e is a namespace, not a node");
        apply(&mut tree, "_e.job", Update::new().weight(3.0), 12_000);
        apply(&mut tree, "_e.job.c", Update::new().msg("still waiting"), 12_500);
        let job = tree.get(&key("_e.job")).unwrap();
        assert_eq!(job.pace.eta, Some((12_500.0 + (1.0 - job.progress().unwrap()) / 0.05e-3).floor() as i64));
        // Steps that finish stop adding their rate; a finished parent has no ETA.
        for step in ["a", "b", "c", "d"] {
            apply(
                &mut tree,
                &format!("_e.job.{step}"),
                Update::new().progress(1.0).status("finished"),
                20_000,
            );
        }
        let job = tree.get(&key("_e.job")).unwrap();
        assert_eq!((job.pace, job.sum_wr, job.rated_children), (Pace::default(), 0.0, 0));
    }

    #[test]
    fn sca_example_sequence() {
        let mut tree = Tree::new();
        apply(
            &mut tree,
            "_test.scott1",
            Update::new().name("soichi's test").status("waiting").msg("Hello"),
            1,
        );
        apply(&mut tree, "_test.scott1.task1", Update::new().status("running"), 2);
        apply(&mut tree, "_test.scott1.task2", Update::new().status("running"), 3);
        apply(&mut tree, "_test.scott1.task2.subtask1", Update::new().status("running"), 4);
        apply(&mut tree, "_test.scott1.task1.subtask1", Update::new().status("finished").progress(1.0), 5);

        assert_eq!(progress(&tree, "_test.scott1.task1"), Some(1.0));
        assert_eq!(progress(&tree, "_test.scott1.task2"), Some(0.0));
        assert_eq!(progress(&tree, "_test.scott1"), Some(0.5));
        assert!(tree.get(&key("_test")).is_none());
        assert_eq!(tree.len(), 5);

        let scott = tree.get(&key("_test.scott1")).unwrap();
        assert_eq!(scott.status(), Some("waiting"));
        assert_eq!(scott.msg(), Some("Hello"));
        assert_eq!(scott.name(), Some("soichi's test"));
        assert_eq!(scott.last_msg.as_deref(), Some("Hello"));
        assert_eq!(scott.start_time, 1);
        assert_eq!(scott.update_time, 5);
        assert_eq!(scott.counts, BTreeMap::from([("running".to_owned(), 2)]));
        assert_eq!(scott.children, BTreeSet::from([key("_test.scott1.task1"), key("_test.scott1.task2")]));
        let task1 = tree.get(&key("_test.scott1.task1")).unwrap();
        assert_eq!(task1.counts, BTreeMap::from([("finished".to_owned(), 1)]));
        assert_eq!(task1.status(), Some("running"));
        assert!(task1.progress_from_children);
    }

    #[test]
    fn ancestors_are_created_up_to_the_namespace() {
        let mut tree = Tree::new();
        let touched = tree.apply(&key("_ns.a.b.c"), &Update::new().progress(0.5), 7);
        assert_eq!(touched, vec![key("_ns.a.b.c"), key("_ns.a.b"), key("_ns.a")]);
        assert_eq!(tree.len(), 3);
        assert!(tree.get(&key("_ns")).is_none());
        for k in ["_ns.a.b", "_ns.a"] {
            let node = tree.get(&key(k)).unwrap();
            assert_eq!(node.start_time, 7);
            assert_eq!(node.progress(), Some(0.5));
            assert!(node.status().is_none());
        }
        // A namespace in the middle cuts the tree in two.
        tree.apply(&key("x._y.z"), &Update::new().progress(1.0), 8);
        assert!(tree.get(&key("x._y")).is_none());
        assert_eq!(tree.get(&key("x._y.z")).unwrap().progress(), Some(1.0));
        tree.check_invariants().unwrap();
    }

    #[test]
    fn pending_steps_pull_the_parent_down() {
        let mut tree = Tree::new();
        for (i, step) in ["s1", "s2", "s3", "s4"].into_iter().enumerate() {
            apply(&mut tree, &format!("job.{step}"), Update::new().progress(0.0).status("waiting"), i as i64);
        }
        assert_eq!(progress(&tree, "job"), Some(0.0));
        apply(&mut tree, "job.s1", Update::new().progress(1.0).status("finished"), 10);
        assert_eq!(progress(&tree, "job"), Some(0.25));
        apply(&mut tree, "job.s2", Update::new().progress(0.5).status("running"), 11);
        assert_eq!(progress(&tree, "job"), Some(0.375));
        let job = tree.get(&key("job")).unwrap();
        assert_eq!(
            job.counts,
            BTreeMap::from([
                ("finished".to_owned(), 1),
                ("running".to_owned(), 1),
                ("waiting".to_owned(), 2)
            ])
        );
    }

    #[test]
    fn children_without_progress_count_as_zero() {
        let mut tree = Tree::new();
        apply(&mut tree, "j.a", Update::new().progress(1.0), 1);
        apply(&mut tree, "j.b", Update::new().status("waiting"), 2);
        assert_eq!(progress(&tree, "j"), Some(0.5));
    }

    #[test]
    fn weights_scale_contributions() {
        let mut tree = Tree::new();
        apply(&mut tree, "j.big", Update::new().weight(3.0).progress(1.0), 1);
        apply(&mut tree, "j.small", Update::new().progress(0.0), 2);
        assert_eq!(progress(&tree, "j"), Some(0.75));
        // Changing a weight alone re-rolls the parent.
        apply(&mut tree, "j.big", Update::new().weight(1.0), 3);
        assert_eq!(progress(&tree, "j"), Some(0.5));
        apply(&mut tree, "j.small", Update::new().weight(0.0), 4);
        assert_eq!(progress(&tree, "j"), Some(1.0));
    }

    #[test]
    fn zero_weights_keep_the_parent_value() {
        let mut tree = Tree::new();
        apply(&mut tree, "j", Update::new().progress(0.3), 1);
        apply(&mut tree, "j.a", Update::new().weight(0.0).progress(1.0), 2);
        apply(&mut tree, "j.b", Update::new().weight(0.0), 3);
        let j = tree.get(&key("j")).unwrap();
        assert_eq!(j.progress(), Some(0.3));
        assert!(!j.progress_from_children);
        assert_eq!((j.sum_w, j.sum_wp), (0.0, 0.0));
        // The first child with weight takes over.
        apply(&mut tree, "j.b", Update::new().weight(1.0).progress(0.8), 4);
        assert_eq!(progress(&tree, "j"), Some(0.8));
        // Weights back to zero: the progress posted on the parent again, not the last roll-up.
        apply(&mut tree, "j.b", Update::new().weight(0.0), 5);
        assert_eq!(progress(&tree, "j"), Some(0.3));
        // A parent that never had progress posted on it then has none.
        apply(&mut tree, "k.a", Update::new().progress(0.6), 6);
        apply(&mut tree, "k.a", Update::new().weight(0.0), 7);
        assert_eq!(progress(&tree, "k"), None);
    }

    #[test]
    fn progress_posted_on_a_parent_is_overwritten_by_the_next_child_update() {
        let mut tree = Tree::new();
        apply(&mut tree, "r.j.a", Update::new().progress(0.2), 1);
        apply(&mut tree, "r.j", Update::new().progress(0.9), 2);
        let j = tree.get(&key("r.j")).unwrap();
        assert_eq!(j.progress(), Some(0.9));
        assert!(!j.progress_from_children);
        // It propagates upward like any change (running sums carry rounding residue).
        assert_close(progress(&tree, "r"), 0.9);
        apply(&mut tree, "r.j.a", Update::new().msg("tick"), 3);
        assert_eq!(progress(&tree, "r.j"), Some(0.2));
        assert_close(progress(&tree, "r"), 0.2);
    }

    #[test]
    fn messages_reach_ancestors_as_last_msg() {
        let mut tree = Tree::new();
        apply(&mut tree, "j", Update::new().msg("own"), 1);
        apply(&mut tree, "j.a.b", Update::new().msg("deep"), 2);
        let j = tree.get(&key("j")).unwrap();
        assert_eq!(j.msg(), Some("own"));
        assert_eq!(j.last_msg.as_deref(), Some("deep"));
        assert_eq!(j.update_time, 2);
        let a = tree.get(&key("j.a")).unwrap();
        assert_eq!(a.msg(), None);
        assert_eq!(a.last_msg.as_deref(), Some("deep"));
        // An update without msg leaves last_msg alone.
        apply(&mut tree, "j.a.b", Update::new().progress(0.1), 3);
        assert_eq!(tree.get(&key("j")).unwrap().last_msg.as_deref(), Some("deep"));
    }

    #[test]
    fn fields_merge() {
        let mut tree = Tree::new();
        apply(&mut tree, "j", Update::new().status("running").field("host", "n1"), 1);
        apply(&mut tree, "j", Update::new().field("bytes", 5), 2);
        let j = tree.get(&key("j")).unwrap();
        assert_eq!(j.fields["host"], json!("n1"));
        assert_eq!(j.fields["bytes"], json!(5));
        assert_eq!(j.status(), Some("running"));
        assert_eq!(j.start_time, 1);
        assert_eq!(j.update_time, 2);
        assert_eq!(
            j.to_json(&key("j")),
            json!({"key": "j", "status": "running", "host": "n1", "bytes": 5,
                   "start_time": 1, "update_time": 2, "_counts": {}})
        );
    }

    #[test]
    fn status_counts_follow_changes() {
        let mut tree = Tree::new();
        apply(&mut tree, "j.a", Update::new().status("running"), 1);
        apply(&mut tree, "j.b", Update::new().status("running"), 1);
        apply(&mut tree, "j.c", Update::new(), 1);
        apply(&mut tree, "j.a", Update::new().status("finished"), 2);
        apply(&mut tree, "j.c", Update::new().status("failed"), 2);
        apply(&mut tree, "j.b", Update::new().status("finished"), 3);
        assert_eq!(
            tree.get(&key("j")).unwrap().counts,
            BTreeMap::from([("failed".to_owned(), 1), ("finished".to_owned(), 2)])
        );
    }

    #[test]
    fn delete_removes_the_subtree_and_fixes_the_parent() {
        let mut tree = Tree::new();
        apply(&mut tree, "r.j.a", Update::new().progress(1.0).status("finished"), 1);
        apply(&mut tree, "r.j.b.x", Update::new().progress(0.0).status("running"), 2);
        apply(&mut tree, "r.j.b.y", Update::new().progress(0.0), 2);
        apply(&mut tree, "r.j.b", Update::new().status("running"), 2);
        assert_eq!(progress(&tree, "r.j"), Some(0.5));
        assert_eq!(tree.len(), 6);

        assert_eq!(tree.delete(&key("r.j.b"), 10), 3);
        tree.check_invariants().unwrap();
        assert_eq!(tree.len(), 3);
        let j = tree.get(&key("r.j")).unwrap();
        assert_eq!(j.progress(), Some(1.0));
        assert_eq!(j.counts, BTreeMap::from([("finished".to_owned(), 1)]));
        assert_eq!(j.update_time, 10);
        assert_eq!(progress(&tree, "r"), Some(1.0));
        assert_eq!(tree.get(&key("r")).unwrap().update_time, 10);

        // Deleting the last child leaves exact zero sums, and the parent keeps the progress it
        // last had.
        assert_eq!(tree.delete(&key("r.j.a"), 11), 1);
        tree.check_invariants().unwrap();
        let j = tree.get(&key("r.j")).unwrap();
        assert!(j.children.is_empty());
        assert_eq!((j.sum_w, j.sum_wp), (0.0, 0.0));
        assert_eq!(j.progress(), Some(1.0));
        assert_eq!(progress(&tree, "r"), Some(1.0));

        assert_eq!(tree.delete(&key("nope"), 12), 0);
        assert_eq!(tree.delete(&key("r"), 12), 2);
        assert!(tree.is_empty());
    }

    #[test]
    fn delete_keeps_trees_below_namespaces() {
        let mut tree = Tree::new();
        apply(&mut tree, "a._x", Update::new().progress(0.5), 1);
        apply(&mut tree, "a._x.y", Update::new().progress(1.0), 1);
        assert_eq!(progress(&tree, "a"), Some(0.5));
        assert_eq!(tree.delete(&key("a"), 2), 2);
        tree.check_invariants().unwrap();
        assert_eq!(tree.keys().collect::<Vec<_>>(), vec![&key("a._x.y")]);
    }

    #[test]
    fn replaying_an_update_changes_only_update_time() {
        let mut once = Tree::new();
        let update = Update::new().progress(0.3).weight(2.5).status("running").msg("m");
        apply(&mut once, "r.a.b", Update::new().progress(0.7), 1);
        apply(&mut once, "r.a.c", update.clone(), 2);
        let mut twice = once.clone();
        apply(&mut twice, "r.a.c", update, 3);
        for (k, node) in once.nodes() {
            let other = twice.get(k).unwrap();
            assert_eq!(Node { update_time: 0, ..node.clone() }, Node { update_time: 0, ..other.clone() });
        }
    }

    #[test]
    fn check_invariants_detects_corruption() {
        let mut tree = Tree::new();
        apply(&mut tree, "j.a", Update::new().progress(0.5), 1);
        let good = tree.clone();

        tree.nodes.get_mut(&key("j")).unwrap().sum_w = 2.0;
        assert!(tree.check_invariants().unwrap_err().contains("sums"));

        let mut tree = good.clone();
        tree.nodes.get_mut(&key("j")).unwrap().counts.insert("running".into(), 1);
        assert!(tree.check_invariants().unwrap_err().contains("counts"));

        let mut tree = good.clone();
        tree.nodes.get_mut(&key("j")).unwrap().children.clear();
        assert!(tree.check_invariants().is_err());

        let mut tree = good.clone();
        tree.nodes.get_mut(&key("j")).unwrap().fields.insert("progress".into(), json!(0.1));
        assert!(tree.check_invariants().unwrap_err().contains("roll up"));

        let mut tree = good;
        tree.nodes.remove(&key("j"));
        assert!(tree.check_invariants().unwrap_err().contains("parent"));
    }
}
