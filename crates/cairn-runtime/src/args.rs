//! Parsing a service's flags and `CAIRN_*` variables so a bad value names its variable.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use std::error::Error as _;

use clap::Parser;

/// Parses `T` from the process arguments and environment. A bad value set through an
/// environment variable exits with a message that names the variable, e.g.
/// `error: CAIRN_PROGRESS_SHARDS="0" is invalid: 0 is not in 1..=256`.
pub fn parse_args<T: Parser>() -> T {
    parse_args_with(T::command())
}

/// [`parse_args`] for a command built at run time (its arguments are `T`'s).
pub fn parse_args_with<T: clap::FromArgMatches>(command: clap::Command) -> T {
    let mut command = hide_env_values(command);
    let parsed = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|mut matches| T::from_arg_matches_mut(&mut matches));
    match parsed {
        Ok(parsed) => parsed,
        Err(error) => match explain(&command, &error) {
            Some(message) => {
                eprintln!("{message}");
                std::process::exit(2)
            }
            // `--help` and `--version` (stdout, exit 0) and every other error, as clap prints them.
            None => error.exit(),
        },
    }
}

/// Like [`parse_args`] but returns the (explained) error text instead of exiting; `--help` and
/// `--version` come back as their text too.
pub fn try_parse_from<T, I, S>(args: I) -> Result<T, String>
where
    T: Parser,
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let mut command = hide_env_values(T::command());
    let error = match command.try_get_matches_from_mut(args) {
        Ok(mut matches) => match T::from_arg_matches_mut(&mut matches) {
            Ok(parsed) => return Ok(parsed),
            Err(error) => error,
        },
        Err(error) => error,
    };
    Err(explain(&command, &error).unwrap_or_else(|| error.render().to_string()))
}

/// Names the environment variable behind an invalid value, when the value came from one.
fn explain(command: &clap::Command, error: &clap::Error) -> Option<String> {
    if !matches!(error.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
        return None;
    }
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else { return None };
    let long = arg.trim_start_matches("--").split([' ', '=']).next()?;
    let env = find_env(command, long)?;
    let value = std::env::var(&env).ok()?;
    let reason = error
        .source()
        .map(ToString::to_string)
        .or_else(|| error.get(ContextKind::ValidValue).map(|valid| format!("expected one of {valid}")));
    let reason = reason.unwrap_or_else(|| "not a valid value".into());
    Some(format!("error: {env}={:?} is invalid: {reason}", redact_url(&value)))
}

/// `--help` shows which variable sets each flag, never the value it has in this environment (a
/// URL may hold a password).
fn hide_env_values(command: clap::Command) -> clap::Command {
    command.mut_args(|arg| arg.hide_env_values(true)).mut_subcommands(hide_env_values)
}

/// A URL (or comma-separated URLs) fit for logs and errors: any password replaced by `***`
/// (`redis://user:***@host:6379`). Text that is not a URL comes back unchanged.
pub fn redact_url(text: &str) -> String {
    text.split(',')
        .map(|url| {
            let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                    let hidden =
                        if userinfo.contains(':') { format!("{user}:***") } else { "***".to_owned() };
                    format!("{scheme}://{hidden}@{host}{path}")
                }
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn find_env(command: &clap::Command, long: &str) -> Option<String> {
    let here = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    here.or_else(|| command.get_subcommands().find_map(|sub| find_env(sub, long)))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[derive(Parser, Debug)]
    struct Example {
        #[arg(long, env = "CAIRN_TEST_ARGS_SHARDS_UNSET_IN_CI", default_value_t = 4,
              value_parser = clap::value_parser!(u16).range(1..=256))]
        shards: u16,
    }

    #[test]
    fn flag_errors_keep_clap_wording() {
        let error = try_parse_from::<Example, _, _>(["x", "--shards", "0"]).unwrap_err();
        assert!(error.contains("--shards"), "{error}");
    }

    #[test]
    fn passwords_never_leave_a_url() {
        assert_eq!(redact_url("redis://:s3cret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("rediss://token@h"), "rediss://***@h");
        assert_eq!(
            redact_url("redis://a:p@h1:7000,redis://b:q@h2:7000"),
            "redis://a:***@h1:7000,redis://b:***@h2:7000"
        );
        assert_eq!(redact_url("redis://h:6379/a@b"), "redis://h:6379/a@b", "an @ in the path is no userinfo");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[derive(Parser, Debug)]
    struct WithSecret {
        #[arg(long, env = "CAIRN_TEST_ARGS_SECRET_URL", default_value = "redis://127.0.0.1:6379")]
        url: String,
    }

    #[test]
    fn help_names_variables_without_their_values() {
        let command = hide_env_values(WithSecret::command());
        let url = command.get_arguments().find(|a| a.get_id() == "url").unwrap();
        assert!(url.is_hide_env_values_set());
        let help = command.clone().render_long_help().to_string();
        assert!(help.contains("[env: CAIRN_TEST_ARGS_SECRET_URL]"), "{help}");
    }

    #[test]
    fn finds_the_variable_of_a_flag() {
        let command = Example::command();
        assert_eq!(find_env(&command, "shards").as_deref(), Some("CAIRN_TEST_ARGS_SHARDS_UNSET_IN_CI"));
        assert_eq!(find_env(&command, "nope"), None);
    }
}
