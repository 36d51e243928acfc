//! The live progress endpoints (SPEC §2 Live) over the process's [`cairn_live::Live`] fan-out:
//! SSE (`sse.rs`). Each adapts a subscription's events to its wire format; the subscription
//! logic (feed, coalescing, snapshots, resume) lives in `cairn-live`.

mod sse;

use std::time::Duration;

use axum::Router;
use cairn_live::{Event, EventKind, Live, LiveError};
use serde_json::Value;

use crate::error::ApiError;

pub(crate) use sse::router as sse_router;

/// Live settings of the ingress.
#[derive(clap::Args, Debug, Clone)]
pub struct LiveConfig {
    /// Live subscribers (SSE streams, WebSocket subscriptions) this replica serves at once;
    /// more get 503 with `Retry-After`.
    #[arg(long = "max-live-subscribers", env = "CAIRN_MAX_LIVE_SUBSCRIBERS", default_value_t = 10_000)]
    pub max_subscribers: usize,
    /// A `running` node silent longer than this is shown with `_stalled: true` (a node's own
    /// `stall_after_ms` field overrides it).
    #[arg(long = "stall-after", env = "CAIRN_STALL_AFTER", default_value = "60s", value_parser = cairn_runtime::parse_duration)]
    pub stall_after: Duration,
}

impl LiveConfig {
    pub fn settings(&self) -> cairn_live::Settings {
        cairn_live::Settings {
            max_subscribers: self.max_subscribers,
            stall_after: self.stall_after,
            ..cairn_live::Settings::default()
        }
    }
}

pub(crate) fn router(live: Live) -> Router {
    sse_router(live)
}

impl From<LiveError> for ApiError {
    fn from(error: LiveError) -> ApiError {
        match error {
            LiveError::Full(_) => ApiError::Overloaded(error.to_string()),
            LiveError::BadDepth(_) | LiveError::BadLimit(_) => ApiError::BadRequest(error.to_string()),
        }
    }
}

/// The JSON payload of an event: a snapshot's node (with its subtree), an update's array of
/// nodes, a delete's array of keys. Every node carries `_age_ms` and, when stuck, `_stalled`.
pub(crate) fn payload(event: &Event, stall_after: Duration) -> Value {
    let now = cairn_live::now_ms();
    let stall = stall_after.as_millis() as i64;
    match event.kind {
        EventKind::Snapshot => event.nodes.first().map_or(Value::Null, |node| node.to_json_at(now, stall)),
        EventKind::Update => {
            Value::Array(event.nodes.iter().map(|node| node.to_json_at(now, stall)).collect())
        }
        EventKind::Delete => Value::Array(event.deleted.iter().cloned().map(Value::from).collect()),
    }
}
