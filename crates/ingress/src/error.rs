//! The one place where failures become HTTP answers.
//!
//! Every error has an [`ErrorKind`] (`cairn-error`), whose one mapping gives its status. Every
//! error body is JSON, `{"error": "<message a user can act on>"}`, except a missing progress
//! node, which answers SCA's `{"key": …, "missing": true}`, and a missing request, which answers
//! `{"id": …, "missing": true}` in the same spirit. Messages of a dependency (the aggregator,
//! Redis) are passed on only when they describe the caller's mistake
//! ([`ErrorKind::is_caller_error`]); anything else was logged where it was classified and is
//! answered with a generic message, so internals never leak.

use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use cairn_error::{ErrorKind, ServiceError};
use cairn_progress::{MAX_UPDATE_BYTES, UpdateError};
use serde_json::json;

use crate::aggregator::CallError;
use crate::requests::RequestsError;

/// Seconds a client should wait before retrying a 503 or 429.
const RETRY_AFTER_SECS: u64 = 1;

/// An answer that is not a success: its kind (hence its status) and what the client is told.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    kind: ErrorKind,
    /// Shown to the client; never a dependency's internals.
    message: String,
    body: Body,
    /// `Retry-After` seconds, for a 429 or 503 that knows better than the default.
    retry_after: Option<u64>,
}

/// The shape of the body.
#[derive(Debug)]
enum Body {
    /// `{"error": message}`.
    Error,
    /// `{field: value, "missing": true}` (SCA's answer for a missing node, and a missing request).
    Missing { field: &'static str, value: String },
}

impl ApiError {
    /// An error of `kind` telling the client `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into(), body: Body::Error, retry_after: None }
    }

    /// The request is wrong; the message says what to change.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::BadRequest, message)
    }

    /// No progress node at this key (SCA's answer).
    pub fn missing_node(key: impl Into<String>) -> ApiError {
        let key = key.into();
        ApiError::missing(format!("no progress at key {key:?}"), "key", key)
    }

    /// No request with this id.
    pub fn missing_request(id: impl Into<String>) -> ApiError {
        let id = id.into();
        ApiError::missing(format!("no request {id}"), "id", id)
    }

    fn missing(message: String, field: &'static str, value: String) -> ApiError {
        ApiError { body: Body::Missing { field, value }, ..ApiError::new(ErrorKind::NotFound, message) }
    }

    /// A progress update's body over its limit.
    pub fn update_too_large() -> ApiError {
        ApiError::new(
            ErrorKind::TooLarge,
            format!(
                "request body is larger than {MAX_UPDATE_BYTES} bytes; an update may have at most 64 KiB of JSON"
            ),
        )
    }

    /// This client went over CAIRN_RATE_LIMIT; it may try again after `secs` seconds.
    pub fn rate_limited(secs: u64) -> ApiError {
        ApiError {
            retry_after: Some(secs),
            ..ApiError::new(ErrorKind::RateLimited, format!("rate limit exceeded; retry after {secs} s"))
        }
    }

    /// Redis, which holds the request queue, did not answer (in time).
    pub fn queue_unavailable() -> ApiError {
        ApiError::new(ErrorKind::Unavailable, "the request queue is unavailable; retry shortly")
    }

    /// Details are logged where the error is classified, never sent.
    pub fn internal() -> ApiError {
        ApiError::new(ErrorKind::Internal, "internal error; the ingress log has the details")
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn status(&self) -> StatusCode {
        self.kind.http_status()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self.body {
            Body::Missing { field, value } => json!({ *field: value, "missing": true }),
            Body::Error => json!({ "error": self.message }),
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if self.kind == ErrorKind::Unauthenticated {
            headers.insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        if matches!(self.kind, ErrorKind::Unavailable | ErrorKind::RateLimited) {
            let secs = self.retry_after.unwrap_or(RETRY_AFTER_SECS);
            headers.insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        response
    }
}

/// A failed aggregator call: the aggregator's verdict on the caller's input passes through, a
/// dependency being away is retryable, everything else is our fault (logged at the client edge).
impl From<CallError> for ApiError {
    fn from(error: CallError) -> ApiError {
        let kind = error.kind();
        let message = match kind {
            _ if kind.is_caller_error() => return ApiError::new(kind, error.to_string()),
            ErrorKind::Unavailable => "the progress aggregator is unavailable; retry shortly",
            ErrorKind::Timeout => "the progress aggregator did not answer in time; retry shortly",
            ErrorKind::RateLimited => "too many requests; retry later",
            _ => return ApiError::internal(),
        };
        ApiError::new(kind, message)
    }
}

impl From<cairn_auth::Denied> for ApiError {
    fn from(denied: cairn_auth::Denied) -> ApiError {
        ApiError::new(denied.kind(), denied.0)
    }
}

impl From<cairn_auth::AuthError> for ApiError {
    fn from(error: cairn_auth::AuthError) -> ApiError {
        ApiError::new(error.kind(), error.to_string())
    }
}

impl From<UpdateError> for ApiError {
    fn from(error: UpdateError) -> ApiError {
        match error {
            UpdateError::TooLarge { .. } => ApiError::update_too_large(),
            UpdateError::InvalidJson { detail } => ApiError::bad_request(format!("invalid JSON: {detail}")),
            other => ApiError::new(other.kind(), other.to_string()),
        }
    }
}

/// The request API's failures: every message of [`RequestsError`] is written for the client
/// (Redis details were logged where they happened), except that a missing request answers in
/// SCA's shape and an internal error says where to look.
impl From<RequestsError> for ApiError {
    fn from(error: RequestsError) -> ApiError {
        match error {
            RequestsError::Missing { id } => ApiError::missing_request(id),
            RequestsError::Internal => ApiError::internal(),
            other => ApiError::new(other.kind(), other.to_string()),
        }
    }
}

impl From<cairn_live::LiveError> for ApiError {
    fn from(error: cairn_live::LiveError) -> ApiError {
        ApiError::new(error.kind(), error.to_string())
    }
}

/// Fallback for paths no route serves.
pub(crate) async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(ErrorKind::NotFound, format!("no route for {method} {}", uri.path()))
}

/// Fallback for a known path asked with a method it does not serve.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(ErrorKind::MethodNotAllowed, format!("{method} is not allowed on {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    async fn body(error: ApiError) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let retry = response.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn grpc_codes_map_once() {
        let cases = [
            (Status::invalid_argument("depth must be between 1 and 8, got 9"), 400, None),
            (Status::not_found("no progress at key \"a\""), 404, None),
            (Status::unavailable("tcp connect error: 127.0.0.1:1"), 503, Some("1")),
            (Status::deadline_exceeded("deadline"), 504, None),
            (Status::resource_exhausted("too big"), 429, Some("1")),
            (Status::internal("redis said ERR at script line 42"), 500, None),
            (Status::unknown("boom"), 500, None),
        ];
        for (status, http, retry) in cases {
            let message = status.message().to_owned();
            let (got, got_retry, json) = body(CallError::from(status).into()).await;
            assert_eq!(got.as_u16(), http, "{message}");
            assert_eq!(got_retry.as_deref(), retry, "{message}");
            let error = json["error"].as_str().unwrap();
            if http < 500 && http != 429 {
                assert_eq!(error, message);
            } else {
                // Internals stay in the log.
                assert!(!error.contains(&message), "{error}");
            }
        }
    }

    #[tokio::test]
    async fn client_timeout_is_a_gateway_timeout() {
        let status = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), Code::Cancelled);
        let (got, _, json) = body(CallError::from(status).into()).await;
        assert_eq!(got, StatusCode::GATEWAY_TIMEOUT);
        assert!(json["error"].as_str().unwrap().contains("did not answer in time"));
        // A cancellation that is not our timeout stays an internal error.
        assert_eq!(
            body(CallError::from(Status::cancelled("x")).into()).await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[tokio::test]
    async fn request_errors_map_once() {
        let cases = [
            (RequestsError::Invalid(cairn_requests::SubmitError::MissingField("handler")), 400, None),
            (
                RequestsError::Invalid(cairn_requests::SubmitError::BodyTooLarge { bytes: 3, max: 2 }),
                413,
                None,
            ),
            (RequestsError::UnknownHandler { name: "x".into(), known: "echo".into() }, 400, None),
            (RequestsError::Overloaded { lag: 9, max: 3 }, 503, Some("1")),
            (RequestsError::IdempotencyConflict { key: "k".into() }, 409, None),
            (RequestsError::AlreadyFinished { id: "r".into(), state: "succeeded".into() }, 409, None),
            (RequestsError::NotDead { id: "r".into(), state: "running".into() }, 409, None),
            (
                RequestsError::NotDeadLetter { id: "r".into(), state: cairn_requests::RequestState::Running },
                404,
                None,
            ),
            (RequestsError::Unavailable, 503, Some("1")),
            (RequestsError::Internal, 500, None),
        ];
        for (error, http, retry) in cases {
            let message = error.to_string();
            let (got, got_retry, json) = body(error.into()).await;
            assert_eq!(got.as_u16(), http, "{message}");
            assert_eq!(got_retry.as_deref(), retry, "{message}");
            if http != 500 {
                assert_eq!(json["error"], message);
            }
        }
        let (got, _, json) = body(RequestsError::Missing { id: "r1".into() }.into()).await;
        assert_eq!(got, StatusCode::NOT_FOUND);
        assert_eq!(json, json!({"id": "r1", "missing": true}));
    }

    #[tokio::test]
    async fn missing_uses_scas_shape_and_update_errors_name_the_problem() {
        let (got, _, json) = body(ApiError::missing_node("_test.a")).await;
        assert_eq!(got, StatusCode::NOT_FOUND);
        assert_eq!(json, json!({"key": "_test.a", "missing": true}));

        let invalid = UpdateError::InvalidJson { detail: "EOF while parsing".into() };
        let (got, _, json) = body(invalid.into()).await;
        assert_eq!(got, StatusCode::BAD_REQUEST);
        assert_eq!(json["error"], "invalid JSON: EOF while parsing");

        let (got, _, json) =
            body(UpdateError::TooLarge { bytes: 70_000, max: MAX_UPDATE_BYTES }.into()).await;
        assert_eq!(got, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(json["error"].as_str().unwrap().contains("65536"), "{json}");
    }
}
