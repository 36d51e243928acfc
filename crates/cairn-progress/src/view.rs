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
