use anyhow::Context as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::telemetry::Telemetry;

/// How log lines are written to stdout.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, for terminals.
    #[default]
    Text,
    /// One JSON object per line with the event's fields flattened, for log collectors.
    Json,
}

/// Logging flags shared by every binary; flatten it into the binary's own `clap` struct.
#[derive(clap::Args, Debug, Clone)]
pub struct LogConfig {
    /// Log line format.
    #[arg(long = "log-format", env = "CAIRN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Which events to log, as a tracing `EnvFilter` directive (e.g. `info,cairn_redis=debug`).
    #[arg(long = "log-level", env = "CAIRN_LOG", default_value = "info,lapin=error")]
    pub log_level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { log_format: LogFormat::Text, log_level: "info,lapin=error".to_owned() }
    }
}

/// Installs the global tracing subscriber.
///
/// Only the first call in a process installs anything; later calls (several services in one
/// process, or many tests) leave the existing subscriber in place and return `Ok`. An invalid
/// filter directive is an error whichever call it comes from.
pub fn init_logging(config: &LogConfig) -> anyhow::Result<()> {
    install(config, None).map(|_| ())
}

/// Like [`init_logging`], and also exports spans over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set, each under the `service.name` of the service (of `services`) whose crate made it. Call
/// [`Telemetry::shutdown`] before exiting so the last spans are sent. Must run inside a tokio
/// runtime. When a subscriber was already installed, tracing stays as that one set it up.
pub fn init_telemetry(config: &LogConfig, services: &[&'static str]) -> anyhow::Result<Telemetry> {
    let provider = crate::telemetry::build_provider(services)?;
    let installed = install(config, provider.as_ref())?;
    match provider {
        Some(provider) if installed => {
            tracing::info!(services = ?services, "exporting traces over OTLP");
            Ok(Telemetry::new(provider))
        }
        Some(provider) => {
            let _ = provider.shutdown();
            Ok(Telemetry::default())
        }
        None => Ok(Telemetry::default()),
    }
}

/// Installs the subscriber; `false` when one was already installed.
fn install(
    config: &LogConfig,
    provider: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) -> anyhow::Result<bool> {
    let filter = EnvFilter::try_new(&config.log_level).with_context(|| {
        format!(
            "invalid log filter {:?} in --log-level / CAIRN_LOG: use a level such as info or \
             a directive such as info,cairn_redis=debug",
            config.log_level
        )
    })?;
    let fmt = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
        LogFormat::Json => {
            tracing_subscriber::fmt::layer().json().flatten_event(true).with_current_span(true).boxed()
        }
    };
    let otel = provider.map(crate::telemetry::layer);
    // The only failure left is "a global subscriber is already set", which is expected when
    // several services or tests share a process.
    Ok(tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        log: LogConfig,
    }

    #[test]
    fn flags_parse_and_default() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.log.log_format, LogFormat::Text);
        assert_eq!(cli.log.log_level, "info,lapin=error");

        let cli = Cli::try_parse_from(["x", "--log-format", "json", "--log-level", "debug"]).unwrap();
        assert_eq!(cli.log.log_format, LogFormat::Json);
        assert_eq!(cli.log.log_level, "debug");

        assert!(Cli::try_parse_from(["x", "--log-format", "yaml"]).is_err());
    }

    #[test]
    fn init_twice_is_fine_and_bad_filter_is_named() {
        let json = LogConfig { log_format: LogFormat::Json, log_level: "debug".into() };
        init_logging(&json).unwrap();
        init_logging(&LogConfig::default()).unwrap();

        let bad = LogConfig { log_format: LogFormat::Text, log_level: "info,cairn=notalevel".into() };
        let err = init_logging(&bad).unwrap_err().to_string();
        assert!(err.contains("CAIRN_LOG"), "{err}");
    }
}
