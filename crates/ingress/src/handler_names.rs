//! The handler names this deployment offers, so a submission naming an unknown handler is refused
//! at the door instead of dying in a processor. They come from the processors' handlers file
//! (`CAIRN_HANDLERS_FILE`), read with the processor's parser (`cairn_runtime::handlers_file`):
//! the ingress accepts a file only if the processor would, and keeps the names. What depends on
//! the processor's host (the programs) only the processor checks.

use std::collections::BTreeSet;
use std::path::Path;

use cairn_runtime::handlers_file;

/// The handlers a processor offers without a handlers file.
pub const DEFAULT_HANDLERS: [&str; 1] = ["echo"];

/// Why the handlers file gives no names: the processor's own error for the same file.
pub type HandlersFileError = handlers_file::ConfigError;

/// The names in the handlers file at `path`, or [`DEFAULT_HANDLERS`] without one.
pub fn load(path: Option<&Path>) -> Result<BTreeSet<String>, HandlersFileError> {
    let Some(path) = path else {
        return Ok(DEFAULT_HANDLERS.iter().map(|name| (*name).to_owned()).collect());
    };
    Ok(handlers_file::names(path)?.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the handlers file's text; `Err` says what is wrong with the file.
    fn parse(text: &str) -> Result<BTreeSet<String>, String> {
        handlers_file::parse(text).map(|specs| specs.into_keys().collect()).map_err(|e| e.to_string())
    }

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
        // A handler's own settings too, as the processor refuses them.
        assert_eq!(
            parse("[handlers.h]\nkind = \"http\"\nurl = \"ftp://a\"").unwrap_err(),
            "handlers.h.url: \"ftp://a\": unsupported scheme \"ftp\"; use http://"
        );
        assert_eq!(
            parse("[handlers.c]\nkind = \"command\"\nprogram = \"x\"\nenv = { CAIRN_PAYLOAD = \"\" }")
                .unwrap_err(),
            "handlers.c.env.CAIRN_PAYLOAD: reserved: the processor sets it for each request"
        );
        // Not whether the program exists: that is the processor's host's business.
        assert!(parse("[handlers.c]\nkind = \"command\"\nprogram = \"/nonexistent/x\"").is_ok());
        let missing = load(Some(Path::new("/nonexistent/handlers.toml"))).unwrap_err().to_string();
        assert!(missing.starts_with("cannot read handlers file /nonexistent/handlers.toml"), "{missing}");
    }
}
