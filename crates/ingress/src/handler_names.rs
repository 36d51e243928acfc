//! The handler names this deployment offers, so a submission naming an unknown handler is refused
//! at the door instead of dying in a processor. They come from the processors' handlers file
//! (`CAIRN_HANDLERS_FILE`): the ingress reads only the names, the keys of its `[handlers.NAME]`
//! tables, and leaves checking each handler's settings to the processor that runs it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// The handlers a processor offers without a handlers file.
pub const DEFAULT_HANDLERS: [&str; 1] = ["echo"];

/// Why the handlers file gives no names.
#[derive(Debug, thiserror::Error)]
pub enum HandlersFileError {
    #[error("cannot read handlers file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("handlers file {}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
}

/// The names in the handlers file at `path`, or [`DEFAULT_HANDLERS`] without one.
pub fn load(path: Option<&Path>) -> Result<BTreeSet<String>, HandlersFileError> {
    let Some(path) = path else {
        return Ok(DEFAULT_HANDLERS.iter().map(|name| (*name).to_owned()).collect());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|source| HandlersFileError::Read { path: path.to_owned(), source })?;
    parse(&text).map_err(|problem| HandlersFileError::Invalid { path: path.to_owned(), problem })
}

/// The keys of the `[handlers]` table; `Err` says what is wrong with the file.
pub fn parse(text: &str) -> Result<BTreeSet<String>, String> {
    let root: Table = toml::from_str(text).map_err(|e| format!("invalid TOML: {}", e.message()))?;
    let handlers = match root.get("handlers") {
        Some(Value::Table(handlers)) => handlers,
        Some(other) => {
            return Err(format!("handlers: must be a table of handlers, found {}", other.type_str()));
        }
        None => return Err("no [handlers.NAME] table; add one per handler".to_owned()),
    };
    if handlers.is_empty() {
        return Err("handlers: no handlers defined; add a [handlers.NAME] table".to_owned());
    }
    Ok(handlers.keys().cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_table_keys() {
        let text = r#"
            [handlers.echo]
            kind = "echo"

            [handlers.thumbnail]
            kind = "http"
            url = "http://127.0.0.1:9000/thumbnail"
        "#;
        let names: Vec<String> = parse(text).unwrap().into_iter().collect();
        assert_eq!(names, ["echo", "thumbnail"]);
    }

    #[test]
    fn defaults_to_echo() {
        let names: Vec<String> = load(None).unwrap().into_iter().collect();
        assert_eq!(names, ["echo"]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(parse("handlers = 3").unwrap_err().contains("must be a table"));
        assert!(parse("[other]\nx = 1").unwrap_err().contains("no [handlers.NAME] table"));
        assert!(parse("[handlers]").unwrap_err().contains("no handlers defined"));
        assert!(parse("[handlers.echo").unwrap_err().starts_with("invalid TOML"));
        let missing = load(Some(Path::new("/nonexistent/handlers.toml"))).unwrap_err().to_string();
        assert!(missing.starts_with("cannot read handlers file /nonexistent/handlers.toml"), "{missing}");
    }
}
