//! The one place where failures become HTTP answers.
//!
//! Every error body is JSON, `{"error": "<message a user can act on>"}`, except a missing progress
//! node, which answers SCA's `{"key": …, "missing": true}`, and a missing request, which answers
//! `{"id": …, "missing": true}` in the same spirit. Messages from the aggregator are passed
//! on only when they describe the caller's mistake (`INVALID_ARGUMENT`, `NOT_FOUND`); anything
//! else is logged here and answered with a generic message, so internals never leak.

use std::error::Error as _;

use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use cairn_progress::{MAX_UPDATE_BYTES, UpdateError};
use serde_json::json;
use tonic::{Code, Status};

use crate::requests::RequestsError;

/// Seconds a client should wait before retrying a 503 or 429.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong; the message says what to change.
    #[error("{0}")]
    BadRequest(String),
    /// No progress node at this key (SCA's answer).
    #[error("no progress at key {key:?}")]
    Missing { key: String },
    #[error("{0}")]
    NotFound(String),
    /// No request with this id.
    #[error("no request {id}")]
    RequestMissing { id: String },
    /// The request conflicts with the state of what it names.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Refused whoever asks (a cross-site browser request); the message says why.
    #[error("{0}")]
    Forbidden(String),
    #[error(
        "request body is larger than {MAX_UPDATE_BYTES} bytes; an update may have at most 64 KiB of JSON"
    )]
    PayloadTooLarge,
    /// A request body over a limit other than the progress update's; the message names it.
    #[error("{0}")]
    TooLarge(String),
    #[error("too many requests; retry later")]
    TooManyRequests,
    /// This client went over CAIRN_RATE_LIMIT; it may try again after this many seconds.
    #[error("rate limit exceeded; retry after {0} s")]
    RateLimited(u64),
    /// No token, or a token that does not verify; the message says why (never the token).
    #[error("{0}")]
    Unauthorized(String),
    /// The client did not send its request in time; the message says what was late.
    #[error("{0}")]
    RequestTimeout(String),
    /// Backpressure: the queue is longer than the configured bound.
    #[error("{0}")]
    Overloaded(String),
    #[error("the progress aggregator is unavailable; retry shortly")]
    Unavailable,
    #[error("the progress aggregator did not answer in time; retry shortly")]
    Timeout,
    /// Redis, which holds the request queue, did not answer (in time).
    #[error("the request queue is unavailable; retry shortly")]
    QueueUnavailable,
    /// Details are logged where the error is classified, never sent.
    #[error("internal error; the ingress log has the details")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Missing { .. } | ApiError::NotFound(_) | ApiError::RequestMissing { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge | ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests | ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable | ApiError::Overloaded(_) | ApiError::QueueUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Missing { key } => json!({ "key": key, "missing": true }),
            ApiError::RequestMissing { id } => json!({ "id": id, "missing": true }),
            other => json!({ "error": other.to_string() }),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let ApiError::RateLimited(secs) = &self {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(*secs));
        } else if let ApiError::Unauthorized(_) = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        } else if self.status() == StatusCode::SERVICE_UNAVAILABLE
            || self.status() == StatusCode::TOO_MANY_REQUESTS
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        response
    }
}

/// The mapping from gRPC codes to HTTP: the aggregator's verdict on the caller's input passes
/// through, a dependency being away is retryable, everything else is our fault.
impl From<Status> for ApiError {
    fn from(status: Status) -> ApiError {
        match effective_code(&status) {
            Code::InvalidArgument => ApiError::BadRequest(status.message().to_owned()),
            Code::NotFound => ApiError::NotFound(status.message().to_owned()),
            Code::Unauthenticated => ApiError::Unauthorized(status.message().to_owned()),
            Code::PermissionDenied => ApiError::Forbidden(status.message().to_owned()),
            Code::Unavailable => {
                tracing::warn!(detail = status.message(), "progress aggregator unavailable");
                ApiError::Unavailable
            }
            Code::DeadlineExceeded => {
                tracing::warn!(detail = status.message(), "progress aggregator call timed out");
                ApiError::Timeout
            }
            Code::ResourceExhausted => {
                tracing::warn!(detail = status.message(), "progress aggregator refused a call as too much");
                ApiError::TooManyRequests
            }
            code => {
                tracing::error!(?code, detail = status.message(), "progress aggregator call failed");
                ApiError::Internal
            }
        }
    }
}

/// The status code, except that the client's own timeout (which tonic reports as `CANCELLED`
/// with a [`tonic::TimeoutExpired`] source) counts as `DEADLINE_EXCEEDED`.
fn effective_code(status: &Status) -> Code {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return Code::DeadlineExceeded;
        }
        source = error.source();
    }
    status.code()
}

impl From<cairn_auth::Denied> for ApiError {
    fn from(denied: cairn_auth::Denied) -> ApiError {
        ApiError::Forbidden(denied.0)
    }
}

impl From<cairn_auth::AuthError> for ApiError {
    fn from(error: cairn_auth::AuthError) -> ApiError {
        ApiError::Unauthorized(error.to_string())
    }
}

impl From<UpdateError> for ApiError {
    fn from(error: UpdateError) -> ApiError {
        match error {
            UpdateError::TooLarge { .. } => ApiError::PayloadTooLarge,
            UpdateError::InvalidJson { detail } => ApiError::BadRequest(format!("invalid JSON: {detail}")),
            other => ApiError::BadRequest(other.to_string()),
        }
    }
}

/// The request API's failures: the caller's mistakes pass through with their message, Redis
/// being away is retryable, the rest was logged where it happened.
impl From<RequestsError> for ApiError {
    fn from(error: RequestsError) -> ApiError {
        match error {
            RequestsError::Invalid(e) if e.is_too_large() => ApiError::TooLarge(e.to_string()),
            RequestsError::StreamTooLarge { .. } | RequestsError::StreamsTooLarge { .. } => {
                ApiError::TooLarge(error.to_string())
            }
            RequestsError::UploadMissing { .. } | RequestsError::BadStreams(_) => {
                ApiError::BadRequest(error.to_string())
            }
            RequestsError::UploadIncomplete { .. } => ApiError::Conflict(error.to_string()),
            RequestsError::Invalid(_) | RequestsError::UnknownHandler { .. } => {
                ApiError::BadRequest(error.to_string())
            }
            RequestsError::Overloaded { .. } | RequestsError::Busy => ApiError::Overloaded(error.to_string()),
            RequestsError::Missing { id } => ApiError::RequestMissing { id },
            RequestsError::NotDeadLetter { .. } => ApiError::NotFound(error.to_string()),
            RequestsError::IdempotencyConflict { .. }
            | RequestsError::AlreadyFinished { .. }
            | RequestsError::NotDead { .. } => ApiError::Conflict(error.to_string()),
            RequestsError::Unavailable => ApiError::QueueUnavailable,
            RequestsError::Denied(denied) => ApiError::Forbidden(denied.0),
            RequestsError::Internal => ApiError::Internal,
        }
    }
}

/// Fallback for paths no route serves.
pub(crate) async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

/// Fallback for a known path asked with a method it does not serve.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let (got, got_retry, json) = body(ApiError::from(status)).await;
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
        let (got, _, json) = body(ApiError::from(status)).await;
        assert_eq!(got, StatusCode::GATEWAY_TIMEOUT);
        assert!(json["error"].as_str().unwrap().contains("did not answer in time"));
        // A cancellation that is not our timeout stays an internal error.
        assert_eq!(body(ApiError::from(Status::cancelled("x"))).await.0, StatusCode::INTERNAL_SERVER_ERROR);
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
        let (got, _, json) = body(ApiError::Missing { key: "_test.a".into() }).await;
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
