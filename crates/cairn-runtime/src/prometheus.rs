use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Histogram bucket bounds, in seconds; set explicitly so histograms render as Prometheus
/// histograms (aggregatable across replicas) rather than the exporter's default summaries.
pub const HISTOGRAM_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
///
/// Metrics recorded before the first call go nowhere, so binaries call this early in `main`
/// (the admin router calls it too). No HTTP listener is started: `/metrics` is served by
/// [`crate::Admin`] on the service's own admin port.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE.get_or_init(install).clone()
}

fn install() -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .set_buckets(HISTOGRAM_BUCKETS)
        .expect("HISTOGRAM_BUCKETS is a non-empty constant");
    let handle = match builder.install_recorder() {
        Ok(handle) => handle,
        Err(error) => {
            // Another recorder was installed outside this crate; keep serving a (empty) page
            // instead of failing the service.
            tracing::warn!(%error, "could not install the prometheus recorder; /metrics will be empty");
            PrometheusBuilder::new().build_recorder().handle()
        }
    };
    // Upkeep drains histogram samples even when nobody scrapes; a plain thread works whether
    // or not the caller is inside a tokio runtime, and outlives any one runtime.
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new().name("cairn-metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not start the metrics upkeep thread");
    }
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_buckets() {
        let handle = metrics_handle();
        metrics::histogram!("cairn_runtime_unit_test_seconds").record(0.003);
        let text = metrics_handle().render();
        assert!(text.contains("cairn_runtime_unit_test_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        drop(handle);
    }
}
