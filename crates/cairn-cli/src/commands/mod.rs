//! One module per command group; each command takes its parsed arguments, the client and the
//! output mode, and returns the exit status its outcome stands for.

pub mod dev;
pub mod dlq;
pub mod progress;
pub mod requests;
pub mod streams;

use std::io::{IsTerminal as _, Read as _};

use serde_json::Value;

use crate::error::CliError;

/// Text given on the command line: itself, `@FILE` for a file's contents, `-` for stdin.
pub fn read_input(arg: &str, what: &str) -> Result<String, CliError> {
    if arg == "-" {
        return read_stdin(what);
    }
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("cannot read the {what} from {path}: {e}"))),
        None => Ok(arg.to_owned()),
    }
}

pub fn read_stdin(what: &str) -> Result<String, CliError> {
    if std::io::stdin().is_terminal() {
        eprintln!("reading the {what} from stdin; end it with Ctrl-D");
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| CliError::usage(format!("cannot read the {what} from stdin: {e}")))?;
    Ok(text)
}

/// `text` parsed as JSON, or a usage error naming `what` and how to quote it.
pub fn parse_json(text: &str, what: &str) -> Result<Value, CliError> {
    serde_json::from_str(text).map_err(|e| {
        CliError::usage(format!(
            "the {what} is not valid JSON ({e}); quote it for the shell, e.g. '{{\"x\": 1}}', or pass @FILE"
        ))
    })
}
