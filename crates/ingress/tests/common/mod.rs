//! Spawns an aggregator and an ingress in-process, on port 0, against the real Redis and RabbitMQ,
//! each stack in its own Redis key prefix and RabbitMQ vhost.

use std::time::Duration;

use cairn_testkit::{AmqpVhost, RedisNamespace, wait_until};
use clap::Parser as _;
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound on every wait: start-up and each HTTP call.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running ingress (and the aggregator behind it, when there is one); both stop when dropped,
/// and the key prefix and vhost are deleted.
pub struct Stack {
    /// `http://127.0.0.1:{port}` of the ingress.
    pub base: String,
    http: reqwest::Client,
    cancel: CancellationToken,
    ingress: Option<JoinHandle<anyhow::Result<()>>>,
    _aggregator: Option<JoinHandle<anyhow::Result<()>>>,
    _ns: Option<RedisNamespace>,
    _vhost: Option<AmqpVhost>,
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
        let ns = RedisNamespace::new();
        let vhost = AmqpVhost::new().await;
        let config = progress_aggregator::Config::try_parse_from([
            "progress-aggregator",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--redis-url",
            &ns.url,
            "--key-prefix",
            &ns.prefix,
            "--amqp-url",
            &vhost.url,
            "--shards",
            "1",
            "--grace",
            "5s",
        ])
        .expect("valid aggregator config");
        let aggregator = progress_aggregator::App::build(config).await.expect("aggregator builds");
        let grpc_addr = aggregator.grpc_addr();
        let cancel = CancellationToken::new();
        let aggregator = tokio::spawn(aggregator.run(cancel.clone()));
        let mut stack = Stack::ingress(&format!("http://{grpc_addr}"), "5s", cancel).await;
        stack._aggregator = Some(aggregator);
        stack._ns = Some(ns);
        stack._vhost = Some(vhost);
        wait_until("ingress ready", WAIT, || async { stack.get("/readyz").await.status == 200 })
            .await
            .expect("ingress becomes ready");
        stack
    }

    /// An ingress pointed at `aggregator_url`, which need not answer, with calls to it bounded by
    /// `request_timeout` (`1s`, `500ms`).
    pub async fn without_aggregator(aggregator_url: &str, request_timeout: &str) -> Stack {
        Stack::ingress(aggregator_url, request_timeout, CancellationToken::new()).await
    }

    async fn ingress(aggregator_url: &str, request_timeout: &str, cancel: CancellationToken) -> Stack {
        let config = ingress::Config::try_parse_from([
            "ingress",
            "--addr",
            "127.0.0.1:0",
            "--aggregator-url",
            aggregator_url,
            "--request-timeout",
            request_timeout,
            "--grace",
            "5s",
        ])
        .expect("valid ingress config");
        let app = ingress::App::build(config).await.expect("ingress builds");
        let base = format!("http://{}", app.local_addr());
        let ingress = tokio::spawn(app.run(cancel.clone()));
        let http = reqwest::Client::builder().timeout(WAIT).build().expect("http client");
        Stack { base, http, cancel, ingress: Some(ingress), _aggregator: None, _ns: None, _vhost: None }
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

    /// Raw text of `GET path` (for `/metrics`).
    pub async fn text(&self, path: &str) -> (u16, String) {
        let response = self.request(Method::GET, path).send().await.expect("ingress answers");
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
