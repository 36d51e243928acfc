//! socket.io for SCA's clients (docs/contract.md §2 Live), on the default namespace at `/socket.io/`:
//! `join` and `subscribe` with a key (SCA's clients send the tree root, e.g. `_portal.job123`;
//! `{"key": …}` works too) and `leave`. The server emits `update` with an array of the changed
//! nodes of one joined key, parents first (a join starts with the subtree's current nodes), and
//! `delete` with the keys that went. Both SCA's socket.io-client 1.7 (Engine.IO 3, through
//! socketioxide's `v4` feature) and a current 4.x work. Cross-site browsers are refused (403)
//! unless their `Origin` is listed in `CAIRN_ALLOWED_ORIGINS`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Query;
use axum::http::header;
use cairn_auth::{AuthError, Grant, Verifier};
use cairn_live::{EventKind, Live, Watch};
use cairn_progress::Key;
use cairn_progress::view::NodeView;
use serde_json::Value;
use socketioxide::SocketIo;
use socketioxide::extract::{Data, SocketRef, TryData};
use socketioxide::handler::ConnectHandler as _;
use tokio::task::JoinHandle;

/// A joined tree is watched this deep (SCA's clients show whole trees).
const DEPTH: u32 = 8;
const LIMIT: u32 = 1000;

type Joined = Arc<Mutex<HashMap<String, JoinHandle<()>>>>;

pub(crate) fn router(live: Live, allowed_origins: Vec<String>, verifier: Option<Verifier>) -> Router {
    let (service, io) = SocketIo::builder().build_svc();
    let shutdown = live.shutdown().clone();
    {
        let io = io.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            io.close().await;
        });
    }
    // The connect middleware refuses a bad token with a `connect_error`; the handler then reads
    // the grant of the token that passed (verifying is a signature check, cheap to repeat).
    let check = {
        let verifier = verifier.clone();
        move |socket: SocketRef, TryData(auth): TryData<Value>| {
            let verifier = verifier.clone();
            async move { grant_of(verifier.as_ref(), &socket, auth.ok().as_ref()).map(drop) }
        }
    };
    let handler = move |socket: SocketRef, TryData(auth): TryData<Value>| {
        let (live, verifier) = (live.clone(), verifier.clone());
        async move {
            match grant_of(verifier.as_ref(), &socket, auth.ok().as_ref()) {
                Ok(grant) => connected(socket, live, grant),
                Err(_) => drop(socket.disconnect()),
            }
        }
    };
    io.ns("/", handler.with(check));
    Router::new()
        .route_service("/socket.io/", service)
        .layer(axum::middleware::from_fn_with_state(Arc::new(allowed_origins), same_origin))
}

/// A browser's cross-site `Origin` is refused (403) unless listed in `CAIRN_ALLOWED_ORIGINS`,
/// as for `/ws`.
async fn same_origin(
    axum::extract::State(allowed): axum::extract::State<Arc<Vec<String>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match super::ws::check_origin(request.headers(), &allowed) {
        Ok(()) => next.run(request).await,
        Err(error) => axum::response::IntoResponse::into_response(error),
    }
}

/// The caller's grant: the token of the `auth` payload (`{"token": …}`), else of `?token=` or
/// `?access_token=`, else of `Authorization: Bearer …`; open when auth is off.
fn grant_of(
    verifier: Option<&Verifier>,
    socket: &SocketRef,
    auth: Option<&Value>,
) -> Result<Grant, AuthError> {
    let Some(verifier) = verifier else { return Ok(Grant::open()) };
    if let Some(token) = auth.and_then(|a| a.get("token")).and_then(Value::as_str) {
        return verifier.verify(token);
    }
    let parts = socket.req_parts();
    if let Ok(Query(query)) = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        && let Some(token) = query.get("token").or_else(|| query.get("access_token"))
    {
        return verifier.verify(token);
    }
    verifier.verify_header(parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))
}

fn connected(socket: SocketRef, live: Live, grant: Grant) {
    let joined: Joined = Arc::default();
    let grant = Arc::new(grant);
    for event in ["join", "subscribe"] {
        let (live, joined, grant) = (live.clone(), joined.clone(), grant.clone());
        socket.on(event, move |socket: SocketRef, Data(arg): Data<Value>| {
            let (live, joined, grant) = (live.clone(), joined.clone(), grant.clone());
            async move { join(&socket, &live, &joined, &grant, &arg) }
        });
    }
    {
        let joined = joined.clone();
        socket.on("leave", move |socket: SocketRef, Data(arg): Data<Value>| {
            let joined = joined.clone();
            async move {
                match key_of(&arg) {
                    Ok(key) => {
                        if let Some(task) = joined.lock().expect("joined lock").remove(key.as_str()) {
                            task.abort();
                        }
                    }
                    Err(message) => drop(socket.emit("error", &message)),
                }
            }
        });
    }
    socket.on_disconnect(move || {
        let joined = joined.clone();
        async move {
            for (_, task) in joined.lock().expect("joined lock").drain() {
                task.abort();
            }
        }
    });
}

fn key_of(arg: &Value) -> Result<Key, String> {
    let raw = match arg {
        Value::String(key) => key.as_str(),
        Value::Object(map) => map.get("key").and_then(Value::as_str).unwrap_or_default(),
        _ => "",
    };
    Key::parse(raw).map_err(|e| format!("key {raw:?}: {e}"))
}

fn join(socket: &SocketRef, live: &Live, joined: &Joined, grant: &Grant, arg: &Value) {
    let key =
        match key_of(arg).and_then(|key| grant.read(key.as_str()).map(|()| key).map_err(|d| d.to_string())) {
            Ok(key) => key,
            Err(message) => {
                let _ = socket.emit("error", &message);
                return;
            }
        };
    if joined.lock().expect("joined lock").contains_key(key.as_str()) {
        return;
    }
    let mut subscription =
        match live.subscribe(Watch { key: key.clone(), depth: DEPTH, limit: LIMIT, after: None }) {
            Ok(subscription) => subscription,
            Err(error) => {
                let _ = socket.emit("error", &error.to_string());
                return;
            }
        };
    let stall = i64::try_from(live.settings().stall_after.as_millis()).unwrap_or(i64::MAX);
    let socket = socket.clone();
    let task = tokio::spawn(async move {
        while let Some(event) = subscription.next().await {
            let now = cairn_progress::now_ms();
            let sent = match event.kind {
                EventKind::Delete => socket.emit("delete", &event.deleted),
                EventKind::Update => {
                    let nodes: Vec<Value> =
                        event.nodes.iter().map(|node| node.to_json_at(now, stall)).collect();
                    socket.emit("update", &nodes)
                }
                EventKind::Snapshot => {
                    let mut nodes = Vec::new();
                    flatten(&event.nodes, now, stall, &mut nodes);
                    socket.emit("update", &nodes)
                }
            };
            if sent.is_err() && !socket.connected() {
                return;
            }
        }
    });
    joined.lock().expect("joined lock").insert(key.to_string(), task);
}

/// A snapshot's nodes one by one, parents before children, without their nested `tasks`.
fn flatten(nodes: &[NodeView], now: i64, stall: i64, out: &mut Vec<Value>) {
    let mut level: Vec<&NodeView> = nodes.iter().collect();
    while !level.is_empty() {
        let mut next = Vec::new();
        for node in level {
            let mut json = node.to_json_at(now, stall);
            if let Value::Object(map) = &mut json {
                map.remove("tasks");
            }
            out.push(json);
            next.extend(node.tasks.iter());
        }
        level = next;
    }
}
