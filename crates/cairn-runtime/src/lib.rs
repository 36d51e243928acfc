//! Process lifecycle shared by every Cairn service and the `cairn` CLI: logging set-up, the
//! process-wide Prometheus recorder, the shutdown signal and grace-period drain, the admin HTTP
//! port (`/healthz`, `/readyz`, `/metrics`), the dependency-free `healthcheck` client used inside
//! distroless containers, and the duration parser used by every `--*-timeout` style flag.
//!
//! Everything here is safe to use several times in one process: `cairn dev` runs all four
//! services side by side, and tests start many services in parallel.

mod admin;
mod args;
mod duration;
mod healthcheck;
mod logging;
mod prometheus;
mod service;
mod shutdown;

pub use admin::{Admin, READINESS_TIMEOUT, Readiness, serve_admin};
pub use args::{parse_args, parse_args_with, try_parse_from};
pub use duration::parse_duration;
pub use healthcheck::{HEALTHCHECK_TIMEOUT, healthcheck};
pub use logging::{LogConfig, LogFormat, init_logging};
pub use prometheus::{HISTOGRAM_BUCKETS, metrics_handle};
pub use service::ServiceMain;
pub use shutdown::{drain, shutdown_token};
