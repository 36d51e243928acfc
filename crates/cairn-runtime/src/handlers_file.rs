//! The handlers file (`CAIRN_HANDLERS_FILE`) as written: its TOML taken apart into one checked
//! [`HandlerSpec`] per handler. Every rule that does not depend on the host is checked here: names,
//! kinds, fields and their types, durations, unknown keys, and each kind's own settings (an `http`
//! URL the processor can call, `args` placeholders, `env` names and values, timeouts above zero);
//! whether a `command` program exists and is executable is left to whoever runs it. The request
//! processor (`handlers::config`, which then builds the handlers) and the ingress (which needs only
//! the names) both read the file through [`parse`], so they refuse the same files with the same
//! messages. The format is documented with the processor's `handlers::config`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};
use url::Url;

/// Used by `http` handlers that do not set `timeout`.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);

const MAX_NAME_LEN: usize = 64;

/// Environment variables the processor sets for each run of a `command`; the file may not set them.
pub const RESERVED_ENV: [&str; 7] = [
    "CAIRN_STREAMS_DIR",
    "CAIRN_PAYLOAD",
    "CAIRN_REQUEST_ID",
    "CAIRN_ATTEMPT",
    "CAIRN_PROGRESS_KEY",
    "CAIRN_PROGRESS_URL",
    "TRACEPARENT",
];

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

/// One handler's settings, as the file gives them, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerSpec {
    Echo,
    /// `url` is `http://` with a host ([`http_url`]); `timeout` is above zero.
    Http {
        url: Url,
        timeout: Duration,
    },
    /// `program` as written: a relative path is resolved, and the program checked, by whoever
    /// runs it.
    Command {
        program: String,
        args: Vec<CommandArg>,
        timeout: Option<Duration>,
        env: BTreeMap<String, String>,
    },
}

/// One argument of a `command`, as configured.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandArg {
    Literal(String),
    /// `{name}`: the payload's top-level field `name`; `{name:raw}` lets its value start with `-`.
    Field {
        name: String,
        raw: bool,
    },
}

impl CommandArg {
    /// The argument at `index` of `args`. Only a whole argument `{name}` or `{name:raw}` (`name`
    /// of `[A-Za-z0-9_-]`) is a placeholder; anything else, `{name}` inside a longer argument
    /// included, is literal. An unknown modifier (`{name:rwa}`) is an error, not a literal.
    pub fn parse(arg: String, index: usize) -> Result<CommandArg, ConfigError> {
        let Some(inner) = arg.strip_prefix('{').and_then(|a| a.strip_suffix('}')) else {
            return Ok(CommandArg::Literal(arg));
        };
        let (name, modifier) = match inner.split_once(':') {
            Some((name, modifier)) => (name, Some(modifier)),
            None => (inner, None),
        };
        let is_name =
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !is_name {
            return Ok(CommandArg::Literal(arg));
        }
        let raw = match modifier {
            None => false,
            Some("raw") => true,
            Some(other) => {
                return Err(ConfigError::invalid(
                    format!("args[{index}]"),
                    format!("unknown placeholder modifier {other:?} in {arg:?}; only {{{name}:raw}} exists"),
                ));
            }
        };
        Ok(CommandArg::Field { name: name.to_owned(), raw })
    }
}

/// A `command`'s `args`, each parsed by [`CommandArg::parse`].
pub fn command_args(args: Vec<String>) -> Result<Vec<CommandArg>, ConfigError> {
    args.into_iter().enumerate().map(|(i, arg)| CommandArg::parse(arg, i)).collect()
}

/// Checks a `command`'s `env`: names a process environment can hold, none of [`RESERVED_ENV`],
/// no NUL in a value.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (name, value) in env {
        let field = format!("env.{name}");
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(ConfigError::invalid(field, "not a valid environment variable name"));
        }
        if RESERVED_ENV.contains(&name.as_str()) {
            return Err(ConfigError::invalid(field, "reserved: the processor sets it for each request"));
        }
        if value.contains('\0') {
            return Err(ConfigError::invalid(field, "must not contain a NUL character"));
        }
    }
    Ok(())
}

/// An `http` handler's `url`: a URL the processor can POST to, `http://` with a host (the
/// processor is built without TLS).
pub fn http_url(url: &str) -> Result<Url, ConfigError> {
    let parsed =
        Url::parse(url).map_err(|e| ConfigError::invalid("url", format!("invalid URL {url:?}: {e}")))?;
    match parsed.scheme() {
        "http" => {}
        "https" => {
            return Err(ConfigError::invalid(
                "url",
                format!("{url:?}: this build has no TLS support; use http:// (behind a TLS proxy if needed)"),
            ));
        }
        other => {
            return Err(ConfigError::invalid(
                "url",
                format!("{url:?}: unsupported scheme {other:?}; use http://"),
            ));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid("url", format!("{url:?} has no host")));
    }
    Ok(parsed)
}

/// A handler's `timeout`, refused when zero: an attempt that may not run at all.
pub fn check_timeout(timeout: Duration) -> Result<Duration, ConfigError> {
    if timeout.is_zero() {
        return Err(ConfigError::invalid("timeout", "must be longer than 0s"));
    }
    Ok(timeout)
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
            Ok(HandlerSpec::Http { url: http_url(&url)?, timeout: check_timeout(timeout)? })
        }
        "command" => {
            let program =
                fields.string("program")?.ok_or_else(|| ConfigError::invalid("program", "missing"))?;
            let args = fields.strings("args")?.unwrap_or_default();
            let timeout = fields.duration("timeout")?;
            let env = fields.string_map("env")?.unwrap_or_default();
            fields.finish(&["kind", "program", "args", "timeout", "env"])?;
            let args = command_args(args)?;
            check_env(&env)?;
            let timeout = timeout.map(check_timeout).transpose()?;
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

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(specs) => panic!("expected an error, got {specs:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn command(extra: &str) -> String {
        format!("[handlers.c]\nkind = \"command\"\nprogram = \"bin/run\"\n{extra}")
    }

    fn http(url: &str, extra: &str) -> String {
        format!("[handlers.h]\nkind = \"http\"\nurl = \"{url}\"\n{extra}")
    }

    #[test]
    fn specs_keep_what_the_file_says() {
        let specs = parse(&format!(
            "{}\n{}",
            command("args = [\"-v\", \"{x}\", \"{y:raw}\", \"--in={x}\"]\nenv = { MODE = \"fast\" }"),
            http("http://a:8080/p", "timeout = \"2s\""),
        ))
        .unwrap();
        let literal = |s: &str| CommandArg::Literal(s.into());
        assert_eq!(
            specs["c"],
            HandlerSpec::Command {
                program: "bin/run".into(),
                args: vec![
                    literal("-v"),
                    CommandArg::Field { name: "x".into(), raw: false },
                    CommandArg::Field { name: "y".into(), raw: true },
                    literal("--in={x}"),
                ],
                timeout: None,
                env: BTreeMap::from([("MODE".into(), "fast".into())]),
            }
        );
        assert_eq!(
            specs["h"],
            HandlerSpec::Http {
                url: Url::parse("http://a:8080/p").unwrap(),
                timeout: Duration::from_secs(2)
            }
        );
        let specs = parse(&http("http://a", "")).unwrap();
        assert_eq!(
            specs["h"],
            HandlerSpec::Http { url: Url::parse("http://a").unwrap(), timeout: DEFAULT_HTTP_TIMEOUT }
        );
    }

    #[test]
    fn a_file_without_handlers_says_so() {
        let e = parse("[other]\nx = 1").unwrap_err().to_string();
        assert_eq!(
            e,
            "other: unknown key; expected only [handlers.NAME] tables, and there is no [handlers.NAME] table"
        );
    }

    #[test]
    fn placeholders_are_whole_arguments() {
        let parse = |arg: &str| CommandArg::parse(arg.into(), 0);
        assert_eq!(parse("{width}").unwrap(), CommandArg::Field { name: "width".into(), raw: false });
        assert_eq!(
            parse("{in-put_2:raw}").unwrap(),
            CommandArg::Field { name: "in-put_2".into(), raw: true }
        );
        for literal in ["width", "--width={width}", "{}", "{a b}", "{\"json\": 1}", "{width", "{:raw}"] {
            assert_eq!(parse(literal).unwrap(), CommandArg::Literal(literal.into()));
        }
    }

    #[test]
    fn an_unknown_placeholder_modifier_is_refused() {
        assert_eq!(
            error(&command("args = [\"a\", \"{width:rwa}\"]")),
            "handlers.c.args[1]: unknown placeholder modifier \"rwa\" in \"{width:rwa}\"; only {width:raw} exists"
        );
    }

    #[test]
    fn env_names_the_processor_sets_or_no_process_can_hold_are_refused() {
        assert_eq!(
            error(&command("env = { CAIRN_PROGRESS_URL = \"x\" }")),
            "handlers.c.env.CAIRN_PROGRESS_URL: reserved: the processor sets it for each request"
        );
        for reserved in RESERVED_ENV {
            assert!(
                error(&command(&format!("env = {{ {reserved} = \"x\" }}"))).contains("reserved"),
                "{reserved}"
            );
        }
        assert_eq!(
            error(&command("env = { \"A=B\" = \"x\" }")),
            "handlers.c.env.A=B: not a valid environment variable name"
        );
        assert_eq!(
            error(&command("env = { \"\" = \"x\" }")),
            "handlers.c.env.: not a valid environment variable name"
        );
        assert_eq!(
            error(&command("env = { \"A\\u0000\" = \"x\" }")),
            "handlers.c.env.A\0: not a valid environment variable name"
        );
        assert_eq!(
            error(&command("env = { A = \"x\\u0000y\" }")),
            "handlers.c.env.A: must not contain a NUL character"
        );
    }

    #[test]
    fn http_urls_the_processor_cannot_call_are_refused() {
        assert!(
            error(&http("not a url", "")).starts_with("handlers.h.url: invalid URL \"not a url\": "),
            "{}",
            error(&http("not a url", ""))
        );
        assert_eq!(
            error(&http("https://example.com", "")),
            "handlers.h.url: \"https://example.com\": this build has no TLS support; use http:// (behind a TLS proxy if needed)"
        );
        assert_eq!(
            error(&http("ftp://example.com", "")),
            "handlers.h.url: \"ftp://example.com\": unsupported scheme \"ftp\"; use http://"
        );
    }

    #[test]
    fn zero_timeouts_are_refused() {
        assert_eq!(
            error(&http("http://a", "timeout = \"0s\"")),
            "handlers.h.timeout: must be longer than 0s"
        );
        assert_eq!(error(&command("timeout = \"0ms\"")), "handlers.c.timeout: must be longer than 0s");
    }
}
