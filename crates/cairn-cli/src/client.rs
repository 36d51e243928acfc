//! The HTTP client of every remote command: ingress's REST API and its SSE stream, at `CAIRN_URL`
//! with `CAIRN_TOKEN` as a bearer token. It turns transport failures and error answers into
//! [`CliError`]s once, so commands only handle the answers they expect.

use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::Value;

use crate::error::CliError;

/// Connecting may take this long before Cairn counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest plain call; a long poll adds its own wait to this.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A JSON answer with a success status.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub json: Value,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    /// `Bearer …`, marked sensitive so it is never printed by reqwest's `Debug`.
    auth: Option<HeaderValue>,
}

impl Client {
    /// A client of the ingress at `url` (`http` or `https`, optionally with a path prefix).
    pub fn new(url: &str, token: Option<&str>) -> Result<Client, CliError> {
        let base = Url::parse(url).map_err(|e| {
            CliError::usage(format!(
                "CAIRN_URL (or --url) {url:?} is not a URL ({e}); use e.g. http://127.0.0.1:8080"
            ))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(CliError::usage(format!(
                "CAIRN_URL (or --url) {url:?} must be an http:// or https:// URL, e.g. http://127.0.0.1:8080"
            )));
        }
        let auth = match token.filter(|t| !t.is_empty()) {
            None => None,
            Some(token) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    CliError::usage("CAIRN_TOKEN (or --token) holds characters a header cannot carry")
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("cairn-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Other(anyhow::anyhow!("cannot build the HTTP client: {e}")))?;
        Ok(Client { http, base, auth })
    }

    /// The base URL, as messages name it.
    pub fn base(&self) -> &str {
        self.base.as_str()
    }

    /// The URL of `segments` below the base; each segment is percent-encoded as needed.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked: the base URL can be a base").pop_if_empty().extend(segments);
        url
    }

    pub fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        self.request_url(method, self.url(segments))
    }

    /// A call to `url` with the token, when there is one.
    pub fn request_url(&self, method: Method, url: Url) -> RequestBuilder {
        let mut request = self.http.request(method, url).header(ACCEPT, "application/json");
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        request
    }

    /// Sends a call expecting a JSON answer: a success status gives the body, anything else the
    /// error it stands for. `wait` is how long the server may hold the call (`Prefer: wait`).
    pub async fn call(&self, request: RequestBuilder, wait: Option<Duration>) -> Result<Answer, CliError> {
        let timeout = CALL_TIMEOUT + wait.unwrap_or_default();
        let response = self.send(request.timeout(timeout)).await?;
        let status = response.status();
        let text = response.text().await.map_err(|e| self.transport(&e))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() {
            let json = json.ok_or_else(|| CliError::Api {
                status: status.as_u16(),
                message: format!("{} answered {status} with a body that is not JSON", self.base),
            })?;
            return Ok(Answer { status, json });
        }
        Err(self.error_status(status, json.as_ref(), &text))
    }

    pub async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Value, CliError> {
        Ok(self.call(self.request(Method::GET, segments).query(query), None).await?.json)
    }

    /// Sends a request whose answer the caller reads itself (the SSE stream), or the error a
    /// failed connection stands for.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, CliError> {
        request.send().await.map_err(|e| self.transport(&e))
    }

    /// The error an answer with a failure status stands for.
    pub fn error_status(&self, status: StatusCode, json: Option<&Value>, text: &str) -> CliError {
        let message = error_message(status, json, text);
        let code = status.as_u16();
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                CliError::Unauthorized { status: code, message }
            }
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNPROCESSABLE_ENTITY => {
                CliError::Refused { message }
            }
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                CliError::Unavailable { url: self.base.to_string(), status: code, message }
            }
            _ => CliError::Api { status: code, message },
        }
    }

    /// A failed exchange: no connection at all, or one that broke.
    pub fn transport(&self, error: &reqwest::Error) -> CliError {
        CliError::Unreachable { url: self.base.to_string(), detail: describe(error) }
    }
}

/// What an error answer says, in words a user can act on.
fn error_message(status: StatusCode, json: Option<&Value>, text: &str) -> String {
    if let Some(json) = json {
        if json["missing"] == Value::Bool(true) {
            if let Some(key) = json["key"].as_str() {
                return format!("no progress at key {key} (`cairn watch {key}` waits for it to appear)");
            }
            if let Some(id) = json["id"].as_str() {
                return format!("no request {id} (`cairn requests` lists them)");
            }
        }
        for field in ["error", "message"] {
            if let Some(message) = json[field].as_str() {
                return message.to_owned();
            }
        }
    }
    let text = text.trim();
    if text.is_empty() {
        format!("the server answered {status}")
    } else {
        format!("the server answered {status}: {}", text.chars().take(200).collect::<String>())
    }
}

/// The innermost cause of a transport error (reqwest's own message only says "error sending
/// request").
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "no answer in time".to_owned();
    }
    let mut source: &dyn std::error::Error = error;
    while let Some(inner) = source.source() {
        source = inner;
    }
    source.to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn urls_keep_a_path_prefix_and_escape_segments() {
        let client = Client::new("https://example.com/cairn/", None).unwrap();
        assert_eq!(client.url(&["status", "_a.b"]).as_str(), "https://example.com/cairn/status/_a.b");
        assert_eq!(client.url(&["status", "a/b?c"]).as_str(), "https://example.com/cairn/status/a%2Fb%3Fc");
        let client = Client::new("http://127.0.0.1:8080", None).unwrap();
        assert_eq!(client.url(&["v1", "requests"]).as_str(), "http://127.0.0.1:8080/v1/requests");
    }

    #[test]
    fn bad_urls_are_usage_errors() {
        for url in ["127.0.0.1:8080", "ftp://h/", "not a url", "mailto:x@y"] {
            let Err(error) = Client::new(url, None) else { panic!("{url} accepted") };
            assert!(matches!(error, CliError::Usage(_)), "{url}: {error}");
            assert!(error.to_string().contains("CAIRN_URL"), "{error}");
        }
    }

    #[test]
    fn error_answers_are_classified() {
        let client = Client::new("http://h:1", None).unwrap();
        let error = |status: u16, body: Value| {
            client.error_status(StatusCode::from_u16(status).unwrap(), Some(&body), &body.to_string())
        };
        let missing = error(404, json!({"key": "_a.b", "missing": true}));
        assert_eq!(missing.exit() as u8, 1);
        assert!(missing.to_string().starts_with("no progress at key _a.b"), "{missing}");
        let refused = error(400, json!({"error": "progress must be a number"}));
        assert_eq!((refused.exit() as u8, refused.to_string()), (2, "progress must be a number".into()));
        assert_eq!(error(401, json!({"error": "missing token"})).exit() as u8, 4);
        assert_eq!(error(403, json!({"error": "outside scope"})).exit() as u8, 4);
        let busy = error(503, json!({"error": "retry shortly"}));
        assert_eq!(busy.exit() as u8, 3);
        assert!(busy.to_string().contains("http://h:1/"), "{busy}");
        let plain = client.error_status(StatusCode::INTERNAL_SERVER_ERROR, None, "boom");
        assert_eq!(plain.to_string(), "the server answered 500 Internal Server Error: boom");
    }
}
