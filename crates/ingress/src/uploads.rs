//! Resumable uploads (the tus 1.0.0 protocol's core, `creation`, `creation-with-upload`,
//! `termination`, `expiration` and `checksum`), free of HTTP: an upload is a blob in Redis
//! (`cairn_redis::blobs`) that grows chunk by chunk until it has its declared length, then waits
//! for a request to use it as a data stream, or expires.
//!
//! Expiry is Redis's: every write moves the upload's `PEXPIREAT` to now + `CAIRN_UPLOAD_EXPIRY`,
//! so an upload untouched that long disappears with its bytes, and is answered 404 from then on.
//! Its progress node `_uploads.{id}` shows `bytes`, `total_bytes` and `progress` as it grows.

use std::time::Duration;

use bytes::Bytes;
use cairn_progress::{Key, Update};
use cairn_redis::ProgressStore;
use cairn_redis::blobs::{BlobError, BlobInfo, BlobStore, BlobWriter, WriteMode};
use cairn_redis::progress::Change;
use futures::{Stream, StreamExt as _};
use sha1::Digest as _;
use tokio::time::Instant;
use tracing::{info, warn};

use cairn_progress::now_ms;

use crate::requests::REDIS_TIMEOUT;

/// How often a growing upload or stream reports its bytes to its progress node.
pub const REPORT_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("no upload {id}: it never existed, expired, was deleted or was used by a request")]
    Missing { id: String },
    #[error("Upload-Offset is {given} but the upload has {offset} bytes; resume from {offset}")]
    OffsetMismatch { given: u64, offset: u64 },
    #[error("Upload-Length {length} is more than the largest upload, {max} bytes")]
    TooLarge { length: u64, max: u64 },
    #[error("the upload would pass its Upload-Length of {length} bytes")]
    PastLength { length: u64 },
    #[error("Upload-Checksum does not match the bytes received ({algorithm}); they were discarded")]
    ChecksumMismatch { algorithm: &'static str },
    #[error("{0}")]
    BadRequest(String),
    /// The client stopped sending (or sent too slowly); what arrived is kept unless checksummed.
    #[error("the upload body was cut off: {0}")]
    Body(String),
    #[error("the upload store is unavailable; retry shortly")]
    Unavailable,
}

impl cairn_error::ServiceError for UploadError {
    fn kind(&self) -> cairn_error::ErrorKind {
        use cairn_error::ErrorKind;
        match self {
            UploadError::Missing { .. } => ErrorKind::NotFound,
            UploadError::OffsetMismatch { .. } => ErrorKind::Conflict,
            UploadError::TooLarge { .. } | UploadError::PastLength { .. } => ErrorKind::TooLarge,
            UploadError::ChecksumMismatch { .. } | UploadError::BadRequest(_) | UploadError::Body(_) => {
                ErrorKind::BadRequest
            }
            UploadError::Unavailable => ErrorKind::Unavailable,
        }
    }
}

/// A checksum algorithm of the tus `checksum` extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha1,
    Sha256,
}

impl Algorithm {
    pub const ADVERTISED: &'static str = "sha1,sha256";

    fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
        }
    }
}

/// `Upload-Checksum: <algorithm> <base64 digest>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: Algorithm,
    pub digest: Vec<u8>,
}

impl Checksum {
    pub fn parse(header: &str) -> Result<Checksum, UploadError> {
        use base64::Engine as _;
        let (name, value) = header.trim().split_once(' ').ok_or_else(|| {
            UploadError::BadRequest(format!(
                "Upload-Checksum must be \"<algorithm> <base64 digest>\", got {header:?}"
            ))
        })?;
        let algorithm = match name.to_ascii_lowercase().as_str() {
            "sha1" => Algorithm::Sha1,
            "sha256" => Algorithm::Sha256,
            other => {
                return Err(UploadError::BadRequest(format!(
                    "unsupported checksum algorithm {other:?}; supported: {}",
                    Algorithm::ADVERTISED
                )));
            }
        };
        let digest = base64::engine::general_purpose::STANDARD.decode(value.trim()).map_err(|_| {
            UploadError::BadRequest(format!("Upload-Checksum digest {value:?} is not base64"))
        })?;
        Ok(Checksum { algorithm, digest })
    }
}

enum Hasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

/// Checks `Upload-Metadata`: comma-separated `key base64value` pairs (the value optional), keys
/// unique, without spaces or commas.
pub fn check_metadata(header: &str) -> Result<(), UploadError> {
    use base64::Engine as _;
    let mut seen = std::collections::BTreeSet::new();
    for pair in header.split(',') {
        let pair = pair.trim();
        let (key, value) = pair.split_once(' ').unwrap_or((pair, ""));
        if key.is_empty() || !key.is_ascii() {
            return Err(UploadError::BadRequest(format!(
                "Upload-Metadata has an empty or non-ASCII key in {pair:?}"
            )));
        }
        if !seen.insert(key) {
            return Err(UploadError::BadRequest(format!("Upload-Metadata names the key {key:?} twice")));
        }
        if !value.is_empty() && base64::engine::general_purpose::STANDARD.decode(value.trim()).is_err() {
            return Err(UploadError::BadRequest(format!("Upload-Metadata value of {key:?} is not base64")));
        }
    }
    Ok(())
}

/// An upload as HEAD shows it.
#[derive(Debug, Clone)]
pub struct UploadState {
    pub offset: u64,
    pub length: u64,
    pub metadata: Option<String>,
    pub expires_ms: Option<i64>,
}

impl UploadState {
    fn from_info(info: &BlobInfo) -> UploadState {
        UploadState {
            offset: info.offset,
            length: info.length.unwrap_or(0),
            metadata: info.fields.get("metadata").cloned().filter(|m| !m.is_empty()),
            expires_ms: info.expires_ms,
        }
    }
}

/// Settings of the upload API.
#[derive(Debug, Clone)]
pub struct UploadSettings {
    /// Largest upload (also the largest data stream).
    pub max_bytes: u64,
    /// An upload untouched this long expires with its bytes.
    pub expiry: Duration,
}

/// The upload core of one replica.
pub struct Uploads {
    blobs: BlobStore,
    progress: ProgressStore,
    settings: UploadSettings,
}

impl Uploads {
    pub fn new(blobs: BlobStore, progress: ProgressStore, settings: UploadSettings) -> Uploads {
        Uploads { blobs, progress, settings }
    }

    pub fn settings(&self) -> &UploadSettings {
        &self.settings
    }

    fn expire_at(&self) -> i64 {
        now_ms() + i64::try_from(self.settings.expiry.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// Creates an empty upload of `length` bytes; its id and expiry (ms).
    pub async fn create(&self, length: u64, metadata: Option<&str>) -> Result<(String, i64), UploadError> {
        if length > self.settings.max_bytes {
            return Err(UploadError::TooLarge { length, max: self.settings.max_bytes });
        }
        if let Some(metadata) = metadata {
            check_metadata(metadata)?;
        }
        let id = uuid::Uuid::now_v7().hyphenated().to_string();
        let expires = self.expire_at();
        let fields = vec![("length", length.to_string()), ("metadata", metadata.unwrap_or("").to_owned())];
        let base = self.blobs.upload_key(&id);
        redis_call(self.blobs.create(&base, &fields, now_ms(), Some(expires))).await?;
        self.report(&id, 0, length, false).await;
        info!(upload = %id, length, "upload created");
        metrics::counter!("cairn_uploads_created_total").increment(1);
        Ok((id, expires))
    }

    /// The upload's offset, length, metadata and expiry.
    pub async fn state(&self, id: &str) -> Result<UploadState, UploadError> {
        let info = redis_call(self.blobs.info(&self.blobs.upload_key(id)))
            .await?
            .ok_or_else(|| UploadError::Missing { id: id.to_owned() })?;
        Ok(UploadState::from_info(&info))
    }

    /// Appends a PATCH body at `offset`; the new offset and expiry. Without a checksum every
    /// chunk counts as it is stored, so an interrupted body keeps what arrived; with one, the
    /// bytes count only once the digest matches. The body is consumed by a task of its own, so a
    /// client that goes away mid-body (which drops the HTTP handler) still has every byte that
    /// arrived stored, and resumes right after it.
    pub async fn append<S, E>(
        &self,
        id: &str,
        offset: u64,
        checksum: Option<Checksum>,
        declared: Option<u64>,
        body: S,
    ) -> Result<(u64, i64), UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let state = self.state(id).await?;
        if state.offset != offset {
            return Err(UploadError::OffsetMismatch { given: offset, offset: state.offset });
        }
        if declared.is_some_and(|n| offset + n > state.length) {
            return Err(UploadError::PastLength { length: state.length });
        }
        let job = Append {
            blobs: self.blobs.clone(),
            progress: self.progress.clone(),
            id: id.to_owned(),
            offset,
            length: state.length,
            checksum,
            expires: self.expire_at(),
        };
        match tokio::spawn(job.run(body)).await {
            Ok(outcome) => outcome,
            Err(error) => {
                warn!(upload = %id, %error, "upload body task failed");
                Err(UploadError::Unavailable)
            }
        }
    }

    /// Deletes an upload and its bytes (its progress node says so).
    pub async fn terminate(&self, id: &str) -> Result<(), UploadError> {
        let deleted = redis_call(self.blobs.delete(&self.blobs.upload_key(id))).await?;
        if !deleted {
            return Err(UploadError::Missing { id: id.to_owned() });
        }
        if let Ok(key) = upload_progress_key(id) {
            let update = Update::new().status("canceled").msg("upload deleted");
            let change = Change { key, update, time_ms: now_ms() };
            if let Err(error) = self.progress.apply(std::slice::from_ref(&change)).await {
                warn!(upload = %id, %error, "cannot mark the deleted upload's progress node");
            }
        }
        info!(upload = %id, "upload deleted");
        Ok(())
    }

    async fn report(&self, id: &str, bytes: u64, total: u64, done: bool) {
        report(&self.progress, id, bytes, total, done).await;
    }
}

/// One PATCH body being stored.
struct Append {
    blobs: BlobStore,
    progress: ProgressStore,
    id: String,
    offset: u64,
    length: u64,
    checksum: Option<Checksum>,
    expires: i64,
}

impl Append {
    async fn run<S, E>(self, body: S) -> Result<(u64, i64), UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display + Send,
    {
        let Append { blobs, progress, id, offset, length, checksum, expires } = self;
        let base = blobs.upload_key(&id);
        let mode = if checksum.is_some() { WriteMode::Staged } else { WriteMode::Direct };
        let mut writer = BlobWriter::new(blobs, base, offset, mode, Some(expires));
        let mut hasher = checksum.as_ref().map(|c| Hasher::new(c.algorithm));
        let mut last_report = Instant::now();
        let body = body.map(|frame| frame.map_err(|e| e.to_string()));
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.next().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => {
                    let kept = writer.abandon().await;
                    report(&progress, &id, kept, length, false).await;
                    return Err(UploadError::Body(error));
                }
            };
            if offset + writer.written() + frame.len() as u64 > length {
                let kept = writer.abandon().await;
                report(&progress, &id, kept, length, false).await;
                return Err(UploadError::PastLength { length });
            }
            if let Some(hasher) = &mut hasher {
                hasher.update(&frame);
            }
            if let Err(error) = writer.write(frame).await {
                return Err(write_failed(error, &id, offset, length));
            }
            if mode == WriteMode::Direct && last_report.elapsed() >= REPORT_EVERY {
                last_report = Instant::now();
                report(&progress, &id, writer.offset(), length, false).await;
            }
        }
        if let (Some(hasher), Some(checksum)) = (hasher, &checksum)
            && hasher.finish() != checksum.digest
        {
            writer.abandon().await;
            metrics::counter!("cairn_uploads_checksum_mismatch_total").increment(1);
            return Err(UploadError::ChecksumMismatch { algorithm: checksum.algorithm.name() });
        }
        let new_offset = match writer.finish().await {
            Ok(new_offset) => new_offset,
            Err(error) => return Err(write_failed(error, &id, offset, length)),
        };
        metrics::counter!("cairn_uploads_bytes_total").increment(new_offset - offset);
        let done = new_offset == length;
        report(&progress, &id, new_offset, length, done).await;
        if done {
            info!(upload = %id, bytes = new_offset, "upload complete");
        }
        Ok((new_offset, expires))
    }
}

/// Writes the upload's byte count to `_uploads.{id}`; a failure is logged, never the client's
/// problem.
async fn report(progress: &ProgressStore, id: &str, bytes: u64, total: u64, done: bool) {
    let Ok(key) = upload_progress_key(id) else { return };
    let update = bytes_update(bytes, total, done);
    let change = Change { key, update, time_ms: now_ms() };
    let applied = tokio::time::timeout(REDIS_TIMEOUT, progress.apply(std::slice::from_ref(&change))).await;
    if !matches!(applied, Ok(Ok(_))) {
        warn!(upload = %id, "cannot report the upload's progress");
    }
}

fn write_failed(error: BlobError, id: &str, given: u64, length: u64) -> UploadError {
    match error {
        BlobError::Offset { offset, .. } => UploadError::OffsetMismatch { given, offset },
        BlobError::TooLong { .. } => UploadError::PastLength { length },
        BlobError::Missing => UploadError::Missing { id: id.to_owned() },
        error => {
            warn!(%error, "cannot store upload bytes");
            UploadError::Unavailable
        }
    }
}

/// The progress update of a byte counter: `bytes`, `total_bytes`, `progress` and a status.
pub fn bytes_update(bytes: u64, total: u64, done: bool) -> Update {
    #[allow(clippy::cast_precision_loss)]
    let progress =
        if total == 0 { if done { 1.0 } else { 0.0 } } else { (bytes as f64 / total as f64).min(1.0) };
    Update::new()
        .progress(progress)
        .status(if done { "finished" } else { "running" })
        .field("bytes", bytes)
        .field("total_bytes", total)
}

/// `_uploads.{id}`.
pub fn upload_progress_key(id: &str) -> Result<Key, cairn_progress::KeyError> {
    Key::parse(&format!("_uploads.{id}"))
}

/// Runs one Redis call within [`REDIS_TIMEOUT`].
async fn redis_call<T>(future: impl Future<Output = Result<T, BlobError>>) -> Result<T, UploadError> {
    match tokio::time::timeout(REDIS_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => {
            warn!(%error, "upload store call failed");
            Err(UploadError::Unavailable)
        }
        Err(_) => {
            warn!(timeout = ?REDIS_TIMEOUT, "upload store did not answer in time");
            Err(UploadError::Unavailable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_parse() {
        let c = Checksum::parse("sha256 n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=").unwrap();
        assert_eq!(c.algorithm, Algorithm::Sha256);
        assert_eq!(c.digest.len(), 32);
        assert_eq!(Checksum::parse("SHA1 AAAA").unwrap().algorithm, Algorithm::Sha1);
        assert!(
            Checksum::parse("md5 AAAA").unwrap_err().to_string().contains("unsupported checksum algorithm")
        );
        assert!(Checksum::parse("sha256").is_err());
        assert!(Checksum::parse("sha256 !!").unwrap_err().to_string().contains("not base64"));
    }

    #[test]
    fn metadata_is_checked() {
        assert!(check_metadata("filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential").is_ok());
        assert!(check_metadata("a YQ==, a Yg==").unwrap_err().to_string().contains("twice"));
        assert!(check_metadata("a !!").unwrap_err().to_string().contains("not base64"));
    }

    #[test]
    fn byte_counts_become_progress() {
        let json = bytes_update(5, 10, false).to_json();
        assert_eq!(json["progress"], 0.5);
        assert_eq!(json["bytes"], 5);
        assert_eq!(json["total_bytes"], 10);
        assert_eq!(json["status"], "running");
        assert_eq!(bytes_update(0, 0, true).to_json()["progress"], 1.0);
    }
}
