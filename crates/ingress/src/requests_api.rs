//! The request REST API (docs/contract.md §3): `POST /v1/requests`, `GET` and `DELETE /v1/requests/{id}`,
//! and the dead letters under `/v1/dead-letters`. Handlers extract and validate, call
//! [`Requests`], and shape the answer; `Prefer: wait=N` (RFC 7240) makes a submission or a read
//! wait for the outcome.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest as _, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use cairn_redis::requests::DeadLetter;
use cairn_requests::{MAX_SUBMISSION_BYTES, is_valid_request_id};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument as _;

use crate::auth::Caller;
use cairn_error::ErrorKind;

use crate::error::ApiError;
use crate::progress_api::bounded;
use crate::requests::{Canceled, Requests, Submitted, progress_url, record_rejection};
use crate::streams;

const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

pub(crate) fn router(requests: Arc<Requests>) -> Router {
    Router::new()
        .route("/v1/requests", post(submit))
        .route("/v1/requests/{id}", get(read).delete(cancel))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/dead-letters/{id}", get(dead_letter))
        .route("/v1/dead-letters/{id}/retry", post(retry))
        // An oversized JSON body is refused before it is buffered (see `body_rejection`);
        // multipart bodies are streamed, within their own limits (`streams`).
        .layer(DefaultBodyLimit::max(MAX_SUBMISSION_BYTES))
        .with_state(requests)
}

/// `POST /v1/requests`: 202 with the new request's id and where to follow it; 200 with the full
/// request once it is finished (asked for with `Prefer: wait`, or an idempotent repeat of a
/// finished one).
#[utoipa::path(post, path = "/v1/requests", tag = "requests", params(("prefer" = Option<String>, Header, description = "`wait=N`: answer once finished or after N s"), ("idempotency-key" = Option<String>, Header, description = "Repeats with the same key name the same request")), request_body(content = Object, description = "`{\"handler\": …, \"payload\": …, \"progress_key\"?, \"max_attempts\"?, \"timeout_ms\"?}`", content_type = "application/json"), responses((status = 202, description = "Queued: id, state, progress_key, progress_url", body = Object), (status = 200, description = "Finished (with Prefer: wait, or an idempotent repeat)", body = Object), (status = 409, description = "Idempotency key reused with another body", body = Object), (status = 413, description = "Body over 2 MiB", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn submit(
    State(requests): State<Arc<Requests>>,
    caller: Caller,
    Prefer { wait }: Prefer,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let wait = capped(wait, requests.settings().max_wait);
    // A W3C `traceparent` header is continued by the submission's span (or a new trace starts
    // there); the context is stored with the request, so its processing joins the same trace.
    let received = request.headers().get("traceparent").and_then(|value| value.to_str().ok()).map(str::trim);
    let span = tracing::info_span!("submit request", otel.kind = "server", http.route = "/v1/requests");
    cairn_runtime::telemetry::continue_trace(&span, received);
    let traceparent = cairn_runtime::telemetry::traceparent(&span, received);
    let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let submitted = match content_type.and_then(streams::boundary) {
        Some(boundary) => {
            let boundary = boundary.map_err(ApiError::from)?;
            match streams::submit(&requests, request.into_body(), boundary, wait, traceparent, &caller.grant)
                .instrument(span)
                .await
            {
                Ok(submitted) => submitted,
                // The body was not read to its end: the connection cannot serve another request.
                Err(error) => {
                    let mut response = ApiError::from(error).into_response();
                    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    return Ok(response);
                }
            }
        }
        None => {
            let body = Bytes::from_request(request, &()).await.map_err(body_rejection)?;
            requests.submit(&body, wait, traceparent, &caller.grant).instrument(span).await?
        }
    };
    let response = match submitted {
        Submitted::Queued(record) => {
            let body = json!({
                "id": record.id,
                "state": record.state,
                "progress_key": record.progress_key,
                "progress_url": progress_url(&record.progress_key),
            });
            answer(StatusCode::ACCEPTED, body, Some(&record.id), wait)
        }
        Submitted::Known(view) => {
            let status = if view.record.state.is_terminal() { StatusCode::OK } else { StatusCode::ACCEPTED };
            answer(status, view.to_json(), Some(&view.record.id), wait)
        }
    };
    Ok(response)
}

/// `GET /v1/requests/{id}`: the request; with `Prefer: wait=N`, once it is finished or N seconds
/// have passed.
#[utoipa::path(get, path = "/v1/requests/{id}", tag = "requests", params(("id" = String, Path, description = "Request id"), ("prefer" = Option<String>, Header, description = "`wait=N`")), responses((status = 200, description = "The request", body = Object), (status = 404, description = "No such request", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn read(
    State(requests): State<Arc<Requests>>,
    caller: Caller,
    RequestId(id): RequestId,
    Prefer { wait }: Prefer,
) -> Result<Response, ApiError> {
    requests.check_access(&id, &caller.grant).await?;
    let wait = capped(wait, requests.settings().max_wait);
    let view = requests.get(&id, wait).await?;
    Ok(answer(StatusCode::OK, view.to_json(), None, wait))
}

/// `DELETE /v1/requests/{id}`: 200 when a queued request is canceled for good, 202 when a running
/// one was told to stop.
#[utoipa::path(delete, path = "/v1/requests/{id}", tag = "requests", params(("id" = String, Path, description = "Request id")), responses((status = 200, description = "Canceled before it ran", body = Object), (status = 202, description = "Running; told to stop", body = Object), (status = 404, description = "No such request", body = Object), (status = 409, description = "Already finished", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn cancel(
    State(requests): State<Arc<Requests>>,
    caller: Caller,
    RequestId(id): RequestId,
) -> Result<Response, ApiError> {
    requests.check_access(&id, &caller.grant).await?;
    let response = match requests.cancel(&id).await? {
        Canceled::Queued => (StatusCode::OK, Json(json!({ "id": id, "state": "canceled" }))),
        Canceled::Signaled => {
            (StatusCode::ACCEPTED, Json(json!({ "id": id, "state": "running", "cancel_requested": true })))
        }
    };
    Ok(response.into_response())
}

#[derive(Deserialize)]
struct PageParams {
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/dead-letters?after=<entry id>&limit=N`: newest first across partitions (`after` pages
/// to older ones); `next` is the cursor of the following page, `null` once a page comes back
/// short. A page ends after every letter sharing its last entry id, so it may hold a few more.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "dead letters", params(("after" = Option<String>, Query, description = "Entry id to page after"), ("limit" = Option<String>, Query, description = "1-1000 (default 100)")), responses((status = 200, description = "`{\"items\": […], \"next\": …}`", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn dead_letters(
    State(requests): State<Arc<Requests>>,
    caller: Caller,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.grant.admin("listing dead letters")?;
    let Query(params) = params.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let limit = bounded("limit", params.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = match params.after.as_deref() {
        None | Some("") | Some("-") => "-",
        Some(after) if is_entry_id(after) => after,
        Some(after) => {
            return Err(ApiError::bad_request(format!(
                "after must be a dead-letter entry id such as 1700000000000-0, got {after:?}"
            )));
        }
    };
    let letters = requests.dead_letters(after, limit as usize).await?;
    let next =
        (letters.len() >= limit as usize).then(|| letters.last().map(|l| l.entry_id.clone())).flatten();
    let items: Vec<Value> = letters.into_iter().map(dead_letter_json).collect();
    Ok(Json(json!({ "items": items, "next": next })))
}

fn dead_letter_json(letter: DeadLetter) -> Value {
    json!({ "entry_id": letter.entry_id, "id": letter.request_id, "error": letter.error, "time": letter.time_ms })
}

/// `GET /v1/dead-letters/{id}`: the request, when it is dead.
#[utoipa::path(get, path = "/v1/dead-letters/{id}", tag = "dead letters", params(("id" = String, Path, description = "Request id")), responses((status = 200, description = "The dead request", body = Object), (status = 404, description = "No such dead request", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn dead_letter(
    State(requests): State<Arc<Requests>>,
    caller: Caller,
    RequestId(id): RequestId,
) -> Result<Json<Value>, ApiError> {
    caller.grant.admin("reading a dead letter")?;
    Ok(Json(requests.dead_letter(&id).await?.to_json()))
}

/// `POST /v1/dead-letters/{id}/retry`: runs a dead request again with fresh attempts.
#[utoipa::path(post, path = "/v1/dead-letters/{id}/retry", tag = "dead letters", params(("id" = String, Path, description = "Request id")), responses((status = 202, description = "Queued again", body = Object), (status = 404, description = "No such request", body = Object), (status = 409, description = "Not dead", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn retry(
    State(requests): State<Arc<Requests>>,
    caller: Caller,
    RequestId(id): RequestId,
) -> Result<Response, ApiError> {
    caller.grant.admin("retrying a dead letter")?;
    requests.retry_dead(&id).await?;
    Ok(answer(StatusCode::ACCEPTED, json!({ "id": id, "state": "queued" }), Some(&id), None))
}

/// The wait to honour: the client's, cut to `max`; none when that leaves nothing to wait.
fn capped(wait: Option<Duration>, max: Duration) -> Option<Duration> {
    wait.map(|wait| wait.min(max)).filter(|wait| !wait.is_zero())
}

/// A JSON answer with `Location` (the request's URL) and, when the client's wait was honoured,
/// `Preference-Applied`.
fn answer(status: StatusCode, body: Value, location: Option<&str>, wait: Option<Duration>) -> Response {
    let mut headers = HeaderMap::new();
    if let Some(id) = location
        && let Ok(value) = HeaderValue::from_str(&format!("/v1/requests/{id}"))
    {
        headers.insert(header::LOCATION, value);
    }
    if let Some(wait) = wait
        && let Ok(value) = HeaderValue::from_str(&format!("wait={}", wait.as_secs()))
    {
        headers.insert(PREFERENCE_APPLIED, value);
    }
    (status, headers, Json(body)).into_response()
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        record_rejection("too_large");
        ApiError::new(
            ErrorKind::TooLarge,
            format!(
                "request body is larger than {MAX_SUBMISSION_BYTES} bytes; a request may have at most 2 MiB of JSON"
            ),
        )
    } else {
        record_rejection("invalid");
        ApiError::bad_request(format!("cannot read the request body: {}", rejection.body_text()))
    }
}

/// A stream entry id: `<ms>-<seq>` or `<ms>`.
pub(crate) fn is_entry_id(s: &str) -> bool {
    let mut parts = s.splitn(2, '-');
    let digits = |p: Option<&str>| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let ms = parts.next();
    match parts.next() {
        None => digits(ms),
        seq => digits(ms) && digits(seq),
    }
}

/// The `{id}` path segment, a request id.
pub(crate) struct RequestId(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        if is_valid_request_id(&id) {
            Ok(RequestId(id))
        } else {
            let shown: String = id.chars().take(64).collect();
            Err(ApiError::bad_request(format!(
                "invalid request id {shown:?}: expected a lowercase UUID such as 0190f5c2-7b8e-4c3d-9a2b-123456789abc"
            )))
        }
    }
}

/// The client's `Prefer: wait=N` (RFC 7240), read leniently: any `Prefer` header, any position in
/// a comma-separated list, the name in any case, the value quoted or not. A value that is not a
/// number of seconds is ignored, as RFC 7240 asks of preferences a server does not understand.
struct Prefer {
    wait: Option<Duration>,
}

impl<S: Send + Sync> FromRequestParts<S> for Prefer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Prefer { wait: wait_preference(&parts.headers) })
    }
}

fn wait_preference(headers: &HeaderMap) -> Option<Duration> {
    let preferences = headers.get_all("prefer").into_iter().filter_map(|value| value.to_str().ok());
    let wait = preferences.flat_map(|value| value.split(',')).find_map(|preference| {
        // Parameters after `;` belong to the preference, not to its value.
        let (name, value) = preference.split(';').next()?.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("wait") {
            return None;
        }
        value.trim().trim_matches('"').parse::<u64>().ok()
    })?;
    (wait > 0).then(|| Duration::from_secs(wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefer(values: &[&str]) -> Option<u64> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("prefer", HeaderValue::from_str(value).unwrap());
        }
        wait_preference(&headers).map(|d| d.as_secs())
    }

    #[test]
    fn wait_is_read_leniently() {
        assert_eq!(prefer(&[]), None);
        assert_eq!(prefer(&["wait=10"]), Some(10));
        assert_eq!(prefer(&["respond-async, wait=5"]), Some(5));
        assert_eq!(prefer(&["return=minimal", "Wait = \"7\""]), Some(7));
        assert_eq!(prefer(&["wait=3; foo=bar"]), Some(3));
        assert_eq!(prefer(&["wait=soon"]), None);
        assert_eq!(prefer(&["wait=-1"]), None);
        assert_eq!(prefer(&["wait=0"]), None);
        assert_eq!(prefer(&["waiting=4"]), None);
    }

    #[test]
    fn waits_are_capped() {
        let max = Duration::from_secs(60);
        assert_eq!(capped(Some(Duration::from_secs(10)), max), Some(Duration::from_secs(10)));
        assert_eq!(capped(Some(Duration::from_secs(600)), max), Some(max));
        assert_eq!(capped(Some(Duration::from_secs(5)), Duration::ZERO), None, "waiting switched off");
        assert_eq!(capped(None, max), None);
    }

    #[test]
    fn entry_ids() {
        for good in ["1700000000000-0", "1700000000000", "0-1"] {
            assert!(is_entry_id(good), "{good}");
        }
        for bad in ["", "-", "a-1", "1-", "-1", "1-2-3", "1 -2", "+"] {
            assert!(!is_entry_id(bad), "{bad}");
        }
    }
}
