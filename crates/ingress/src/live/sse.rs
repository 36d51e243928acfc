//! `GET /status/{key}/events`: a subtree's live events as Server-Sent Events. Event names are
//! `snapshot`, `update` and `delete`, each with an `id:` that `Last-Event-ID` (or `?after=`)
//! resumes after; a comment keeps the connection alive every 15 s. The stream ends when the
//! ingress shuts down, so it never holds the graceful shutdown.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cairn_live::{FeedId, Live, Watch};
use futures::StreamExt as _;
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::progress_api::{ProgressKey, bounded};

const DEFAULT_DEPTH: u32 = 8;
const DEFAULT_LIMIT: u32 = 100;
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(crate) fn router(live: Live) -> Router {
    Router::new().route("/status/{key}/events", get(events)).with_state(live)
}

#[derive(Deserialize)]
struct EventsParams {
    depth: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

#[utoipa::path(get, path = "/status/{key}/events", tag = "live", params(("key" = String, Path, description = "Progress key, dot-separated (`_portal.job1`)"), ("depth" = Option<String>, Query, description = "Levels watched, 1-8 (default 8)"), ("limit" = Option<String>, Query, description = "Children per parent, 1-1000"), ("after" = Option<String>, Query, description = "Resume after this event id"), ("access_token" = Option<String>, Query, description = "Bearer token (EventSource cannot set headers)")), responses((status = 200, description = "Server-sent events: snapshot, update, delete", content_type = "text/event-stream", body = String), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn events(
    State(live): State<Live>,
    caller: Caller,
    ProgressKey(key): ProgressKey,
    Query(params): Query<EventsParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.grant.read(key.as_str())?;
    let depth = bounded("depth", params.depth.as_deref(), DEFAULT_DEPTH, 8)?;
    let limit = bounded("limit", params.limit.as_deref(), DEFAULT_LIMIT, 1000)?;
    // A reconnecting EventSource repeats the original URL and adds Last-Event-ID: it wins.
    let after = match headers.get("last-event-id") {
        Some(value) => Some(parse_after("Last-Event-ID", value.to_str().unwrap_or("\u{fffd}"))?),
        None => match params.after.as_deref() {
            None | Some("") => None,
            Some(raw) => Some(parse_after("after", raw)?),
        },
    };
    let stall_after = live.settings().stall_after;
    let subscription = live.subscribe(Watch { key, depth, limit, after })?;
    let stream = subscription.into_stream().map(move |event| {
        let data = super::payload(&event, stall_after).to_string();
        Ok::<_, Infallible>(
            SseEvent::default().event(event.kind.as_str()).id(event.id.to_string()).data(data),
        )
    });
    let mut response = Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response();
    // Proxies (nginx) must not buffer an event stream.
    response.headers_mut().insert("x-accel-buffering", axum::http::HeaderValue::from_static("no"));
    Ok(response)
}

fn parse_after(name: &str, raw: &str) -> Result<FeedId, ApiError> {
    raw.trim().parse().map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
}
