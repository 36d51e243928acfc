//! Runs the built `cairn` binary against a real stack: an aggregator, a request processor (with
//! `echo` and the example `steps` handler) and an ingress, in this test process on port 0, on
//! their own Redis key prefix and RabbitMQ vhost (the pattern of ingress's test harness).

#![allow(dead_code)] // Each test binary uses its own part of the harness.

pub mod live;

use std::process::Stdio;
use std::time::Duration;

use cairn_testkit::{AmqpVhost, RedisNamespace, wait_until};
use clap::Parser as _;
use request_processor::HandlerSet;
use reqwest::Method;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound on every wait: start-up, each HTTP call, each command.
pub const WAIT: Duration = Duration::from_secs(30);

/// The fields of a node that change between two reads of the same state.
const VOLATILE: [&str; 1] = ["_age_ms"];

pub struct Stack {
    /// `http://127.0.0.1:{port}` of the ingress.
    pub base: String,
    http: reqwest::Client,
    cancel: CancellationToken,
    /// Stops the ingress alone (see [`Stack::restart_ingress`]).
    ingress_stop: CancellationToken,
    ingress_args: Vec<String>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    ns: RedisNamespace,
    _vhost: AmqpVhost,
    _handlers: tempfile::NamedTempFile,
}

/// What a `cairn` run left behind.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout as one JSON document; fails the test otherwise.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Fails the test unless the command exited with `code`.
    #[track_caller]
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        self
    }
}

/// The request processor's handlers: `echo` and the example `steps`.
pub fn handlers() -> HandlerSet {
    request_processor::handlers::default_handlers().with("steps", example_processor::Steps)
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with("").await
    }

    /// A stack whose handlers file also holds `extra_handlers` (TOML `[handlers.NAME]` tables),
    /// which the processor runs too.
    pub async fn start_with(extra_handlers: &str) -> Stack {
        let handlers = handlers_file(extra_handlers);
        let processor_handlers = if extra_handlers.is_empty() {
            self::handlers()
        } else {
            request_processor::handlers::config::load(handlers.path())
                .expect("valid handlers file")
                .with("steps", example_processor::Steps)
        };
        let ns = RedisNamespace::new();
        let vhost = AmqpVhost::new().await;
        let cancel = CancellationToken::new();
        let config = progress_aggregator::Config::try_parse_from(cairn_testkit::aggregator_args(&ns, &vhost))
            .expect("valid aggregator config");
        let aggregator = progress_aggregator::App::build(config).await.expect("aggregator builds");
        let aggregator_url = format!("http://{}", aggregator.grpc_addr());
        let mut tasks = vec![tokio::spawn(aggregator.run(cancel.clone()))];

        let config = request_processor::Config::try_parse_from([
            "request-processor",
            "--redis-url",
            &ns.url,
            "--key-prefix",
            &ns.prefix,
            "--amqp-url",
            &vhost.url,
            "--admin-addr",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "200ms",
            "--lease-timeout",
            "1s",
            "--grace",
            "2s",
        ])
        .expect("valid processor config");
        let processor = request_processor::App::build_with_handlers(config, processor_handlers)
            .await
            .expect("processor builds");
        let processor_ready = format!("http://{}/readyz", processor.admin_addr());
        tasks.push(tokio::spawn(processor.run(cancel.clone())));

        let ingress_args = vec![
            "ingress".to_owned(),
            "--aggregator-url".to_owned(),
            aggregator_url,
            "--grace".to_owned(),
            "5s".to_owned(),
            "--redis-url".to_owned(),
            ns.url.clone(),
            "--key-prefix".to_owned(),
            ns.prefix.clone(),
            "--handlers".to_owned(),
            handlers.path().to_string_lossy().into_owned(),
        ];
        let ingress_stop = cancel.child_token();
        let (base, ingress) = start_ingress(&ingress_args, "127.0.0.1:0", ingress_stop.clone()).await;
        tasks.push(ingress);

        let http = reqwest::Client::builder().timeout(WAIT).build().expect("http client");
        let stack = Stack {
            base,
            http,
            cancel,
            ingress_stop,
            ingress_args,
            tasks,
            ns,
            _vhost: vhost,
            _handlers: handlers,
        };
        for ready in [format!("{}/readyz", stack.base), processor_ready] {
            wait_until(&ready, WAIT, || async {
                stack.http.get(&ready).send().await.is_ok_and(|r| r.status() == 200)
            })
            .await
            .expect("stack becomes ready");
        }
        stack
    }

    /// Stops the ingress (ending its live streams, as a deploy would) and starts a new one on
    /// the same address; returns once it is ready.
    pub async fn restart_ingress(&mut self) {
        self.ingress_stop.cancel();
        let old = self.tasks.pop().expect("the ingress task is the last one");
        tokio::time::timeout(WAIT, old)
            .await
            .expect("ingress stops")
            .expect("ingress task")
            .expect("ingress run");
        self.ingress_stop = self.cancel.child_token();
        let addr = self.base.trim_start_matches("http://").to_owned();
        let (_, ingress) = start_ingress(&self.ingress_args, &addr, self.ingress_stop.clone()).await;
        self.tasks.push(ingress);
        let ready = format!("{}/readyz", self.base);
        wait_until(&ready, WAIT, || async {
            self.http.get(&ready).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await
        .expect("the new ingress becomes ready");
    }

    /// The stack's Redis URL and key prefix (for `cairn streams`).
    pub fn redis(&self) -> (&str, &str) {
        (&self.ns.url, &self.ns.prefix)
    }

    /// `cairn ARGS` against this stack (`CAIRN_URL` set, stdin empty), to its end.
    pub async fn cairn(&self, args: &[&str]) -> Run {
        cairn_at(&self.base, args).await
    }

    /// The JSON answer of `METHOD path` (any status).
    pub async fn rest(&self, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("ingress answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")))
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, json) = self.rest(Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {json}");
        json
    }

    /// Posts a progress update over REST.
    pub async fn post(&self, key: &str, update: Value) {
        let (status, json) = self.rest(Method::POST, &format!("/status/{key}"), Some(&update)).await;
        assert_eq!(status, 200, "POST {key}: {json}");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.cancel.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// An ingress with `args` listening on `addr`, running until `stop` fires: its base URL and task.
async fn start_ingress(
    args: &[String],
    addr: &str,
    stop: CancellationToken,
) -> (String, JoinHandle<anyhow::Result<()>>) {
    let mut argv = args.to_vec();
    argv.extend(["--addr".to_owned(), addr.to_owned(), "--admin-addr".to_owned(), "127.0.0.1:0".to_owned()]);
    let config = ingress::Config::try_parse_from(argv).expect("valid ingress config");
    let ingress = ingress::App::build(config).await.expect("ingress builds");
    let base = format!("http://{}", ingress.local_addr());
    (base, tokio::spawn(ingress.run(stop)))
}

/// A handlers file naming what the processor runs, so ingress accepts `steps` too (one per
/// stack: tests run in parallel).
fn handlers_file(extra: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().expect("temp file");
    let text = format!("[handlers.echo]\nkind = \"echo\"\n\n[handlers.steps]\nkind = \"echo\"\n\n{extra}");
    std::io::Write::write_all(&mut file, text.as_bytes()).expect("handlers file");
    file
}

/// The `cairn` command with a clean environment: no token, colours or URL from the caller.
pub fn command(base: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cairn"));
    command
        .env("CAIRN_URL", base)
        .env_remove("CAIRN_TOKEN")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

pub async fn cairn_at(base: &str, args: &[&str]) -> Run {
    let output = tokio::time::timeout(WAIT, command(base).args(args).output())
        .await
        .unwrap_or_else(|_| panic!("cairn {args:?} did not end within {WAIT:?}"))
        .expect("cairn runs");
    Run {
        code: output.status.code().expect("cairn exited, not killed by a signal"),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

/// `value` without the fields that change between two reads of the same state, at any depth.
pub fn stable(mut value: Value) -> Value {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                for field in VOLATILE {
                    map.remove(field);
                }
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut value);
    value
}
