//! A tus 1.0.0 client over the [`Client`]: create an upload (with its metadata), learn its
//! offset, append one chunk with its `Upload-Checksum`. Uploads are addressed by the `Location`
//! the server answered, resolved against the base URL (ingress answers a relative one).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::{Method, Response, StatusCode, Url};
use sha2::{Digest as _, Sha256};

use crate::client::Client;
use crate::error::CliError;

const TUS_RESUMABLE: &str = "Tus-Resumable";
const VERSION: &str = "1.0.0";
/// tus's status for a chunk whose `Upload-Checksum` does not match its bytes.
const CHECKSUM_MISMATCH: u16 = 460;

/// What appending a chunk came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// The server holds the bytes up to this offset.
    At(u64),
    /// The server's offset differs from ours (409): resume from this one.
    Conflict(u64),
    /// The bytes arrived damaged (460): send them again.
    Damaged,
}

/// `Upload-Metadata`: `key base64(value)` pairs, comma-separated.
pub fn metadata(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(key, value)| format!("{key} {}", BASE64.encode(value))).collect::<Vec<_>>().join(",")
}

/// `Upload-Checksum` of `bytes`: `sha256 <base64 digest>`.
pub fn checksum(bytes: &[u8]) -> String {
    format!("sha256 {}", BASE64.encode(Sha256::digest(bytes)))
}

/// The upload id at the end of its URL.
pub fn upload_id(url: &Url) -> &str {
    url.path_segments().and_then(|mut s| s.next_back()).unwrap_or_default()
}

impl Client {
    fn tus(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.request_url(method, url).header(TUS_RESUMABLE, VERSION)
    }

    /// Creates an upload of `length` bytes; its URL.
    pub async fn tus_create(&self, length: u64, metadata: &str) -> Result<Url, CliError> {
        let request = self
            .tus(Method::POST, self.url(&["v1", "uploads"]))
            .header("Upload-Length", length)
            .header("Upload-Metadata", metadata);
        let response = self.send(request.timeout(super::CALL_TIMEOUT)).await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.tus_error(response).await);
        }
        let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
            CliError::Other(anyhow::anyhow!("{} created an upload without a Location", self.base()))
        })?;
        self.resolve(location)
    }

    /// The server's offset of the upload, or `None` when it does not know it (expired, used).
    pub async fn tus_offset(&self, url: &Url) -> Result<Option<u64>, CliError> {
        let response = self.send(self.tus(Method::HEAD, url.clone()).timeout(super::CALL_TIMEOUT)).await?;
        match response.status() {
            StatusCode::OK => offset_header(&response).map(Some),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(None),
            _ => Err(self.tus_error(response).await),
        }
    }

    /// Appends `bytes` at `offset`, with their checksum.
    pub async fn tus_append(
        &self,
        url: &Url,
        offset: u64,
        bytes: bytes::Bytes,
    ) -> Result<Appended, CliError> {
        let request = self
            .tus(Method::PATCH, url.clone())
            .header(CONTENT_TYPE, "application/offset+octet-stream")
            .header("Upload-Offset", offset)
            .header("Upload-Checksum", checksum(&bytes))
            .body(bytes)
            .timeout(super::CALL_TIMEOUT);
        let response = self.send(request).await?;
        match response.status().as_u16() {
            204 | 200 => offset_header(&response).map(Appended::At),
            409 => match offset_header(&response) {
                Ok(offset) => Ok(Appended::Conflict(offset)),
                Err(_) => match self.tus_offset(url).await? {
                    Some(offset) => Ok(Appended::Conflict(offset)),
                    None => Err(CliError::Api { status: 404, message: format!("upload {url} is gone") }),
                },
            },
            CHECKSUM_MISMATCH => Ok(Appended::Damaged),
            _ => Err(self.tus_error(response).await),
        }
    }

    /// Ends an upload the server should forget.
    pub async fn tus_terminate(&self, url: &Url) -> Result<(), CliError> {
        let response = self.send(self.tus(Method::DELETE, url.clone()).timeout(super::CALL_TIMEOUT)).await?;
        match response.status() {
            StatusCode::NO_CONTENT | StatusCode::NOT_FOUND | StatusCode::GONE => Ok(()),
            _ => Err(self.tus_error(response).await),
        }
    }

    /// `location` (absolute or relative to the server) as a URL, kept below the base URL's
    /// host so a path prefix in `CAIRN_URL` still applies to a root-relative answer.
    fn resolve(&self, location: &str) -> Result<Url, CliError> {
        let base = self.url(&[]);
        let url = if location.starts_with('/') {
            // A root-relative Location names the path ingress sees; behind a proxy with a path
            // prefix, the prefix of CAIRN_URL goes in front.
            let prefix = base.path().trim_end_matches('/');
            let mut url = base.clone();
            url.set_path(&format!("{prefix}{location}"));
            Ok(url)
        } else {
            base.join(location)
        };
        url.map_err(|e| {
            CliError::Other(anyhow::anyhow!("the upload's Location {location:?} is not a URL: {e}"))
        })
    }

    async fn tus_error(&self, response: Response) -> CliError {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).ok();
        self.error_status(status, json.as_ref(), &text)
    }
}

fn offset_header(response: &Response) -> Result<u64, CliError> {
    response
        .headers()
        .get("Upload-Offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            CliError::Other(anyhow::anyhow!(
                "the server answered {} without an Upload-Offset",
                response.status()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_and_checksums_are_base64() {
        assert_eq!(metadata(&[("filename", "a/b.txt"), ("sha256", "")]), "filename YS9iLnR4dA==,sha256 ");
        // sha256("abc"), base64
        assert_eq!(checksum(b"abc"), "sha256 ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=");
    }

    #[test]
    fn locations_resolve_below_the_base() {
        let client = Client::new("http://h:1/cairn/", None).unwrap();
        let url = client.resolve("/v1/uploads/abc").unwrap();
        assert_eq!(url.as_str(), "http://h:1/cairn/v1/uploads/abc");
        assert_eq!(upload_id(&url), "abc");
        let client = Client::new("http://h:1", None).unwrap();
        assert_eq!(client.resolve("/v1/uploads/x").unwrap().as_str(), "http://h:1/v1/uploads/x");
        assert_eq!(client.resolve("http://o:2/v1/uploads/y").unwrap().as_str(), "http://o:2/v1/uploads/y");
    }
}
