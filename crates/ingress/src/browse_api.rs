//! Read-only listings to start browsing from, for the web UI and any other client:
//! `GET /v1/trees` (progress tree roots, most recently updated first), `GET /v1/requests`
//! (requests, newest first, filtered by state and handler) and `GET /v1/requests/{id}/payload`
//! (what a request was submitted with, which its public view leaves out).
//!
//! They read what the progress store and the request queue already keep, without an index of
//! their own: roots from the `P:proots` sorted set (score: the root's latest update time),
//! requests from the request streams read backwards (every partition's, merged newest first by
//! entry id), each entry joined with its record `P:req:<id>`. An entry whose record is gone
//! (purged) or names a newer entry (a dead request queued again) is skipped, so every request
//! appears once, at its latest submission.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use cairn_error::ServiceError;
use cairn_progress::Key;
use cairn_redis::ProgressStore;
use cairn_redis::progress::ReadOptions;
use cairn_redis::requests::{Entry, RequestQueues};
use cairn_requests::{RequestRecord, RequestState};
use futures::future::join_all;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::progress_api::bounded;
use crate::requests::{REDIS_TIMEOUT, through_ties};
use crate::requests_api::RequestId;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1000;
/// Most stream entries one `GET /v1/requests` (or roots one `GET /v1/trees`) looks at; a filter
/// that matches little answers a short page with a `next` cursor instead of scanning everything.
const MAX_SCANNED: usize = 5000;
/// Stream entries read per round trip.
const SCAN_BATCH: usize = 200;
/// Longest handler name accepted as a filter (names come from the handlers file).
const MAX_HANDLER_LEN: usize = 256;

#[derive(Clone)]
struct Browse {
    queues: RequestQueues,
    store: ProgressStore,
}

pub(crate) fn router(queues: RequestQueues, store: ProgressStore) -> Router {
    Router::new()
        .route("/v1/trees", get(trees))
        .route("/v1/requests", get(requests))
        .route("/v1/requests/{id}/payload", get(payload))
        .with_state(Browse { queues, store })
}

#[derive(Deserialize)]
struct TreeParams {
    limit: Option<String>,
    offset: Option<String>,
}

/// `GET /v1/trees?limit=N&offset=M`: roots by latest update, newest first, each with its node
/// (depth 1, one child key); `next` is the offset of the following page, `null` at the end.
/// Without the admin scope, only the roots the token may read are listed.
#[utoipa::path(get, path = "/v1/trees", tag = "browse", params(("limit" = Option<String>, Query, description = "1-1000"), ("offset" = Option<String>, Query, description = "Offset of the page")), responses((status = 200, description = "Roots by latest update", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn trees(
    State(browse): State<Browse>,
    caller: Caller,
    params: Result<Query<TreeParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let limit = bounded("limit", params.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)? as isize;
    let offset = match params.offset.as_deref() {
        None | Some("") => 0,
        Some(raw) => raw.parse::<isize>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::bad_request(format!("offset must be a non-negative integer, got {raw:?}"))
        })?,
    };
    // An admin sees every root; anyone else the roots their read scopes cover, found by scanning
    // at most MAX_SCANNED roots (a short page then continues from where the scan stopped).
    // `offset` and `next` count positions among all roots either way.
    let admin = caller.grant.is_admin();
    let (mut roots, mut position, mut more) = (Vec::new(), offset, false);
    loop {
        let batch = if admin { limit + 1 } else { SCAN_BATCH as isize };
        let page = timed("tree roots", browse.store.roots(position as usize, batch as usize)).await?;
        let exhausted = (page.len() as isize) < batch;
        for (root, updated) in page {
            if roots.len() as isize == limit {
                more = true;
                break;
            }
            position += 1;
            if admin || caller.grant.can_read(&root) {
                roots.push((root, updated));
            }
        }
        if more || exhausted {
            break;
        }
        if (position - offset) as usize >= MAX_SCANNED {
            more = true;
            break;
        }
    }
    let options = ReadOptions { depth: 1, limit: 1, after: None };
    let nodes = join_all(roots.iter().map(|(root, _)| {
        let (store, options) = (&browse.store, &options);
        async move {
            let key = Key::parse(root).ok()?;
            let read = tokio::time::timeout(REDIS_TIMEOUT, store.get(&key, options)).await;
            read.ok()?.ok()?
        }
    }))
    .await;
    let items: Vec<Value> = roots
        .iter()
        .zip(nodes)
        .map(|((key, updated), node)| {
            json!({ "key": key, "update_time": *updated as i64, "node": node.map(|n| n.to_sca_json()) })
        })
        .collect();
    let next = more.then(|| position.to_string());
    Ok(Json(json!({ "items": items, "next": next })))
}

#[derive(Deserialize)]
struct RequestParams {
    state: Option<String>,
    handler: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// What `GET /v1/requests` keeps.
#[derive(Debug, Default, PartialEq)]
struct Filter {
    state: Option<RequestState>,
    handler: Option<String>,
}

impl Filter {
    fn from_params(state: Option<&str>, handler: Option<&str>) -> Result<Filter, ApiError> {
        let state = match state {
            None | Some("") => None,
            Some(raw) => Some(raw.parse::<RequestState>().map_err(|_| {
                let known: Vec<&str> = RequestState::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::bad_request(format!("state must be one of {}, got {raw:?}", known.join(", ")))
            })?),
        };
        let handler = match handler {
            None | Some("") => None,
            Some(raw) if raw.len() > MAX_HANDLER_LEN => {
                return Err(ApiError::bad_request(format!(
                    "handler must be at most {MAX_HANDLER_LEN} bytes, got {}",
                    raw.len()
                )));
            }
            Some(raw) => Some(raw.to_owned()),
        };
        Ok(Filter { state, handler })
    }

    fn keeps(&self, record: &RequestRecord) -> bool {
        self.state.is_none_or(|state| record.state == state)
            && self.handler.as_deref().is_none_or(|handler| record.handler == handler)
    }
}

/// `GET /v1/requests?state=S&handler=H&limit=N&after=<entry id>`: requests newest first across
/// partitions, each as `GET /v1/requests/{id}` shows it (without progress); `next` continues
/// after the last entry looked at, `null` once the streams are exhausted. Entries of different
/// partitions can share an entry id; a page never ends between them, so it may hold a few more
/// than `limit`.
#[utoipa::path(get, path = "/v1/requests", tag = "browse", params(("state" = Option<String>, Query, description = "Only this state"), ("handler" = Option<String>, Query, description = "Only this handler"), ("limit" = Option<String>, Query, description = "1-1000"), ("after" = Option<String>, Query, description = "Entry id to continue after")), responses((status = 200, description = "Requests, newest first", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn requests(
    State(browse): State<Browse>,
    caller: Caller,
    params: Result<Query<RequestParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.grant.admin("listing every request")?;
    let Query(params) = params.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let limit = bounded("limit", params.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)? as usize;
    let filter = Filter::from_params(params.state.as_deref(), params.handler.as_deref())?;
    let mut cursor = match params.after.as_deref() {
        None | Some("") => None,
        Some(after) if crate::requests_api::is_entry_id(after) => Some(after.to_owned()),
        Some(after) => {
            return Err(ApiError::bad_request(format!(
                "after must be a request stream entry id such as 1700000000000-0 (the `next` of the previous page), got {after:?}"
            )));
        }
    };
    // Up to this many entries of other partitions can share the last entry id of a batch.
    let ties = usize::from(browse.queues.layout().partitions) - 1;
    let (mut items, mut scanned) = (Vec::new(), 0);
    let exhausted = loop {
        let batch = SCAN_BATCH.min(MAX_SCANNED.saturating_sub(scanned)).max(1);
        let fetched = timed("request stream", browse.queues.newest(cursor.as_deref(), batch + ties)).await?;
        let fetched_all = fetched.len() < batch + ties;
        let fetched_len = fetched.len();
        let entries = through_ties(fetched, batch, |entry| &entry.entry_id);
        let read_all = fetched_all && entries.len() == fetched_len;
        let ids: Vec<&str> = entries.iter().map(|entry| entry.request_id.as_str()).collect();
        let records = timed("request records", browse.queues.records(&ids)).await?;
        // Once the page is full, only the entries sharing its last entry id come along.
        let mut full_at: Option<&str> = None;
        for (Entry { entry_id, .. }, record) in entries.iter().zip(records) {
            if full_at.is_some_and(|last| last != entry_id) {
                break;
            }
            scanned += 1;
            cursor = Some(entry_id.clone());
            let Some(record) = record else { continue };
            if record.entry_id.as_deref() == Some(entry_id) && filter.keeps(&record) {
                items.push(record.to_json());
                if items.len() == limit {
                    full_at = Some(entry_id);
                }
            }
        }
        if items.len() >= limit {
            break false;
        }
        if read_all {
            break true;
        }
        if scanned >= MAX_SCANNED {
            break false;
        }
    };
    let next = if exhausted { None } else { cursor };
    Ok(Json(json!({ "items": items, "next": next })))
}

/// `GET /v1/requests/{id}/payload`: the payload the request was submitted with.
#[utoipa::path(get, path = "/v1/requests/{id}/payload", tag = "browse", params(("id" = String, Path, description = "Request id")), responses((status = 200, description = "The submitted payload", body = Object), (status = 404, description = "No such request", body = Object), (status = 400, description = "Bad input; the message names it", body = Object), (status = 401, description = "Missing or bad token", body = Object), (status = 403, description = "Outside the token's scopes, or a cross-site browser", body = Object), (status = 429, description = "Over the rate limit", body = Object), (status = 503, description = "A dependency is away or the limit of waiters is reached; retry", body = Object)))]
async fn payload(
    State(browse): State<Browse>,
    caller: Caller,
    RequestId(id): RequestId,
) -> Result<Json<Value>, ApiError> {
    if !caller.grant.is_admin() {
        let read = browse.queues.record_field(&id, cairn_requests::fields::PROGRESS_KEY);
        let key = timed("request progress key", read).await?;
        caller.grant.read(&key.ok_or(ApiError::missing_request(id.clone()))?)?;
    }
    let read = browse.queues.record_field(&id, cairn_requests::fields::PAYLOAD);
    let stored = timed("request payload", read).await?;
    let stored = stored.ok_or(ApiError::missing_request(id.clone()))?;
    serde_json::from_str(&stored).map(Json).map_err(|error| {
        warn!(request = %id, %error, "stored payload is not JSON");
        ApiError::internal()
    })
}

/// A Redis read bounded by [`REDIS_TIMEOUT`]; Redis away or slow is a 503, a refused call or a
/// reply that makes no sense a 500 (by the error's kind).
async fn timed<T, E: ServiceError>(
    what: &'static str,
    read: impl Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(REDIS_TIMEOUT, read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) if error.kind().is_retryable() => {
            warn!(%error, what, "redis read failed");
            Err(ApiError::queue_unavailable())
        }
        Ok(Err(error)) => {
            tracing::error!(%error, what, "redis read answered something unexpected");
            Err(ApiError::internal())
        }
        Err(_) => {
            warn!(what, "redis read timed out");
            Err(ApiError::queue_unavailable())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<Filter, ApiError>) -> String {
        match result.unwrap_err() {
            error if error.kind() == cairn_error::ErrorKind::BadRequest => error.to_string(),
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn filters_are_checked() {
        assert_eq!(Filter::from_params(None, Some("")).unwrap(), Filter::default());
        let filter = Filter::from_params(Some("dead"), Some("echo")).unwrap();
        assert_eq!(filter, Filter { state: Some(RequestState::Dead), handler: Some("echo".into()) });
        let got = message(Filter::from_params(Some("done"), None));
        assert_eq!(
            got,
            "state must be one of queued, running, failed, succeeded, canceled, dead, got \"done\""
        );
        let long = "h".repeat(257);
        assert!(message(Filter::from_params(None, Some(&long))).contains("at most 256 bytes"));
    }
}
