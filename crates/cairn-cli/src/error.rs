//! How a `cairn` command fails: one error type whose variants decide the exit code, each with a
//! message that says what to do next. Secrets (the token) never appear in a message.

use std::process::ExitCode;

/// The exit codes of `cairn`, as `--help` documents them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// The request failed, was canceled or is dead; or what was asked for does not exist.
    Failed = 1,
    /// The command line (or input it names) is wrong.
    Usage = 2,
    /// Cairn could not be reached (connection refused, DNS, timeout, 502/503/504).
    Unreachable = 3,
    /// The token is missing, invalid or not allowed to do this (401/403).
    Unauthorized = 4,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "cannot reach Cairn at {url}: {detail}. Is ingress running there? Point CAIRN_URL (or --url) at it"
    )]
    Unreachable { url: String, detail: String },
    #[error("Cairn at {url} is unavailable ({status}): {message}")]
    Unavailable { url: String, status: u16, message: String },
    #[error("not authorised ({status}): {message}. Set CAIRN_TOKEN (or --token) to a token that allows this")]
    Unauthorized { status: u16, message: String },
    /// The server refused the input (400, 413): the message names the field.
    #[error("{message}")]
    Refused { message: String },
    /// Anything else the server answered with an error status.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CliError {
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) | CliError::Refused { .. } => Exit::Usage,
            CliError::Unreachable { .. } | CliError::Unavailable { .. } => Exit::Unreachable,
            CliError::Unauthorized { .. } => Exit::Unauthorized,
            CliError::Api { .. } | CliError::Other(_) => Exit::Failed,
        }
    }

    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::Usage(message.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let unreachable = CliError::Unreachable { url: "http://h:1/".into(), detail: "refused".into() };
        assert_eq!(unreachable.exit() as u8, 3);
        assert!(unreachable.to_string().contains("http://h:1/"), "{unreachable}");
        assert_eq!(CliError::Unauthorized { status: 401, message: "x".into() }.exit() as u8, 4);
        assert_eq!(CliError::Refused { message: "x".into() }.exit() as u8, 2);
        assert_eq!(CliError::usage("x").exit() as u8, 2);
        assert_eq!(CliError::Api { status: 404, message: "x".into() }.exit() as u8, 1);
        assert_eq!(
            CliError::Unavailable { url: "u".into(), status: 503, message: "m".into() }.exit() as u8,
            3
        );
    }
}
