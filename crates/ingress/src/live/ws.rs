//! `GET /ws`: live events over a WebSocket, many subscriptions per socket (docs/contract.md §2 Live).
//!
//! The client sends `{"op":"subscribe","key":K,"depth":N,"limit":M,"after":ID}` (all but `op` and
//! `key` optional) and `{"op":"unsubscribe","key":K}`; the server sends
//! `{"type":"snapshot"|"update"|"delete","key":K,"id":ID,"nodes":[…]}` with the SSE rules per
//! subscription (a delete's nodes are `{"key": …}` of the keys that went), and
//! `{"type":"error","message":…}` for a message it cannot act on; the socket stays open.
//! A browser's cross-site `Origin` is refused (403) unless listed in `CAIRN_ALLOWED_ORIGINS`.

use std::collections::HashMap;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::get;
use cairn_auth::Grant;
use cairn_live::{Live, Watch};
use cairn_progress::Key;
use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::auth::Caller;
use cairn_error::ErrorKind;

use crate::error::ApiError;

/// Subscriptions one socket may hold.
const MAX_PER_SOCKET: usize = 1000;
const DEFAULT_DEPTH: u32 = 8;
const DEFAULT_LIMIT: u32 = 100;

#[derive(Clone)]
struct WsState {
    live: Live,
    allowed_origins: Vec<String>,
}

pub(crate) fn router(live: Live, allowed_origins: Vec<String>) -> Router {
    Router::new().route("/ws", get(upgrade)).with_state(WsState { live, allowed_origins })
}

async fn upgrade(
    State(state): State<WsState>,
    caller: Caller,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    check_origin(&headers, &state.allowed_origins)?;
    Ok(ws.on_upgrade(move |socket| session(socket, state.live, caller.grant)))
}

/// Same-origin (the `Origin`'s host is the `Host` asked for), no `Origin` (not a browser), or
/// listed. Guards the WebSocket and socket.io upgrades and every call but GET and HEAD
/// (`auth.rs`).
pub(crate) fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return Ok(()) };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    if origin_host.eq_ignore_ascii_case(host)
        || allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorKind::Forbidden,
        format!("cross-site call from origin {origin:?} refused: list it in CAIRN_ALLOWED_ORIGINS"),
    ))
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Op {
    Subscribe { key: String, depth: Option<u32>, limit: Option<u32>, after: Option<String> },
    Unsubscribe { key: String },
}

async fn session(socket: WebSocket, live: Live, grant: Grant) {
    let (mut sink, mut incoming) = socket.split();
    // Events of every subscription, to the one writer. Bounded: a socket that does not drain
    // stops its subscriptions' reading, and their hubs keep keys, not events.
    let (out, mut outgoing) = mpsc::channel::<String>(16);
    let mut subscriptions: HashMap<String, JoinHandle<()>> = HashMap::new();
    let shutdown = live.shutdown().clone();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                break;
            }
            text = outgoing.recv() => {
                let Some(text) = text else { break };
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            message = incoming.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue, // pings are answered by the library; binary is ignored
                };
                if let Err(message) = handle(&text, &live, &grant, &out, &mut subscriptions) {
                    let error = json!({"type": "error", "message": message}).to_string();
                    if sink.send(Message::Text(error.into())).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    for (_, task) in subscriptions {
        task.abort();
    }
}

fn handle(
    text: &str,
    live: &Live,
    grant: &Grant,
    out: &mpsc::Sender<String>,
    subscriptions: &mut HashMap<String, JoinHandle<()>>,
) -> Result<(), String> {
    let op: Op = serde_json::from_str(text).map_err(|e| format!("bad message: {e}"))?;
    match op {
        Op::Unsubscribe { key } => match subscriptions.remove(&key) {
            Some(task) => {
                task.abort();
                Ok(())
            }
            None => Err(format!("not subscribed to {key:?}")),
        },
        Op::Subscribe { key, depth, limit, after } => {
            let parsed = Key::parse(&key).map_err(|e| format!("key {key:?}: {e}"))?;
            grant.read(parsed.as_str()).map_err(|denied| denied.to_string())?;
            let after = match after.as_deref() {
                None | Some("") => None,
                Some(raw) => Some(raw.parse().map_err(|e| format!("after: {e}"))?),
            };
            if !subscriptions.contains_key(&key) && subscriptions.len() >= MAX_PER_SOCKET {
                return Err(format!("at most {MAX_PER_SOCKET} subscriptions per socket"));
            }
            let watch = Watch {
                key: parsed,
                depth: depth.unwrap_or(DEFAULT_DEPTH),
                limit: limit.unwrap_or(DEFAULT_LIMIT),
                after,
            };
            let mut subscription = live.subscribe(watch).map_err(|e| e.to_string())?;
            let stall_after = live.settings().stall_after;
            let out = out.clone();
            let task = tokio::spawn(async move {
                while let Some(event) = subscription.next().await {
                    let nodes = match super::payload(&event, stall_after) {
                        Value::Array(items) if event.kind == cairn_live::EventKind::Delete => {
                            items.into_iter().map(|key| json!({"key": key})).collect()
                        }
                        Value::Array(items) => items,
                        node => vec![node],
                    };
                    let message = json!({"type": event.kind.as_str(), "key": event.key, "id": event.id.to_string(), "nodes": nodes});
                    if out.send(message.to_string()).await.is_err() {
                        return;
                    }
                }
            });
            if let Some(old) = subscriptions.insert(key, task) {
                old.abort();
            }
            Ok(())
        }
    }
}
