//! The live progress endpoints (docs/contract.md §2 Live) over the process's [`cairn_live::Live`] fan-out:
//! SSE (`sse.rs`), WebSocket (`ws.rs`) and socket.io (`socketio.rs`). Each adapts a subscription's events to its wire format; the subscription
//! logic (feed, coalescing, snapshots, resume) lives in `cairn-live`.

mod socketio;
pub(crate) mod sse;
mod ws;

use std::time::Duration;

use axum::Router;
use cairn_live::{Event, EventKind, Live};
use serde_json::Value;

pub(crate) use sse::router as sse_router;

/// Live settings of the ingress.
#[derive(clap::Args, Debug, Clone)]
pub struct LiveConfig {
    #[command(flatten)]
    pub live: cairn_live::LiveArgs,
    /// Browser origins (`https://app.example.com`, comma-separated, `*` for any) allowed to make
    /// cross-site calls (WebSocket, socket.io, and any call but GET and HEAD); same-origin and
    /// non-browser clients need no entry.
    #[arg(long = "allowed-origins", env = "CAIRN_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
}

pub(crate) use ws::check_origin;

pub(crate) fn router(live: Live, config: &LiveConfig, verifier: Option<cairn_auth::Verifier>) -> Router {
    sse_router(live.clone())
        .merge(ws::router(live.clone(), config.allowed_origins.clone()))
        .merge(socketio::router(live, config.allowed_origins.clone(), verifier))
}

/// The JSON payload of an event: a snapshot's node (with its subtree), an update's array of
/// nodes, a delete's array of keys. Every node carries `_age_ms` and, when stuck, `_stalled`.
pub(crate) fn payload(event: &Event, stall_after: Duration) -> Value {
    let now = cairn_progress::now_ms();
    let stall = stall_after.as_millis() as i64;
    match event.kind {
        EventKind::Snapshot => event.nodes.first().map_or(Value::Null, |node| node.to_json_at(now, stall)),
        EventKind::Update => {
            Value::Array(event.nodes.iter().map(|node| node.to_json_at(now, stall)).collect())
        }
        EventKind::Delete => Value::Array(event.deleted.iter().cloned().map(Value::from).collect()),
    }
}
