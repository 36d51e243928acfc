//! tus 1.0.0 over HTTP under `/v1/uploads`: `OPTIONS` (discovery), `POST` (creation, with an
//! optional first body: creation-with-upload), `HEAD` (offset), `PATCH` (append at an offset) and
//! `DELETE` (termination). Every answer but `OPTIONS` carries `Tus-Resumable: 1.0.0`; a request
//! for another protocol version gets 412. Bodies are streamed into Redis chunk by chunk, never
//! held whole. `Location` is relative (`/v1/uploads/{id}`), so uploads work behind any proxy.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use cairn_error::ServiceError as _;
use cairn_requests::is_valid_request_id;
use serde_json::json;

use crate::uploads::{Algorithm, Checksum, UploadError, Uploads};

const TUS_VERSION: &str = "1.0.0";
const EXTENSIONS: &str = "creation,creation-with-upload,termination,expiration,checksum";
const OFFSET_CONTENT_TYPE: &str = "application/offset+octet-stream";

const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
const UPLOAD_METADATA: HeaderName = HeaderName::from_static("upload-metadata");
const UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");
const UPLOAD_CHECKSUM: HeaderName = HeaderName::from_static("upload-checksum");
const UPLOAD_DEFER_LENGTH: HeaderName = HeaderName::from_static("upload-defer-length");

pub(crate) fn router(uploads: Arc<Uploads>) -> Router {
    Router::new()
        .route("/v1/uploads", post(create).options(options))
        .route("/v1/uploads/{id}", any(upload))
        .with_state(uploads)
}

/// An answer of the tus API: status, headers, and for errors a JSON body naming the problem.
struct Tus {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Option<serde_json::Value>,
}

impl Tus {
    fn new(status: StatusCode) -> Tus {
        let headers = vec![(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION))];
        Tus { status, headers, body: None }
    }

    fn header(mut self, name: HeaderName, value: impl ToString) -> Tus {
        if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
            self.headers.push((name, value));
        }
        self
    }

    fn expires(self, at_ms: i64) -> Tus {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(at_ms).unwrap_or(0));
        self.header(UPLOAD_EXPIRES, httpdate::fmt_http_date(at))
    }
}

impl IntoResponse for Tus {
    fn into_response(self) -> Response {
        let headers: HeaderMap = self.headers.into_iter().collect();
        match self.body {
            Some(body) => (self.status, headers, axum::Json(body)).into_response(),
            None => (self.status, headers).into_response(),
        }
    }
}

impl From<UploadError> for Tus {
    fn from(error: UploadError) -> Tus {
        let status = match &error {
            // tus's own status for a checksum mismatch.
            UploadError::ChecksumMismatch { .. } => {
                StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST)
            }
            other => other.kind().http_status(),
        };
        let mut tus = Tus::new(status);
        if let UploadError::OffsetMismatch { offset, .. } = &error {
            tus = tus.header(UPLOAD_OFFSET, offset);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tus = tus.header(header::RETRY_AFTER, 1);
        }
        tus.body = Some(json!({ "error": error.to_string() }));
        tus
    }
}

fn bad(message: impl Into<String>) -> Tus {
    UploadError::BadRequest(message.into()).into()
}

/// Refuses a request for a protocol version other than 1.0.0 (412, naming the version spoken).
fn check_version(headers: &HeaderMap) -> Result<(), Tus> {
    match headers.get(&TUS_RESUMABLE).map(HeaderValue::to_str) {
        Some(Ok(TUS_VERSION)) => Ok(()),
        Some(_) => {
            let mut tus = Tus::new(StatusCode::PRECONDITION_FAILED)
                .header(HeaderName::from_static("tus-version"), TUS_VERSION);
            tus.body = Some(
                json!({ "error": format!("this server speaks tus {TUS_VERSION}; send Tus-Resumable: {TUS_VERSION}") }),
            );
            Err(tus)
        }
        None => Err(bad(format!("the Tus-Resumable header is required (Tus-Resumable: {TUS_VERSION})"))),
    }
}

fn number_header(headers: &HeaderMap, name: &HeaderName) -> Result<Option<u64>, Tus> {
    let Some(value) = headers.get(name) else { return Ok(None) };
    let text = value.to_str().unwrap_or("");
    text.parse::<u64>()
        .map(Some)
        .map_err(|_| bad(format!("{name} must be a non-negative integer, got {text:?}")))
}

fn text_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, Tus> {
    headers
        .get(name)
        .map(|v| v.to_str().map_err(|_| bad(format!("{name} must be visible ASCII"))))
        .transpose()
}

fn checksum_header(headers: &HeaderMap) -> Result<Option<Checksum>, Tus> {
    text_header(headers, &UPLOAD_CHECKSUM)?.map(Checksum::parse).transpose().map_err(Tus::from)
}

/// Whether the body is tus data (`Content-Type: application/offset+octet-stream`).
fn is_offset_stream(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(OFFSET_CONTENT_TYPE))
    })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// `OPTIONS /v1/uploads`: what this server supports.
async fn options(State(uploads): State<Arc<Uploads>>) -> Response {
    Tus::new(StatusCode::NO_CONTENT)
        .header(HeaderName::from_static("tus-version"), TUS_VERSION)
        .header(HeaderName::from_static("tus-extension"), EXTENSIONS)
        .header(HeaderName::from_static("tus-max-size"), uploads.settings().max_bytes)
        .header(HeaderName::from_static("tus-checksum-algorithm"), Algorithm::ADVERTISED)
        .into_response()
}

/// `POST /v1/uploads`: a new upload of `Upload-Length` bytes, with `Upload-Metadata` kept; a
/// body of `application/offset+octet-stream` is its first bytes.
async fn create(State(uploads): State<Arc<Uploads>>, headers: HeaderMap, body: Body) -> Response {
    match create_upload(&uploads, &headers, body).await {
        Ok(tus) | Err(tus) => tus.into_response(),
    }
}

async fn create_upload(uploads: &Uploads, headers: &HeaderMap, body: Body) -> Result<Tus, Tus> {
    check_version(headers)?;
    if headers.contains_key(&UPLOAD_DEFER_LENGTH) {
        return Err(bad("Upload-Defer-Length is not supported: send Upload-Length"));
    }
    let length =
        number_header(headers, &UPLOAD_LENGTH)?.ok_or_else(|| bad("the Upload-Length header is required"))?;
    let metadata = text_header(headers, &UPLOAD_METADATA)?;
    let checksum = checksum_header(headers)?;
    let (id, mut expires) = uploads.create(length, metadata).await?;
    let location = format!("/v1/uploads/{id}");
    let mut tus = Tus::new(StatusCode::CREATED).header(header::LOCATION, &location);
    if is_offset_stream(headers) {
        match uploads.append(&id, 0, checksum, content_length(headers), body.into_data_stream()).await {
            Ok((offset, at)) => {
                expires = at;
                tus = tus.header(UPLOAD_OFFSET, offset);
            }
            // The upload exists; the client learns its offset with HEAD and goes on.
            Err(error) => return Err(Tus::from(error).header(header::LOCATION, &location)),
        }
    }
    Ok(tus.expires(expires))
}

/// `/v1/uploads/{id}`: `HEAD`, `PATCH`, `DELETE` (and `OPTIONS`).
async fn upload(
    State(uploads): State<Arc<Uploads>>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method == Method::OPTIONS {
        return options(State(uploads)).await;
    }
    let answer = async {
        if !is_valid_request_id(&id) {
            return Err(Tus::from(UploadError::Missing { id: id.chars().take(64).collect() }));
        }
        check_version(&headers)?;
        match method {
            Method::HEAD => head(&uploads, &id).await,
            Method::PATCH => patch(&uploads, &id, &headers, body).await,
            Method::DELETE => {
                uploads.terminate(&id).await?;
                Ok(Tus::new(StatusCode::NO_CONTENT))
            }
            _ => {
                let mut tus = Tus::new(StatusCode::METHOD_NOT_ALLOWED)
                    .header(header::ALLOW, "HEAD, PATCH, DELETE, OPTIONS");
                tus.body = Some(
                    json!({ "error": format!("{method} is not allowed on an upload; use HEAD, PATCH or DELETE") }),
                );
                Err(tus)
            }
        }
    };
    match answer.await {
        Ok(tus) | Err(tus) => tus.into_response(),
    }
}

async fn head(uploads: &Uploads, id: &str) -> Result<Tus, Tus> {
    let state = uploads.state(id).await?;
    let mut tus = Tus::new(StatusCode::OK)
        .header(UPLOAD_OFFSET, state.offset)
        .header(UPLOAD_LENGTH, state.length)
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(metadata) = &state.metadata {
        tus = tus.header(UPLOAD_METADATA, metadata);
    }
    if let Some(at) = state.expires_ms {
        tus = tus.expires(at);
    }
    Ok(tus)
}

async fn patch(uploads: &Uploads, id: &str, headers: &HeaderMap, body: Body) -> Result<Tus, Tus> {
    if !is_offset_stream(headers) {
        let mut tus = Tus::new(StatusCode::UNSUPPORTED_MEDIA_TYPE);
        tus.body =
            Some(json!({ "error": format!("a PATCH body must be Content-Type: {OFFSET_CONTENT_TYPE}") }));
        return Err(tus);
    }
    let offset =
        number_header(headers, &UPLOAD_OFFSET)?.ok_or_else(|| bad("the Upload-Offset header is required"))?;
    let checksum = checksum_header(headers)?;
    let (offset, expires) =
        uploads.append(id, offset, checksum, content_length(headers), body.into_data_stream()).await?;
    Ok(Tus::new(StatusCode::NO_CONTENT).header(UPLOAD_OFFSET, offset).expires(expires))
}
