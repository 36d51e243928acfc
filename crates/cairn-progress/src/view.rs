//! What a node looks like when read: the server's view of one node and, to a depth, its children.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// One node as read from the store, with its children page when read to depth > 1.
///
/// `fields` holds everything clients posted (`progress`, `weight`, `status`, `msg`, `name` and any
/// other scalar); the server fields have their own members so they can never be confused.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    pub key: String,
    pub start_time: i64,
    pub update_time: i64,
    pub fields: Map<String, Value>,
    /// Direct children by status.
    pub counts: BTreeMap<String, u64>,
    /// Estimated completion (ms epoch) while the node runs.
    pub eta: Option<i64>,
    /// Latest message posted anywhere in the subtree.
    pub last_msg: Option<String>,
    /// Number of direct children (all pages).
    pub child_count: u64,
    /// Keys of the children on this page, sorted by `start_time`.
    pub children: Vec<String>,
    /// Set when more children follow this page: the `after` cursor of the next page.
    pub next_after: Option<String>,
    /// Child nodes of this page (depth > 1), in the order of `children`.
    pub tasks: Vec<NodeView>,
}

impl NodeView {
    pub fn progress(&self) -> Option<f64> {
        self.fields.get("progress").and_then(Value::as_f64)
    }

    pub fn weight(&self) -> Option<f64> {
        self.fields.get("weight").and_then(Value::as_f64)
    }

    pub fn status(&self) -> Option<&str> {
        self.fields.get("status").and_then(Value::as_str)
    }

    /// [SCA's wire format](NodeView::to_sca_json) with what tells whether work is stuck, on this
    /// node and every node of `tasks`: `_age_ms` (`now_ms` − `update_time`), and `_stalled: true`
    /// on a `running` node silent longer than its `stall_after_ms` field, else `stall_after_ms`.
    pub fn to_json_at(&self, now_ms: i64, stall_after_ms: i64) -> Value {
        let mut out = self.to_sca_json();
        self.decorate(&mut out, now_ms, stall_after_ms);
        out
    }

    /// Whether this node is `running` and has been silent longer than its threshold.
    pub fn is_stalled(&self, now_ms: i64, stall_after_ms: i64) -> bool {
        let threshold = self
            .fields
            .get("stall_after_ms")
            .and_then(Value::as_f64)
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map_or(stall_after_ms, |ms| ms as i64);
        self.status() == Some("running") && now_ms - self.update_time > threshold
    }

    fn decorate(&self, out: &mut Value, now_ms: i64, stall_after_ms: i64) {
        let Value::Object(map) = out else { return };
        map.insert("_age_ms".into(), Value::from((now_ms - self.update_time).max(0)));
        if self.is_stalled(now_ms, stall_after_ms) {
            map.insert("_stalled".into(), Value::Bool(true));
        }
        if let Some(Value::Array(tasks)) = map.get_mut("tasks") {
            for (task, view) in tasks.iter_mut().zip(&self.tasks) {
                view.decorate(task, now_ms, stall_after_ms);
            }
        }
    }

    /// SCA's wire format: node fields flat, `_children` on parents, `tasks` when read deeper.
    pub fn to_sca_json(&self) -> Value {
        let mut out = Map::with_capacity(self.fields.len() + 8);
        out.insert("key".into(), Value::from(self.key.clone()));
        out.insert("start_time".into(), Value::from(self.start_time));
        out.insert("update_time".into(), Value::from(self.update_time));
        for (name, value) in &self.fields {
            out.insert(name.clone(), value.clone());
        }
        let counts: Map<String, Value> =
            self.counts.iter().map(|(status, n)| (status.clone(), Value::from(*n))).collect();
        out.insert("_counts".into(), Value::Object(counts));
        if let Some(eta) = self.eta {
            out.insert("_eta".into(), Value::from(eta));
        }
        if let Some(msg) = &self.last_msg {
            out.insert("_last_msg".into(), Value::from(msg.clone()));
        }
        if self.child_count > 0 {
            out.insert("_children".into(), Value::from(self.children.clone()));
            out.insert("_child_count".into(), Value::from(self.child_count));
            if let Some(next) = &self.next_after {
                out.insert("_next".into(), Value::from(next.clone()));
            }
            if !self.tasks.is_empty() {
                let tasks = self.tasks.iter().map(NodeView::to_sca_json).collect();
                out.insert("tasks".into(), Value::Array(tasks));
            }
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_and_stall_are_added_to_every_node() {
        let mut child = NodeView { key: "_t.a.b".into(), update_time: 1_000, ..NodeView::default() };
        child.fields.insert("status".into(), Value::from("running"));
        let mut own = child.clone();
        own.key = "_t.a.c".into();
        own.fields.insert("stall_after_ms".into(), Value::from(100_000));
        let parent = NodeView {
            key: "_t.a".into(),
            update_time: 50_000,
            child_count: 2,
            children: vec!["_t.a.b".into(), "_t.a.c".into()],
            tasks: vec![child, own],
            ..NodeView::default()
        };
        let json = parent.to_json_at(70_000, 60_000);
        assert_eq!(json["_age_ms"], 20_000);
        assert!(json.get("_stalled").is_none(), "not running");
        assert_eq!(json["tasks"][0]["_age_ms"], 69_000);
        assert_eq!(json["tasks"][0]["_stalled"], true, "running, silent 69 s > 60 s");
        assert!(json["tasks"][1].get("_stalled").is_none(), "its own threshold is 100 s");
    }
}
