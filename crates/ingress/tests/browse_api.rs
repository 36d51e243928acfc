//! The listings to browse from (`GET /v1/trees`, `GET /v1/requests`, `/v1/requests/{id}/payload`)
//! and the UI's pages and assets as ingress serves them, on a stack with its own prefix and vhost.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use common::{Options, Stack};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use request_processor::handlers::Echo;
use request_processor::{Context, Handler, HandlerError, HandlerSet};
use reqwest::Method;
use serde_json::{Value, json};

/// Fails for good the first time, then echoes.
struct Flaky(AtomicBool);

impl Handler for Flaky {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        let failed_before = self.0.swap(true, Ordering::SeqCst);
        let payload = ctx.payload.clone();
        async move { if failed_before { Ok(payload) } else { Err(HandlerError::Permanent("once".into())) } }
            .boxed()
    }
}

async fn stack() -> (Stack, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("handlers.toml");
    std::fs::write(&file, "[handlers.echo]\nkind = \"echo\"\n[handlers.flaky]\nkind = \"echo\"\n").unwrap();
    let handlers = HandlerSet::new().with("echo", Echo).with("flaky", Flaky(AtomicBool::new(false)));
    let options = Options::default().handlers(handlers).arg("--handlers", file.to_str().unwrap());
    (Stack::with(options).await, dir)
}

fn ids(page: &Value) -> Vec<String> {
    page["items"].as_array().expect("items").iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect()
}

async fn submit(stack: &Stack, handler: &str, payload: Value) -> String {
    let reply = stack.submit(&json!({"handler": handler, "payload": payload}), Some(10)).await;
    assert!(reply.status == 200 || reply.status == 202, "{}", reply.json);
    reply.json["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn requests_are_listed_newest_first_filtered_and_paged() {
    let (stack, _dir) = stack().await;
    let mut submitted = Vec::new();
    for i in 0..5 {
        submitted.push(submit(&stack, "echo", json!({"i": i})).await);
    }
    let dead = submit(&stack, "flaky", json!({"big": "x".repeat(100)})).await;
    assert_eq!(stack.request_state(&dead, Some(10)).await.json["state"], "dead");

    let all = stack.get("/v1/requests").await;
    assert_eq!(all.status, 200, "{}", all.json);
    let mut newest_first: Vec<String> = submitted.iter().rev().cloned().collect();
    newest_first.insert(0, dead.clone());
    assert_eq!(ids(&all.json), newest_first);
    assert_eq!(all.json["next"], Value::Null);
    let first = &all.json["items"][1];
    assert_eq!(first["state"], "succeeded");
    assert_eq!(first["result"], json!({"i": 4}));
    assert!(first.get("payload").is_none(), "the list shows the public view: {first}");

    // Pages of two follow `next` to the end, with nothing repeated or lost.
    let mut paged = Vec::new();
    let mut path = "/v1/requests?limit=2".to_owned();
    loop {
        let page = stack.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.json);
        paged.extend(ids(&page.json));
        match page.json["next"].as_str() {
            Some(next) => path = format!("/v1/requests?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(paged, newest_first);

    assert_eq!(ids(&stack.get("/v1/requests?state=dead").await.json), vec![dead.clone()]);
    assert_eq!(ids(&stack.get("/v1/requests?handler=flaky").await.json), vec![dead.clone()]);
    assert_eq!(
        ids(&stack.get("/v1/requests?state=succeeded&handler=echo&limit=2").await.json),
        newest_first[1..3]
    );
    assert!(ids(&stack.get("/v1/requests?handler=nobody").await.json).is_empty());

    // Retried from the dead letters, it is listed once (its new entry), no longer as dead.
    let retry = stack.send(stack.request(Method::POST, &format!("/v1/dead-letters/{dead}/retry"))).await;
    assert_eq!(retry.status, 202, "{}", retry.json);
    assert_eq!(stack.request_state(&dead, Some(10)).await.json["state"], "succeeded");
    let after_retry = ids(&stack.get("/v1/requests").await.json);
    assert_eq!(after_retry.iter().filter(|id| **id == dead).count(), 1, "{after_retry:?}");
    assert_eq!(after_retry[0], dead, "the retry is the newest entry");
    assert!(ids(&stack.get("/v1/requests?state=dead").await.json).is_empty());

    let payload = stack.get(&format!("/v1/requests/{dead}/payload")).await;
    assert_eq!((payload.status, payload.json), (200, json!({"big": "x".repeat(100)})));

    for (path, message) in [
        ("/v1/requests?state=done", "state must be one of"),
        ("/v1/requests?limit=0", "limit must be an integer from 1 to 1000"),
        ("/v1/requests?after=yesterday", "after must be a request stream entry id"),
        ("/v1/requests/not-an-id/payload", "invalid request id"),
    ] {
        let reply = stack.get(path).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.json);
        assert!(reply.error().contains(message), "{path}: {}", reply.error());
    }
    let missing = stack.get("/v1/requests/0190f5c2-7b8e-4c3d-9a2b-123456789abc/payload").await;
    assert_eq!(missing.status, 404, "{}", missing.json);
}

#[tokio::test]
async fn trees_are_listed_by_latest_update() {
    let (stack, _dir) = stack().await;
    stack.publish("_browse.a.step", json!({"progress": 0.5, "status": "running"})).await;
    stack.publish("_browse.b", json!({"progress": 1, "status": "finished"})).await;
    stack.publish("_browse.c", json!({"progress": 0.1})).await;
    // a is updated last, so it comes first.
    stack.publish("_browse.a.other", json!({"progress": 0})).await;

    let page = stack.get("/v1/trees?limit=2").await;
    assert_eq!(page.status, 200, "{}", page.json);
    let keys: Vec<&str> =
        page.json["items"].as_array().unwrap().iter().map(|t| t["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["_browse.a", "_browse.c"]);
    let a = &page.json["items"][0];
    assert_eq!(a["node"]["_child_count"], 2);
    assert!((a["node"]["progress"].as_f64().unwrap() - 0.25).abs() < 1e-9, "{a}");
    assert!(a["update_time"].as_i64().unwrap() >= page.json["items"][1]["update_time"].as_i64().unwrap());
    assert_eq!(page.json["next"], "2");
    let rest = stack.get("/v1/trees?limit=2&offset=2").await;
    let keys: Vec<&str> =
        rest.json["items"].as_array().unwrap().iter().map(|t| t["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["_browse.b"]);
    assert_eq!(rest.json["next"], Value::Null);
    let bad = stack.get("/v1/trees?offset=-1").await;
    assert_eq!(bad.status, 400, "{}", bad.json);
    assert!(bad.error().contains("offset must be a non-negative integer"), "{}", bad.error());
}

#[tokio::test]
async fn pages_and_assets_are_served_with_their_types_and_caching() {
    let stack = Stack::start().await;
    let mut version = String::new();
    for path in
        ["/", "/trees/_a.b", "/requests", "/requests/0190f5c2-7b8e-4c3d-9a2b-123456789abc", "/dead-letters"]
    {
        let response = stack.request(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "text/html; charset=utf-8", "{path}");
        assert_eq!(headers["cache-control"], "no-cache", "{path}");
        assert!(headers["content-security-policy"].to_str().unwrap().contains("connect-src 'self'"));
        let html = response.text().await.unwrap();
        let start = html.find("/ui/").expect("asset link") + 4;
        version = html[start..].split('/').next().unwrap().to_owned();
        assert!(html.contains(r#"<meta name="viewport" content="width=device-width"#), "{path}");
    }

    let app = stack.request(Method::GET, &format!("/ui/{version}/app.js")).send().await.unwrap();
    assert_eq!(app.status(), 200);
    assert_eq!(app.headers()["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(app.headers()["cache-control"], "public, max-age=31536000, immutable");
    let etag = app.headers()["etag"].clone();
    let again = stack
        .request(Method::GET, &format!("/ui/{version}/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let css = stack.request(Method::GET, "/ui/old/app.css").send().await.unwrap();
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    assert_eq!(css.headers()["cache-control"], "no-cache", "another build's URL is revalidated");

    for missing in [format!("/ui/{version}/nope.js"), format!("/ui/{version}/README.md"), "/nowhere".into()] {
        let reply = stack.get(&missing).await;
        assert_eq!(reply.status, 404, "{missing}: {}", reply.json);
    }
    // The API keeps its own answers.
    let status = stack.get("/status/_a.b").await;
    assert_eq!((status.status, &status.json["missing"]), (404, &json!(true)));
    assert_eq!(stack.get("/healthz").await.status, 200);
}
