//! `http`: POSTs the payload as JSON to a configured upstream and turns its answer into a result
//! or a retryable or permanent error. A request with data streams is sent as
//! `multipart/form-data` instead: a part `payload` (the JSON), then one part per stream (named
//! and with the file name of the stream), each streamed from Redis as the upstream reads it.
//!
//! The request carries `x-cairn-request-id`, `x-cairn-attempt`, `x-cairn-progress-url`,
//! `x-cairn-progress-key` and, when the request has one, `traceparent`, so the upstream can post
//! its own progress and join the trace. Answers:
//! - 2xx: success; the body is the result (JSON if it parses, else a string, `null` if empty).
//! - 408 and 429: retried — the upstream is busy, not the request wrong.
//! - other 4xx, and 3xx (redirects are not followed: a POST must not turn into a GET): permanent.
//! - 5xx, connection errors and timeouts: retried.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde_json::Value;

use crate::handler::{Context, Handler, HandlerError};
use cairn_runtime::handlers_file::{self, ConfigError};

/// A successful answer's body becomes the stored result; larger ones fail the request.
const MAX_RESULT_BYTES: usize = 1 << 20;
/// How much of an error answer's body goes into the error message.
const ERROR_BODY_BYTES: usize = 512;

pub struct HttpHandler {
    url: Url,
    timeout: Duration,
    client: reqwest::Client,
}

impl HttpHandler {
    /// `timeout` bounds each attempt: connecting, sending and reading the whole answer. `url` and
    /// `timeout` are checked as the handlers file checks them ([`handlers_file::http_url`]).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, ConfigError> {
        Self::with_url(handlers_file::http_url(url)?, timeout)
    }

    /// [`HttpHandler::new`] with a URL the handlers file already checked.
    pub(crate) fn with_url(url: Url, timeout: Duration) -> Result<Self, ConfigError> {
        let timeout = handlers_file::check_timeout(timeout)?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::invalid("url", format!("cannot build an HTTP client: {e}")))?;
        Ok(Self { url, timeout, client })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    async fn call(&self, ctx: &Context) -> Result<Value, HandlerError> {
        let request = self.client.post(self.url.clone()).headers(headers(ctx));
        let request =
            if ctx.streams.is_empty() { request.json(&ctx.payload) } else { request.multipart(form(ctx)?) };
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if status.is_success() {
            let body =
                read_body(response, MAX_RESULT_BYTES + 1).await.map_err(|e| self.transport_error(&e))?;
            if body.len() > MAX_RESULT_BYTES {
                return Err(HandlerError::Permanent(format!(
                    "upstream {} answered {status} with a body over {MAX_RESULT_BYTES} bytes; \
                     return a reference to large results instead",
                    self.url
                )));
            }
            return Ok(parse_output(&body));
        }

        // The body only explains the error: read its start, then drop the connection.
        let body = read_body(response, ERROR_BODY_BYTES).await.unwrap_or_default();
        let mut body = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_BYTES)]).into_owned();
        if body.is_empty() {
            body.push_str("(empty body)");
        }
        let message = format!("upstream answered {status}: {body}");
        if status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            Err(HandlerError::Retryable(message))
        } else {
            Err(HandlerError::Permanent(message))
        }
    }

    fn transport_error(&self, error: &reqwest::Error) -> HandlerError {
        let url = &self.url;
        let message = if error.is_timeout() {
            format!("POST {url} timed out after {:?}", self.timeout)
        } else if error.is_connect() {
            format!("POST {url}: cannot connect: {}", root_cause(error))
        } else {
            format!("POST {url} failed: {}", root_cause(error))
        };
        HandlerError::Retryable(message)
    }
}

/// The multipart body of a request with data streams: `payload`, then the streams in name order.
fn form(ctx: &Context) -> Result<reqwest::multipart::Form, HandlerError> {
    use reqwest::multipart::{Form, Part};
    let invalid =
        |e: reqwest::Error| HandlerError::Permanent(format!("cannot build the multipart body: {e}"));
    let payload = Part::text(ctx.payload.to_string()).mime_str("application/json").map_err(invalid)?;
    let mut form = Form::new().part("payload", payload);
    for stream in ctx.streams.list() {
        let Some(chunks) = ctx.streams.chunks(&stream.name) else { continue };
        let part = Part::stream_with_length(reqwest::Body::wrap_stream(chunks), stream.bytes)
            .file_name(stream.name.clone())
            .mime_str("application/octet-stream")
            .map_err(invalid)?;
        form = form.part(stream.name.clone(), part);
    }
    Ok(form)
}

impl Handler for HttpHandler {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async move {
            tokio::select! {
                biased;
                () = ctx.cancel.cancelled() => Err(HandlerError::Retryable("canceled".into())),
                result = self.call(ctx) => result,
            }
        }
        .boxed()
    }
}

fn headers(ctx: &Context) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut add = |name: &'static str, value: &str| match HeaderValue::from_str(value) {
        Ok(value) => {
            headers.insert(HeaderName::from_static(name), value);
        }
        // Only a traceparent read from a stream entry can be malformed; the request still runs.
        Err(_) => tracing::warn!(header = name, value, "not sending a header whose value is not valid"),
    };
    add("x-cairn-request-id", &ctx.request_id);
    add("x-cairn-attempt", &ctx.attempt.to_string());
    add("x-cairn-progress-url", &ctx.progress_url);
    add("x-cairn-progress-key", ctx.progress_key.as_str());
    if let Some(token) = &ctx.progress_token {
        add("x-cairn-progress-token", token);
    }
    if let Some(traceparent) = &ctx.traceparent {
        add("traceparent", traceparent);
    }
    headers
}

/// Reads the body until its end or until `limit` bytes are in, whichever comes first.
async fn read_body(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await? {
            Some(chunk) => body.extend_from_slice(&chunk[..chunk.len().min(limit - body.len())]),
            None => break,
        }
    }
    Ok(body)
}

/// JSON if the output parses as JSON, else the trimmed text as a JSON string; `null` if empty.
pub(crate) fn parse_output(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// reqwest's own message is "error sending request for url (…)"; the cause is at the bottom.
fn root_cause(error: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;
    use crate::handlers::test_context;

    /// A one-shot upstream: accepts one connection, reads the request (head and body), waits
    /// `delay`, answers `response` verbatim and closes. Yields the request text it read.
    async fn upstream(response: &'static str, delay: Duration) -> (String, oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/work", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).into_owned();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let length = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_owned)
                        })
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if request.len() >= head_end + 4 + length || n == 0 {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
            tokio::time::sleep(delay).await;
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
        (url, rx)
    }

    fn handler(url: &str) -> HttpHandler {
        HttpHandler::new(url, Duration::from_secs(5)).unwrap()
    }

    #[tokio::test]
    async fn success_returns_the_json_body_and_sends_the_headers() {
        let (url, request) = upstream(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"done\":42}",
            Duration::ZERO,
        )
        .await;
        let mut ctx = test_context(serde_json::json!({"width": 300}));
        ctx.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        ctx.attempt = 2;
        ctx.progress_token = Some("header.payload.signature".into());
        let result = handler(&url).handle(&ctx).await;
        assert_eq!(result, Ok(serde_json::json!({"done": 42})));

        let request = request.await.unwrap().to_ascii_lowercase();
        assert!(request.starts_with("post /work http/1.1\r\n"), "{request}");
        for header in [
            format!("x-cairn-request-id: {}", ctx.request_id),
            "x-cairn-attempt: 2".into(),
            format!("x-cairn-progress-url: {}", ctx.progress_url),
            format!("x-cairn-progress-key: {}", ctx.progress_key),
            "x-cairn-progress-token: header.payload.signature".into(),
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            "content-type: application/json".into(),
        ] {
            assert!(
                request.contains(&format!("\r\n{}\r\n", header.to_ascii_lowercase())),
                "{header} in {request}"
            );
        }
        assert!(request.ends_with("\r\n\r\n{\"width\":300}"), "{request}");
    }

    #[tokio::test]
    async fn success_with_text_or_empty_body() {
        let (url, _request) =
            upstream("HTTP/1.1 201 Created\r\ncontent-length: 7\r\n\r\n saved\n", Duration::ZERO).await;
        let ctx = test_context(Value::Null);
        assert_eq!(handler(&url).handle(&ctx).await, Ok(Value::String("saved".into())));

        let (url, request) = upstream("HTTP/1.1 204 No Content\r\n\r\n", Duration::ZERO).await;
        assert_eq!(handler(&url).handle(&ctx).await, Ok(Value::Null));
        assert!(!request.await.unwrap().to_ascii_lowercase().contains("traceparent"));
    }

    #[tokio::test]
    async fn client_errors_are_permanent_and_quote_the_body() {
        let (url, _request) =
            upstream("HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nno route!", Duration::ZERO).await;
        let result = handler(&url).handle(&test_context(Value::Null)).await;
        assert_eq!(result, Err(HandlerError::Permanent("upstream answered 404 Not Found: no route!".into())));
    }

    #[tokio::test]
    async fn error_bodies_are_cut_at_512_bytes() {
        let response: &'static str = Box::leak(
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 2000\r\n\r\n{}", "x".repeat(2000))
                .into_boxed_str(),
        );
        let (url, _request) = upstream(response, Duration::ZERO).await;
        let Err(HandlerError::Permanent(message)) = handler(&url).handle(&test_context(Value::Null)).await
        else {
            panic!("expected a permanent error");
        };
        assert_eq!(message, format!("upstream answered 400 Bad Request: {}", "x".repeat(512)));
    }

    #[tokio::test]
    async fn server_errors_and_throttling_are_retryable() {
        for (response, expected) in [
            (
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy",
                "upstream answered 503 Service Unavailable: busy",
            ),
            (
                "HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n",
                "upstream answered 429 Too Many Requests: (empty body)",
            ),
        ] {
            let (url, _request) = upstream(response, Duration::ZERO).await;
            let result = handler(&url).handle(&test_context(Value::Null)).await;
            assert_eq!(result, Err(HandlerError::Retryable(expected.into())));
        }
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let (url, _request) = upstream(
            "HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        let result = handler(&url).handle(&test_context(Value::Null)).await;
        assert!(
            matches!(result, Err(HandlerError::Permanent(ref m)) if m.starts_with("upstream answered 302 Found"))
        );
    }

    #[tokio::test]
    async fn a_slow_upstream_times_out_as_retryable() {
        let (url, _request) =
            upstream("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", Duration::from_secs(10)).await;
        let handler = HttpHandler::new(&url, Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let result = handler.handle(&test_context(Value::Null)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(result, Err(HandlerError::Retryable(format!("POST {url} timed out after 200ms"))));
    }

    #[tokio::test]
    async fn connection_errors_are_retryable_and_name_the_url() {
        // Bind then drop: nothing listens on the port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/work");
        let result = handler(&url).handle(&test_context(Value::Null)).await;
        let Err(HandlerError::Retryable(message)) = result else {
            panic!("expected retryable, got {result:?}")
        };
        assert!(message.starts_with(&format!("POST {url}: cannot connect: ")), "{message}");
    }

    #[tokio::test]
    async fn cancel_stops_the_call() {
        let (url, _request) =
            upstream("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", Duration::from_secs(10)).await;
        let ctx = test_context(Value::Null);
        let cancel = ctx.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            cancel.cancel();
        });
        let started = Instant::now();
        assert_eq!(handler(&url).handle(&ctx).await, Err(HandlerError::Retryable("canceled".into())));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn rejects_unusable_settings() {
        let message = |url: &str, timeout| HttpHandler::new(url, timeout).err().unwrap().to_string();
        assert!(message("not a url", Duration::from_secs(1)).starts_with("url: invalid URL \"not a url\""));
        assert!(message("https://example.com", Duration::from_secs(1)).contains("no TLS support"));
        assert!(message("ftp://example.com", Duration::from_secs(1)).contains("unsupported scheme \"ftp\""));
        assert_eq!(message("http://example.com", Duration::ZERO), "timeout: must be longer than 0s");
    }
}
