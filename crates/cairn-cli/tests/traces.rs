//! One trace from ingress through the processor and its handler to the aggregator, exported over
//! OTLP/gRPC by the real `cairn dev` process to a small OTLP receiver in this test.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use cairn_testkit::{AmqpVhost, RedisNamespace, ServiceProcess, free_addr, hex, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A span as received: its service, name, and ids in hex.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The `http` handler's upstream: answers 200 and keeps the `traceparent` it was sent.
async fn upstream(seen: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let app = axum::Router::new().route(
        "/work",
        axum::routing::post(move |headers: HeaderMap| {
            let seen = seen.clone();
            async move {
                if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
                    seen.lock().unwrap().push(tp.to_owned());
                }
                axum::Json(json!({"done": true}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_ingress_processor_handler_and_aggregator() {
    let collector = Collector::default();
    let otlp = free_addr();
    let stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_shutdown(otlp, stop.clone().cancelled_owned());
    tokio::spawn(server);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let upstream = upstream(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let handlers = dir.path().join("handlers.toml");
    std::fs::write(
        &handlers,
        format!("[handlers.work]\nkind = \"http\"\nurl = \"http://{upstream}/work\"\n"),
    )
    .unwrap();

    let ns = RedisNamespace::new();
    let vhost = AmqpVhost::new().await;
    let (ingress, grpc, aggregator_admin) = (free_addr(), free_addr(), free_addr());
    // The environment is exactly this (no `OTEL_SERVICE_NAME` or sampler from the caller's).
    let env = [
        ("CAIRN_REDIS_URL", ns.url.clone()),
        ("CAIRN_KEY_PREFIX", ns.prefix.clone()),
        ("CAIRN_AMQP_URL", vhost.url.clone()),
        ("CAIRN_HANDLERS_FILE", handlers.display().to_string()),
        ("CAIRN_INGRESS_ADDR", ingress.to_string()),
        ("CAIRN_INGRESS_ADMIN_ADDR", free_addr().to_string()),
        ("CAIRN_AGGREGATOR_GRPC_ADDR", grpc.to_string()),
        ("CAIRN_AGGREGATOR_URL", format!("http://{grpc}")),
        ("CAIRN_AGGREGATOR_ADMIN_ADDR", aggregator_admin.to_string()),
        ("CAIRN_PROCESSOR_ADMIN_ADDR", free_addr().to_string()),
        ("CAIRN_TRIMMER_ADMIN_ADDR", free_addr().to_string()),
        ("CAIRN_PUBLIC_URL", format!("http://{ingress}")),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let env: BTreeMap<String, String> =
        env.into_iter().map(|(name, value)| (name.to_owned(), value)).collect();
    let mut cairn = ServiceProcess::new("cairn-dev", env!("CARGO_BIN_EXE_cairn"), &["dev"], env, dir.path());
    cairn.start();

    let http = reqwest::Client::new();
    let base = format!("http://{ingress}");
    wait_until("cairn dev answers and its aggregator is ready", WAIT, || {
        let http = http.clone();
        let (ingress, ready) =
            (format!("{base}/v1/requests/unknown"), format!("http://{aggregator_admin}/readyz"));
        async move {
            http.get(ingress).send().await.is_ok()
                && http.get(ready).send().await.is_ok_and(|r| r.status().is_success())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; cairn dev's log ends:\n{}", cairn.log_tail(30)));

    let reply = http
        .post(format!("{base}/v1/requests"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .header("prefer", "wait=30")
        .json(&json!({"handler": "work", "payload": {"x": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200, "{:?}", reply.text().await);

    // The three services' spans of that trace: ingress under the client's span, the processor
    // under ingress's, the aggregator under the processor's.
    let spans = collector.spans.clone();
    let chain = || -> Option<(Received, Received, Received)> {
        let spans = spans.lock().unwrap();
        let of = |service: &str, name: &str| {
            spans.iter().find(|s| s.trace_id == TRACE_ID && s.service == service && s.name == name).cloned()
        };
        let ingress = of("ingress", "submit request")?;
        let processor = of("request-processor", "process request")?;
        let aggregator = spans
            .iter()
            .find(|s| {
                s.trace_id == TRACE_ID
                    && s.service == "progress-aggregator"
                    && s.name == "apply progress"
                    && s.parent == processor.span_id
            })
            .cloned()?;
        Some((ingress, processor, aggregator))
    };
    let found = wait_until("spans of all three services", WAIT, || {
        let found = chain().is_some();
        async move { found }
    })
    .await;
    let all: Vec<Received> = collector.spans.lock().unwrap().clone();
    found.unwrap_or_else(|e| panic!("{e}: received {all:#?}"));
    let (ingress_span, processor_span, aggregator_span) = chain().unwrap();
    assert_eq!(ingress_span.parent, CLIENT_SPAN, "{all:#?}");
    assert_eq!(processor_span.parent, ingress_span.span_id, "{all:#?}");
    assert_eq!(aggregator_span.parent, processor_span.span_id, "{all:#?}");

    // The handler got the processor's span as its parent.
    let sent = seen.lock().unwrap().clone();
    assert_eq!(sent, vec![format!("00-{TRACE_ID}-{}-01", processor_span.span_id)]);

    // Nothing of another service leaked under a wrong name: every span has one of the four.
    let names: HashMap<&str, usize> = all.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(s.service.as_str()).or_default() += 1;
        m
    });
    for service in names.keys() {
        assert!(
            ["ingress", "request-processor", "progress-aggregator", "stream-trimmer"].contains(service),
            "unexpected service.name {service:?}: {all:#?}"
        );
    }

    cairn.kill();
    stop.cancel();
}
