//! Built-in handlers and the handlers file that names and configures them.

pub mod command;
pub mod config;
pub mod echo;
pub mod http;

pub use cairn_runtime::handlers_file::{ConfigError, HandlerSpec};
pub use command::CommandHandler;
pub use config::default_handlers;
pub use echo::Echo;
pub use http::HttpHandler;

/// Progress reports of a handler run in a unit test: dropped.
#[cfg(test)]
struct Discard;

#[cfg(test)]
impl crate::handler::ProgressSink for Discard {
    fn send(&self, _key: cairn_progress::Key, _update: cairn_progress::Update, _traceparent: Option<&str>) {}
}

/// A context for running a handler in tests: progress reports are dropped.
#[cfg(test)]
pub(crate) fn test_context(payload: serde_json::Value) -> crate::handler::Context {
    crate::handler::Context {
        request_id: "0198c0de-0000-7000-8000-000000000001".into(),
        handler: "test".into(),
        payload,
        attempt: 1,
        progress_key: cairn_progress::Key::parse("_requests.0198c0de").unwrap(),
        progress_url: "http://127.0.0.1:8080/status/_requests.0198c0de".into(),
        progress_token: None,
        traceparent: None,
        cancel: tokio_util::sync::CancellationToken::new(),
        streams: crate::streams::Streams::none(&cairn_progress::Key::parse("_requests.0198c0de").unwrap()),
        last_progress: std::sync::Arc::new(crate::handler::LastProgress::new()),
        publisher: std::sync::Arc::new(Discard),
    }
}
