//! Traces over OTLP and W3C trace context.
//!
//! Configured only by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; without one, tracing is off), `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`grpc` or `http/protobuf`, the default), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
//!
//! Every service reports its own `service.name`, also when several share a process (`cairn dev`):
//! each named service gets its own batch processor and exporter with its own resource, and a span
//! goes to the one whose crate produced it (the span's `target`, e.g. `request_processor::worker`
//! belongs to `request-processor`). Spans of shared crates go to the first service named.
//!
//! Trace context crosses process boundaries as a W3C `traceparent` string: [`traceparent`] reads
//! it from a span, [`continue_trace`] makes a span the child of one.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::Value;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanProcessor};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// How long shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The tracer provider while tracing is on; [`Telemetry::shutdown`] flushes it.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub(crate) fn new(provider: SdkTracerProvider) -> Self {
        Self { provider: Some(provider) }
    }

    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn is_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporters (waits at most 5 s).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::warn!(%error, "could not export the last spans");
        }
    }
}

/// The endpoint variable that turns tracing on, if set to something.
fn endpoint_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()))
}

/// Builds the tracer provider for `services` (the first is also the home of spans from shared
/// crates), or `None` when no OTLP endpoint is configured. Must run inside a tokio runtime (the
/// gRPC exporter's channel lives on it). A standalone service's name yields to
/// `OTEL_SERVICE_NAME`; inside a process running several services, each keeps its own name.
pub(crate) fn build_provider(services: &[&'static str]) -> anyhow::Result<Option<SdkTracerProvider>> {
    if !endpoint_configured() {
        return Ok(None);
    }
    check_protocol()?;
    let env_name = std::env::var("OTEL_SERVICE_NAME").ok().filter(|name| !name.trim().is_empty());
    let mut routes = Vec::new();
    for &service in services {
        let name = match (&env_name, services.len()) {
            (Some(name), 1) => name.clone(),
            _ => service.to_owned(),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .build()
            .context("cannot set up the OTLP span exporter (check OTEL_EXPORTER_OTLP_ENDPOINT)")?;
        let mut processor = BatchSpanProcessor::builder(exporter).build();
        processor.set_resource(&Resource::builder().with_service_name(name).build());
        routes.push(Route { crate_name: service.replace('-', "_"), processor });
    }
    let router = ServiceRouter { routes };
    // The sampler comes from OTEL_TRACES_SAMPLER(_ARG), read by the SDK's default config.
    let provider = SdkTracerProvider::builder().with_span_processor(router).build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Some(provider))
}

fn check_protocol() -> anyhow::Result<()> {
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Ok(value) = std::env::var(name) {
            anyhow::ensure!(
                matches!(value.trim(), "" | "grpc" | "http/protobuf"),
                "{name}={value:?} is not supported: use grpc or http/protobuf"
            );
        }
    }
    Ok(())
}

/// A tracing layer exporting spans through `provider`.
pub(crate) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("cairn"))
}

#[derive(Debug)]
struct Route {
    /// Spans whose target starts with this crate name (`request_processor`) belong here.
    crate_name: String,
    processor: BatchSpanProcessor,
}

/// Sends each finished span to its service's processor (each with its own resource).
#[derive(Debug)]
struct ServiceRouter {
    routes: Vec<Route>,
}

impl ServiceRouter {
    fn route(&self, span: &SpanData) -> &Route {
        let target =
            span.attributes.iter().find(|kv| kv.key.as_str() == "target").and_then(|kv| match &kv.value {
                Value::String(s) => Some(s.as_str()),
                _ => None,
            });
        let crate_name = target.map(|t| t.split("::").next().unwrap_or(t));
        crate_name
            .and_then(|name| self.routes.iter().find(|route| route.crate_name == name))
            .unwrap_or(&self.routes[0])
    }
}

impl SpanProcessor for ServiceRouter {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        self.route(&span).processor.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Every route is flushed, also after one fails; the first error is reported.
        let results: Vec<OTelSdkResult> =
            self.routes.iter().map(|route| route.processor.force_flush()).collect();
        results.into_iter().collect()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let results: Vec<OTelSdkResult> =
            self.routes.iter().map(|route| route.processor.shutdown_with_timeout(timeout)).collect();
        results.into_iter().collect()
    }

    // Each route keeps the resource naming its service.
    fn set_resource(&mut self, _resource: &Resource) {}
}

/// Whether `value` has the shape of a W3C `traceparent` (version `00`, non-zero ids, hex only).
pub fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// Makes `span` continue the trace of `traceparent` (ignored when missing or malformed, or when
/// tracing is off).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.filter(|t| is_valid_traceparent(t)) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` naming `span` as the parent, when tracing is on; otherwise `fallback` (the
/// context received from upstream, passed on unchanged) if it is well formed.
pub fn traceparent(span: &tracing::Span, fallback: Option<&str>) -> Option<String> {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        if let Some(value) = carrier.remove("traceparent") {
            return Some(value);
        }
    }
    fallback.filter(|t| is_valid_traceparent(t)).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_shape() {
        assert!(is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));
        assert!(!is_valid_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"));
        assert!(!is_valid_traceparent("garbage"));
    }

    #[test]
    fn without_tracing_the_upstream_context_passes_through() {
        let span = tracing::Span::none();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent(&span, Some(tp)).as_deref(), Some(tp));
        assert_eq!(traceparent(&span, Some("bad")), None);
        assert_eq!(traceparent(&span, None), None);
    }
}
