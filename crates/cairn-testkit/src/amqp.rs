use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const DEFAULT_API: &str = "http://127.0.0.1:15672";
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672";
/// How long [`AmqpVhost::close_connections`] waits for the API to list a connection.
const LIST_CONNECTIONS_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes `body` to the `progress` exchange under `routing_key` through a confirming channel
/// (as [`AmqpVhost::progress_publisher`]'s), and fails the test unless the broker confirms it.
pub async fn publish_progress(
    channel: &lapin::Channel,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    let options = lapin::options::BasicPublishOptions::default();
    let confirm = channel
        .basic_publish("progress".into(), routing_key.into(), options, body, properties)
        .await
        .unwrap_or_else(|e| panic!("cannot publish to {routing_key}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("no confirm of the message to {routing_key}: {e}"));
    assert!(confirm.is_ack(), "the broker refused the message to {routing_key}");
}

/// A RabbitMQ virtual host of its own, created through the management API and deleted on drop
/// (with every exchange, queue and connection in it).
///
/// Connect the code under test to `url`; exchange and queue names then need no randomising.
/// Needs the `rabbitmq_management` plugin (`rabbitmq-plugins enable rabbitmq_management`).
#[derive(Debug)]
pub struct AmqpVhost {
    /// `amqp://…/<name>`, from `CAIRN_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672`).
    pub url: String,
    /// `t-<8 hex digits>`.
    pub name: String,
    api: Api,
    /// Users made by [`AmqpVhost::add_user`], deleted on drop.
    users: std::sync::Mutex<Vec<String>>,
}

impl AmqpVhost {
    /// Creates the vhost and grants the API user (`CAIRN_TEST_RABBITMQ_USER`, default guest)
    /// full permissions on it.
    pub async fn new() -> Self {
        let api = Api::from_env();
        let name = format!("t-{}", crate::short_id());
        if let Err(e) = api.create_vhost(&name).await {
            panic!(
                "cannot create RabbitMQ vhost {name} through the management API at {} \
                 (set CAIRN_TEST_RABBITMQ_API / _USER / _PASS; the rabbitmq_management plugin \
                 must be enabled): {e:#}",
                api.base
            );
        }
        let base = crate::env_or("CAIRN_TEST_AMQP_URL", DEFAULT_AMQP_URL);
        let url = format!("{}/{name}", base.trim_end_matches('/'));
        Self { url, name, api, users: std::sync::Mutex::new(Vec::new()) }
    }

    /// A connection and a confirming channel on this vhost, with the durable topic exchange
    /// `progress` declared: what a test publishes progress messages through, as producers do.
    pub async fn progress_publisher(&self) -> (lapin::Connection, lapin::Channel) {
        use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
        let conn = lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.name));
        let channel = conn.create_channel().await.expect("an AMQP channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("publisher confirms");
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let kind = lapin::ExchangeKind::Topic;
        channel
            .exchange_declare("progress".into(), kind, durable, lapin::types::FieldTable::default())
            .await
            .expect("the progress exchange");
        (conn, channel)
    }

    /// Adds a user with these `configure`, `write` and `read` permission patterns on this vhost
    /// (and none elsewhere); returns its `amqp://` URL to this vhost. The user is named
    /// `<vhost>-<name>` (users are global to the broker) and deleted on drop.
    pub async fn add_user(&self, name: &str, configure: &str, write: &str, read: &str) -> String {
        let user = format!("{}-{name}", self.name);
        let password = format!("{}-pw", crate::short_id());
        let created = async {
            let body = json!({"password": password, "tags": ""});
            self.api.send(Method::PUT, &format!("/api/users/{}", encode(&user)), Some(&body), None).await?;
            self.users.lock().expect("users lock").push(user.clone());
            let permissions = json!({"configure": configure, "write": write, "read": read});
            let path = format!("/api/permissions/{}/{}", encode(&self.name), encode(&user));
            self.api.send(Method::PUT, &path, Some(&permissions), None).await
        };
        if let Err(e) = created.await {
            panic!("cannot create RabbitMQ user {user} on vhost {}: {e:#}", self.name);
        }
        let (scheme, rest) = self.url.split_once("://").expect("an amqp:// URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{user}:{password}@{host}")
    }

    /// Force-closes every client connection to this vhost, as the broker does on restart or
    /// `rabbitmqctl close_all_connections`; returns how many were closed.
    ///
    /// The management API learns of a new connection a moment after it opens, so this waits
    /// (up to 5 s) for at least one connection to be listed and returns 0 if none shows up;
    /// call it when the code under test is connected and assert on the count.
    pub async fn close_connections(&self) -> usize {
        let path = format!("/api/vhosts/{}/connections", encode(&self.name));
        let deadline = Instant::now() + LIST_CONNECTIONS_TIMEOUT;
        let listed = loop {
            match self.api.get(&path).await {
                Ok(Value::Array(connections)) if !connections.is_empty() => break connections,
                Ok(_) if Instant::now() < deadline => {}
                Ok(_) => return 0,
                Err(e) => panic!("cannot list connections of vhost {}: {e:#}", self.name),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut closed = 0;
        for connection in &listed {
            let Some(name) = connection["name"].as_str() else {
                continue;
            };
            let path = format!("/api/connections/{}", encode(name));
            match self.api.delete(&path, Some("cairn test")).await {
                Ok(()) => closed += 1,
                Err(e) => panic!("cannot close connection {name:?}: {e:#}"),
            }
        }
        closed
    }

    /// The number of messages in `queue` (ready and unacknowledged).
    ///
    /// The management API refreshes queue statistics only every few seconds (5 s by default),
    /// so poll with [`crate::wait_until`] rather than expecting an exact value at once; before
    /// the first refresh after the queue was declared this is an error.
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u64> {
        let path = format!("/api/queues/{}/{}", encode(&self.name), encode(queue));
        let info = self.api.get(&path).await?;
        info["messages"]
            .as_u64()
            .with_context(|| format!("queue {queue} has no message statistics yet; poll until it does"))
    }

    /// Takes one message off `queue` (acknowledged, not requeued), or `None` when it is empty.
    ///
    /// The value is the management API's rendering: `payload` (text, or base64 when
    /// `payload_encoding` says so), `properties` (with `headers`), `routing_key`, `exchange`,
    /// `redelivered`. Tests read dead letters with it. Unlike [`queue_depth`](Self::queue_depth)
    /// this is a real `basic.get`, so it is current. Panics if the queue does not exist.
    pub async fn get_message(&self, queue: &str) -> Option<Value> {
        let path = format!("/api/queues/{}/{}/get", encode(&self.name), encode(queue));
        let body = json!({"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"});
        match self.api.post(&path, &body).await {
            Ok(Value::Array(mut messages)) if !messages.is_empty() => Some(messages.swap_remove(0)),
            Ok(_) => None,
            Err(e) => panic!("cannot get a message from queue {queue} in vhost {}: {e:#}", self.name),
        }
    }
}

impl Drop for AmqpVhost {
    fn drop(&mut self) {
        let api = self.api.clone();
        let name = self.name.clone();
        let users = std::mem::take(&mut *self.users.lock().unwrap_or_else(|e| e.into_inner()));
        // A fresh thread with its own runtime: drop may run on a runtime thread, where blocking
        // on a future would panic.
        let cleanup = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                // A fresh client: the one in `api` may hold connections of the test's runtime.
                let api = Api { client: reqwest::Client::new(), ..api };
                for user in users {
                    api.delete(&format!("/api/users/{}", encode(&user)), None).await?;
                }
                api.delete(&format!("/api/vhosts/{}", encode(&name)), None).await
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cairn-testkit: could not delete RabbitMQ vhost {}: {e:#}", self.name),
            Err(_) => eprintln!("cairn-testkit: RabbitMQ vhost cleanup thread panicked"),
        }
    }
}

/// The RabbitMQ management HTTP API.
#[derive(Debug, Clone)]
struct Api {
    base: String,
    user: String,
    pass: String,
    client: reqwest::Client,
}

impl Api {
    fn from_env() -> Self {
        Self {
            base: crate::env_or("CAIRN_TEST_RABBITMQ_API", DEFAULT_API).trim_end_matches('/').to_owned(),
            user: crate::env_or("CAIRN_TEST_RABBITMQ_USER", "guest"),
            pass: crate::env_or("CAIRN_TEST_RABBITMQ_PASS", "guest"),
            client: reqwest::Client::new(),
        }
    }

    async fn create_vhost(&self, name: &str) -> anyhow::Result<()> {
        let vhost = encode(name);
        self.send(Method::PUT, &format!("/api/vhosts/{vhost}"), Some(&json!({})), None).await?;
        let permissions = json!({"configure": ".*", "write": ".*", "read": ".*"});
        let path = format!("/api/permissions/{vhost}/{}", encode(&self.user));
        self.send(Method::PUT, &path, Some(&permissions), None).await?;
        Ok(())
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(Method::GET, path, None, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(Method::POST, path, Some(body), None).await
    }

    /// Deletes `path`; already gone (404) counts as done.
    async fn delete(&self, path: &str, reason: Option<&str>) -> anyhow::Result<()> {
        match self.send(Method::DELETE, path, None, reason).await {
            Ok(_) => Ok(()),
            Err(e) if e.downcast_ref::<NotFound>().is_some() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sends one request; the JSON answer, `Null` for an empty body, or an error naming the
    /// method, URL, status and the API's reason.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        reason: Option<&str>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .client
            .request(method.clone(), &url)
            .basic_auth(&self.user, Some(&self.pass))
            .timeout(Duration::from_secs(10));
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(reason) = reason {
            request = request.header("X-Reason", reason);
        }
        let response = request.send().await.with_context(|| format!("{method} {url}"))?;
        let status = response.status();
        let text = response.text().await.with_context(|| format!("{method} {url}: reading the answer"))?;
        if status == StatusCode::NOT_FOUND {
            return Err(anyhow::Error::new(NotFound).context(format!("{method} {url}: 404 {text}")));
        }
        if !status.is_success() {
            bail!("{method} {url}: {status} {text}");
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {url}: answer is not JSON"))
    }
}

#[derive(Debug)]
struct NotFound;

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not found")
    }
}

impl std::error::Error for NotFound {}

/// Percent-encodes one path segment (vhost, queue and connection names may hold `/`, spaces,
/// `>` …).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn encodes_path_segments() {
        assert_eq!(encode("t-ab12_x.y~"), "t-ab12_x.y~");
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("127.0.0.1:5 -> 127.0.0.1:5672"), "127.0.0.1%3A5%20-%3E%20127.0.0.1%3A5672");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
