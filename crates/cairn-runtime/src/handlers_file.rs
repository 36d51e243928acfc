//! The handlers file (`CAIRN_HANDLERS_FILE`) as written: its TOML taken apart into one
//! [`HandlerSpec`] per handler, every structural rule checked (names, kinds, fields and their
//! types, durations, unknown keys), nothing about the host (whether a program exists). The request
//! processor (`handlers::config`, which then builds the handlers) and the ingress (which needs only
//! the names) both read the file through [`parse`], so they accept the same files. The format is
//! documented with the processor's `handlers::config`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

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
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), message: message.into() }
    }

    /// Puts `prefix.` in front of the field an error names.
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Self::Invalid { field, message } => Self::Invalid { field: format!("{prefix}.{field}"), message },
            other => other,
        }
    }
}

/// One handler's settings, as the file gives them.
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerSpec {
    Echo,
    Http {
        url: String,
        timeout: Duration,
    },
    /// `program` as written: a relative path is resolved by whoever runs it.
    Command {
        program: String,
        args: Vec<String>,
        timeout: Option<Duration>,
        env: BTreeMap<String, String>,
    },
}

/// Reads the handlers file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })
}

/// The handler names of the handlers file at `path`, checked as the processor checks them.
pub fn names(path: &Path) -> Result<Vec<String>, ConfigError> {
    let specs =
        parse(&read(path)?).map_err(|e| ConfigError::File { path: path.to_owned(), source: Box::new(e) })?;
    Ok(specs.into_keys().collect())
}

/// Parses a handlers file's text into its handlers by name.
pub fn parse(text: &str) -> Result<BTreeMap<String, HandlerSpec>, ConfigError> {
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
        let also = if handlers.is_empty() { ", and there is no [handlers.NAME] table" } else { "" };
        return Err(ConfigError::invalid(
            key.as_str(),
            format!("unknown key; expected only [handlers.NAME] tables{also}"),
        ));
    }
    if handlers.is_empty() {
        return Err(ConfigError::invalid("handlers", "no handlers defined; add a [handlers.NAME] table"));
    }
    let mut specs = BTreeMap::new();
    for (name, spec) in handlers {
        let prefix = format!("handlers.{name}");
        check_name(&name).map_err(|message| ConfigError::invalid(&prefix, message))?;
        let Value::Table(spec) = spec else {
            return Err(ConfigError::invalid(prefix, format!("must be a table, found {}", spec.type_str())));
        };
        let spec = handler_spec(Fields::new(spec)).map_err(|e| e.within(&prefix))?;
        specs.insert(name, spec);
    }
    Ok(specs)
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

fn handler_spec(mut fields: Fields) -> Result<HandlerSpec, ConfigError> {
    let kind = fields
        .string("kind")?
        .ok_or_else(|| ConfigError::invalid("kind", "missing; use \"echo\", \"http\" or \"command\""))?;
    match kind.as_str() {
        "echo" => {
            fields.finish(&["kind"])?;
            Ok(HandlerSpec::Echo)
        }
        "http" => {
            let url = fields.string("url")?.ok_or_else(|| ConfigError::invalid("url", "missing"))?;
            let timeout = fields.duration("timeout")?.unwrap_or(DEFAULT_HTTP_TIMEOUT);
            fields.finish(&["kind", "url", "timeout"])?;
            Ok(HandlerSpec::Http { url, timeout })
        }
        "command" => {
            let program =
                fields.string("program")?.ok_or_else(|| ConfigError::invalid("program", "missing"))?;
            let args = fields.strings("args")?.unwrap_or_default();
            let timeout = fields.duration("timeout")?;
            let env = fields.string_map("env")?.unwrap_or_default();
            fields.finish(&["kind", "program", "args", "timeout", "env"])?;
            Ok(HandlerSpec::Command { program, args, timeout, env })
        }
        other => Err(ConfigError::invalid(
            "kind",
            format!("unknown kind {other:?}; use \"echo\", \"http\" or \"command\""),
        )),
    }
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
        crate::parse_duration(&text).map(Some).map_err(|message| ConfigError::invalid(field, message))
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

    #[test]
    fn specs_keep_what_the_file_says() {
        let specs = parse(
            "[handlers.c]\nkind = \"command\"\nprogram = \"bin/run\"\nargs = [\"{x}\"]\n\n[handlers.h]\nkind = \"http\"\nurl = \"http://a\"",
        )
        .unwrap();
        assert_eq!(
            specs["c"],
            HandlerSpec::Command {
                program: "bin/run".into(),
                args: vec!["{x}".into()],
                timeout: None,
                env: BTreeMap::new()
            }
        );
        assert_eq!(specs["h"], HandlerSpec::Http { url: "http://a".into(), timeout: DEFAULT_HTTP_TIMEOUT });
    }

    #[test]
    fn a_file_without_handlers_says_so() {
        let e = parse("[other]\nx = 1").unwrap_err().to_string();
        assert_eq!(
            e,
            "other: unknown key; expected only [handlers.NAME] tables, and there is no [handlers.NAME] table"
        );
    }
}
