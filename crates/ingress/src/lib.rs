//! ingress: the public REST face of Cairn. It owns the HTTP routes clients call — SCA's progress
//! API (`/status/{key}`, `/health`) today — and adapts them onto the services behind it: every
//! progress read and write is a `cairn.v1.Progress` call to the progress aggregator, so ingress
//! keeps no state of its own and scales freely. It also serves `/healthz`, `/readyz` and
//! `/metrics` on the same port.

mod aggregator;
mod error;
mod http_metrics;
mod progress_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use cairn_runtime::{Admin, LogConfig, parse_duration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use tracing::{info, warn};

pub use crate::aggregator::{Aggregator, Read, UrlError};
pub use crate::error::ApiError;

/// Settings of the ingress: flags, or `CAIRN_*` environment variables.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "ingress", version, about = "Cairn's public REST API")]
pub struct Config {
    /// HTTP listen address (API, `/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "CAIRN_INGRESS_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,
    /// gRPC URL of the progress aggregator (`http://host:port`).
    #[arg(long, env = "CAIRN_AGGREGATOR_URL", default_value = "http://127.0.0.1:50051")]
    pub aggregator_url: String,
    /// Longest a call to the aggregator may take before the client gets a 504.
    #[arg(long, env = "CAIRN_INGRESS_REQUEST_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub request_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "CAIRN_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    #[command(flatten)]
    pub log: LogConfig,
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("invalid duration {s:?}: must be more than 0")),
        d => Ok(d),
    }
}

/// A built ingress, its listener bound (so tests can use port 0 and ask the address).
pub struct App {
    config: Config,
    listener: TcpListener,
    aggregator: Aggregator,
    /// Cancelled when shutdown begins, so `/readyz` answers 503 while requests drain.
    draining: CancellationToken,
}

impl App {
    /// Binds the listener and prepares the aggregator channel. The channel connects lazily, so the
    /// ingress starts (and reports not-ready) while the aggregator is away.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        // Install the recorder before the first request records anything.
        cairn_runtime::metrics_handle();
        let aggregator = Aggregator::connect_lazy(&config.aggregator_url, config.request_timeout)
            .with_context(|| format!("invalid CAIRN_AGGREGATOR_URL={:?}", config.aggregator_url))?;
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on CAIRN_INGRESS_ADDR={}", config.addr))?;
        Ok(App { config, listener, aggregator, draining: CancellationToken::new() })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Every route the ingress serves, with its metrics and tracing layers.
    pub fn router(&self) -> Router {
        let admin = Admin::new("ingress")
            .readiness(Arc::new(self.aggregator.clone()))
            .with_shutdown(self.draining.clone())
            .router();
        progress_api::router(self.aggregator.clone())
            .merge(admin)
            .fallback(error::route_not_found)
            .method_not_allowed_fallback(error::method_not_allowed)
            .layer(axum::middleware::from_fn(http_metrics::record))
            .layer(TraceLayer::new_for_http())
    }

    /// Serves until `shutdown` fires, then reports not-ready, stops accepting connections and lets
    /// in-flight requests finish within the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let router = self.router();
        let App { config, listener, draining, .. } = self;
        info!(addr = %listener.local_addr()?, aggregator = %config.aggregator_url, "ingress starting");
        let stop = CancellationToken::new();
        let mut server = tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .into_future(),
        );
        tokio::select! {
            result = &mut server => {
                // The server only returns by itself when accepting connections failed for good.
                return result.context("ingress server task failed")?.context("ingress server failed");
            }
            () = shutdown.cancelled() => {}
        }
        draining.cancel();
        stop.cancel();
        info!(grace = ?config.grace, "ingress shutting down");
        if cairn_runtime::drain("ingress", config.grace, &mut server).await {
            info!("ingress stopped");
        } else {
            warn!("ingress closed connections that were still open after the grace period");
            server.abort();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_work_on_localhost() {
        let config = Config::try_parse_from(["ingress"]).unwrap();
        assert_eq!(config.addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.aggregator_url, "http://127.0.0.1:50051");
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.grace, Duration::from_secs(10));
    }

    #[test]
    fn zero_request_timeout_is_refused() {
        let err = Config::try_parse_from(["ingress", "--request-timeout", "0s"]).unwrap_err().to_string();
        assert!(err.contains("must be more than 0"), "{err}");
        let config = Config::try_parse_from(["ingress", "--request-timeout", "250ms"]).unwrap();
        assert_eq!(config.request_timeout, Duration::from_millis(250));
    }
}
