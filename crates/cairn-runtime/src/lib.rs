//! Process lifecycle shared by every Cairn service and the `cairn` CLI: logging and trace set-up, the
//! process-wide Prometheus recorder, the shutdown signal and grace-period drain, the admin HTTP
//! port (`/healthz`, `/readyz`, `/metrics`), the dependency-free `healthcheck` client used inside
//! distroless containers, the duration parser used by every `--*-timeout` style flag, and the
//! binaries' memory allocator ([`global_allocator!`]), and the handlers file's parser
//! ([`handlers_file`], read by the ingress and the request processor alike).
//!
//! Everything here is safe to use several times in one process: `cairn dev` runs all four
//! services side by side, and tests start many services in parallel.

mod admin;
mod args;
mod duration;
pub mod handlers_file;
mod healthcheck;
mod logging;
mod prometheus;
mod service;
mod shutdown;
pub mod telemetry;

pub use admin::{Admin, READINESS_TIMEOUT, Readiness, serve_admin};
pub use args::{parse_args, parse_args_with, redact_url, try_parse_from};
pub use duration::parse_duration;
pub use healthcheck::{HEALTHCHECK_TIMEOUT, healthcheck};
pub use logging::{LogConfig, LogFormat, init_logging, init_telemetry};
pub use prometheus::{HISTOGRAM_BUCKETS, metrics_handle};
pub use service::ServiceMain;
pub use shutdown::{drain, shutdown_token};
pub use telemetry::Telemetry;

#[doc(hidden)]
pub use mimalloc;

/// Makes mimalloc the global allocator of the binary whose `main.rs` invokes it (at the top level,
/// once). A library never chooses the allocator, so users who build their own processor on these
/// crates keep theirs. glibc's malloc took over a quarter of the instructions of a busy request
/// processor (callgrind of `cairn-bench requests`: 27 %); with mimalloc the allocator is 12 %.
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::mimalloc::MiMalloc = $crate::mimalloc::MiMalloc;
    };
}
