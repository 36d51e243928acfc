//! The progress tree as the CLI knows it: built from a read or a `snapshot` event (a node with its
//! `tasks`), kept current by `update` events (nodes in their newest state, parents first) and
//! `delete` events, and flattened into [`Row`]s in display order for bars and text.

use std::collections::HashMap;

use serde_json::{Map, Value};

use cairn_progress::now_ms;

use crate::output;

/// The statuses after which a node changes no more; a watch ends when its root reaches one.
pub const TERMINAL: [&str; 3] = ["finished", "failed", "canceled"];

#[derive(Debug, Default)]
struct Node {
    /// The node's fields as the server sent them, without `tasks`.
    fields: Map<String, Value>,
    /// Child keys in display order (by `start_time`, then key).
    children: Vec<String>,
}

impl Node {
    fn start_time(&self) -> i64 {
        self.fields.get("start_time").and_then(Value::as_i64).unwrap_or(i64::MAX)
    }
}

/// The subtree under one key.
#[derive(Debug)]
pub struct Tree {
    root: String,
    nodes: HashMap<String, Node>,
}

/// One node, ready to print: its place in the tree and what to show of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    /// 0 for the root.
    pub depth: usize,
    /// The root's full key; below it the node's `name` or last key segment.
    pub label: String,
    pub progress: Option<f64>,
    pub status: Option<String>,
    pub msg: Option<String>,
    /// Milliseconds from now to the node's `_eta`, while it is not finished.
    pub eta_in_ms: Option<i64>,
    /// `_stalled` with the node's age (ms since it was last heard of), when known.
    pub stalled: Option<Option<i64>>,
    /// Children the server has but did not send (beyond the depth or the first page).
    pub unseen_children: u64,
}

impl Row {
    /// Status, stalled marker, ETA and message, as one line of text.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(status) = &self.status {
            parts.push(output::status_style(status).apply_to(status).to_string());
        }
        if let Some(age) = self.stalled {
            let marker = match age {
                Some(age) => format!("⚠ stalled {}", output::short_duration(age)),
                None => "⚠ stalled".to_owned(),
            };
            parts.push(console::style(marker).yellow().bold().to_string());
        }
        if let Some(eta) = self.eta_in_ms {
            parts.push(format!("ETA {}", output::short_duration(eta)));
        }
        if self.unseen_children > 0 {
            parts.push(format!("(+{} more)", self.unseen_children));
        }
        if let Some(msg) = &self.msg {
            parts.push(msg.clone());
        }
        parts.join("  ")
    }
}

impl Tree {
    /// A tree that waits for `root` to appear.
    pub fn new(root: &str) -> Tree {
        Tree { root: root.to_owned(), nodes: HashMap::new() }
    }

    /// The tree a read or a `snapshot` event shows: the node with its `tasks`, recursively. A
    /// `{"missing": true}` answer leaves the tree empty.
    pub fn from_snapshot(root: &str, snapshot: &Value) -> Tree {
        let mut tree = Tree::new(root);
        tree.replace(snapshot);
        tree
    }

    pub fn replace(&mut self, snapshot: &Value) {
        self.nodes.clear();
        if snapshot.get("missing") != Some(&Value::Bool(true)) {
            self.insert_subtree(snapshot);
        }
    }

    fn insert_subtree(&mut self, value: &Value) -> Option<String> {
        let object = value.as_object()?;
        let key = object.get("key")?.as_str()?.to_owned();
        let mut fields = object.clone();
        let tasks = fields.remove("tasks");
        let children = tasks
            .as_ref()
            .and_then(Value::as_array)
            .map(|tasks| tasks.iter().filter_map(|task| self.insert_subtree(task)).collect())
            .unwrap_or_default();
        let mut node = Node { fields, children };
        self.sort_children(&mut node);
        self.nodes.insert(key.clone(), node);
        Some(key)
    }

    fn sort_children(&self, node: &mut Node) {
        let start = |key: &String| self.nodes.get(key).map_or(i64::MAX, Node::start_time);
        node.children.sort_by(|a, b| start(a).cmp(&start(b)).then_with(|| a.cmp(b)));
    }

    /// Applies an `update` event: each node replaces the fields of the one with its key; a new
    /// node joins its parent when the parent is shown (parents come before their children).
    pub fn update(&mut self, nodes: &[Value]) {
        for value in nodes {
            let Some(object) = value.as_object() else { continue };
            let Some(key) = object.get("key").and_then(Value::as_str) else { continue };
            let mut fields = object.clone();
            let tasks = fields.remove("tasks");
            if let Some(node) = self.nodes.get_mut(key) {
                node.fields = fields;
                if tasks.is_some() {
                    // A node sent with its tasks is a subtree: take it whole.
                    self.insert_subtree(value);
                }
                continue;
            }
            if key == self.root {
                self.insert_subtree(value);
                continue;
            }
            let Some(parent) = parent_of(key) else { continue };
            if !self.nodes.contains_key(parent) {
                continue;
            }
            self.insert_subtree(value);
            let mut node = self.nodes.remove(parent).expect("checked above");
            node.children.push(key.to_owned());
            self.sort_children(&mut node);
            self.nodes.insert(parent.to_owned(), node);
        }
    }

    /// Applies a `delete` event: the keys and everything below them go.
    pub fn delete(&mut self, keys: &[String]) {
        for key in keys {
            self.remove_subtree(key);
            if let Some(parent) = parent_of(key).and_then(|p| self.nodes.get_mut(p)) {
                parent.children.retain(|child| child != key);
            }
        }
    }

    fn remove_subtree(&mut self, key: &str) {
        if let Some(node) = self.nodes.remove(key) {
            for child in node.children {
                self.remove_subtree(&child);
            }
        }
    }

    /// The root's fields, once it exists.
    pub fn root(&self) -> Option<&Map<String, Value>> {
        self.nodes.get(&self.root).map(|node| &node.fields)
    }

    /// The root's status when it is terminal.
    pub fn terminal_status(&self) -> Option<&str> {
        let status = self.root()?.get("status")?.as_str()?;
        TERMINAL.contains(&status).then_some(status)
    }

    /// Every shown node, depth first in display order, at most `max` of them; and how many
    /// more there are.
    pub fn rows(&self, max: usize) -> (Vec<Row>, usize) {
        let now = now_ms();
        let mut rows = Vec::new();
        let mut hidden = 0;
        let mut stack = vec![(self.root.as_str(), 0usize)];
        while let Some((key, depth)) = stack.pop() {
            let Some(node) = self.nodes.get(key) else { continue };
            if rows.len() < max {
                rows.push(self.row(key, depth, node, now));
            } else {
                hidden += 1;
            }
            stack.extend(node.children.iter().rev().map(|child| (child.as_str(), depth + 1)));
        }
        (rows, hidden)
    }

    fn row(&self, key: &str, depth: usize, node: &Node, now: i64) -> Row {
        let fields = &node.fields;
        let text = |name: &str| fields.get(name).and_then(Value::as_str).map(str::to_owned);
        let status = text("status");
        let terminal = status.as_deref().is_some_and(|s| TERMINAL.contains(&s));
        let label = if depth == 0 {
            key.to_owned()
        } else {
            text("name").unwrap_or_else(|| key.rsplit('.').next().unwrap_or(key).to_owned())
        };
        let eta_in_ms =
            fields.get("_eta").and_then(Value::as_i64).filter(|_| !terminal).map(|eta| (eta - now).max(0));
        let stalled = (fields.get("_stalled") == Some(&Value::Bool(true)) && !terminal)
            .then(|| fields.get("_age_ms").and_then(Value::as_i64));
        let child_count = fields.get("_child_count").and_then(Value::as_u64).unwrap_or(0);
        Row {
            key: key.to_owned(),
            depth,
            label,
            progress: fields.get("progress").and_then(Value::as_f64),
            status,
            msg: text("msg").or_else(|| text("_last_msg")),
            eta_in_ms,
            stalled,
            unseen_children: child_count.saturating_sub(node.children.len() as u64),
        }
    }

    /// The tree as text: one line per node with an indented label, a bar, the percentage and
    /// the summary; `width` bounds each line.
    pub fn render_text(&self, max_rows: usize, width: usize) -> String {
        let (rows, hidden) = self.rows(max_rows);
        let mut out = String::new();
        for line in lines(&rows, width) {
            out.push_str(&line);
            out.push('\n');
        }
        if hidden > 0 {
            out.push_str(&format!("… and {hidden} more nodes\n"));
        }
        out
    }
}

/// `rows` as aligned text lines: `label  ██████░░░░  60%  summary`.
pub fn lines(rows: &[Row], width: usize) -> Vec<String> {
    let labels: Vec<String> = rows.iter().map(indented_label).collect();
    let label_width = labels.iter().map(|l| console::measure_text_width(l)).max().unwrap_or(0).min(48);
    rows.iter()
        .zip(labels)
        .map(|(row, label)| {
            let label = output::truncate(&label, label_width);
            let pad = label_width - console::measure_text_width(&label);
            let bar = output::text_bar(row.progress.unwrap_or(0.0), 20);
            let line = format!(
                "{label}{}  {bar} {}  {}",
                " ".repeat(pad),
                output::percent(row.progress),
                row.summary()
            );
            output::truncate(line.trim_end(), width)
        })
        .collect()
}

/// The label behind its tree guides: two spaces per level, `└ ` before a child.
pub fn indented_label(row: &Row) -> String {
    if row.depth == 0 {
        row.label.clone()
    } else {
        format!("{}└ {}", "  ".repeat(row.depth - 1), row.label)
    }
}

/// The parent of a key inside the same tree (`a.b.c` → `a.b`); `None` at a root or below a
/// namespace, where progress does not roll up.
fn parent_of(key: &str) -> Option<&str> {
    let (parent, _) = key.rsplit_once('.')?;
    let last = parent.rsplit('.').next().unwrap_or(parent);
    (!last.starts_with('_')).then_some(parent)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn snapshot() -> Value {
        json!({
            "key": "_t.job", "start_time": 1, "update_time": 5, "progress": 0.5, "status": "running",
            "_child_count": 2, "_children": ["_t.job.b", "_t.job.a"],
            "tasks": [
                {"key": "_t.job.b", "start_time": 2, "update_time": 5, "progress": 1.0, "status": "finished"},
                {"key": "_t.job.a", "start_time": 3, "update_time": 5, "progress": 0.0, "status": "waiting",
                 "msg": "queued", "_child_count": 4}
            ]
        })
    }

    fn keys(tree: &Tree) -> Vec<(String, usize)> {
        tree.rows(100).0.into_iter().map(|r| (r.key, r.depth)).collect()
    }

    #[test]
    fn snapshot_rows_follow_start_time() {
        let tree = Tree::from_snapshot("_t.job", &snapshot());
        assert_eq!(keys(&tree), [("_t.job".into(), 0), ("_t.job.b".into(), 1), ("_t.job.a".into(), 1)]);
        let (rows, hidden) = tree.rows(2);
        assert_eq!((rows.len(), hidden), (2, 1));
        let a = &tree.rows(10).0[2];
        assert_eq!((a.label.as_str(), a.unseen_children, a.msg.as_deref()), ("a", 4, Some("queued")));
        assert_eq!(tree.terminal_status(), None);
    }

    #[test]
    fn updates_change_add_and_finish() {
        let mut tree = Tree::from_snapshot("_t.job", &snapshot());
        tree.update(&[
            json!({"key": "_t.job", "start_time": 1, "progress": 0.75, "status": "running"}),
            json!({"key": "_t.job.c", "start_time": 0, "progress": 0.2, "name": "first"}),
            json!({"key": "_t.job.c.d", "start_time": 9}),
            json!({"key": "_t.other", "start_time": 9}),
            json!({"key": "_t.job.zz.orphan", "start_time": 9}),
        ]);
        assert_eq!(
            keys(&tree),
            [
                ("_t.job".into(), 0),
                ("_t.job.c".into(), 1),
                ("_t.job.c.d".into(), 2),
                ("_t.job.b".into(), 1),
                ("_t.job.a".into(), 1),
            ]
        );
        let rows = tree.rows(10).0;
        assert_eq!((rows[0].progress, rows[1].label.as_str()), (Some(0.75), "first"));
        tree.update(&[json!({"key": "_t.job", "progress": 1.0, "status": "finished", "_eta": 1})]);
        assert_eq!(tree.terminal_status(), Some("finished"));
        assert_eq!(tree.rows(1).0[0].eta_in_ms, None, "no ETA once finished");
    }

    #[test]
    fn deletes_remove_subtrees() {
        let mut tree = Tree::from_snapshot("_t.job", &snapshot());
        tree.update(&[json!({"key": "_t.job.a.x", "start_time": 4})]);
        tree.delete(&["_t.job.a".to_owned()]);
        assert_eq!(keys(&tree), [("_t.job".into(), 0), ("_t.job.b".into(), 1)]);
        tree.delete(&["_t.job".to_owned()]);
        assert!(tree.root().is_none());
        assert!(tree.rows(10).0.is_empty());
    }

    #[test]
    fn a_missing_root_appears_later() {
        let mut tree = Tree::from_snapshot("_t.job", &json!({"key": "_t.job", "missing": true}));
        assert!(tree.root().is_none());
        tree.update(&[json!({"key": "_t.job.a", "start_time": 2})]);
        assert!(tree.root().is_none(), "a child without its parent is not shown");
        tree.update(&[
            json!({"key": "_t.job", "start_time": 1}),
            json!({"key": "_t.job.a", "start_time": 2}),
        ]);
        assert_eq!(keys(&tree), [("_t.job".into(), 0), ("_t.job.a".into(), 1)]);
    }

    #[test]
    fn namespaces_are_roots() {
        assert_eq!(parent_of("_requests.abc"), None);
        assert_eq!(parent_of("_requests.abc.step-1"), Some("_requests.abc"));
        assert_eq!(parent_of("a"), None);
        assert_eq!(parent_of("a.b.c"), Some("a.b"));
    }

    #[test]
    fn rows_show_stalled_nodes_and_eta() {
        let now = now_ms();
        let tree = Tree::from_snapshot(
            "_t.s",
            &json!({"key": "_t.s", "status": "running", "progress": 0.25, "_stalled": true,
                    "_age_ms": 90_000, "_eta": now + 60_000, "msg": "copying"}),
        );
        let row = &tree.rows(1).0[0];
        assert_eq!(row.stalled, Some(Some(90_000)));
        assert!(row.eta_in_ms.is_some_and(|eta| (55_000..=60_000).contains(&eta)), "{row:?}");
        let text = tree.render_text(10, 200);
        assert!(
            text.starts_with("_t.s  █████░░░░░░░░░░░░░░░  25%  running  ⚠ stalled 1m30s  ETA "),
            "{text}"
        );
        assert!(text.trim_end().ends_with("copying"), "{text}");
    }
}
