//! The live feed of one progress key: ingress's SSE stream `GET /status/{key}/events`, parsed
//! into [`LiveEvent`]s. When the connection drops it reconnects by itself with `Last-Event-ID`,
//! so the server resumes right after the last event seen (or sends a fresh `snapshot`).

use std::pin::Pin;
use std::time::{Duration, Instant};

use cairn_error::Retries;
use eventsource_stream::{Event, EventStreamError, Eventsource as _};
use futures::{Stream, StreamExt as _};
use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::client::Client;
use crate::error::CliError;

/// The server sends a comment every 15 s; silence for this long means the connection is dead.
const SILENCE: Duration = Duration::from_secs(45);
/// Reconnecting gives up after failing for this long in a row.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One event of the feed.
#[derive(Debug, Clone, PartialEq)]
pub enum LiveEvent {
    /// The subtree as a read returns it; replaces whatever was known.
    Snapshot { id: String, tree: Value },
    /// Nodes that changed, in their newest state, parents first.
    Update { id: String, nodes: Vec<Value> },
    /// Keys that went away, with their subtrees.
    Delete { id: String, keys: Vec<String> },
}

impl LiveEvent {
    /// The event as one JSON line of `watch --json`: `{"type", "id", "key", "nodes"}` like the
    /// WebSocket API's messages (`keys` for a delete; a snapshot's one node carries `tasks`).
    pub fn to_json(&self, key: &str) -> Value {
        match self {
            LiveEvent::Snapshot { id, tree } => {
                let nodes =
                    if tree.get("missing") == Some(&Value::Bool(true)) { vec![] } else { vec![tree.clone()] };
                serde_json::json!({"type": "snapshot", "id": id, "key": key, "nodes": nodes})
            }
            LiveEvent::Update { id, nodes } => {
                serde_json::json!({"type": "update", "id": id, "key": key, "nodes": nodes})
            }
            LiveEvent::Delete { id, keys } => {
                serde_json::json!({"type": "delete", "id": id, "key": key, "keys": keys})
            }
        }
    }

    /// Reads one SSE event; `None` for kinds this client does not know (ignored, as SSE asks).
    pub fn parse(event: &Event) -> Result<Option<LiveEvent>, String> {
        let id = event.id.clone();
        let data = || {
            serde_json::from_str::<Value>(&event.data)
                .map_err(|e| format!("the server sent a {} event that is not JSON: {e}", event.event))
        };
        let live = match event.event.as_str() {
            "snapshot" => LiveEvent::Snapshot { id, tree: data()? },
            "update" => match data()? {
                Value::Array(nodes) => LiveEvent::Update { id, nodes },
                node @ Value::Object(_) => LiveEvent::Update { id, nodes: vec![node] },
                other => {
                    return Err(format!("the server sent an update that is not a list of nodes: {other}"));
                }
            },
            "delete" => LiveEvent::Delete { id, keys: deleted_keys(&data()?) },
            _ => return Ok(None),
        };
        Ok(Some(live))
    }
}

/// The keys a `delete` event names: a list of keys or of nodes, or an object with `keys`.
fn deleted_keys(data: &Value) -> Vec<String> {
    let list = match data {
        Value::Array(list) => list.as_slice(),
        Value::Object(map) => match map.get("keys").or_else(|| map.get("nodes")) {
            Some(Value::Array(list)) => list.as_slice(),
            _ => return map.get("key").and_then(Value::as_str).map(str::to_owned).into_iter().collect(),
        },
        Value::String(key) => return vec![key.clone()],
        _ => &[],
    };
    list.iter()
        .filter_map(|item| item.as_str().or_else(|| item.get("key").and_then(Value::as_str)))
        .map(str::to_owned)
        .collect()
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// What the feed is doing, for the view to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Connected,
    /// The connection dropped; reconnecting (the reason).
    Reconnecting(String),
}

pub struct Feed {
    client: Client,
    key: String,
    depth: u32,
    last_id: Option<String>,
    events: Option<Events>,
    /// When the current run of failed connection attempts began.
    failing_since: Option<Instant>,
    retries: Retries,
    ever_connected: bool,
}

impl Feed {
    pub fn new(client: Client, key: &str, depth: u32) -> Feed {
        Feed {
            client,
            key: key.to_owned(),
            depth,
            last_id: None,
            events: None,
            failing_since: None,
            retries: Retries::doubling(FIRST_BACKOFF, MAX_BACKOFF),
            ever_connected: false,
        }
    }

    /// The next event, reconnecting as needed; `on_link` hears of drops and reconnections. The
    /// first connection fails at once (Cairn unreachable, no such endpoint, not authorised);
    /// later ones are retried for [`GIVE_UP_AFTER`].
    pub async fn next(&mut self, on_link: &mut (dyn FnMut(Link) + Send)) -> Result<LiveEvent, CliError> {
        loop {
            if self.events.is_none() {
                match connect(&self.client, &self.key, self.depth, self.last_id.clone()).await {
                    Ok(events) => {
                        if self.failing_since.take().is_some() {
                            on_link(Link::Connected);
                        }
                        self.events = Some(events);
                        self.retries.succeeded();
                        self.ever_connected = true;
                    }
                    Err(error) if !self.ever_connected || !retryable(&error) => return Err(error),
                    Err(error) => {
                        let since = *self.failing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= GIVE_UP_AFTER {
                            return Err(error);
                        }
                        on_link(Link::Reconnecting(error.to_string()));
                        tokio::time::sleep(self.retries.failed()).await;
                        continue;
                    }
                }
            }
            let events = self.events.as_mut().expect("connected above");
            let reason = match tokio::time::timeout(SILENCE, events.next()).await {
                Ok(Some(Ok(event))) => {
                    if !event.id.is_empty() {
                        self.last_id = Some(event.id.clone());
                    }
                    match LiveEvent::parse(&event) {
                        Ok(Some(live)) => return Ok(live),
                        Ok(None) => continue,
                        Err(message) => return Err(CliError::Other(anyhow::anyhow!(message))),
                    }
                }
                Ok(Some(Err(error))) => format!("the event stream broke: {error}"),
                Ok(None) => "the server closed the event stream".to_owned(),
                Err(_) => format!("nothing heard for {}s", SILENCE.as_secs()),
            };
            self.events = None;
            self.failing_since.get_or_insert_with(Instant::now);
            on_link(Link::Reconnecting(reason));
        }
    }
}

/// Opens the event stream, resuming after `last_id` when given.
async fn connect(
    client: &Client,
    key: &str,
    depth: u32,
    last_id: Option<String>,
) -> Result<Events, CliError> {
    let depth = depth.to_string();
    let mut request = client
        .request(Method::GET, &["status", key, "events"])
        .header(ACCEPT, "text/event-stream")
        .query(&[("depth", depth.as_str())]);
    if let Some(id) = &last_id {
        request = request.header("last-event-id", id);
    }
    let response = client.send(request).await?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if status == StatusCode::NOT_FOUND && json.as_ref().is_none_or(|j| j.get("missing").is_none()) {
            return Err(CliError::Api {
                status: 404,
                message: format!(
                    "{} has no live progress endpoint (GET /status/{{key}}/events); \
                     upgrade ingress, or read the tree with `cairn status {}`",
                    client.base(),
                    key
                ),
            });
        }
        return Err(client.error_status(status, json.as_ref(), &text));
    }
    Ok(Box::pin(response.bytes_stream().eventsource()))
}

/// Whether a failed reconnection is worth another try: the server being away is; a refusal
/// (auth, bad key) is not.
fn retryable(error: &CliError) -> bool {
    matches!(error, CliError::Unreachable { .. } | CliError::Unavailable { .. })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(kind: &str, id: &str, data: &str) -> Event {
        Event { event: kind.into(), data: data.into(), id: id.into(), retry: None }
    }

    #[test]
    fn events_parse() {
        let snapshot = LiveEvent::parse(&event("snapshot", "1-0", r#"{"key":"a","progress":0.5}"#)).unwrap();
        assert_eq!(
            snapshot,
            Some(LiveEvent::Snapshot { id: "1-0".into(), tree: json!({"key":"a","progress":0.5}) })
        );
        let update =
            LiveEvent::parse(&event("update", "2-0", r#"[{"key":"a"},{"key":"a.b"}]"#)).unwrap().unwrap();
        assert_eq!(update.to_json("a")["id"], "2-0");
        assert_eq!(update.to_json("a")["nodes"].as_array().unwrap().len(), 2);
        assert_eq!(LiveEvent::parse(&event("ping", "", "x")).unwrap(), None);
        assert!(LiveEvent::parse(&event("update", "", "{oops")).unwrap_err().contains("not JSON"));
    }

    #[test]
    fn deletes_name_keys_in_any_shape() {
        for data in [r#"["a.b","a.c"]"#, r#"[{"key":"a.b"},{"key":"a.c"}]"#, r#"{"keys":["a.b","a.c"]}"#] {
            let Some(LiveEvent::Delete { keys, .. }) = LiveEvent::parse(&event("delete", "3", data)).unwrap()
            else {
                panic!("{data}")
            };
            assert_eq!(keys, ["a.b", "a.c"], "{data}");
        }
    }

    #[test]
    fn json_lines_follow_the_websocket_shape() {
        let missing = LiveEvent::Snapshot { id: "1".into(), tree: json!({"key": "a", "missing": true}) };
        assert_eq!(missing.to_json("a"), json!({"type": "snapshot", "id": "1", "key": "a", "nodes": []}));
        let delete = LiveEvent::Delete { id: "2".into(), keys: vec!["a.b".into()] };
        assert_eq!(delete.to_json("a"), json!({"type": "delete", "id": "2", "key": "a", "keys": ["a.b"]}));
    }
}
