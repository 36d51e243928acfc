//! Property tests of the reference model: random trees and random update/delete sequences keep
//! every invariant, replays change nothing but `update_time`, and the incremental sums agree
//! with a naive implementation that rescans children on every step.

use std::collections::{BTreeMap, BTreeSet};

use cairn_progress::{Key, Node, Pace, Tree, Update, WELL_KNOWN_STATUSES, rollup};
use proptest::prelude::*;
use serde_json::{Value, json};

fn key_strategy() -> impl Strategy<Value = Key> {
    let segment = prop_oneof![
        4 => Just("a"),
        4 => Just("b"),
        3 => Just("c"),
        1 => Just("_n"),
    ];
    (any::<bool>(), prop::collection::vec(segment, 1..=4)).prop_map(|(namespaced, segments)| {
        let mut parts = Vec::new();
        if namespaced {
            parts.push("_ns");
        }
        parts.extend(segments);
        Key::parse(&parts.join(".")).expect("generated keys are valid")
    })
}

/// A handful of keys in one small tree, so that a short batch often hits one node twice.
fn few_keys() -> impl Strategy<Value = Key> {
    prop::sample::select(vec!["a", "a.b", "a.c", "a.b.d"]).prop_map(|k| Key::parse(k).expect("valid key"))
}

fn update_strategy() -> impl Strategy<Value = Update> {
    let progress = prop_oneof![Just(0.0), Just(1.0), Just(0.5), 0.0..=1.0f64];
    let weight = prop_oneof![Just(0.0), Just(1.0), Just(2.0), 0.1..5.0f64];
    let status = prop::sample::select(
        WELL_KNOWN_STATUSES.iter().map(|s| s.to_string()).chain(["uploading".to_owned()]).collect::<Vec<_>>(),
    );
    let extra = (
        prop::sample::select(vec!["x", "y"]),
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            "[a-z]{0,4}".prop_map(Value::from),
        ],
    );
    (
        prop::option::weighted(0.6, progress),
        prop::option::weighted(0.3, weight),
        prop::option::weighted(0.4, status),
        prop::option::weighted(0.3, "[a-z]{0,6}"),
        prop::option::weighted(0.2, extra),
    )
        .prop_map(|(progress, weight, status, msg, extra)| {
            let mut update = Update::new();
            update.progress = progress;
            update.weight = weight;
            update.status = status;
            update.msg = msg;
            if let Some((name, value)) = extra {
                update = update.field(name, value);
            }
            update.validate().expect("generated updates are valid");
            update
        })
}

#[derive(Debug, Clone)]
enum Op {
    Apply(Key, Update),
    /// Applies the previous Apply again.
    Replay,
    Delete(Key),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (key_strategy(), update_strategy()).prop_map(|(k, u)| Op::Apply(k, u)),
        2 => Just(Op::Replay),
        1 => key_strategy().prop_map(Op::Delete),
    ]
}

/// The same semantics without running sums: every step rescans the children of each parent.
#[derive(Debug, Default)]
struct Naive {
    nodes: BTreeMap<Key, NaiveNode>,
}

#[derive(Debug, Clone)]
struct NaiveNode {
    fields: BTreeMap<String, Value>,
    start_time: i64,
    update_time: i64,
    last_msg: Option<String>,
    /// The progress last posted on the node itself.
    own_progress: Option<Value>,
}

impl NaiveNode {
    fn new(now: i64) -> NaiveNode {
        NaiveNode {
            fields: BTreeMap::new(),
            start_time: now,
            update_time: now,
            last_msg: None,
            own_progress: None,
        }
    }
}

impl Naive {
    fn children(&self, key: &Key) -> Vec<&NaiveNode> {
        self.nodes.iter().filter(|(k, _)| k.parent().as_ref() == Some(key)).map(|(_, n)| n).collect()
    }

    fn sums(&self, key: &Key) -> (f64, f64, BTreeMap<String, u64>) {
        let mut sum_w = 0.0;
        let mut sum_wp = 0.0;
        let mut counts = BTreeMap::new();
        for child in self.children(key) {
            let w = child.fields.get("weight").and_then(Value::as_f64).unwrap_or(1.0);
            let p = child.fields.get("progress").and_then(Value::as_f64).unwrap_or(0.0);
            sum_w += w;
            sum_wp += w * p;
            if let Some(status) = child.fields.get("status").and_then(Value::as_str) {
                *counts.entry(status.to_owned()).or_insert(0) += 1;
            }
        }
        (sum_w, sum_wp, counts)
    }

    /// Re-rolls every ancestor of `key`, nearest first.
    fn roll_up(&mut self, key: &Key, msg: Option<&str>, now: i64) {
        for parent in key.ancestors() {
            let (sum_w, sum_wp, _) = self.sums(&parent);
            let node = self.nodes.entry(parent).or_insert_with(|| NaiveNode::new(now));
            match (rollup(sum_w, sum_wp), node.own_progress.clone()) {
                (Some(p), _) => node.fields.insert("progress".into(), json!(p)),
                (None, Some(own)) => node.fields.insert("progress".into(), own),
                (None, None) => node.fields.remove("progress"),
            };
            node.update_time = now;
            if let Some(msg) = msg {
                node.last_msg = Some(msg.to_owned());
            }
        }
    }

    fn apply(&mut self, key: &Key, update: &Update, now: i64) {
        let node = self.nodes.entry(key.clone()).or_insert_with(|| NaiveNode::new(now));
        node.fields.extend(update.fields());
        if update.progress.is_some() {
            node.own_progress = node.fields.get("progress").cloned();
        }
        node.update_time = now;
        if let Some(msg) = &update.msg {
            node.last_msg = Some(msg.clone());
        }
        // Ancestors must exist before they are rescanned.
        for ancestor in key.ancestors() {
            self.nodes.entry(ancestor).or_insert_with(|| NaiveNode::new(now));
        }
        self.roll_up(key, update.msg.as_deref(), now);
    }

    fn delete(&mut self, key: &Key, now: i64) {
        if !self.nodes.contains_key(key) {
            return;
        }
        let doomed: Vec<Key> =
            self.nodes.keys().filter(|k| *k == key || k.ancestors().contains(key)).cloned().collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
        // A parent left without children keeps the progress it last had.
        if let Some(parent) = key.parent()
            && self.children(&parent).is_empty()
            && let Some(node) = self.nodes.get_mut(&parent)
            && let Some(last) = node.fields.get("progress").cloned()
        {
            node.own_progress = Some(last);
        }
        self.roll_up(key, None, now);
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9
}

fn compare(tree: &Tree, naive: &Naive) -> Result<(), String> {
    let tree_keys: BTreeSet<&Key> = tree.keys().collect();
    let naive_keys: BTreeSet<&Key> = naive.nodes.keys().collect();
    if tree_keys != naive_keys {
        return Err(format!("keys differ: {tree_keys:?} vs {naive_keys:?}"));
    }
    for (key, expected) in &naive.nodes {
        let node = tree.get(key).expect("same keys");
        let (sum_w, sum_wp, counts) = naive.sums(key);
        if !close(node.sum_w, sum_w) || !close(node.sum_wp, sum_wp) || node.counts != counts {
            return Err(format!("{key}: sums/counts differ: {node:?} vs ({sum_w}, {sum_wp}, {counts:?})"));
        }
        let mut fields = node.fields.clone();
        let mut expected_fields = expected.fields.clone();
        let progress = fields.remove("progress").and_then(|v| v.as_f64());
        let expected_progress = expected_fields.remove("progress").and_then(|v| v.as_f64());
        let same_progress = match (progress, expected_progress) {
            (Some(a), Some(b)) => close(a, b),
            (a, b) => a == b,
        };
        if !same_progress || fields != expected_fields {
            return Err(format!("{key}: fields differ: {:?} vs {:?}", node.fields, expected.fields));
        }
        if (node.start_time, node.update_time, &node.last_msg)
            != (expected.start_time, expected.update_time, &expected.last_msg)
        {
            return Err(format!("{key}: times or last_msg differ: {node:?} vs {expected:?}"));
        }
    }
    Ok(())
}

/// A node with `update_time` and its pace blanked, for comparisons that ignore them: an update
/// replayed later in time is a new sample of the rate (a redelivered one keeps its original time,
/// and changes nothing at all: see the tests below).
fn timeless(node: &Node) -> Node {
    Node { update_time: 0, pace: Pace::default(), sum_wr: 0.0, rated_children: 0, ..node.clone() }
}

fn assert_same_but_update_time(a: &Tree, b: &Tree) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (key, node) in a.nodes() {
        prop_assert_eq!(timeless(node), timeless(b.get(key).unwrap()), "node {}", key);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn invariants_hold_and_match_a_naive_model(ops in prop::collection::vec(op_strategy(), 1..40)) {
        let mut tree = Tree::new();
        let mut naive = Naive::default();
        let mut last: Option<(Key, Update)> = None;
        for (step, op) in ops.into_iter().enumerate() {
            let now = step as i64 * 600;
            match op {
                Op::Apply(key, update) => {
                    tree.apply(&key, &update, now);
                    naive.apply(&key, &update, now);
                    last = Some((key, update));
                }
                Op::Replay => {
                    if let Some((key, update)) = &last {
                        tree.apply(key, update, now);
                        naive.apply(key, update, now);
                    }
                }
                Op::Delete(key) => {
                    let before = tree.len();
                    let removed = tree.delete(&key, now);
                    prop_assert_eq!(tree.len(), before - removed);
                    prop_assert!(tree.get(&key).is_none());
                    naive.delete(&key, now);
                }
            }
            if let Err(problem) = tree.check_invariants() {
                return Err(TestCaseError::fail(format!("step {step}: {problem}")));
            }
            if let Err(problem) = compare(&tree, &naive) {
                return Err(TestCaseError::fail(format!("step {step}: {problem}")));
            }
        }
    }

    #[test]
    fn applying_an_update_twice_equals_applying_it_once(
        setup in prop::collection::vec((key_strategy(), update_strategy()), 0..25),
        key in key_strategy(),
        update in update_strategy(),
    ) {
        let mut tree = Tree::new();
        for (i, (k, u)) in setup.iter().enumerate() {
            tree.apply(k, u, i as i64);
        }
        tree.apply(&key, &update, 1000);
        let once = tree.clone();
        // Redelivered with its own time: nothing changes, not even the pace.
        tree.apply(&key, &update, 1000);
        prop_assert_eq!(&once, &tree);
        tree.apply(&key, &update, 2000);
        prop_assert!(tree.check_invariants().is_ok());
        assert_same_but_update_time(&once, &tree)?;
        // Sums are not merely close: a replay adds exact zeros.
        for (k, node) in once.nodes() {
            let again = tree.get(k).unwrap();
            prop_assert_eq!(node.sum_w.to_bits(), again.sum_w.to_bits());
            prop_assert_eq!(node.sum_wp.to_bits(), again.sum_wp.to_bits());
        }
    }

    /// A redelivered burst: the same updates again, in order, at their own time, after they were
    /// all applied. The tree may only differ in rounding residue of the running sums (and where
    /// a rate is measured from).
    #[test]
    fn applying_a_batch_twice_equals_applying_it_once(
        setup in prop::collection::vec((key_strategy(), update_strategy()), 0..25),
        batch in prop::collection::vec((few_keys(), update_strategy()), 1..8),
    ) {
        let mut tree = Tree::new();
        for (i, (k, u)) in setup.iter().enumerate() {
            tree.apply(k, u, i as i64);
        }
        for (k, u) in &batch {
            tree.apply(k, u, 1000);
        }
        let once = tree.clone();
        for (k, u) in &batch {
            tree.apply(k, u, 1000);
        }
        prop_assert!(tree.check_invariants().is_ok());
        prop_assert_eq!(once.keys().collect::<Vec<_>>(), tree.keys().collect::<Vec<_>>());
        for (key, node) in once.nodes() {
            let again = tree.get(key).unwrap();
            prop_assert!(
                close(node.sum_w, again.sum_w) && close(node.sum_wp, again.sum_wp),
                "{} sums ({}, {}) vs ({}, {})", key, node.sum_w, node.sum_wp, again.sum_w, again.sum_wp
            );
            let rate = |n: &Node| n.pace.rate.unwrap_or(0.0);
            prop_assert!(close(rate(node), rate(again)), "{} rate {:?} vs {:?}", key, node.pace, again.pace);
            let eta = |n: &Node| n.pace.eta.unwrap_or(0) as f64;
            prop_assert!((eta(node) - eta(again)).abs() <= 1.0 + 1e-9 * eta(node).abs(), "{} eta {:?} vs {:?}", key, node.pace, again.pace);
            let strip = |n: &Node| Node {
                sum_w: 0.0,
                sum_wp: 0.0,
                sum_wr: 0.0,
                // where a node's own rate is measured from may differ: a posted progress is a new
                // sample when the node's children weigh nothing, which a burst can change
                pace: Pace { rate: n.pace.rate.map(|_| 0.0), eta: None, anchor: None },
                ..n.clone()
            };
            let (mut a, mut b) = (strip(node), strip(again));
            let (pa, pb) = (a.fields.remove("progress"), b.fields.remove("progress"));
            let same = match (pa.as_ref().and_then(Value::as_f64), pb.as_ref().and_then(Value::as_f64)) {
                (Some(x), Some(y)) => close(x, y),
                (x, y) => x == y,
            };
            prop_assert!(same, "{} progress {:?} vs {:?}", key, pa, pb);
            prop_assert_eq!(a, b, "node {}", key);
        }
    }

    #[test]
    fn rolled_up_progress_stays_in_range(
        ops in prop::collection::vec((key_strategy(), update_strategy()), 1..40),
    ) {
        let mut tree = Tree::new();
        for (i, (k, u)) in ops.iter().enumerate() {
            tree.apply(k, u, i as i64);
        }
        for (key, node) in tree.nodes() {
            if let Some(p) = node.progress() {
                prop_assert!((0.0..=1.0).contains(&p), "{} has progress {}", key, p);
            }
            prop_assert!(!key.is_namespace() || node.children.iter().all(|c| c.parent().as_ref() == Some(key)));
            prop_assert!(key.parent().is_none_or(|p| !p.is_namespace()));
        }
    }
}
