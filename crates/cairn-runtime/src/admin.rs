use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::{BoxFuture, join_all};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Upper bound on each readiness check; a dependency that does not answer in time is not ready.
pub const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// One dependency a service needs before it should receive traffic (Redis answers PING, the
/// AMQP channel is open, ...).
pub trait Readiness: Send + Sync + 'static {
    /// `Err` names what is not ready and why, e.g. `"redis: connection refused"`; it is shown
    /// verbatim in the `/readyz` body.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;

    /// Names the dependency when its check times out; override with something short such as
    /// `"redis"`.
    fn name(&self) -> &str {
        std::any::type_name::<Self>()
    }
}

/// The admin HTTP port every service serves: liveness, readiness and Prometheus metrics.
pub struct Admin {
    service: &'static str,
    checks: Vec<Arc<dyn Readiness>>,
    shutdown: Option<CancellationToken>,
}

struct AdminState {
    service: &'static str,
    checks: Vec<Arc<dyn Readiness>>,
    shutdown: Option<CancellationToken>,
    metrics: PrometheusHandle,
}

impl Admin {
    pub fn new(service_name: &'static str) -> Self {
        Self { service: service_name, checks: Vec::new(), shutdown: None }
    }

    /// Adds a dependency check; `/readyz` passes only when every check passes.
    pub fn readiness(mut self, check: Arc<dyn Readiness>) -> Self {
        self.checks.push(check);
        self
    }

    /// Makes `/readyz` answer 503 once `token` is cancelled, so load balancers stop sending
    /// traffic while the service drains.
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = Some(token);
        self
    }

    /// `GET /healthz` (alive; never looks at dependencies), `GET /readyz` and `GET /metrics`.
    pub fn router(self) -> Router {
        let (probes, state) = self.probes_and_state();
        probes.merge(Router::new().route("/metrics", get(metrics)).with_state(state))
    }

    /// `GET /healthz` and `GET /readyz` alone, for a public port where load balancers probe
    /// (metrics stay on the admin port).
    pub fn probes_router(self) -> Router {
        self.probes_and_state().0
    }

    fn probes_and_state(self) -> (Router, Arc<AdminState>) {
        let state = Arc::new(AdminState {
            service: self.service,
            checks: self.checks,
            shutdown: self.shutdown,
            metrics: crate::metrics_handle(),
        });
        let probes = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(state.clone());
        (probes, state)
    }
}

async fn healthz(State(state): State<Arc<AdminState>>) -> Response {
    axum::Json(json!({ "status": "ok", "service": state.service })).into_response()
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let shutting_down = state.shutdown.as_ref().is_some_and(CancellationToken::is_cancelled);
    let problems: Vec<String> = if shutting_down {
        vec!["shutting down".to_owned()]
    } else {
        join_all(state.checks.iter().map(|check| async move {
            match tokio::time::timeout(READINESS_TIMEOUT, check.check()).await {
                Ok(Ok(())) => None,
                Ok(Err(problem)) => Some(problem),
                Err(_) => Some(format!("{}: no answer within {READINESS_TIMEOUT:?}", check.name())),
            }
        }))
        .await
        .into_iter()
        .flatten()
        .collect()
    };
    if problems.is_empty() {
        axum::Json(json!({ "status": "ready" })).into_response()
    } else {
        tracing::debug!(service = state.service, ?problems, "not ready");
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "status": "not ready", "problems": problems })))
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], state.metrics.render()).into_response()
}

/// Serves the admin router on `listener` until `shutdown` is cancelled.
///
/// To let probes see `/readyz` turn 503 while the service drains, pass a token that fires
/// after the drain (not the signal token given to [`Admin::with_shutdown`]).
pub async fn serve_admin(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
