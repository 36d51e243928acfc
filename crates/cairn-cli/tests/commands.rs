//! Every remote `cairn` command run as a user runs it, against a real stack: its `--json`
//! output is what the REST API answers, its text output says the same, and its exit code tells
//! success, failure, usage errors, an unreachable Cairn and a refused token apart.

mod common;

use common::{Stack, cairn_at, stable};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_commands_match_rest() {
    let stack = Stack::start().await;
    let key = "_cli.job";

    // post: the answer is the REST answer, with the node as a later read shows it
    let posted = stack
        .cairn(&["post", "_cli.job.a", r#"{"progress": 0.5, "status": "running", "msg": "half"}"#, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(posted["status"], "published");
    assert_eq!(stable(posted["node"].clone()), stable(stack.get("/status/_cli.job.a").await));
    stack.post("_cli.job.b", json!({"progress": 1, "status": "finished", "weight": 3})).await;

    // status: the tree as GET returns it
    let status = stack.cairn(&["status", key, "--json"]).await.expect(0).json();
    assert_eq!(stable(status.clone()), stable(stack.get("/status/_cli.job?depth=3&limit=100").await));
    assert_eq!(status["tasks"].as_array().map(Vec::len), Some(2), "{status}");
    let status = stack.cairn(&["--json", "status", key, "--depth", "1"]).await.expect(0).json();
    assert_eq!(stable(status), stable(stack.get("/status/_cli.job?depth=1&limit=100").await));

    // status as text: one line per node with its percentage, status and message
    let text = stack.cairn(&["status", key]).await.expect(0).stdout;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("_cli.job ") && lines[0].contains(" 87%"), "{text}");
    assert!(lines[1].contains("└ a") && lines[1].contains(" 50%  running  half"), "{text}");
    assert!(lines[2].contains("└ b") && lines[2].contains("100%  finished"), "{text}");
    assert!(!text.contains('\x1b'), "no colours when stdout is not a terminal: {text:?}");

    // a node silent past its stall_after_ms is marked; children beyond the depth are counted
    stack.post("_cli.job.c", json!({"status": "running", "progress": 0.1, "stall_after_ms": 1})).await;
    cairn_testkit::wait_until("c stalls", common::WAIT, || async {
        stack.get("/status/_cli.job.c").await["_stalled"] == true
    })
    .await
    .unwrap();
    let text = stack.cairn(&["status", key]).await.expect(0).stdout;
    let c = text.lines().find(|l| l.contains("└ c")).unwrap_or_else(|| panic!("{text}"));
    assert!(c.contains(" 10%  running  ⚠ stalled "), "{text}");
    let text = stack.cairn(&["status", key, "--depth", "1"]).await.expect(0).stdout;
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("(+3 more)"), "{text}");
    stack.cairn(&["delete", "_cli.job.c"]).await.expect(0);

    // post with the update from stdin-less @file
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("update.json");
    std::fs::write(&file, r#"{"progress": 0.25}"#).unwrap();
    let arg = format!("@{}", file.display());
    let posted = stack.cairn(&["post", "_cli.job.a", &arg]).await.expect(0).stdout;
    assert!(posted.contains(" 25%") && posted.contains("running"), "{posted}");

    // delete: the REST answer, and the node is gone
    let deleted = stack.cairn(&["delete", key, "--json"]).await.expect(0).json();
    assert_eq!(deleted["removed"], 3, "{deleted}");
    let (status, _) = stack.rest(Method::GET, "/status/_cli.job", None).await;
    assert_eq!(status, 404);

    // failures: a missing node (1), refused input (2), bad JSON on the command line (2)
    let missing = stack.cairn(&["status", key]).await.expect(1);
    assert!(missing.stderr.contains("no progress at key _cli.job"), "{missing:?}");
    let refused = stack.cairn(&["post", key, r#"{"progress": 2}"#]).await.expect(2);
    assert!(refused.stderr.contains("progress"), "{refused:?}");
    let bad = stack.cairn(&["post", key, "{progress: 1}"]).await.expect(2);
    assert!(bad.stderr.contains("not valid JSON"), "{bad:?}");
    let not_object = stack.cairn(&["post", key, "[1]"]).await.expect(2);
    assert!(not_object.stderr.contains("JSON object"), "{not_object:?}");
    let bad_key = stack.cairn(&["status", "a..b"]).await.expect(2);
    assert!(bad_key.stderr.contains("empty"), "{bad_key:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_commands_match_rest() {
    let stack = Stack::start().await;

    // submit without waiting: the REST answer (202)
    let submitted = stack.cairn(&["submit", "echo", r#"{"x": 1}"#, "--json"]).await.expect(0).json();
    let id = submitted["id"].as_str().expect("an id").to_owned();
    assert_eq!(submitted["progress_key"], format!("_requests.{id}"));

    // request --wait: the finished request as GET shows it
    let shown = stack.cairn(&["request", &id, "--wait", "--json"]).await.expect(0).json();
    assert_eq!(shown["state"], "succeeded", "{shown}");
    assert_eq!(shown["result"], json!({"x": 1}));
    assert_eq!(shown, stack.get(&format!("/v1/requests/{id}")).await);
    let text = stack.cairn(&["request", &id]).await.expect(0).stdout;
    assert!(text.contains(&format!("request       {id}")) && text.contains("succeeded"), "{text}");

    // submit --wait outside a terminal: no bars, the finished request
    let waited = stack.cairn(&["submit", "echo", "\"hello\"", "--wait", "--json"]).await.expect(0).json();
    assert_eq!((waited["state"].as_str(), &waited["result"]), (Some("succeeded"), &json!("hello")));
    let waited = stack.cairn(&["submit", "echo", "plain text", "--text", "--wait"]).await.expect(0).stdout;
    assert!(waited.contains("succeeded") && waited.contains("\"plain text\""), "{waited}");
    assert!(!waited.contains('\x1b') && !waited.contains('█'), "no colours or bars: {waited:?}");

    // requests: the REST list, newest first
    let listed = stack.cairn(&["requests", "--json"]).await.expect(0).json();
    assert_eq!(listed, stack.get("/v1/requests?limit=50").await);
    let ids: Vec<&str> =
        listed["items"].as_array().unwrap().iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids.len(), 3, "{listed}");
    assert_eq!(ids[2], id, "newest first");
    let filtered =
        stack.cairn(&["requests", "--state", "succeeded", "--limit", "1", "--json"]).await.expect(0).json();
    assert_eq!(filtered, stack.get("/v1/requests?limit=1&state=succeeded").await);
    // paging: `next` of one page is `--after` of the following one
    let first = stack.cairn(&["requests", "--limit", "1", "--json"]).await.expect(0).json();
    let next = first["next"].as_str().expect("a next page").to_owned();
    let second =
        stack.cairn(&["requests", "--limit", "1", "--after", &next, "--json"]).await.expect(0).json();
    assert_eq!(second, stack.get(&format!("/v1/requests?limit=1&after={next}")).await);
    assert_eq!(second["items"][0]["id"].as_str(), Some(ids[1]), "{second}");
    let text = stack.cairn(&["requests", "--limit", "1"]).await.expect(0).stdout;
    assert!(text.trim_end().ends_with(&format!("more: cairn requests --limit 1 --after {next}")), "{text}");
    let table = stack.cairn(&["requests"]).await.expect(0).stdout;
    assert!(table.starts_with("ID ") && table.lines().count() == 4, "{table}");
    assert!(table.contains(&id), "{table}");

    // cancel a running request: the REST answer, then the request ends canceled (exit 1)
    let running = stack
        .cairn(&["submit", "steps", r#"{"steps": 2, "step_ms": 20000}"#, "--json"])
        .await
        .expect(0)
        .json();
    let running = running["id"].as_str().unwrap().to_owned();
    cairn_testkit::wait_until("the request runs", common::WAIT, || async {
        stack.get(&format!("/v1/requests/{running}")).await["state"] == "running"
    })
    .await
    .unwrap();
    let canceled = stack.cairn(&["cancel", &running, "--json"]).await.expect(0).json();
    assert_eq!(canceled, json!({"id": running, "state": "running", "cancel_requested": true}));
    let ended = stack.cairn(&["request", &running, "--wait", "--json"]).await.expect(1).json();
    assert_eq!(ended["state"], "canceled", "{ended}");

    // streams (read from Redis): the request stream and its group, with nothing left to deliver
    let (redis_url, prefix) = stack.redis();
    let streams = common::command(&stack.base)
        .env("CAIRN_REDIS_URL", redis_url)
        .env("CAIRN_KEY_PREFIX", prefix)
        .args(["streams", "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(streams.status.code(), Some(0), "{streams:?}");
    let streams: serde_json::Value = serde_json::from_slice(&streams.stdout).unwrap();
    let requests =
        streams.as_array().unwrap().iter().find(|s| s["stream"] == "requests").expect("the request stream");
    assert_eq!(requests["key"], format!("{prefix}:requests"));
    assert_eq!(requests["length"], 4, "{requests}");
    assert_eq!(requests["groups"][0]["name"], "processors");
    assert_eq!(requests["groups"][0]["lag"], 0, "{requests}");

    // failures: unknown request (1), malformed id (2), unknown handler (2)
    let missing = stack.cairn(&["request", "0190f5c2-7b8e-4c3d-9a2b-123456789abc"]).await.expect(1);
    assert!(missing.stderr.contains("0190f5c2-7b8e-4c3d-9a2b-123456789abc"), "{missing:?}");
    let malformed = stack.cairn(&["cancel", "nope"]).await.expect(2);
    assert!(malformed.stderr.contains("invalid request id"), "{malformed:?}");
    let unknown = stack.cairn(&["submit", "no-such-handler", "1"]).await.expect(2);
    assert!(unknown.stderr.contains("no-such-handler"), "{unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_show_and_retry() {
    let stack = Stack::start().await;
    // `steps` refuses a payload without steps for good: the request dies, submit --wait says 1
    let died = stack.cairn(&["submit", "steps", "{}", "--wait", "--json"]).await.expect(1).json();
    assert_eq!(died["state"], "dead", "{died}");
    let id = died["id"].as_str().unwrap().to_owned();

    let listed = stack.cairn(&["dlq", "list", "--json"]).await.expect(0).json();
    assert_eq!(listed, stack.get("/v1/dead-letters?limit=50").await);
    assert_eq!(listed["items"][0]["id"], id.as_str(), "{listed}");
    let table = stack.cairn(&["dlq", "list"]).await.expect(0).stdout;
    assert!(table.starts_with("ID ") && table.contains(&id) && table.contains("steps"), "{table}");

    let shown = stack.cairn(&["dlq", "show", &id, "--json"]).await.expect(0).json();
    assert_eq!(shown, stack.get(&format!("/v1/dead-letters/{id}")).await);

    let retried = stack.cairn(&["dlq", "retry", &id, "--json"]).await.expect(0).json();
    assert_eq!(retried, json!({"id": id, "state": "queued"}));
    // it runs again, and dies again: the same payload
    let again = stack.cairn(&["request", &id, "--wait", "--json"]).await.expect(1).json();
    assert_eq!(again["state"], "dead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_ingress_is_unreachable() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    for args in
        [&["status", "_a.b"][..], &["requests"], &["watch", "_a.b"], &["submit", "echo", "1", "--wait"]]
    {
        let run = cairn_at(&base, args).await.expect(3);
        assert!(run.stderr.contains(&format!("cannot reach Cairn at {base}/")), "{args:?}: {run:?}");
        assert!(run.stderr.contains("CAIRN_URL"), "{run:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let base = "http://127.0.0.1:9";
    let run = cairn_at(base, &["status"]).await.expect(2);
    assert!(run.stderr.contains("KEY"), "{run:?}");
    cairn_at(base, &["frobnicate"]).await.expect(2);
    cairn_at(base, &["status", "a", "--depth", "0"]).await.expect(2);
    let run = cairn_at("localhost:8080", &["status", "a"]).await.expect(2);
    assert!(run.stderr.contains("CAIRN_URL"), "{run:?}");
    let run = cairn_at(base, &["submit", "echo", "@/no/such/file"]).await.expect(2);
    assert!(run.stderr.contains("/no/such/file"), "{run:?}");
}

/// A server that answers every request with `status` and a JSON error, and counts the
/// `Authorization` headers it saw.
async fn refusing_server(status: u16) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (seen, heard) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = vec![0; 8192];
            let n = socket.read(&mut request).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&request[..n]).to_lowercase();
            let auth = request.lines().find(|l| l.starts_with("authorization:")).unwrap_or("").to_owned();
            let _ = seen.send(auth);
            let body = r#"{"error":"token expired"}"#;
            let reply = format!(
                "HTTP/1.1 {status} Refused\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(reply.as_bytes()).await;
        }
    });
    (base, heard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_exit_4_and_tokens_are_sent_as_bearer() {
    for status in [401, 403] {
        let (base, mut heard) = refusing_server(status).await;
        let output = common::command(&base)
            .env("CAIRN_TOKEN", "s3cret-token")
            .args(["requests"])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{stderr}");
        assert!(stderr.contains("not authorised") && stderr.contains("token expired"), "{stderr}");
        assert!(stderr.contains("CAIRN_TOKEN"), "{stderr}");
        assert!(!stderr.contains("s3cret-token"), "the token never appears: {stderr}");
        assert_eq!(heard.recv().await.unwrap(), "authorization: bearer s3cret-token");
        // --token wins over CAIRN_TOKEN
        let output = common::command(&base)
            .env("CAIRN_TOKEN", "from-env")
            .args(["status", "a", "--token", "from-flag"])
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(4));
        assert_eq!(heard.recv().await.unwrap(), "authorization: bearer from-flag");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_completions() {
    let base = "http://127.0.0.1:9";
    for command in ["submit", "status", "watch", "post", "delete", "requests", "request", "cancel", "streams"]
    {
        let help = cairn_at(base, &[command, "--help"]).await.expect(0).stdout;
        assert!(help.contains("Example") && help.contains(&format!("cairn {command}")), "{command}: {help}");
    }
    let help = cairn_at(base, &["--help"]).await.expect(0).stdout;
    assert!(
        help.contains("Exit codes") && help.contains("CAIRN_URL") && help.contains("CAIRN_TOKEN"),
        "{help}"
    );
    let token_help =
        common::command(base).env("CAIRN_TOKEN", "hidden-value").arg("--help").output().await.unwrap();
    assert!(!String::from_utf8_lossy(&token_help.stdout).contains("hidden-value"), "the token is not shown");

    let bash = cairn_at(base, &["completions", "bash"]).await.expect(0).stdout;
    assert!(bash.contains("_cairn()") && bash.contains("complete -F _cairn"), "{bash}");
    let zsh = cairn_at(base, &["completions", "zsh"]).await.expect(0).stdout;
    assert!(zsh.starts_with("#compdef cairn"), "{zsh}");
    let fish = cairn_at(base, &["completions", "fish"]).await.expect(0).stdout;
    assert!(fish.contains("complete -c cairn") && fish.contains("dlq"), "{fish}");
    cairn_at(base, &["completions", "tcsh"]).await.expect(2);
}
