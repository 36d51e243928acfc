//! Spawns an aggregator, request processors and an ingress in-process, on port 0, against the
//! real Redis and RabbitMQ, each stack in its own Redis key prefix and RabbitMQ vhost, or on a
//! Redis Cluster of its own (three masters, the request queue in [`CLUSTER_PARTITIONS`]
//! partitions: [`Options::on_cluster`]).

#![allow(dead_code)] // Each test binary uses its own part of the harness.

use std::time::Duration;

use cairn_redis::requests::{QueueLayout, RequestQueues};
use cairn_redis::{RedisConfig, RedisConnection};
use cairn_testkit::{AmqpVhost, RedisCluster, RedisNamespace, unique_name, wait_until};
use clap::Parser as _;
use redis::aio::ConnectionManager;
use request_processor::HandlerSet;
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound on every wait: start-up and each HTTP call.
pub const WAIT: Duration = Duration::from_secs(20);

/// Partitions of the request queue of a stack on a Redis Cluster.
pub const CLUSTER_PARTITIONS: u16 = 3;

/// Where a stack keeps its data.
enum Store {
    /// A key prefix of its own on the shared Redis, deleted on drop.
    Single(RedisNamespace),
    /// A Redis Cluster of its own, stopped on drop.
    Cluster { cluster: RedisCluster, prefix: String },
}

impl Store {
    async fn cluster() -> Store {
        Store::Cluster { cluster: RedisCluster::new().await, prefix: unique_name("c") }
    }

    fn prefix(&self) -> &str {
        match self {
            Store::Single(ns) => &ns.prefix,
            Store::Cluster { prefix, .. } => prefix,
        }
    }

    fn config(&self) -> RedisConfig {
        match self {
            Store::Single(ns) => RedisConfig::new(ns.url.clone(), ns.prefix.clone()),
            Store::Cluster { cluster, prefix } => RedisConfig::cluster(cluster.url(), prefix.clone()),
        }
    }

    /// The Redis flags of every service.
    fn args(&self) -> Vec<String> {
        let config = self.config();
        let mut args = vec!["--redis-url".to_owned(), config.url, "--key-prefix".to_owned(), config.prefix];
        if config.cluster {
            args.extend(["--redis-cluster".to_owned(), "true".to_owned()]);
        }
        args
    }

    /// The request queue's flags of the services that use it (the ingress and the processors).
    fn queue_args(&self) -> Vec<String> {
        match self {
            Store::Single(_) => Vec::new(),
            Store::Cluster { .. } => vec!["--request-partitions".to_owned(), CLUSTER_PARTITIONS.to_string()],
        }
    }
}

/// A running ingress (and the aggregator and processors behind it, when there are some); all
/// stop when dropped, and the key prefix and vhost are deleted.
pub struct Stack {
    /// `http://127.0.0.1:{port}` of the ingress.
    pub base: String,
    /// `http://127.0.0.1:{port}` of the ingress's admin port (`/metrics`).
    pub admin: String,
    /// The ingress replica's name.
    pub replica: String,
    /// The gRPC URL of the aggregator the ingress calls.
    pub aggregator_url: String,
    http: reqwest::Client,
    cancel: CancellationToken,
    ingress: Option<JoinHandle<anyhow::Result<()>>>,
    /// The aggregator and the processors.
    services: Vec<JoinHandle<anyhow::Result<()>>>,
    store: Store,
    vhost: Option<AmqpVhost>,
    shared_args: Vec<String>,
}

/// What a stack runs besides the aggregator and the ingress.
#[derive(Default)]
pub struct Options {
    /// A request processor with these handlers, on the stack's prefix and vhost.
    pub processor: Option<HandlerSet>,
    /// More ingress flags, such as `--max-lag 3`.
    pub ingress_args: Vec<String>,
    /// Flags every service gets (the aggregator, processors and the ingress), such as auth's.
    pub shared_args: Vec<String>,
    /// On a Redis Cluster of the stack's own, the request queue in [`CLUSTER_PARTITIONS`]
    /// partitions, instead of a prefix of the shared Redis.
    pub cluster: bool,
}

impl Options {
    /// A processor with the default handlers (`echo`).
    pub fn with_processor() -> Options {
        Options { processor: Some(request_processor::handlers::default_handlers()), ..Options::default() }
    }

    pub fn handlers(mut self, handlers: HandlerSet) -> Options {
        self.processor = Some(handlers);
        self
    }

    /// A flag for every service of the stack.
    pub fn shared(mut self, flag: &str, value: &str) -> Options {
        self.shared_args.extend([flag.to_owned(), value.to_owned()]);
        self
    }

    pub fn arg(mut self, flag: &str, value: &str) -> Options {
        self.ingress_args.extend([flag.to_owned(), value.to_owned()]);
        self
    }

    /// The stack on a Redis Cluster of its own ([`Options::cluster`]).
    pub fn on_cluster(mut self) -> Options {
        self.cluster = true;
        self
    }
}

/// An HTTP answer whose body is JSON (anything else fails the test).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub json: Value,
}

impl Reply {
    /// The `error` message of an error body.
    pub fn error(&self) -> &str {
        self.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {}: {}", self.status, self.json))
    }
}

impl Stack {
    /// An aggregator on its own prefix and vhost, and an ingress in front of it, both ready.
    pub async fn start() -> Stack {
        Stack::with(Options::default()).await
    }

    /// An aggregator, the processor `options` ask for and an ingress, on one prefix and vhost;
    /// the ingress is ready.
    pub async fn with(options: Options) -> Stack {
        let store =
            if options.cluster { Store::cluster().await } else { Store::Single(RedisNamespace::new()) };
        let vhost = AmqpVhost::new().await;
        let config = progress_aggregator::Config::try_parse_from(
            cairn_testkit::aggregator_args_with(&store.args(), &vhost)
                .into_iter()
                .chain(options.shared_args.iter().cloned()),
        )
        .expect("valid aggregator config");
        let aggregator = progress_aggregator::App::build(config).await.expect("aggregator builds");
        let grpc_addr = aggregator.grpc_addr();
        let cancel = CancellationToken::new();
        let aggregator = tokio::spawn(aggregator.run(cancel.clone()));
        let url = format!("http://{grpc_addr}");
        let ingress_args: Vec<String> =
            options.ingress_args.iter().chain(&options.shared_args).cloned().collect();
        let mut stack = Stack::ingress(store, &url, "5s", &ingress_args, cancel).await;
        stack.shared_args = options.shared_args;
        stack.services.push(aggregator);
        stack.vhost = Some(vhost);
        if let Some(handlers) = options.processor {
            stack.start_processor(handlers).await;
        }
        wait_until("ingress ready", WAIT, || async { stack.get("/readyz").await.status == 200 })
            .await
            .expect("ingress becomes ready");
        stack
    }

    /// An ingress pointed at `aggregator_url`, which need not answer, with calls to it bounded by
    /// `request_timeout` (`1s`, `500ms`).
    pub async fn without_aggregator(aggregator_url: &str, request_timeout: &str) -> Stack {
        let store = Store::Single(RedisNamespace::new());
        Stack::ingress(store, aggregator_url, request_timeout, &[], CancellationToken::new()).await
    }

    /// An ingress alone (no aggregator, no processor) on a prefix of the Redis at `redis_url`,
    /// which need not answer.
    pub async fn ingress_on(redis_url: &str, args: &[String]) -> Stack {
        let store = Store::Single(RedisNamespace::with_url(redis_url));
        Stack::ingress(store, "http://127.0.0.1:1", "5s", args, CancellationToken::new()).await
    }

    async fn ingress(
        store: Store,
        aggregator_url: &str,
        request_timeout: &str,
        args: &[String],
        cancel: CancellationToken,
    ) -> Stack {
        let mut argv: Vec<String> = [
            "ingress",
            "--addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--aggregator-url",
            aggregator_url,
            "--request-timeout",
            request_timeout,
            "--grace",
            "5s",
        ]
        .map(String::from)
        .to_vec();
        argv.extend(store.args());
        argv.extend(store.queue_args());
        argv.extend_from_slice(args);
        let config = ingress::Config::try_parse_from(argv).expect("valid ingress config");
        let app = ingress::App::build(config).await.expect("ingress builds");
        let base = format!("http://{}", app.local_addr());
        let admin = format!("http://{}", app.admin_addr());
        let replica = app.replica().to_owned();
        let ingress = tokio::spawn(app.run(cancel.clone()));
        let http = reqwest::Client::builder().timeout(WAIT).build().expect("http client");
        let aggregator_url = aggregator_url.to_owned();
        Stack {
            base,
            admin,
            replica,
            aggregator_url,
            http,
            cancel,
            ingress: Some(ingress),
            services: Vec::new(),
            store,
            vhost: None,
            shared_args: Vec::new(),
        }
    }

    /// Starts a request processor with `handlers` on the stack's prefix and vhost (fast leases, so
    /// tests do not wait long), and waits until it is ready.
    pub async fn start_processor(&mut self, handlers: HandlerSet) {
        let vhost = self.vhost.as_ref().expect("a stack with a vhost (Stack::with)");
        let amqp = vhost.url.clone();
        self.start_processor_on(handlers, &amqp).await;
    }

    /// [`Stack::start_processor`], reporting progress to the broker at `amqp_url` (which need
    /// not answer).
    pub async fn start_processor_on(&mut self, handlers: HandlerSet, amqp_url: &str) {
        let config = request_processor::Config::try_parse_from(
            [
                "request-processor",
                "--amqp-url",
                amqp_url,
                "--public-url",
                &self.base,
                "--admin-addr",
                "127.0.0.1:0",
                "--heartbeat-interval",
                "200ms",
                "--lease-timeout",
                "1s",
                "--grace",
                "2s",
            ]
            .map(String::from)
            .into_iter()
            .chain(self.store.args())
            .chain(self.store.queue_args())
            .chain(self.shared_args.iter().cloned()),
        )
        .expect("valid processor config");
        let app =
            request_processor::App::build_with_handlers(config, handlers).await.expect("processor builds");
        let ready = format!("http://{}/readyz", app.admin_addr());
        self.services.push(tokio::spawn(app.run(self.cancel.clone())));
        wait_until("processor ready", WAIT, || async {
            self.http.get(&ready).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await
        .expect("processor becomes ready");
    }

    /// The stack's RabbitMQ vhost URL (stacks built with [`Stack::with`]).
    pub fn amqp_url(&self) -> &str {
        &self.vhost.as_ref().expect("a stack with a vhost (Stack::with)").url
    }

    /// Another ingress replica on the same Redis prefix (its own reply stream and live reader),
    /// pointed at the same aggregator; stops with this stack or when `stop` fires. Returns its base URL.
    pub async fn another_ingress(&self, stop: &CancellationToken) -> String {
        let app = self.build_ingress(&[]).await;
        let base = format!("http://{}", app.local_addr());
        let stop = stop.clone();
        let parent = self.cancel.clone();
        tokio::spawn(async move {
            let both = CancellationToken::new();
            let fire = both.clone();
            tokio::spawn(async move {
                tokio::select! { () = stop.cancelled() => {}, () = parent.cancelled() => {} }
                fire.cancel();
            });
            app.run(both).await
        });
        base
    }

    /// Another ingress on the same Redis prefix and aggregator with `args` added, built but not
    /// running.
    pub async fn build_ingress(&self, args: &[&str]) -> ingress::App {
        let argv = [
            "ingress",
            "--addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--aggregator-url",
            &self.aggregator_url,
            "--grace",
            "5s",
        ]
        .map(String::from)
        .into_iter()
        .chain(self.store.args())
        .chain(self.store.queue_args())
        .chain(args.iter().map(|arg| (*arg).to_owned()));
        let config = ingress::Config::try_parse_from(argv).expect("valid ingress config");
        ingress::App::build(config).await.expect("ingress builds")
    }

    /// The stack's key prefix and Redis (a stack on the shared Redis).
    pub fn ns(&self) -> &RedisNamespace {
        match &self.store {
            Store::Single(ns) => ns,
            Store::Cluster { .. } => panic!("a stack on a Redis Cluster has no RedisNamespace: use queues()"),
        }
    }

    /// A connection to the stack's Redis, for looking at keys directly (a stack on the shared
    /// Redis).
    pub async fn redis(&self) -> ConnectionManager {
        self.ns().connection().await
    }

    /// Whether the stack runs on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.store, Store::Cluster { .. })
    }

    /// The stack's Redis settings (one Redis or its cluster).
    pub fn redis_config(&self) -> RedisConfig {
        self.store.config()
    }

    /// A connection to the stack's Redis or cluster, as its services have one.
    pub fn connection(&self) -> RedisConnection {
        self.store.config().connection().expect("valid redis settings")
    }

    /// The stack's request queue, laid out as its services lay it out.
    pub fn queues(&self) -> RequestQueues {
        let partitions = if self.is_cluster() { CLUSTER_PARTITIONS } else { 1 };
        let layout =
            QueueLayout::new(self.store.prefix(), "requests", "processors").with_partitions(partitions);
        RequestQueues::new(self.connection(), layout)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    pub async fn send(&self, request: RequestBuilder) -> Reply {
        let response = request.send().await.expect("ingress answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("response body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {text:?}"));
        Reply { status, headers, json }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.request(Method::GET, path)).await
    }

    /// `POST /status/{key}` with `body` sent as `application/json`.
    pub async fn post(&self, key: &str, body: &str) -> Reply {
        let request = self
            .request(Method::POST, &format!("/status/{key}"))
            .header("content-type", "application/json")
            .body(body.to_owned());
        self.send(request).await
    }

    /// Posts `body` and fails the test unless it was published.
    pub async fn publish(&self, key: &str, body: Value) -> Value {
        let reply = self.post(key, &body.to_string()).await;
        assert_eq!(reply.status, 200, "POST {key} {body}: {}", reply.json);
        assert_eq!(reply.json["status"], "published");
        reply.json["node"].clone()
    }

    pub async fn delete(&self, key: &str) -> Reply {
        self.send(self.request(Method::DELETE, &format!("/status/{key}"))).await
    }

    /// `POST /v1/requests` with `body`, and `Prefer: wait={wait}` when given.
    pub async fn submit(&self, body: &Value, wait: Option<u64>) -> Reply {
        let mut request = self.request(Method::POST, "/v1/requests").json(body);
        if let Some(wait) = wait {
            request = request.header("prefer", format!("wait={wait}"));
        }
        self.send(request).await
    }

    /// `GET /v1/requests/{id}`, with `Prefer: wait={wait}` when given.
    pub async fn request_state(&self, id: &str, wait: Option<u64>) -> Reply {
        let mut request = self.request(Method::GET, &format!("/v1/requests/{id}"));
        if let Some(wait) = wait {
            request = request.header("prefer", format!("wait={wait}"));
        }
        self.send(request).await
    }

    /// Raw text of `GET path`; `/metrics` is read from the admin port, where it is served.
    pub async fn text(&self, path: &str) -> (u16, String) {
        let request = if path == "/metrics" {
            self.http.get(format!("{}{path}", self.admin))
        } else {
            self.request(Method::GET, path)
        };
        let response = request.send().await.expect("ingress answers");
        (response.status().as_u16(), response.text().await.expect("response body"))
    }

    /// Cancels the stack and waits for the ingress to stop; fails the test if it does not stop
    /// cleanly within [`WAIT`].
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let ingress = self.ingress.take().expect("ingress task");
        tokio::time::timeout(WAIT, ingress)
            .await
            .expect("ingress stops within the wait")
            .expect("ingress task")
            .expect("ingress run returns Ok");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `tests/socketio`, with its npm packages installed (`npm ci`, once per test binary: the tests
/// of one binary run in parallel and two concurrent installs into one `node_modules` break
/// each other). `scripts/deps.sh --browser` installs them ahead of the suite.
pub async fn socket_io_clients() -> std::path::PathBuf {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio");
    INSTALLED
        .get_or_init(|| async {
            if dir.join("node_modules/sio1").exists() && dir.join("node_modules/sio4").exists() {
                return;
            }
            let status = tokio::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .status()
                .await
                .expect("npm runs");
            assert!(status.success(), "npm ci in {}", dir.display());
        })
        .await;
    dir
}

/// A handlers file naming `names` (the ingress reads only the names), in a temporary directory.
pub fn handlers_file(names: &[&str]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("handlers.toml");
    let text: String = names.iter().map(|name| format!("[handlers.{name}]\nkind = \"echo\"\n\n")).collect();
    std::fs::write(&path, text).expect("write handlers file");
    (dir, path.to_str().expect("UTF-8 path").to_owned())
}
