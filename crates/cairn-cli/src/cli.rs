//! The command line of `cairn`: every subcommand, its arguments and its `--help` example.

use cairn_redis::RedisConfig;
use cairn_runtime::LogConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

const EXIT_CODES: &str = "\
Exit codes: 0 success; 1 the request failed, was canceled or is dead (or what was asked for does
not exist); 2 usage error; 3 Cairn cannot be reached; 4 not authorised.

Every command but `dev` and `streams` talks to ingress only (REST and SSE), at CAIRN_URL.";

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn: durable requests with live, hierarchical progress",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Where Cairn is and how to print; accepted before or after the subcommand.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Base URL of the Cairn ingress (REST and SSE).
    #[arg(long, global = true, env = "CAIRN_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Bearer token sent with every call (needed when Cairn runs with auth on).
    #[arg(long, global = true, env = "CAIRN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON for scripts (JSON lines for `watch`) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Submit a request to a handler; with --wait, follow its progress live and print its result.
    #[command(after_help = "\
Examples:
  cairn submit echo '{\"x\": 1}' --wait
  cairn submit convert @job.json --progress-key _portal.job42
  generate-payload | cairn submit convert - --json
  cairn submit convert '{\"width\": 640}' --file image=photo.jpg --wait")]
    Submit(Submit),
    /// Upload every file that appears in a directory (resumable, in chunks, restart-safe) and
    /// submit one request per file to a handler, with the file as a data stream.
    #[command(after_help = "\
Examples:
  cairn upload ./outbox --handler ingest
  cairn upload ./outbox --handler ingest --upload-existing --chunk-size 1MiB --threads 4
  cairn upload ./outbox --handler ingest --once --json

On a terminal, `c` prints the counts and `q` finishes what is queued and exits. The journal in
DIR/LOGS/ lets a restart resume unfinished files from the server's offset.")]
    Upload(Upload),
    /// Show a progress tree: each node with its bar, percentage, status, ETA and message.
    #[command(after_help = "Example:\n  cairn status _portal.job42 --depth 3")]
    Status(Status),
    /// Follow a progress tree live (nested progress bars) until its root finishes, fails or is
    /// canceled; the exit code tells which.
    #[command(after_help = "\
Examples:
  cairn watch _portal.job42
  cairn watch _requests.0190f5c2-7b8e-4c3d-9a2b-123456789abc --json | jq -c .nodes")]
    Watch(Watch),
    /// Post a progress update (a JSON object merged into the node) and print the node.
    #[command(after_help = "\
Examples:
  cairn post _portal.job42.step1 '{\"progress\": 0.5, \"status\": \"running\", \"msg\": \"halfway\"}'
  echo '{\"status\": \"finished\", \"progress\": 1}' | cairn post _portal.job42.step1 -")]
    Post(Post),
    /// Delete a progress node and everything below it.
    #[command(after_help = "Example:\n  cairn delete _portal.job42")]
    Delete(KeyArg),
    /// List requests, newest first.
    #[command(
        after_help = "Examples:\n  cairn requests\n  cairn requests --state dead --handler convert --limit 20"
    )]
    Requests(RequestList),
    /// Show one request: state, attempts, timestamps, result or error.
    #[command(after_help = "\
Examples:
  cairn request 0190f5c2-7b8e-4c3d-9a2b-123456789abc
  cairn request 0190f5c2-7b8e-4c3d-9a2b-123456789abc --wait --json")]
    Request(RequestShow),
    /// Cancel a request: a queued one never runs, a running one is told to stop.
    #[command(after_help = "Example:\n  cairn cancel 0190f5c2-7b8e-4c3d-9a2b-123456789abc")]
    Cancel(IdArg),
    /// Dead letters: requests that failed for good.
    #[command(subcommand)]
    Dlq(Dlq),
    /// Show every registered stream: length, first and last entry id, and each consumer
    /// group's lag (entries not yet delivered) and pending count (delivered, not acknowledged).
    /// Reads Redis directly (CAIRN_REDIS_URL), not ingress.
    #[command(after_help = "Example:\n  CAIRN_REDIS_URL=redis://10.0.0.5:6379 cairn streams")]
    Streams {
        #[command(flatten)]
        redis: RedisConfig,
    },
    /// Run every service in this one process (ingress on :8080, aggregator gRPC on :50051,
    /// a request processor, the stream trimmer with its admin port on :9093).
    /// Each service is configured by its usual CAIRN_* variables.
    #[command(after_help = "Examples:\n  CAIRN_HANDLERS_FILE=handlers.toml cairn dev\n  \
cairn dev --only ingress,progress-aggregator   # the rest runs elsewhere")]
    Dev {
        #[command(flatten)]
        log: LogConfig,
        /// Run only these services (comma-separated); the others are expected to run elsewhere.
        #[arg(long, value_enum, value_delimiter = ',', env = "CAIRN_DEV_ONLY")]
        only: Vec<Service>,
    },
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  cairn completions bash > ~/.local/share/bash-completion/completions/cairn
  cairn completions zsh > \"${fpath[1]}/_cairn\"
  cairn completions fish > ~/.config/fish/completions/cairn.fish")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
pub struct Submit {
    /// Handler to run (a name from the handlers file, e.g. `echo`).
    pub handler: String,
    /// Payload: JSON text, `@FILE` to read a file, or `-` for stdin. Default: stdin when it is
    /// not a terminal, else `null`.
    pub payload: Option<String>,
    /// Send the payload as a JSON string instead of parsing it as JSON.
    #[arg(long)]
    pub text: bool,
    /// Progress key of the request's tree (default `_requests.{id}`).
    #[arg(long)]
    pub progress_key: Option<String>,
    /// Deliveries before the request is dead (1-100; server default 3).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Longest one attempt may run, e.g. `30s`, `5m`.
    #[arg(long, value_parser = cairn_runtime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Submitting again with the same key and body returns the first request.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the request until it ends (live bars on a terminal) and print its result; the exit
    /// code tells success (0) from failure, cancellation or death (1).
    #[arg(long)]
    pub wait: bool,
    /// A file sent with the request as the data stream NAME (repeatable); the submission goes
    /// as multipart/form-data.
    #[arg(long = "file", value_name = "NAME=PATH", value_parser = parse_file_arg)]
    pub files: Vec<(String, std::path::PathBuf)>,
}

/// `NAME=PATH` of `submit --file`.
fn parse_file_arg(text: &str) -> Result<(String, std::path::PathBuf), String> {
    match text.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_owned(), path.into())),
        _ => Err(format!("{text:?} is not NAME=PATH, e.g. image=photo.jpg")),
    }
}

#[derive(Args)]
pub struct Upload {
    /// Directory to watch; its subdirectories are watched too and kept in the uploaded paths.
    pub dir: std::path::PathBuf,
    /// Handler each file's request goes to.
    #[arg(long)]
    pub handler: String,
    /// Also upload the files already in DIR when the command starts.
    #[arg(long)]
    pub upload_existing: bool,
    /// Upload the files already in DIR, then exit instead of watching (implies
    /// --upload-existing).
    #[arg(long)]
    pub once: bool,
    /// Bytes per PATCH: a power of two from 16KiB to 64MiB, as bytes (`65536`) or with a unit
    /// (`64KiB`, `4MiB`).
    #[arg(long, default_value = "4MiB", value_parser = crate::upload::parse_chunk_size)]
    pub chunk_size: u64,
    /// Files uploaded at the same time (1-64).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// Upload only files whose path relative to DIR (with `/` separators) matches this regex.
    /// Default: every file but hidden ones (a name starting with `.`, or inside such a
    /// directory) and `*.log`.
    #[arg(long)]
    pub upload_regex: Option<String>,
    /// How long a file must stay unchanged (size and modification time) before it is uploaded.
    #[arg(long, default_value = "3s", value_parser = cairn_runtime::parse_duration)]
    pub lag: std::time::Duration,
    /// JSON object merged into every request's payload (`@FILE` reads a file).
    #[arg(long)]
    pub payload: Option<String>,
}

#[derive(Args)]
pub struct Status {
    /// Progress key, e.g. `_portal.job42`.
    pub key: String,
    /// Levels to show, the node itself being level 1 (1-8).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub depth: u32,
    /// Children per parent (1-1000); the rest are counted.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
}

#[derive(Args)]
pub struct Watch {
    /// Progress key, e.g. `_portal.job42`; it need not exist yet.
    pub key: String,
    /// Levels to follow, the node itself being level 1 (1-8).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub depth: u32,
}

#[derive(Args)]
pub struct Post {
    /// Progress key of the node to update.
    pub key: String,
    /// The update: a JSON object, `@FILE`, or `-` for stdin.
    pub update: String,
}

#[derive(Args)]
pub struct KeyArg {
    /// Progress key.
    pub key: String,
}

#[derive(Args)]
pub struct IdArg {
    /// Request id (a UUID).
    pub id: String,
}

#[derive(Args)]
pub struct RequestShow {
    /// Request id (a UUID).
    pub id: String,
    /// Wait until the request has ended (long polls; no live view).
    #[arg(long)]
    pub wait: bool,
}

#[derive(Args)]
pub struct RequestList {
    /// Only requests in this state (queued, running, failed, succeeded, canceled, dead).
    #[arg(long)]
    pub state: Option<String>,
    /// Only requests to this handler.
    #[arg(long)]
    pub handler: Option<String>,
    /// Requests per page (1-1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Cursor from a previous page (its `next`).
    #[arg(long)]
    pub after: Option<String>,
}

#[derive(Subcommand)]
pub enum Dlq {
    /// List dead letters.
    #[command(after_help = "Example:\n  cairn dlq list --limit 20")]
    List {
        /// Dead letters per page (1-1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Cursor from a previous page (its `next`).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show a dead request: its last error, attempts and timestamps.
    #[command(after_help = "Example:\n  cairn dlq show 0190f5c2-7b8e-4c3d-9a2b-123456789abc")]
    Show(IdArg),
    /// Run a dead request again, with the same id and fresh attempts.
    #[command(after_help = "Example:\n  cairn dlq retry 0190f5c2-7b8e-4c3d-9a2b-123456789abc")]
    Retry(IdArg),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_has_an_example() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for command in cli.get_subcommands() {
            let leaves: Vec<_> =
                if command.has_subcommands() { command.get_subcommands().collect() } else { vec![command] };
            for leaf in leaves {
                let help = leaf.get_after_help().map(ToString::to_string).unwrap_or_default();
                if !help.contains("cairn ") {
                    missing.push(leaf.get_name().to_owned());
                }
            }
        }
        assert!(missing.is_empty(), "commands without an example: {missing:?}");
    }

    #[test]
    fn flags_go_anywhere() {
        let cli = Cli::try_parse_from(["cairn", "status", "a.b", "--json", "--url", "http://h:1"]).unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.url, "http://h:1");
        assert!(Cli::try_parse_from(["cairn", "status", "a", "--depth", "9"]).is_err());
    }
}

/// A service `cairn dev` can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Service {
    Ingress,
    ProgressAggregator,
    RequestProcessor,
    StreamTrimmer,
}
