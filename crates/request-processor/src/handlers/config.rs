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
//! `handlers.convert.timeout: invalid duration "soon": …`. Everything but the program is checked
//! by `cairn_runtime::handlers_file`, which the ingress reads the file with too, so both refuse
//! the same files; this module builds the handlers and checks what depends on this host (the
//! program).

use std::path::Path;
use std::sync::Arc;

use super::command::CommandHandler;
use super::echo::Echo;
use super::http::HttpHandler;
use crate::handler::HandlerSet;
use cairn_runtime::handlers_file::{self as spec, ConfigError, HandlerSpec};

/// Reads and checks the handlers file at `path`; see the [module docs](self) for its format.
pub fn load(path: &Path) -> Result<HandlerSet, ConfigError> {
    let text = spec::read(path)?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    parse(&text, base_dir).map_err(|e| ConfigError::File { path: path.to_owned(), source: Box::new(e) })
}

/// Parses a handlers file's text ([`spec::parse`]) and builds its handlers; relative `program`
/// paths resolve against `base_dir`.
pub fn parse(text: &str, base_dir: &Path) -> Result<HandlerSet, ConfigError> {
    let mut set = HandlerSet::new();
    for (name, spec) in spec::parse(text)? {
        let built = build(spec, base_dir).map_err(|e| e.within(&format!("handlers.{name}")))?;
        set.insert(&name, built);
    }
    Ok(set)
}

/// The handlers offered when no handlers file is configured: just `echo`.
pub fn default_handlers() -> HandlerSet {
    HandlerSet::new().with("echo", Echo)
}

fn build(spec: HandlerSpec, base_dir: &Path) -> Result<Arc<dyn crate::handler::Handler>, ConfigError> {
    Ok(match spec {
        HandlerSpec::Echo => Arc::new(Echo),
        HandlerSpec::Http { url, timeout } => Arc::new(HttpHandler::with_url(url, timeout)?),
        HandlerSpec::Command { program, args, timeout, env } => {
            let mut handler = CommandHandler::with_args(base_dir.join(program), args)?.with_env(env)?;
            if let Some(timeout) = timeout {
                handler = handler.with_timeout(timeout)?;
            }
            Arc::new(handler)
        }
    })
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

    /// The ingress reads the file with the shared parser alone: everything but the program must
    /// be refused there, with the processor's own message.
    #[test]
    fn what_the_processor_refuses_the_shared_parser_refuses_alike() {
        let bad = [
            "[handlers.x]\nkind = \"ftp\"",
            "[handlers.h]\nkind = \"http\"\nurl = \"https://example.com\"",
            "[handlers.h]\nkind = \"http\"\nurl = \"ftp://example.com\"",
            "[handlers.h]\nkind = \"http\"\nurl = \"not a url\"",
            "[handlers.h]\nkind = \"http\"\nurl = \"http://a\"\ntimeout = \"0s\"",
            "[handlers.c]\nkind = \"command\"\nprogram = \"/bin/true\"\nargs = [\"{x:rwa}\"]",
            "[handlers.c]\nkind = \"command\"\nprogram = \"/bin/true\"\nenv = { TRACEPARENT = \"x\" }",
            "[handlers.c]\nkind = \"command\"\nprogram = \"/bin/true\"\nenv = { \"A=B\" = \"x\" }",
            "[handlers.c]\nkind = \"command\"\nprogram = \"/bin/true\"\ntimeout = \"0s\"",
        ];
        for text in bad {
            let shared = spec::parse(text).err().map(|e| e.to_string());
            assert!(shared.is_some(), "the shared parser accepts {text:?}");
            assert_eq!(Some(error(text)), shared, "{text}");
        }
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
