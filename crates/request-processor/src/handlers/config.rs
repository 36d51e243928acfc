//! The handlers file: which handlers a processor offers, by name, and how each is configured.
//!
//! A TOML file with one `[handlers.NAME]` table per handler. `NAME` is what requests give as
//! `"handler"` (1–64 characters of `[A-Za-z0-9_-]`); `kind` picks the built-in handler:
//!
//! ```toml
//! [handlers.echo]
//! kind = "echo"                          # answers the payload; for smoke tests
//!
//! [handlers.thumbnail]
//! kind = "http"                          # POSTs the payload as JSON
//! url = "http://127.0.0.1:9000/thumbnail"
//! timeout = "30s"                        # optional, default 30s
//!
//! [handlers.convert]
//! kind = "command"                       # runs a program, never a shell
//! program = "/usr/local/bin/convert.sh"  # relative paths start at this file's directory
//! args = ["--width", "{width}", "{input}"]
//! timeout = "5m"                         # optional, default none
//! env = { MODE = "fast" }                # optional
//! ```
//!
//! - `http`: 2xx is the result, 4xx (but 408 and 429) fails the request for good, 5xx,
//!   connection errors and timeouts are retried. See [`HttpHandler`].
//! - `command`: an argument written `{field}` is replaced by the payload's top-level `field`
//!   (a string, number or bool); a string starting with `-` is refused unless written
//!   `{field:raw}`. Exit status 0 is success (stdout is the result), 2 means the input is wrong
//!   (not retried), anything else is retried. See [`CommandHandler`].
//!
//! Durations take a unit: `500ms`, `30s`, `5m`, `1h`. Everything is checked when the file is
//! loaded — unknown keys, bad durations, a `program` that does not exist or is not executable —
//! and each error names the handler and the field, e.g.
//! `handlers.convert.timeout: invalid duration "soon": …`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use super::command::CommandHandler;
use super::echo::Echo;
use super::http::HttpHandler;
use crate::handler::HandlerSet;

/// Used by `http` handlers that do not set `timeout`.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);

const MAX_NAME_LEN: usize = 64;

/// Why a handlers file, or one handler's settings, cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read handlers file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// An error inside the file at `path`.
    #[error("handlers file {}: {source}", path.display())]
    File { path: PathBuf, source: Box<ConfigError> },
    #[error("invalid TOML: {0}")]
    Syntax(String),
    /// `field` is the dotted path of the offending setting, such as `handlers.convert.timeout`.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), message: message.into() }
    }

    /// Puts `prefix.` in front of the field an error names.
    fn within(self, prefix: &str) -> Self {
        match self {
            Self::Invalid { field, message } => Self::Invalid { field: format!("{prefix}.{field}"), message },
            other => other,
        }
    }
}

/// Reads and checks the handlers file at `path`; see the [module docs](self) for its format.
pub fn load(path: &Path) -> Result<HandlerSet, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    parse(&text, base_dir).map_err(|e| ConfigError::File { path: path.to_owned(), source: Box::new(e) })
}

/// Parses a handlers file's text; relative `program` paths resolve against `base_dir`.
pub fn parse(text: &str, base_dir: &Path) -> Result<HandlerSet, ConfigError> {
    let mut root: Table = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.message().to_owned()))?;
    let handlers = match root.remove("handlers") {
        Some(Value::Table(handlers)) => handlers,
        Some(other) => {
            return Err(ConfigError::invalid(
                "handlers",
                format!("must be a table of handlers, found {}", other.type_str()),
            ));
        }
        None => Table::new(),
    };
    if let Some(key) = root.keys().next() {
        return Err(ConfigError::invalid(key.as_str(), "unknown key; expected only [handlers.NAME] tables"));
    }
    if handlers.is_empty() {
        return Err(ConfigError::invalid("handlers", "no handlers defined; add a [handlers.NAME] table"));
    }

    let mut set = HandlerSet::new();
    for (name, spec) in handlers {
        let prefix = format!("handlers.{name}");
        check_name(&name).map_err(|message| ConfigError::invalid(&prefix, message))?;
        let Value::Table(spec) = spec else {
            return Err(ConfigError::invalid(prefix, format!("must be a table, found {}", spec.type_str())));
        };
        add_handler(&mut set, &name, Fields::new(spec), base_dir).map_err(|e| e.within(&prefix))?;
    }
    Ok(set)
}

/// The handlers offered when no handlers file is configured: just `echo`.
pub fn default_handlers() -> HandlerSet {
    HandlerSet::new().with("echo", Echo)
}

fn check_name(name: &str) -> Result<(), String> {
    let valid_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !valid_chars {
        return Err(format!(
            "invalid handler name {name:?}: use 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '_' and '-'"
        ));
    }
    Ok(())
}

fn add_handler(
    set: &mut HandlerSet,
    name: &str,
    mut fields: Fields,
    base_dir: &Path,
) -> Result<(), ConfigError> {
    let kind = fields
        .string("kind")?
        .ok_or_else(|| ConfigError::invalid("kind", "missing; use \"echo\", \"http\" or \"command\""))?;
    match kind.as_str() {
        "echo" => {
            fields.finish(&["kind"])?;
            set.insert(name, std::sync::Arc::new(Echo));
        }
        "http" => {
            let url = fields.string("url")?.ok_or_else(|| ConfigError::invalid("url", "missing"))?;
            let timeout = fields.duration("timeout")?.unwrap_or(DEFAULT_HTTP_TIMEOUT);
            fields.finish(&["kind", "url", "timeout"])?;
            set.insert(name, std::sync::Arc::new(HttpHandler::new(&url, timeout)?));
        }
        "command" => {
            let program =
                fields.string("program")?.ok_or_else(|| ConfigError::invalid("program", "missing"))?;
            let args = fields.strings("args")?.unwrap_or_default();
            let timeout = fields.duration("timeout")?;
            let env = fields.string_map("env")?.unwrap_or_default();
            fields.finish(&["kind", "program", "args", "timeout", "env"])?;
            let mut handler = CommandHandler::new(base_dir.join(program), args)?.with_env(env)?;
            if let Some(timeout) = timeout {
                handler = handler.with_timeout(timeout)?;
            }
            set.insert(name, std::sync::Arc::new(handler));
        }
        other => {
            return Err(ConfigError::invalid(
                "kind",
                format!("unknown kind {other:?}; use \"echo\", \"http\" or \"command\""),
            ));
        }
    }
    Ok(())
}

/// One handler's table, taken apart field by field so every error names its field (serde's
/// own messages do not say which field of a table had the wrong type).
struct Fields(Table);

impl Fields {
    fn new(table: Table) -> Self {
        Self(table)
    }

    fn string(&mut self, field: &str) -> Result<Option<String>, ConfigError> {
        match self.0.remove(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(field, "a string", &other)),
        }
    }

    fn duration(&mut self, field: &str) -> Result<Option<Duration>, ConfigError> {
        let Some(text) = self.string(field)? else { return Ok(None) };
        cairn_runtime::parse_duration(&text).map(Some).map_err(|message| ConfigError::invalid(field, message))
    }

    fn strings(&mut self, field: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.0.remove(field) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s),
                    other => Err(wrong_type(&format!("{field}[{i}]"), "a string", &other)),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(other) => Err(wrong_type(field, "an array of strings", &other)),
        }
    }

    fn string_map(&mut self, field: &str) -> Result<Option<BTreeMap<String, String>>, ConfigError> {
        match self.0.remove(field) {
            None => Ok(None),
            Some(Value::Table(table)) => table
                .into_iter()
                .map(|(key, value)| match value {
                    Value::String(s) => Ok((key, s)),
                    other => Err(wrong_type(&format!("{field}.{key}"), "a string", &other)),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(other) => Err(wrong_type(field, "a table of strings", &other)),
        }
    }

    /// Rejects whatever key is left: a typo must not silently fall back to a default.
    fn finish(self, known: &[&str]) -> Result<(), ConfigError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(key) => Err(ConfigError::invalid(
                key.as_str(),
                format!("unknown field; this kind takes {}", known.join(", ")),
            )),
        }
    }
}

fn wrong_type(field: &str, expected: &str, found: &Value) -> ConfigError {
    ConfigError::invalid(field, format!("must be {expected}, found {}", found.type_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        match parse(text, Path::new("/")) {
            Ok(set) => panic!("expected an error, got handlers {:?}", set.names().collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        }
    }

    const EXAMPLE: &str = r#"
        [handlers.echo]
        kind = "echo"

        [handlers.thumbnail]
        kind = "http"
        url = "http://127.0.0.1:9000/thumbnail"
        timeout = "30s"

        [handlers.convert]
        kind = "command"
        program = "/bin/true"
        args = ["--width", "{width}", "{input}"]
        timeout = "5m"          # optional
        env = { MODE = "fast" } # optional
    "#;

    #[test]
    fn parses_the_documented_example() {
        let set = parse(EXAMPLE, Path::new("/")).unwrap();
        assert_eq!(set.names().collect::<Vec<_>>(), ["convert", "echo", "thumbnail"]);
    }

    #[test]
    fn the_module_docs_show_the_same_example() {
        // The README copies the module docs; keep their example loadable apart from the program.
        let docs = include_str!("config.rs");
        let example: String = docs
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let example = example.replace("/usr/local/bin/convert.sh", "/bin/true");
        let set = parse(&example, Path::new("/")).unwrap();
        assert_eq!(set.names().collect::<Vec<_>>(), ["convert", "echo", "thumbnail"]);
    }

    #[test]
    fn default_handlers_offer_echo_only() {
        assert_eq!(default_handlers().names().collect::<Vec<_>>(), ["echo"]);
    }

    #[test]
    fn errors_name_the_handler_and_the_field() {
        let e = error("[handlers.x]\nkind = \"ftp\"");
        assert!(e.starts_with("handlers.x.kind: unknown kind \"ftp\""), "{e}");

        let e = error("[handlers.x]\nurl = \"http://a\"");
        assert!(e.starts_with("handlers.x.kind: missing"), "{e}");

        let e = error("[handlers.t]\nkind = \"http\"\nurl = \"http://a\"\nretries = 3");
        assert!(e.starts_with("handlers.t.retries: unknown field"), "{e}");

        let e = error("[handlers.convert]\nkind = \"command\"\nprogram = \"/bin/true\"\ntimeout = \"soon\"");
        assert!(e.starts_with("handlers.convert.timeout: invalid duration \"soon\""), "{e}");

        let e = error("[handlers.t]\nkind = \"http\"\nurl = 5");
        assert_eq!(e, "handlers.t.url: must be a string, found integer");

        let e = error("[handlers.c]\nkind = \"command\"\nprogram = \"/bin/true\"\nargs = [\"a\", 1]");
        assert_eq!(e, "handlers.c.args[1]: must be a string, found integer");

        let e = error("[handlers.c]\nkind = \"command\"\nprogram = \"/bin/true\"\nenv = { N = 1 }");
        assert_eq!(e, "handlers.c.env.N: must be a string, found integer");

        let e = error("[handlers.e]\nkind = \"echo\"\nurl = \"http://a\"");
        assert!(e.starts_with("handlers.e.url: unknown field"), "{e}");

        let e = error("[handlers.t]\nkind = \"http\"");
        assert_eq!(e, "handlers.t.url: missing");
    }

    #[test]
    fn a_missing_or_unusable_program_is_an_error_naming_it() {
        let e = error("[handlers.convert]\nkind = \"command\"\nprogram = \"/nonexistent/convert.sh\"");
        assert!(e.starts_with("handlers.convert.program: /nonexistent/convert.sh "), "{e}");

        let e = error("[handlers.convert]\nkind = \"command\"");
        assert_eq!(e, "handlers.convert.program: missing");

        // Exists but is not executable.
        let plain = std::env::temp_dir().join(format!("cairn-not-executable-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let result = parse(
            &format!("[handlers.convert]\nkind = \"command\"\nprogram = \"{}\"", plain.display()),
            Path::new("/"),
        );
        std::fs::remove_file(&plain).unwrap();
        let e = result.err().unwrap().to_string();
        assert_eq!(
            e,
            format!("handlers.convert.program: {} is not executable (chmod +x it)", plain.display())
        );
    }

    #[test]
    fn relative_programs_resolve_against_the_files_directory() {
        let text = "[handlers.c]\nkind = \"command\"\nprogram = \"true\"";
        assert!(parse(text, Path::new("/bin")).is_ok());
        let e = parse(text, Path::new("/nonexistent")).err().unwrap().to_string();
        assert!(e.contains("/nonexistent/true"), "{e}");
    }

    #[test]
    fn rejects_bad_names_and_shapes() {
        let e = error("[handlers.\"bad name\"]\nkind = \"echo\"");
        assert!(e.starts_with("handlers.bad name: invalid handler name"), "{e}");
        let long = "n".repeat(65);
        let e = error(&format!("[handlers.{long}]\nkind = \"echo\""));
        assert!(e.contains("invalid handler name"), "{e}");
        assert!(parse(&format!("[handlers.{}]\nkind = \"echo\"", "n".repeat(64)), Path::new("/")).is_ok());

        let e = error("[handler.echo]\nkind = \"echo\"");
        assert!(e.starts_with("handler: unknown key"), "{e}");
        assert!(error("").starts_with("handlers: no handlers defined"));
        assert!(error("handlers = 1").starts_with("handlers: must be a table"));
        assert!(error("[handlers]\necho = \"echo\"").starts_with("handlers.echo: must be a table"));
        assert!(error("[handlers.echo\nkind = 1").starts_with("invalid TOML: "));
    }

    #[test]
    fn load_names_the_file() {
        let missing = Path::new("/nonexistent/handlers.toml");
        let e = load(missing).err().unwrap().to_string();
        assert!(e.starts_with("cannot read handlers file /nonexistent/handlers.toml: "), "{e}");

        let dir = std::env::temp_dir().join(format!("cairn-handlers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("handlers.toml");
        std::fs::write(&path, "[handlers.x]\nkind = \"ftp\"").unwrap();
        let e = load(&path).err().unwrap().to_string();
        std::fs::write(&path, EXAMPLE).unwrap();
        let loaded = load(&path).map(|set| set.names().count());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            e,
            format!(
                "handlers file {}: handlers.x.kind: unknown kind \"ftp\"; use \"echo\", \"http\" or \"command\"",
                path.display()
            )
        );
        assert_eq!(loaded.unwrap(), 3);
    }
}
