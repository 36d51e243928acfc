//! `cairn watch KEY` (and the live view of `submit --wait`): follows a key's live feed until its
//! root reaches a terminal status, shown as nested progress bars on a terminal, as text lines
//! when stdout is not one, or as JSON lines with `--json`. The exit code comes from the root's
//! final status.

mod bars;
mod feed;
pub mod tree;

use std::time::Duration;

use tokio::sync::mpsc;

use crate::client::Client;
use crate::error::{CliError, Exit};
use crate::output::{self, Output};
use bars::Bars;
pub use feed::{Feed, Link, LiveEvent};
use tree::Tree;

/// Rows a text snapshot shows at most (the bars fit the terminal's height instead).
const TEXT_ROWS: usize = 200;
/// How often the bars refresh what time changes by itself (ETA, age) between events.
const TICK: Duration = Duration::from_secs(1);

/// How a watch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// `finished`, `failed`, `canceled`; `None` when the root was deleted.
    pub status: Option<String>,
}

impl Ended {
    pub fn exit(&self) -> Exit {
        match self.status.as_deref() {
            Some("finished") => Exit::Success,
            _ => Exit::Failed,
        }
    }
}

/// Follows `key` to the end and says how its root ended.
pub async fn follow(client: &Client, key: &str, depth: u32, out: Output) -> Result<Ended, CliError> {
    let (items, mut received) = mpsc::channel(16);
    // The feed runs in its own task: its reconnection backoff and silence timeout must not be
    // cut short by the view's ticks.
    let feeder = tokio::spawn(run_feed(Feed::new(client.clone(), key, depth), items));
    let result = show(key, &mut received, out).await;
    feeder.abort();
    result
}

enum Item {
    Event(LiveEvent),
    Link(Link),
}

async fn run_feed(mut feed: Feed, items: mpsc::Sender<Result<Item, CliError>>) {
    loop {
        let links = items.clone();
        let next = feed.next(&mut |link| drop(links.try_send(Ok(Item::Link(link))))).await;
        let last = next.is_err();
        if items.send(next.map(Item::Event)).await.is_err() || last {
            return;
        }
    }
}

async fn show(
    key: &str,
    received: &mut mpsc::Receiver<Result<Item, CliError>>,
    out: Output,
) -> Result<Ended, CliError> {
    let mut tree = Tree::new(key);
    let mut view = if out.json {
        View::Json(out)
    } else if out.terminal {
        View::Bars(Bars::new(key))
    } else {
        View::Lines { width: 200 }
    };
    let mut tick = tokio::time::interval(TICK);
    let mut seen_root = false;
    loop {
        let item = tokio::select! {
            item = received.recv() => item,
            _ = tick.tick() => {
                view.tick(&tree);
                continue;
            }
        };
        let event = match item {
            Some(Ok(Item::Event(event))) => event,
            Some(Ok(Item::Link(link))) => {
                view.link(&link);
                continue;
            }
            Some(Err(error)) => {
                view.abandon();
                return Err(error);
            }
            None => {
                view.abandon();
                return Err(CliError::Other(anyhow::anyhow!("the live feed stopped unexpectedly")));
            }
        };
        match &event {
            LiveEvent::Snapshot { tree: snapshot, .. } => tree.replace(snapshot),
            LiveEvent::Update { nodes, .. } => tree.update(nodes),
            LiveEvent::Delete { keys, .. } => tree.delete(keys),
        }
        view.show(key, &event, &tree);
        seen_root |= tree.root().is_some();
        let ended = if let Some(status) = tree.terminal_status() {
            Ended { status: Some(status.to_owned()) }
        } else if seen_root && tree.root().is_none() {
            Ended { status: None }
        } else {
            continue;
        };
        view.finish(key, &tree, &ended);
        return Ok(ended);
    }
}

enum View {
    Json(Output),
    Bars(Bars),
    /// Plain text: the tree on a snapshot, then one line per changed node.
    Lines {
        width: usize,
    },
}

impl View {
    fn show(&mut self, key: &str, event: &LiveEvent, tree: &Tree) {
        match self {
            View::Json(out) => out.json_line(&event.to_json(key)),
            View::Bars(bars) => bars.show(tree),
            View::Lines { width } => match event {
                LiveEvent::Snapshot { .. } if tree.root().is_none() => {
                    output::print(&format!("waiting for {key} to appear\n"));
                }
                LiveEvent::Snapshot { .. } => output::print(&tree.render_text(TEXT_ROWS, *width)),
                LiveEvent::Update { nodes, .. } => {
                    let changed: Vec<&str> =
                        nodes.iter().filter_map(|n| n.get("key").and_then(|k| k.as_str())).collect();
                    let (rows, _) = tree.rows(usize::MAX);
                    let rows: Vec<_> =
                        rows.into_iter().filter(|r| changed.contains(&r.key.as_str())).collect();
                    for row in &rows {
                        let line = format!(
                            "{}  {}  {}",
                            row.key,
                            output::percent(row.progress).trim_start(),
                            row.summary()
                        );
                        output::print(&format!("{}\n", output::truncate(line.trim_end(), *width)));
                    }
                }
                LiveEvent::Delete { keys, .. } => {
                    for key in keys {
                        output::print(&format!("{key}  deleted\n"));
                    }
                }
            },
        }
    }

    fn tick(&mut self, tree: &Tree) {
        if let View::Bars(bars) = self {
            bars.show(tree);
        }
    }

    fn link(&mut self, link: &Link) {
        match (self, link) {
            (View::Bars(bars), link) => bars.link(link),
            (View::Lines { .. }, Link::Reconnecting(reason)) => eprintln!("reconnecting: {reason}"),
            (View::Lines { .. }, Link::Connected) => eprintln!("reconnected"),
            (View::Json(_), Link::Reconnecting(reason)) => eprintln!("reconnecting: {reason}"),
            (View::Json(_), Link::Connected) => {}
        }
    }

    fn finish(&mut self, key: &str, tree: &Tree, ended: &Ended) {
        let line = summary_line(key, tree, ended);
        match self {
            View::Json(_) => {}
            View::Bars(bars) => {
                bars.finish(tree);
                output::print(&format!("{line}\n"));
            }
            View::Lines { .. } => output::print(&format!("{line}\n")),
        }
    }

    fn abandon(&mut self) {
        if let View::Bars(bars) = self {
            bars.abandon();
        }
    }
}

/// `_requests.x finished in 12s` / `… failed: <msg>` / `… was deleted`.
fn summary_line(key: &str, tree: &Tree, ended: &Ended) -> String {
    let Some(status) = &ended.status else { return format!("{key} was deleted before it finished") };
    let root = tree.root();
    let field = |name: &str| root.and_then(|r| r.get(name)).and_then(serde_json::Value::as_i64);
    let took = match (field("start_time"), field("update_time")) {
        (Some(start), Some(end)) => format!(" in {}", output::short_duration(end - start)),
        _ => String::new(),
    };
    let msg = root
        .and_then(|r| r.get("msg"))
        .and_then(|m| m.as_str())
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    let status = output::status_style(status).apply_to(status);
    format!("{key} {status}{took}{msg}")
}
