//! SCA's progress REST API over `cairn.v1.Progress`: `GET`, `POST` and `DELETE /status/{key}` and
//! `GET /health`. Handlers extract and validate the request, call the aggregator and map the
//! answer to SCA's wire format; the tree itself lives behind the aggregator.

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use cairn_progress::{Key, MAX_UPDATE_BYTES, Update};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::aggregator::{Aggregator, Read};
use crate::auth::Caller;
use cairn_error::{ErrorKind, ServiceError as _};

use crate::error::ApiError;

/// Read parameters and their bounds, as the `cairn.v1.Progress` contract defines them.
const DEFAULT_DEPTH: u32 = 1;
const MAX_DEPTH: u32 = 8;
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

/// What the progress routes need: the aggregator, and when a running node counts as stalled.
#[derive(Clone)]
struct Progress {
    aggregator: Aggregator,
    stall_after: StallAfter,
}

/// `CAIRN_STALL_AFTER` in ms, for the `_stalled` flag of nodes read.
#[derive(Clone, Copy)]
struct StallAfter(i64);

impl FromRef<Progress> for Aggregator {
    fn from_ref(state: &Progress) -> Aggregator {
        state.aggregator.clone()
    }
}

impl FromRef<Progress> for StallAfter {
    fn from_ref(state: &Progress) -> StallAfter {
        state.stall_after
    }
}

impl StallAfter {
    fn json(self, node: &cairn_progress::view::NodeView) -> Value {
        node.to_json_at(cairn_progress::now_ms(), self.0)
    }
}

pub(crate) fn router(aggregator: Aggregator, stall_after: std::time::Duration) -> Router {
    let stall_after = StallAfter(i64::try_from(stall_after.as_millis()).unwrap_or(i64::MAX));
    Router::new()
        .route("/status/{key}", get(read).post(update).delete(remove))
        .route("/health", get(health))
        // The body limit is the update limit, so an oversized body is refused before it is
        // buffered; the rejection becomes a JSON 413 in `body_rejection`.
        .layer(DefaultBodyLimit::max(MAX_UPDATE_BYTES))
        .with_state(Progress { aggregator, stall_after })
}

/// `GET /status/{key}?depth=N&limit=M&after=K`: the node in SCA's format, or SCA's
/// `{"key": …, "missing": true}` with 404.
#[utoipa::path(get, path = "/status/{key}", tag = "progress", params(("key" = String, Path, description = "Progress key, dot-separated (`_portal.job1`)"), ("depth" = Option<String>, Query, description = "Levels of children, 1-8 (default 1)"), ("limit" = Option<String>, Query, description = "Children per parent, 1-1000 (default 100)"), ("after" = Option<String>, Query, description = "Page after this child key")), responses((status = 200, description = "The node in SCA's format", body = Object), (status = 404, description = "No node: `{\"key\": …, \"missing\": true}`", body = Object), (status = 504, description = "The aggregator did not answer in time", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn read(
    State(aggregator): State<Aggregator>,
    State(stall_after): State<StallAfter>,
    caller: Caller,
    ReadQuery(read): ReadQuery,
) -> Result<Json<Value>, ApiError> {
    caller.grant.read(read.key.as_str())?;
    match aggregator.get(&read, caller.token.as_deref()).await {
        Ok(node) => Ok(Json(stall_after.json(&node))),
        Err(error) if error.kind() == ErrorKind::NotFound => Err(ApiError::missing_node(read.key.as_str())),
        Err(error) => Err(error.into()),
    }
}

/// `POST /status/{key}`: the body is JSON whatever its `Content-Type` (bare `curl -d` sends
/// `application/x-www-form-urlencoded`), validated here so a bad field is named before any call.
#[utoipa::path(post, path = "/status/{key}", tag = "progress", params(("key" = String, Path, description = "Progress key, dot-separated (`_portal.job1`)"), ("access_token" = Option<String>, Query, description = "Bearer token, for clients that cannot set headers")), request_body(content = Object, description = "Progress update: progress, status, msg, weight, other fields", content_type = "application/json"), responses((status = 200, description = "Published; the node as it is now", body = Object), (status = 413, description = "Body over 64 KiB", body = Object), (status = 504, description = "The aggregator did not answer in time", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn update(
    State(aggregator): State<Aggregator>,
    State(stall_after): State<StallAfter>,
    caller: Caller,
    ProgressKey(key): ProgressKey,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.grant.write(key.as_str())?;
    let body = body.map_err(body_rejection)?;
    let update = Update::from_slice(&body)?;
    let node = aggregator.update(&key, &update, caller.token.as_deref()).await?;
    Ok(Json(json!({ "status": "published", "node": stall_after.json(&node) })))
}

/// `DELETE /status/{key}`: removes the node and its subtree.
#[utoipa::path(delete, path = "/status/{key}", tag = "progress", params(("key" = String, Path, description = "Progress key, dot-separated (`_portal.job1`)")), responses((status = 200, description = "Removed with its subtree", body = Object), (status = 404, description = "No node", body = Object), (status = 504, description = "The aggregator did not answer in time", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn remove(
    State(aggregator): State<Aggregator>,
    caller: Caller,
    ProgressKey(key): ProgressKey,
) -> Result<Json<Value>, ApiError> {
    caller.grant.write(key.as_str())?;
    match aggregator.delete(&key, caller.token.as_deref()).await? {
        0 => Err(ApiError::missing_node(key.as_str())),
        removed => {
            Ok(Json(json!({ "status": format!("removed {key} and its children"), "removed": removed })))
        }
    }
}

/// `GET /health` (SCA's route): whether the aggregator serves.
#[utoipa::path(get, path = "/health", tag = "progress", responses((status = 200, description = "The aggregator serves", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 503, description = "It does not", body = Object)))]
async fn health(State(aggregator): State<Aggregator>) -> Response {
    let checked = tokio::time::timeout(cairn_runtime::READINESS_TIMEOUT, aggregator.check_health())
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the progress aggregator did not answer within {:?}",
                cairn_runtime::READINESS_TIMEOUT
            ))
        });
    match checked {
        Ok(()) => Json(json!({ "status": "ok" })).into_response(),
        Err(message) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "failed", "message": message })))
                .into_response()
        }
    }
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::update_too_large()
    } else {
        ApiError::bad_request(format!("cannot read the request body: {}", rejection.body_text()))
    }
}

/// The `{key}` path segment, percent-decoded and validated.
pub(crate) struct ProgressKey(pub(crate) Key);

impl<S: Send + Sync> FromRequestParts<S> for ProgressKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        Key::parse(&raw).map(ProgressKey).map_err(|e| ApiError::bad_request(format!("key {raw:?}: {e}")))
    }
}

#[derive(Deserialize)]
struct ReadParams {
    depth: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// The key and the query of a read, validated.
struct ReadQuery(Read);

impl<S: Send + Sync> FromRequestParts<S> for ReadQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let ProgressKey(key) = ProgressKey::from_request_parts(parts, state).await?;
        let Query(params) = Query::<ReadParams>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        Ok(ReadQuery(read_options(key, params)?))
    }
}

fn read_options(key: Key, params: ReadParams) -> Result<Read, ApiError> {
    let after = match params.after.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(Key::parse(raw).map_err(|e| ApiError::bad_request(format!("after {raw:?}: {e}")))?),
    };
    Ok(Read {
        key,
        depth: bounded("depth", params.depth.as_deref(), DEFAULT_DEPTH, MAX_DEPTH)?,
        limit: bounded("limit", params.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?,
        after,
    })
}

pub(crate) fn bounded(name: &str, raw: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!("{name} must be an integer from 1 to {max}, got {raw:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(depth: Option<&str>, limit: Option<&str>, after: Option<&str>) -> ReadParams {
        ReadParams {
            depth: depth.map(Into::into),
            limit: limit.map(Into::into),
            after: after.map(Into::into),
        }
    }

    fn message(result: Result<Read, ApiError>) -> String {
        match result.unwrap_err() {
            error if error.kind() == cairn_error::ErrorKind::BadRequest => error.to_string(),
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn read_defaults_and_bounds() {
        let key = Key::parse("_test.a").unwrap();
        let read = read_options(key.clone(), params(None, None, Some(""))).unwrap();
        assert_eq!(read, Read { key: key.clone(), depth: 1, limit: 100, after: None });
        let read = read_options(key.clone(), params(Some("8"), Some("1000"), Some("_test.a.b"))).unwrap();
        assert_eq!((read.depth, read.limit), (8, 1000));
        assert_eq!(read.after.unwrap().as_str(), "_test.a.b");

        for depth in ["0", "9", "-1", "1.5", "x", ""] {
            let got = message(read_options(key.clone(), params(Some(depth), None, None)));
            assert_eq!(got, format!("depth must be an integer from 1 to 8, got {depth:?}"));
        }
        for limit in ["0", "1001", "abc"] {
            let got = message(read_options(key.clone(), params(None, Some(limit), None)));
            assert_eq!(got, format!("limit must be an integer from 1 to 1000, got {limit:?}"));
        }
        let got = message(read_options(key, params(None, None, Some("a..b"))));
        assert_eq!(got, r#"after "a..b": key segment 1 is empty"#);
    }
}
