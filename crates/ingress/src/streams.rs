//! Data streams written at a request's own stream keys before it is stored.
//!
//! Multipart submissions: `POST /v1/requests` with `multipart/form-data`, a part named `request`
//! holding the JSON submission first, then one part per data stream (the part's name is the
//! stream's name). Each part goes to Redis chunk by chunk as it arrives (the ingress holds at
//! most a chunk of it), its received bytes reported to `{progress_key}.streams.{name}`. The
//! submission is checked before any stream is read, so a refused one costs no storage; a stream
//! over its limit is answered 413 naming it, after the rest of the body is read and discarded
//! up to a bound.
//!
//! Uploads in another slot: on a Redis Cluster an upload of another partition than its request's
//! cannot be renamed into the request by the submission's step, so it is copied the same way,
//! chunk by chunk ([`copy_upload`]).

use cairn_auth::Grant;
use std::time::Duration;

use axum::body::Body;
use cairn_redis::blobs::{BlobError, BlobWriter, WriteMode};
use cairn_requests::{
    MAX_STREAMS, MAX_SUBMISSION_BYTES, StreamInfo, Submission, SubmitError, check_stream_name,
};
use futures::TryStreamExt as _;
use tokio::time::Instant;

use crate::requests::{NewRequest, Prepared, Requests, RequestsError, Submitted, stream_node};
use crate::uploads::REPORT_EVERY;
use cairn_progress::now_ms;

/// The part that holds the JSON submission.
pub const REQUEST_PART: &str = "request";

/// After a refusal, at most this much more of the body is read (and dropped) so the client,
/// still sending, gets the answer; then the connection closes.
pub const DISCARD_BOUND: u64 = 16 * 1024 * 1024;

/// The multipart boundary of a `multipart/form-data` content type, if it is one.
pub fn boundary(content_type: &str) -> Option<Result<String, RequestsError>> {
    let mime = content_type.split(';').next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    Some(
        multer::parse_boundary(content_type)
            .map_err(|e| RequestsError::BadStreams(format!("invalid multipart/form-data content type: {e}"))),
    )
}

/// Reads a multipart submission and queues it. `Err` with `discarded`: the body was refused
/// and the connection should close.
pub async fn submit(
    requests: &Requests,
    body: Body,
    boundary: String,
    wait: Option<Duration>,
    traceparent: Option<String>,
    grant: &Grant,
) -> Result<Submitted, RequestsError> {
    let submitted = try_submit(requests, body, boundary, wait, traceparent, grant).await;
    if let Err(error) = &submitted {
        crate::requests::record_rejection(match error {
            RequestsError::StreamTooLarge { .. } | RequestsError::StreamsTooLarge { .. } => "too_large",
            RequestsError::Invalid(e) if e.is_too_large() => "too_large",
            RequestsError::Overloaded { .. } | RequestsError::Busy => "backpressure",
            RequestsError::Unavailable => "unavailable",
            RequestsError::Internal => "internal",
            RequestsError::Denied(_) => "denied",
            _ => "invalid",
        });
    }
    submitted
}

async fn try_submit(
    requests: &Requests,
    body: Body,
    boundary: String,
    wait: Option<Duration>,
    traceparent: Option<String>,
    grant: &Grant,
) -> Result<Submitted, RequestsError> {
    let mut multipart = multer::Multipart::new(body.into_data_stream(), boundary);
    let first = multipart.next_field().await.map_err(bad_multipart)?.ok_or_else(|| {
        RequestsError::BadStreams("the multipart body is empty; its first part must be \"request\"".into())
    })?;
    if first.name() != Some(REQUEST_PART) {
        return Err(RequestsError::BadStreams(format!(
            "the first part must be named \"request\" and hold the JSON submission, got {:?}",
            first.name().unwrap_or("")
        )));
    }
    let json = read_submission(first).await?;
    let _parsing = requests.parse_budget(json.len()).await?;
    let submission = Submission::from_slice(&json)?;
    let new = match requests.prepare(submission, wait, grant).await? {
        Prepared::Answered(submitted) => return Ok(*submitted),
        Prepared::New(new) => *new,
    };
    let mut received: Vec<StreamInfo> = Vec::new();
    match receive(requests, &new, &mut multipart, &mut received).await {
        Ok(()) => requests.queue_new(new, received, wait, traceparent).await,
        Err(error) => {
            requests.drop_streams(&new.record.id, &new.record.progress_key, &received).await;
            if matches!(error, RequestsError::StreamTooLarge { .. } | RequestsError::StreamsTooLarge { .. }) {
                discard(&mut multipart).await;
            }
            Err(error)
        }
    }
}

async fn read_submission(mut field: multer::Field<'_>) -> Result<Vec<u8>, RequestsError> {
    let mut json = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(bad_multipart)? {
        if json.len() + chunk.len() > MAX_SUBMISSION_BYTES {
            return Err(SubmitError::BodyTooLarge {
                bytes: json.len() + chunk.len(),
                max: MAX_SUBMISSION_BYTES,
            }
            .into());
        }
        json.extend_from_slice(&chunk);
    }
    Ok(json)
}

/// Stores every stream part at the request's stream keys; `received` lists what was written
/// (also when it fails, so the caller can remove it).
async fn receive(
    requests: &Requests,
    new: &NewRequest,
    multipart: &mut multer::Multipart<'_>,
    received: &mut Vec<StreamInfo>,
) -> Result<(), RequestsError> {
    let settings = requests.settings();
    let record = &new.record;
    let mut total = new.upload_bytes;
    let expire_at = stream_expire_at(requests);
    while let Some(mut field) = multipart.next_field().await.map_err(bad_multipart)? {
        let name = field.name().unwrap_or("").to_owned();
        check_stream_name(&name).map_err(RequestsError::BadStreams)?;
        if received.iter().any(|s| s.name == name) || new.uploads.iter().any(|(s, _)| s.name == name) {
            return Err(RequestsError::BadStreams(format!("data stream {name:?} is named twice")));
        }
        if received.len() + new.uploads.len() >= MAX_STREAMS {
            return Err(RequestsError::BadStreams(format!(
                "a request may have at most {MAX_STREAMS} data streams"
            )));
        }
        stream_node(&record.progress_key, &name)?;
        let base = requests.blobs().stream_key(&record.id, &name);
        blob_call(requests.blobs().create(&base, &[], now_ms(), Some(expire_at))).await?;
        received.push(StreamInfo { name: name.clone(), bytes: 0 });
        let mut writer =
            BlobWriter::new(requests.blobs().clone(), base, 0, WriteMode::Direct, Some(expire_at));
        requests.report_stream(&record.progress_key, &name, 0, None).await;
        let mut last_report = Instant::now();
        while let Some(chunk) = field.chunk().await.map_err(bad_multipart)? {
            let len = chunk.len() as u64;
            if writer.written() + len > settings.max_stream_bytes {
                return Err(RequestsError::StreamTooLarge { name, max: settings.max_stream_bytes });
            }
            total += len;
            if total > settings.max_request_stream_bytes {
                return Err(RequestsError::StreamsTooLarge { name, max: settings.max_request_stream_bytes });
            }
            blob_call(writer.write(chunk)).await?;
            if last_report.elapsed() >= REPORT_EVERY {
                last_report = Instant::now();
                requests.report_stream(&record.progress_key, &name, writer.written(), None).await;
            }
        }
        let bytes = blob_call(writer.finish()).await?;
        if let Some(stream) = received.last_mut() {
            stream.bytes = bytes;
        }
        requests.report_stream(&record.progress_key, &name, bytes, Some(bytes)).await;
    }
    Ok(())
}

/// Until when a stream written for a request that is not stored yet may stay: its keys expire
/// then unless the submission's step, which persists its request's streams, stored it.
fn stream_expire_at(requests: &Requests) -> i64 {
    now_ms() + i64::try_from(requests.settings().stream_expiry.as_millis()).unwrap_or(i64::MAX / 2)
}

/// Copies the finished upload `upload` to the data stream `name` of request `id`, a chunk at a
/// time: for a request whose streams are in another slot than the upload (a Redis Cluster,
/// another partition). The copy expires as a multipart stream does until its request is stored;
/// one that fails is removed. An upload gone meanwhile is [`RequestsError::UploadMissing`].
pub(crate) async fn copy_upload(
    requests: &Requests,
    id: &str,
    name: &str,
    upload: &str,
) -> Result<(), RequestsError> {
    let blobs = requests.blobs();
    let (source, target) = (blobs.upload_key(upload), blobs.stream_key(id, name));
    let missing = || RequestsError::UploadMissing { name: name.to_owned(), upload: upload.to_owned() };
    let copy = async {
        let info = blob_call(blobs.info(&source)).await?.ok_or_else(missing)?;
        let expire_at = stream_expire_at(requests);
        let mut fields = vec![("length", info.offset.to_string())];
        fields.extend(info.fields.get("metadata").map(|metadata| ("metadata", metadata.clone())));
        blob_call(blobs.create(&target, &fields, now_ms(), Some(expire_at))).await?;
        let mut writer =
            BlobWriter::new(blobs.clone(), target.clone(), 0, WriteMode::Direct, Some(expire_at));
        let mut chunks = std::pin::pin!(blobs.read(&source));
        loop {
            match tokio::time::timeout(crate::requests::REDIS_TIMEOUT, chunks.try_next()).await {
                Ok(Ok(Some(chunk))) => blob_call(writer.write(chunk)).await?,
                Ok(Ok(None)) => break,
                Ok(Err(BlobError::Missing)) => return Err(missing()),
                Ok(Err(error)) => {
                    tracing::warn!(%error, upload, "cannot read an upload to copy");
                    return Err(RequestsError::Unavailable);
                }
                Err(_) => return Err(RequestsError::Unavailable),
            }
        }
        let bytes = blob_call(writer.finish()).await?;
        if bytes != info.offset {
            // Only a deletion changes a finished upload: it went away while it was read.
            return Err(missing());
        }
        Ok(())
    };
    let copied = copy.await;
    if copied.is_err() {
        let _ = blob_call(blobs.delete(&target)).await;
    }
    copied
}

/// Reads and drops the rest of a refused body, up to [`DISCARD_BOUND`].
async fn discard(multipart: &mut multer::Multipart<'_>) {
    let mut dropped = 0u64;
    while let Ok(Some(mut field)) = multipart.next_field().await {
        while let Ok(Some(chunk)) = field.chunk().await {
            dropped += chunk.len() as u64;
            if dropped > DISCARD_BOUND {
                return;
            }
        }
    }
}

fn bad_multipart(error: multer::Error) -> RequestsError {
    RequestsError::BadStreams(format!("cannot read the multipart body: {error}"))
}

async fn blob_call<T>(
    future: impl Future<Output = Result<T, cairn_redis::BlobError>>,
) -> Result<T, RequestsError> {
    match tokio::time::timeout(crate::requests::REDIS_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot store a data stream");
            Err(RequestsError::Unavailable)
        }
        Err(_) => Err(RequestsError::Unavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_form_data_is_multipart() {
        assert!(boundary("application/json").is_none());
        assert_eq!(boundary("multipart/form-data; boundary=abc").unwrap().unwrap(), "abc");
        assert!(boundary("multipart/form-data").unwrap().is_err());
    }
}
