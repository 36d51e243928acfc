//! What a request runs: the [`Handler`] trait, the [`Context`] a run gets, and how a run fails.
//!
//! Build a processor with your own handlers by registering them in a [`HandlerSet`] and passing it
//! to `App::build_with_handlers` (see `crates/example-processor`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_amqp::ProgressPublisher;
use cairn_progress::{Key, Update};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::streams::Streams;

/// Runs one attempt of a request. Return the result, or say whether the failure is worth
/// retrying. Stop promptly when `ctx.cancel` fires (cancellation, lost lease, shutdown).
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>>;
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    /// Worth another attempt later (upstream 5xx, timeout, a resource briefly away).
    #[error("{0}")]
    Retryable(String),
    /// Will fail the same way every time (bad payload, upstream 4xx): the request is dead.
    #[error("{0}")]
    Permanent(String),
}

/// Where a run's progress reports go: the AMQP [`ProgressPublisher`] in a processor, anything
/// else in tests or around a handler run outside one.
pub trait ProgressSink: Send + Sync + 'static {
    /// Queues `update` of `key`, within the trace `traceparent` (coalesced, never blocks, never
    /// fails).
    fn send(&self, key: Key, update: Update, traceparent: Option<&str>);
}

impl ProgressSink for ProgressPublisher {
    fn send(&self, key: Key, update: Update, traceparent: Option<&str>) {
        self.publish_traced(key, update, traceparent);
    }
}

/// Everything a handler knows about the attempt it runs.
pub struct Context {
    pub request_id: String,
    pub handler: String,
    pub payload: Value,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub progress_key: Key,
    /// `{ingress}/status/{progress_key}`: where an external program can POST its progress.
    pub progress_url: String,
    /// With auth on: a token that may write only this request's progress subtree, valid while
    /// the request may run. Never logged.
    pub progress_token: Option<String>,
    pub traceparent: Option<String>,
    /// Fires when the run must stop: cancellation requested, lease lost, or timeout.
    pub cancel: CancellationToken,
    /// The request's data streams: `streams.open(name)` reads one from its start.
    pub streams: Streams,
    pub(crate) publisher: Arc<dyn ProgressSink>,
    /// What `report` last said of `progress`; the processor's heartbeats carry it.
    pub(crate) last_progress: Arc<LastProgress>,
}

impl Context {
    /// The progress URL with the token as `?access_token=`, so a plain `curl -d … "$URL"`
    /// authenticates.
    pub fn progress_url_with_token(&self) -> String {
        match &self.progress_token {
            Some(token) => format!("{}?access_token={token}", self.progress_url),
            None => self.progress_url.clone(),
        }
    }

    /// Reports progress of this request's own node (coalesced, never blocks, never fails). Its
    /// `progress` also rides on the processor's next heartbeat into the request's record.
    pub fn report(&self, update: Update) {
        if let Some(progress) = update.progress {
            self.last_progress.set(progress);
        }
        self.publisher.send(self.progress_key.clone(), update, self.traceparent.as_deref());
    }

    /// Reports progress of a sub-step `{progress_key}.{step}`; it rolls up into the request's
    /// node by its weight. An invalid step name is ignored with a warning.
    pub fn report_step(&self, step: &str, update: Update) {
        match Key::parse(&format!("{}.{step}", self.progress_key)) {
            Ok(key) => self.publisher.send(key, update, self.traceparent.as_deref()),
            Err(error) => tracing::warn!(%error, step, "ignoring progress of an invalid step name"),
        }
    }
}

/// The latest progress a handler reported for its request's own node, shared with the heartbeat
/// loop (the bits of an `f64`; NaN while nothing was reported).
#[derive(Debug)]
pub(crate) struct LastProgress(AtomicU64);

impl LastProgress {
    pub(crate) fn new() -> LastProgress {
        LastProgress(AtomicU64::new(f64::NAN.to_bits()))
    }

    fn set(&self, progress: f64) {
        self.0.store(progress.to_bits(), Ordering::Relaxed);
    }

    /// The last value reported, if any (the queue keeps only values from 0 to 1 in the record).
    pub(crate) fn get(&self) -> Option<f64> {
        Some(f64::from_bits(self.0.load(Ordering::Relaxed))).filter(|p| !p.is_nan())
    }
}

/// The handlers a processor knows, by name.
#[derive(Clone, Default)]
pub struct HandlerSet {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl HandlerSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    pub fn insert(&mut self, name: impl Into<String>, handler: Arc<dyn Handler>) {
        self.handlers.insert(name.into(), handler);
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}
