//! `command`: runs a configured program for each request — never a command line taken from the
//! request, and never through a shell.
//!
//! The arguments come from the configuration. One written `{field}` (the whole argument) is
//! replaced by the payload's top-level field `field`, which must be a string, number or bool; a
//! string starting with `-` is refused so a payload cannot smuggle in an option, unless the
//! placeholder is written `{field:raw}`. `{field}` inside a longer argument is left as it is.
//!
//! The program gets the payload as JSON on stdin and in `CAIRN_PAYLOAD` (only up to 64 KiB:
//! larger payloads are on stdin alone), `CAIRN_REQUEST_ID`, `CAIRN_ATTEMPT`,
//! `CAIRN_PROGRESS_KEY`, `CAIRN_PROGRESS_URL` (so a script can
//! `curl -d '{"progress":0.5}' "$CAIRN_PROGRESS_URL"`), `TRACEPARENT` when the request carries
//! one, `CAIRN_STREAMS_DIR` (a private temporary directory holding one file per data stream,
//! named as the stream; removed after the run), and the configured `env`. Of the processor's own
//! environment it inherits only what `inherited` lists (PATH, HOME, the locale, …): nothing
//! that could hold a secret.
//!
//! Outcome:
//! - exit status 0: success; stdout is the result (JSON if it parses, else the trimmed text as a
//!   string, `null` if empty; at most 1 MiB).
//! - exit status 2 means **the input is wrong**: the request fails for good, it is not retried.
//! - any other status, or a signal: retried; the error has the status and the end of stderr.
//! - timeout or cancellation: the program's whole process group is killed (so the children of a
//!   script die too) and the attempt is retried.
//!
//! The program runs in its own process group; when it exits, whatever it left running in that
//! group is killed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::http::parse_output;
use crate::handler::{Context, Handler, HandlerError};
use cairn_runtime::handlers_file::{self, CommandArg, ConfigError};

/// The exit status by which a program says its input is wrong (not worth retrying).
pub const EXIT_INPUT_WRONG: i32 = 2;
/// Largest stdout kept as the result; a program writing more fails the request.
const MAX_STDOUT_BYTES: usize = 1 << 20;
/// How much of the end of stderr an error message quotes.
const STDERR_TAIL_BYTES: usize = 1024;
/// Above this, the payload is not put in `CAIRN_PAYLOAD`: Linux refuses an environment string
/// over 128 KiB, and the program would not start at all.
const MAX_ENV_PAYLOAD_BYTES: usize = 64 * 1024;

pub struct CommandHandler {
    program: PathBuf,
    args: Vec<CommandArg>,
    timeout: Option<Duration>,
    env: BTreeMap<String, String>,
}

impl CommandHandler {
    /// Checks that `program` is an executable file and that the placeholders in `args` are well
    /// formed (the handlers file's rule, [`CommandArg::parse`]). A relative `program` is taken
    /// from the current directory, never searched in `PATH`.
    pub fn new(program: impl Into<PathBuf>, args: Vec<String>) -> Result<Self, ConfigError> {
        Self::with_args(program, handlers_file::command_args(args)?)
    }

    /// [`CommandHandler::new`] with arguments already parsed, as the handlers file gives them.
    pub(crate) fn with_args(program: impl Into<PathBuf>, args: Vec<CommandArg>) -> Result<Self, ConfigError> {
        let program = program.into();
        let program = std::path::absolute(&program)
            .map_err(|e| ConfigError::invalid("program", format!("{}: {e}", program.display())))?;
        check_executable(&program).map_err(|message| ConfigError::invalid("program", message))?;
        Ok(Self { program, args, timeout: None, env: BTreeMap::new() })
    }

    /// Kills the program when an attempt runs longer; by default only cancellation stops it.
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, ConfigError> {
        self.timeout = Some(handlers_file::check_timeout(timeout)?);
        Ok(self)
    }

    /// Adds environment variables; the ones the processor sets itself
    /// ([`handlers_file::RESERVED_ENV`]) are refused, as the handlers file refuses them.
    pub fn with_env(mut self, env: BTreeMap<String, String>) -> Result<Self, ConfigError> {
        handlers_file::check_env(&env)?;
        self.env.extend(env);
        Ok(self)
    }

    /// The arguments for this payload; every error is the payload's fault, hence permanent.
    fn render_args(&self, ctx: &Context) -> Result<Vec<String>, HandlerError> {
        self.args
            .iter()
            .map(|arg| match arg {
                CommandArg::Literal(text) => Ok(text.clone()),
                CommandArg::Field { name, raw } => {
                    field_value(ctx, name, *raw).map_err(HandlerError::Permanent)
                }
            })
            .collect()
    }

    async fn run(&self, ctx: &Context) -> Result<Value, HandlerError> {
        let args = self.render_args(ctx)?;
        // Removed (with its files) when the run ends, however it ends.
        let streams_dir = write_streams(ctx).await?;
        let payload = ctx.payload.to_string();
        let mut command = tokio::process::Command::new(&self.program);
        // Nothing of the processor's own environment reaches the program but what a program needs
        // to run (a variable such as CAIRN_REDIS_URL may hold a password): the allowlist, then the
        // handler's configured `env`, then Cairn's variables.
        command.env_clear();
        for (name, value) in std::env::vars_os() {
            if name.to_str().is_some_and(inherited) {
                command.env(name, value);
            }
        }
        command
            .args(&args)
            .envs(&self.env)
            .env("CAIRN_REQUEST_ID", &ctx.request_id)
            .env("CAIRN_ATTEMPT", ctx.attempt.to_string())
            .env("CAIRN_PROGRESS_KEY", ctx.progress_key.as_str())
            .env("CAIRN_PROGRESS_URL", ctx.progress_url_with_token())
            .env("CAIRN_STREAMS_DIR", streams_dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if payload.len() <= MAX_ENV_PAYLOAD_BYTES {
            command.env("CAIRN_PAYLOAD", &payload);
        }
        if let Some(traceparent) = ctx.traceparent.as_deref().filter(|t| !t.contains('\0')) {
            command.env("TRACEPARENT", traceparent);
        }

        let mut child = command.spawn().map_err(|e| self.spawn_error(&e))?;
        // The child leads its own group, so its pid is the group's id.
        let pgid = child.id();
        // If this future is dropped mid-run instead of canceled, the group still dies.
        let mut guard = GroupGuard(pgid);
        let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let feed_stdin = async move {
            if let Some(mut stdin) = stdin {
                // A program that does not read its stdin closes the pipe: not an error.
                let _ = stdin.write_all(payload.as_bytes()).await;
            }
        };

        let stop = {
            let exited = async {
                let status = child.wait().await;
                // Stragglers would hold the pipes open and keep the reads below waiting. The
                // child was just reaped, but while its group has members the id cannot be reused.
                if let Some(pgid) = pgid {
                    kill_group(pgid);
                }
                status
            };
            let io =
                async { tokio::join!(read_capped(stdout, MAX_STDOUT_BYTES), read_tail(stderr), feed_stdin) };
            let run = async { tokio::join!(exited, io) };
            let timeout = async {
                match self.timeout {
                    Some(timeout) => tokio::time::sleep(timeout).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = ctx.cancel.cancelled() => Stop::Canceled,
                () = timeout => Stop::TimedOut,
                (status, (stdout, stderr, ())) = run => Stop::Exited(status, stdout, stderr),
            }
        };

        let (status, (stdout, stdout_overflow), stderr) = match stop {
            Stop::Exited(status, stdout, stderr) => (status, stdout, stderr),
            Stop::Canceled => return Err(stopped(&mut child, guard.disarm(), "canceled".into()).await),
            Stop::TimedOut => {
                let timeout = self.timeout.unwrap_or_default();
                return Err(stopped(&mut child, guard.disarm(), format!("timed out after {timeout:?}")).await);
            }
        };
        guard.disarm();
        let status = status
            .map_err(|e| HandlerError::Retryable(format!("lost track of {}: {e}", self.program.display())))?;
        if status.success() {
            if stdout_overflow {
                return Err(HandlerError::Permanent(format!(
                    "{} wrote more than {MAX_STDOUT_BYTES} bytes to stdout; \
                     return a reference to large results instead",
                    self.program.display()
                )));
            }
            return Ok(parse_output(&stdout));
        }
        Err(self.exit_error(status, &stderr))
    }

    fn exit_error(&self, status: ExitStatus, stderr: &[u8]) -> HandlerError {
        let stderr = tail_text(stderr);
        let stderr = if stderr.is_empty() { String::new() } else { format!(": {stderr}") };
        let program = self.program.display();
        match (status.code(), status.signal()) {
            (Some(EXIT_INPUT_WRONG), _) => HandlerError::Permanent(format!(
                "{program} exited with status {EXIT_INPUT_WRONG} (the input is wrong){stderr}"
            )),
            (Some(code), _) => {
                HandlerError::Retryable(format!("{program} exited with status {code}{stderr}"))
            }
            (None, Some(signal)) => {
                HandlerError::Retryable(format!("{program} was killed by signal {signal}{stderr}"))
            }
            (None, None) => HandlerError::Retryable(format!("{program} ended with {status}{stderr}")),
        }
    }

    fn spawn_error(&self, error: &std::io::Error) -> HandlerError {
        let message = format!("cannot start {}: {error}", self.program.display());
        // E2BIG: the arguments and environment built from this payload are too large.
        if error.raw_os_error() == Some(7) {
            HandlerError::Permanent(message)
        } else {
            HandlerError::Retryable(message)
        }
    }
}

impl Handler for CommandHandler {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        self.run(ctx).boxed()
    }
}

/// Kills the group of a program that must stop and reaps it. The group goes first, while the
/// child is not yet reaped and its id still names the group.
/// A private temporary directory (mode 0700) with one file per data stream, written from Redis.
async fn write_streams(ctx: &Context) -> Result<tempfile::TempDir, HandlerError> {
    let failed = |what: &str, e: std::io::Error| {
        HandlerError::Retryable(format!("cannot {what} the data streams: {e}"))
    };
    let dir = tempfile::Builder::new()
        .prefix("cairn-streams-")
        .tempdir()
        .map_err(|e| failed("create a directory for", e))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(|e| failed("create a directory for", e))?;
    for stream in ctx.streams.list() {
        let Some(mut reader) = ctx.streams.open(&stream.name) else { continue };
        let mut file =
            tokio::fs::File::create(dir.path().join(&stream.name)).await.map_err(|e| failed("write", e))?;
        let copied = tokio::select! {
            copied = tokio::io::copy(&mut reader, &mut file) => copied.map_err(|e| failed("write", e))?,
            () = ctx.cancel.cancelled() => return Err(HandlerError::Retryable("canceled".into())),
        };
        file.flush().await.map_err(|e| failed("write", e))?;
        if copied != stream.bytes {
            return Err(HandlerError::Retryable(format!(
                "data stream {:?} has {copied} bytes, not the {} its request recorded",
                stream.name, stream.bytes
            )));
        }
    }
    Ok(dir)
}

async fn stopped(child: &mut tokio::process::Child, pgid: Option<u32>, reason: String) -> HandlerError {
    if let Some(pgid) = pgid {
        kill_group(pgid);
    }
    let _ = child.kill().await;
    HandlerError::Retryable(reason)
}

enum Stop {
    Canceled,
    TimedOut,
    Exited(std::io::Result<ExitStatus>, (Vec<u8>, bool), Vec<u8>),
}

fn check_executable(program: &Path) -> Result<(), String> {
    let shown = program.display();
    let metadata = std::fs::metadata(program).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{shown} does not exist"),
        _ => format!("{shown}: {e}"),
    })?;
    if !metadata.is_file() {
        return Err(format!("{shown} is not a file"));
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(format!("{shown} is not executable (chmod +x it)"));
    }
    Ok(())
}

fn field_value(ctx: &Context, name: &str, raw: bool) -> Result<String, String> {
    let value = ctx
        .payload
        .get(name)
        .ok_or_else(|| format!("payload field {name:?} is required by handler {:?}", ctx.handler))?;
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null | Value::Array(_) | Value::Object(_) => {
            return Err(format!("payload field {name:?} must be a string, number or bool"));
        }
    };
    if !raw && text.starts_with('-') {
        return Err(format!(
            "payload field {name:?} must not start with '-' (it would be read as an option by handler {:?})",
            ctx.handler
        ));
    }
    if text.contains('\0') {
        return Err(format!("payload field {name:?} must not contain a NUL character"));
    }
    Ok(text)
}

/// Reads `pipe` to its end, keeping the first `limit` bytes; says whether more came. It keeps
/// reading past the limit so the program never blocks on a full pipe.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> (Vec<u8>, bool) {
    let (mut kept, mut overflow) = (Vec::new(), false);
    let Some(mut pipe) = pipe else { return (kept, overflow) };
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        let room = limit - kept.len();
        kept.extend_from_slice(&buf[..n.min(room)]);
        overflow |= n > room;
    }
    (kept, overflow)
}

/// Reads `pipe` to its end, keeping only its last [`STDERR_TAIL_BYTES`].
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut tail = Vec::new();
    let Some(mut pipe) = pipe else { return tail };
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 4 * STDERR_TAIL_BYTES {
            tail.drain(..tail.len() - STDERR_TAIL_BYTES);
        }
    }
    let excess = tail.len().saturating_sub(STDERR_TAIL_BYTES);
    tail.drain(..excess);
    tail
}

/// The text of a tail cut at an arbitrary byte: a partial first character is dropped.
fn tail_text(bytes: &[u8]) -> String {
    let start = bytes.iter().take(3).take_while(|b| (**b & 0b1100_0000) == 0b1000_0000).count();
    String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
}

/// Kills a program's process group when dropped while armed.
struct GroupGuard(Option<u32>);

impl GroupGuard {
    /// The group id, now the caller's to kill.
    fn disarm(&mut self) -> Option<u32> {
        self.0.take()
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            kill_group(pgid);
        }
    }
}

/// SIGKILLs every process of group `pgid`: one `kill(-pgid, SIGKILL)` system call, which never
/// blocks, so `Drop` may call it too.
fn kill_group(pgid: u32) {
    use rustix::process::{Pid, Signal, kill_process_group};
    let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) else { return };
    match kill_process_group(pid, Signal::KILL) {
        // The group is gone already: nothing left to stop.
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => tracing::warn!(pgid, error = %e, "cannot kill the process group of a command"),
    }
}

/// The processor's variables a `command` program inherits: where programs and the home folder
/// are, the locale, the time zone and the temporary folder; nothing that could hold a secret.
fn inherited(name: &str) -> bool {
    matches!(name, "PATH" | "HOME" | "USER" | "LOGNAME" | "SHELL" | "LANG" | "LANGUAGE" | "TZ" | "TMPDIR")
        || name.starts_with("LC_")
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;

    use super::*;
    use crate::handlers::test_context;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    fn handler(script: &str, args: &[&str]) -> CommandHandler {
        CommandHandler::new(fixture(script), args.iter().map(|a| a.to_string()).collect()).unwrap()
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("cairn-command-{}-{name}", std::process::id()))
    }

    /// Gone, or a zombie waiting for an init process that does not reap (some containers).
    fn is_dead(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    async fn wait_dead(pid: &str) -> bool {
        for _ in 0..50 {
            let alive = std::process::Command::new("kill").args(["-0", pid]).status().unwrap().success();
            if !alive || is_dead(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn success_returns_stdout_json_and_passes_args_env_and_stdin() {
        let handler = handler("ok.sh", &["--width", "{width}", "{input}", "{flag}", "{width}x"])
            .with_env(BTreeMap::from([("MODE".into(), "fast".into())]))
            .unwrap();
        let payload = json!({"width": 300, "input": "a.png", "flag": true});
        let mut ctx = test_context(payload.clone());
        ctx.attempt = 3;
        let result = handler.handle(&ctx).await.unwrap();
        assert_eq!(
            result,
            json!({
                "args": ["--width", "300", "a.png", "true", "{width}x"],
                "progress_url": ctx.progress_url,
                "progress_key": ctx.progress_key.as_str(),
                "request_id": ctx.request_id,
                "attempt": "3",
                "mode": "fast",
                "payload_env": payload,
                "stdin": payload,
            })
        );
    }

    /// The program sees PATH and Cairn's variables, never the processor's own (cargo runs this
    /// test with CARGO_* variables set; a deployed processor has CAIRN_REDIS_URL and the like).
    #[tokio::test]
    async fn the_program_inherits_nothing_that_could_hold_a_secret() {
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some(), "cargo sets it for tests");
        let handler = CommandHandler::new("/usr/bin/env", vec![]).unwrap();
        let Ok(Value::String(env)) = handler.handle(&test_context(json!({}))).await else {
            panic!("env prints text")
        };
        let names: Vec<&str> = env.lines().filter_map(|line| line.split_once('=').map(|(n, _)| n)).collect();
        assert!(names.contains(&"PATH") && names.contains(&"CAIRN_REQUEST_ID"), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("CARGO")), "{names:?}");
    }

    #[tokio::test]
    async fn text_output_is_a_trimmed_string() {
        let handler = CommandHandler::new("/bin/echo", vec!["hello".into(), "{name}".into()]).unwrap();
        let result = handler.handle(&test_context(json!({"name": "world"}))).await;
        assert_eq!(result, Ok(Value::String("hello world".into())));
    }

    #[tokio::test]
    async fn exit_1_is_retryable_with_the_end_of_stderr() {
        let result = handler("fail.sh", &[]).handle(&test_context(json!({}))).await;
        let Err(HandlerError::Retryable(message)) = result else {
            panic!("expected retryable, got {result:?}")
        };
        let prefix = format!("{} exited with status 1: ", fixture("fail.sh").display());
        assert!(message.starts_with(&prefix), "{message}");
        assert!(message.ends_with("disk full"), "{message}");
        assert!(message.len() <= prefix.len() + STDERR_TAIL_BYTES, "{}", message.len());
    }

    #[tokio::test]
    async fn exit_2_is_permanent() {
        let result = handler("bad_input.sh", &[]).handle(&test_context(json!({}))).await;
        assert_eq!(
            result,
            Err(HandlerError::Permanent(format!(
                "{} exited with status 2 (the input is wrong): width must be positive",
                fixture("bad_input.sh").display()
            )))
        );
    }

    #[tokio::test]
    async fn cancel_kills_the_program_and_its_children() {
        let pid_file = temp_path("cancel.pid");
        let _ = std::fs::remove_file(&pid_file);
        let handler = handler("slow.sh", &["{pid_file}"]);
        let ctx = test_context(json!({"pid_file": pid_file.to_str().unwrap()}));
        let cancel = ctx.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        });
        let started = Instant::now();
        let result = handler.handle(&ctx).await;
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert_eq!(result, Err(HandlerError::Retryable("canceled".into())));
        let grandchild = std::fs::read_to_string(&pid_file).unwrap();
        let _ = std::fs::remove_file(&pid_file);
        assert!(wait_dead(grandchild.trim()).await, "the script's sleep {grandchild} survived");
    }

    #[tokio::test]
    async fn timeout_kills_the_program_and_its_children() {
        let pid_file = temp_path("timeout.pid");
        let _ = std::fs::remove_file(&pid_file);
        let handler = handler("slow.sh", &["{pid_file}"]).with_timeout(Duration::from_millis(100)).unwrap();
        let ctx = test_context(json!({"pid_file": pid_file.to_str().unwrap()}));
        let started = Instant::now();
        let result = handler.handle(&ctx).await;
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert_eq!(result, Err(HandlerError::Retryable("timed out after 100ms".into())));
        // The script may not have got as far as writing the file in 100 ms.
        if let Ok(grandchild) = std::fs::read_to_string(&pid_file) {
            let _ = std::fs::remove_file(&pid_file);
            assert!(wait_dead(grandchild.trim()).await, "the script's sleep {grandchild} survived");
        }
    }

    #[tokio::test]
    async fn dropping_a_run_kills_the_program_and_its_children() {
        let pid_file = temp_path("drop.pid");
        let _ = std::fs::remove_file(&pid_file);
        let handler = handler("slow.sh", &["{pid_file}"]);
        let ctx = test_context(json!({"pid_file": pid_file.to_str().unwrap()}));
        let run = tokio::time::timeout(Duration::from_millis(300), handler.handle(&ctx)).await;
        assert!(run.is_err(), "slow.sh finished: {run:?}");
        let grandchild = std::fs::read_to_string(&pid_file).unwrap();
        let _ = std::fs::remove_file(&pid_file);
        assert!(wait_dead(grandchild.trim()).await, "the script's sleep {grandchild} survived");
    }

    #[tokio::test]
    async fn processes_left_behind_are_killed_when_the_program_exits() {
        let pid_file = temp_path("straggler.pid");
        let _ = std::fs::remove_file(&pid_file);
        let handler = handler("straggler.sh", &["{pid_file}"]);
        let ctx = test_context(json!({"pid_file": pid_file.to_str().unwrap()}));
        let started = Instant::now();
        // The straggler holds stdout open: without the group kill this would wait 30 s.
        assert_eq!(handler.handle(&ctx).await, Ok(Value::String("done".into())));
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        let straggler = std::fs::read_to_string(&pid_file).unwrap();
        let _ = std::fs::remove_file(&pid_file);
        assert!(wait_dead(straggler.trim()).await, "the script's sleep {straggler} survived");
    }

    #[tokio::test]
    async fn payload_fields_are_checked_before_running() {
        let handler = &handler("ok.sh", &["{input}"]);
        let run = |payload: Value| {
            let ctx = test_context(payload);
            async move { handler.handle(&ctx).await }
        };
        assert_eq!(
            run(json!({"input": "-rf"})).await,
            Err(HandlerError::Permanent(
                "payload field \"input\" must not start with '-' (it would be read as an option by handler \"test\")"
                    .into()
            ))
        );
        assert_eq!(
            run(json!({"other": 1})).await,
            Err(HandlerError::Permanent("payload field \"input\" is required by handler \"test\"".into()))
        );
        assert_eq!(
            run(json!({"input": {"nested": 1}})).await,
            Err(HandlerError::Permanent("payload field \"input\" must be a string, number or bool".into()))
        );
        assert_eq!(
            run(json!(["not", "an", "object"])).await,
            Err(HandlerError::Permanent("payload field \"input\" is required by handler \"test\"".into()))
        );
        // A negative number is a value, not an option, but it starts with '-' just the same.
        assert!(matches!(run(json!({"input": -3})).await, Err(HandlerError::Permanent(_))));
    }

    #[tokio::test]
    async fn raw_placeholders_accept_a_leading_dash() {
        let handler = CommandHandler::new("/bin/echo", vec!["{offset:raw}".into(), "x".into()]).unwrap();
        let result = handler.handle(&test_context(json!({"offset": "-5"}))).await;
        assert_eq!(result, Ok(Value::String("-5 x".into())));
    }

    #[tokio::test]
    async fn oversized_stdout_is_permanent() {
        // `yes` writes forever; `head` stops it after 2 MiB.
        let script = temp_path("big.sh");
        std::fs::write(&script, "#!/bin/sh\nyes | head -c 2097152\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let handler = CommandHandler::new(&script, vec![]).unwrap();
        let result = handler.handle(&test_context(json!({}))).await;
        let _ = std::fs::remove_file(&script);
        assert!(
            matches!(result, Err(HandlerError::Permanent(ref m)) if m.contains("more than 1048576 bytes")),
            "{result:?}"
        );
    }

    #[test]
    fn rejects_unusable_settings() {
        let e = CommandHandler::new("/nonexistent/tool", vec![]).err().unwrap().to_string();
        assert_eq!(e, "program: /nonexistent/tool does not exist");
        let e = CommandHandler::new("/bin", vec![]).err().unwrap().to_string();
        assert_eq!(e, "program: /bin is not a file");
        let echo = || CommandHandler::new("/bin/echo", vec![]).unwrap();
        let e = echo().with_env(BTreeMap::from([("CAIRN_PROGRESS_URL".into(), "x".into())])).err().unwrap();
        assert_eq!(e.to_string(), "env.CAIRN_PROGRESS_URL: reserved: the processor sets it for each request");
        let e = echo().with_env(BTreeMap::from([("A=B".into(), "x".into())])).err().unwrap();
        assert_eq!(e.to_string(), "env.A=B: not a valid environment variable name");
        let e = echo().with_timeout(Duration::ZERO).err().unwrap();
        assert_eq!(e.to_string(), "timeout: must be longer than 0s");
        let e = CommandHandler::new("/bin/echo", vec!["{width:rwa}".into()]).err().unwrap().to_string();
        assert!(e.starts_with("args[0]: unknown placeholder modifier \"rwa\""), "{e}");
    }

    #[test]
    fn relative_programs_are_not_searched_in_path() {
        // `true` is in PATH, but not in the current directory (the crate's).
        let e = CommandHandler::new("true", vec![]).err().unwrap().to_string();
        assert!(e.ends_with("/request-processor/true does not exist"), "{e}");
    }

    #[test]
    fn killing_a_group_sends_sigkill() {
        use std::os::unix::process::CommandExt;

        let mut sleeper = std::process::Command::new("sleep");
        sleeper.arg("30").process_group(0);
        let mut sleeper = sleeper.spawn().unwrap();
        kill_group(sleeper.id());
        assert_eq!(sleeper.wait().unwrap().signal(), Some(9));
    }

    #[test]
    fn stderr_tails_drop_a_cut_character() {
        assert_eq!(tail_text("é ok\n".as_bytes()), "é ok");
        assert_eq!(tail_text(&"é ok".as_bytes()[1..]), "ok");
    }
}
