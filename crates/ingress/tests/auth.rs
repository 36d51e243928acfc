//! Auth on every transport: REST, SSE, WebSocket, socket.io (the Node client) and the
//! aggregator's gRPC refuse missing and bad tokens (401 / `UNAUTHENTICATED`) and calls outside a
//! token's scopes (403 / `PERMISSION_DENIED`); a `command` handler reports progress through its
//! `CAIRN_PROGRESS_URL` with the token the processor minted; the rate limit answers 429.

mod common;

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto::v1::progress_client::ProgressClient;
use cairn_proto::v1::{GetRequest, UpdateRequest};
use common::{Options, Stack};
use futures::{SinkExt as _, StreamExt as _};
use jsonwebtoken::{EncodingKey, Header};
use request_processor::HandlerSet;
use request_processor::handlers::CommandHandler;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

const SECRET: &str = "a-test-secret-that-signs-tokens";
const AUDIENCE: &str = "cairn-test";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn sign_with(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(&Header::default(), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

/// A valid token with these `cairn` scopes.
fn token(sub: &str, scopes: Value) -> String {
    sign_with(&json!({"sub": sub, "exp": now() + 600, "aud": AUDIENCE, "cairn": scopes}), SECRET)
}

fn admin() -> String {
    token("root", json!({"admin": true}))
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Every kind of bad token, by name (`None`: no token at all).
fn bad_tokens() -> Vec<(&'static str, Option<String>)> {
    let all = json!({"admin": true});
    let unsigned = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(
            json!({"sub": "x", "exp": now() + 600, "aud": AUDIENCE, "cairn": all}).to_string().as_bytes()
        )
    );
    vec![
        ("no token", None),
        ("expired", Some(sign_with(&json!({"exp": now() - 600, "aud": AUDIENCE, "cairn": all}), SECRET))),
        (
            "not yet valid",
            Some(sign_with(
                &json!({"exp": now() + 1200, "nbf": now() + 600, "aud": AUDIENCE, "cairn": all}),
                SECRET,
            )),
        ),
        ("alg none", Some(unsigned)),
        (
            "wrong signature",
            Some(sign_with(&json!({"exp": now() + 600, "aud": AUDIENCE, "cairn": all}), "other")),
        ),
        (
            "wrong audience",
            Some(sign_with(&json!({"exp": now() + 600, "aud": "other", "cairn": all}), SECRET)),
        ),
    ]
}

async fn stack(options: Options) -> Stack {
    Stack::with(options.shared("--auth-jwt-secret", SECRET).shared("--auth-jwt-audience", AUDIENCE)).await
}

async fn call(
    stack: &Stack,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> common::Reply {
    let mut request = stack.request(method, path);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    stack.send(request).await
}

/// The status a WebSocket upgrade is answered with (101 when it is accepted).
async fn ws_status(stack: &Stack, token: Option<&str>) -> u16 {
    let mut url = format!("{}/ws", stack.base.replace("http://", "ws://"));
    if let Some(token) = token {
        url.push_str(&format!("?access_token={token}"));
    }
    match tokio_tungstenite::connect_async(url).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("websocket: {other}"),
    }
}

async fn grpc(stack: &Stack) -> ProgressClient<tonic::transport::Channel> {
    ProgressClient::connect(stack.aggregator_url.clone()).await.expect("aggregator answers")
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Runs the socket.io client (`tests/socketio/auth.js`); its one JSON line.
async fn socket_io(stack: &Stack, token: Option<&str>, how: &str, key: &str) -> Value {
    let dir = common::socket_io_clients().await;
    let output = tokio::process::Command::new("node")
        .args(["auth.js", &stack.base, token.unwrap_or("-"), how, key])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs");
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        panic!("socket.io client said {line:?} ({e}); its stderr: {stderr}")
    })
}

#[tokio::test]
async fn missing_and_bad_tokens_get_401_on_every_transport() {
    let stack = stack(Options::default()).await;
    call(&stack, Method::POST, "/status/_t.a", Some(&admin()), Some(json!({"progress": 0.1}))).await;
    let mut client = grpc(&stack).await;
    for (what, token) in bad_tokens() {
        let token = token.as_deref();
        let rest = call(&stack, Method::GET, "/status/_t.a", token, None).await;
        assert_eq!(rest.status, 401, "REST, {what}: {}", rest.json);
        assert_eq!(rest.headers["www-authenticate"], "Bearer", "{what}");
        let submit =
            call(&stack, Method::POST, "/v1/requests", token, Some(json!({"handler": "echo"}))).await;
        assert_eq!(submit.status, 401, "submit, {what}");
        let path = match token {
            Some(t) => format!("/status/_t.a/events?access_token={t}"),
            None => "/status/_t.a/events".to_owned(),
        };
        let sse = stack.request(Method::GET, &path).send().await.unwrap();
        assert_eq!(sse.status(), 401, "SSE, {what}");
        assert_eq!(ws_status(&stack, token).await, 401, "WebSocket, {what}");
        let status =
            client.get(with_token(GetRequest { key: "_t.a".into(), ..GetRequest::default() }, token)).await;
        assert_eq!(status.unwrap_err().code(), tonic::Code::Unauthenticated, "gRPC, {what}");
        for how in ["auth", "query"] {
            let got = socket_io(&stack, token, how, "_t.a").await;
            assert!(got.get("connect_error").is_some(), "socket.io ({how}), {what}: {got}");
        }
    }
    // What needs no token.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(stack.get(path).await.status, 200, "{path}");
    }
    // A good token passes everywhere.
    let good = admin();
    assert_eq!(call(&stack, Method::GET, "/status/_t.a", Some(&good), None).await.status, 200);
    assert_eq!(ws_status(&stack, Some(&good)).await, 101);
    let got =
        client.get(with_token(GetRequest { key: "_t.a".into(), ..GetRequest::default() }, Some(&good))).await;
    assert!(got.is_ok(), "gRPC with a good token: {got:?}");
    for how in ["auth", "query"] {
        assert_eq!(socket_io(&stack, Some(&good), how, "_t.a").await, json!({"joined": true}), "{how}");
    }
}

#[tokio::test]
async fn calls_outside_a_tokens_scopes_get_403() {
    let stack = stack(Options::with_processor()).await;
    let root = admin();
    let alice_token = token("alice", json!({"read": ["_t"], "write": ["_t.mine"], "submit": ["echo"]}));
    let alice = Some(alice_token.as_str());
    call(&stack, Method::POST, "/status/_u.theirs", Some(&root), Some(json!({"progress": 0.2}))).await;

    // Progress: read and write by key prefix.
    let post = |key: &str| {
        let path = format!("/status/{key}");
        let stack = &stack;
        async move { call(stack, Method::POST, &path, alice, Some(json!({"progress": 0.5}))).await }
    };
    assert_eq!(post("_t.mine.x").await.status, 200);
    assert_eq!(post("_t.mine").await.status, 200);
    assert_eq!(post("_t.minex").await.status, 403, "a prefix is a key, not a string prefix");
    let refused = post("_t.other").await;
    assert_eq!(refused.status, 403);
    assert!(refused.error().contains("_t.other"), "{}", refused.json);
    assert_eq!(call(&stack, Method::GET, "/status/_t.mine.x", alice, None).await.status, 200);
    assert_eq!(call(&stack, Method::GET, "/status/_u.theirs", alice, None).await.status, 403);
    assert_eq!(call(&stack, Method::DELETE, "/status/_t.other", alice, None).await.status, 403);
    let sse = stack
        .request(Method::GET, "/status/_u.theirs/events")
        .bearer_auth(&alice_token)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 403);

    // WebSocket: the socket opens, a subscription outside the scope is refused.
    let url = format!("{}/ws?access_token={}", stack.base.replace("http://", "ws://"), alice_token);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket opens");
    ws.send(tungstenite::Message::text(json!({"op": "subscribe", "key": "_u.theirs"}).to_string()))
        .await
        .unwrap();
    let reply = tokio::time::timeout(common::WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let reply: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("may not read"), "{reply}");
    ws.send(tungstenite::Message::text(json!({"op": "subscribe", "key": "_t.mine.x"}).to_string()))
        .await
        .unwrap();
    let reply = tokio::time::timeout(common::WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let reply: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
    assert_eq!(reply["type"], "snapshot", "{reply}");

    // socket.io: joining outside the scope is an error event.
    let got = socket_io(&stack, alice, "auth", "_u.theirs").await;
    assert!(got["error"].as_str().is_some_and(|e| e.contains("may not read")), "{got}");
    assert_eq!(socket_io(&stack, alice, "auth", "_t.mine.x").await, json!({"joined": true}));

    // gRPC: the aggregator checks the same scopes.
    let mut client = grpc(&stack).await;
    let denied =
        client.get(with_token(GetRequest { key: "_u.theirs".into(), ..GetRequest::default() }, alice)).await;
    assert_eq!(denied.unwrap_err().code(), tonic::Code::PermissionDenied);
    let update = UpdateRequest { key: "_t.other".into(), fields: None };
    assert_eq!(
        client.update(with_token(update, alice)).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let update = UpdateRequest { key: "_t.mine.y".into(), fields: None };
    assert!(client.update(with_token(update, alice)).await.is_ok());

    // Requests: submit needs the handler and write on an explicit progress_key.
    let submit = |body: Value| call(&stack, Method::POST, "/v1/requests", alice, Some(body));
    let own = submit(json!({"handler": "echo", "progress_key": "_t.mine.job", "payload": {"a": 1}})).await;
    assert_eq!(own.status, 202, "{}", own.json);
    let outside = submit(json!({"handler": "echo", "progress_key": "_t.other.job"})).await;
    assert_eq!(outside.status, 403, "progress_key outside the write scope: {}", outside.json);
    let handler = submit(json!({"handler": "sleepy", "progress_key": "_t.mine.job2"})).await;
    assert_eq!(handler.status, 403, "handler outside submit: {}", handler.json);
    let own_id = own.json["id"].as_str().unwrap();
    assert_eq!(call(&stack, Method::GET, &format!("/v1/requests/{own_id}"), alice, None).await.status, 200);
    assert_eq!(
        call(&stack, Method::GET, &format!("/v1/requests/{own_id}/payload"), alice, None).await.status,
        200
    );

    // Another tenant's request: not readable, cancellable or its payload visible.
    let theirs = call(
        &stack,
        Method::POST,
        "/v1/requests",
        Some(&root),
        Some(json!({"handler": "echo", "progress_key": "_u.job"})),
    )
    .await;
    assert_eq!(theirs.status, 202, "{}", theirs.json);
    let id = theirs.json["id"].as_str().unwrap();
    assert_eq!(call(&stack, Method::GET, &format!("/v1/requests/{id}"), alice, None).await.status, 403);
    assert_eq!(call(&stack, Method::DELETE, &format!("/v1/requests/{id}"), alice, None).await.status, 403);
    assert_eq!(
        call(&stack, Method::GET, &format!("/v1/requests/{id}/payload"), alice, None).await.status,
        403
    );
    assert_eq!(call(&stack, Method::GET, &format!("/v1/requests/{id}"), Some(&root), None).await.status, 200);

    // Admin only: dead letters, the request stream's listing.
    for path in ["/v1/dead-letters", "/v1/requests"] {
        assert_eq!(call(&stack, Method::GET, path, alice, None).await.status, 403, "{path}");
        assert_eq!(call(&stack, Method::GET, path, Some(&root), None).await.status, 200, "{path}");
    }
    // Tree roots: a reader sees those its scopes cover, an admin all of them.
    let posted =
        call(&stack, Method::POST, "/status/_u.x", Some(&root), Some(json!({"progress": 0.5}))).await;
    assert_eq!(posted.status, 200, "{}", posted.json);
    let roots = |reply: &common::Reply| -> Vec<String> {
        let items = reply.json["items"].as_array().expect("items").iter();
        items.map(|item| item["key"].as_str().unwrap().to_owned()).collect()
    };
    let readable = call(&stack, Method::GET, "/v1/trees", alice, None).await;
    assert_eq!(readable.status, 200, "{}", readable.json);
    let all = call(&stack, Method::GET, "/v1/trees", Some(&root), None).await;
    assert_eq!(all.status, 200, "{}", all.json);
    let (readable, all) = (roots(&readable), roots(&all));
    let under_t: Vec<String> = all.iter().filter(|key| key.starts_with("_t.")).cloned().collect();
    assert!(all.contains(&"_u.x".to_owned()), "the admin sees every root: {all:?}");
    assert!(!under_t.is_empty(), "{all:?}");
    assert_eq!(readable, under_t, "alice reads the roots under _t, in the same order");
}

#[tokio::test]
async fn a_command_handler_reports_progress_through_its_url_with_auth_on() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/report_progress.sh");
    let handler = CommandHandler::new(script.to_str().unwrap(), Vec::new()).expect("script handler");
    // The ingress knows handlers by the names in the processors' handlers file, which it reads
    // with the processor's parser (the program is looked for only where it runs).
    let handlers_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        handlers_file.path(),
        "[handlers.report]\nkind = \"command\"\nprogram = \"report_progress.sh\"\n",
    )
    .unwrap();
    let options = Options::default()
        .handlers(HandlerSet::new().with("report", handler))
        .arg("--handlers", handlers_file.path().to_str().unwrap());
    let stack = stack(options).await;
    let root = admin();
    let reply = stack
        .send(
            stack
                .request(Method::POST, "/v1/requests")
                .bearer_auth(&root)
                .header("prefer", "wait=20")
                .json(&json!({"handler": "report"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(reply.json["state"], "succeeded", "{}", reply.json);
    assert_eq!(reply.json["result"], json!({"own": 200, "foreign": 403}), "{}", reply.json);
    let key = reply.json["progress_key"].as_str().unwrap();
    // The handler's own post landed (the processor's final report may have come after it).
    let node = call(&stack, Method::GET, &format!("/status/{key}"), Some(&root), None).await;
    assert_eq!(node.status, 200, "{}", node.json);
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let stack = Stack::with(Options::default().arg("--rate-limit", "1").arg("--rate-burst", "1")).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let reply = stack.get("/status/_t.none").await;
        if reply.status == 429 {
            let retry: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(retry >= 1, "{retry}");
        }
        statuses.push(reply.status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    // Probes are never limited.
    for _ in 0..3 {
        assert_eq!(stack.get("/healthz").await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_ne!(stack.get("/status/_t.none").await.status, 429, "the bucket refills");
}
