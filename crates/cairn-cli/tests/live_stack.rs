//! `cairn watch` and `cairn submit --wait` against a real stack: the aggregator's change feed
//! through ingress's SSE endpoint, driven by REST updates and by a request's own handler.

mod common;

use common::Stack;
use common::live::{Tmux, quote};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Reads JSON lines until one satisfies `check`; fails the test after [`common::WAIT`].
async fn line_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let read = async {
        while let Some(line) = lines.next_line().await.expect("stdout") {
            let event: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if check(&event) {
                return event;
            }
        }
        panic!("watch ended before {what}");
    };
    tokio::time::timeout(common::WAIT, read).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The node `key` in an event, if it carries it.
fn node<'a>(event: &'a Value, key: &str) -> Option<&'a Value> {
    event["nodes"].as_array()?.iter().find(|n| n["key"] == key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_follows_updates_until_the_root_finishes() {
    let stack = Stack::start().await;
    stack.post("_ws.job.a", json!({"progress": 0.2, "status": "running"})).await;
    let mut child = common::command(&stack.base).args(["watch", "_ws.job", "--json"]).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let snapshot = line_until(&mut lines, "the snapshot", |e| e["type"] == "snapshot").await;
    assert_eq!(snapshot["key"], "_ws.job");
    assert!(snapshot["id"].as_str().is_some_and(|id| !id.is_empty()), "{snapshot}");
    assert_eq!(snapshot["nodes"][0]["tasks"][0]["key"], "_ws.job.a", "{snapshot}");

    stack.post("_ws.job.a", json!({"progress": 0.6, "msg": "more"})).await;
    let update =
        line_until(&mut lines, "the update", |e| node(e, "_ws.job.a").is_some_and(|n| n["progress"] == 0.6))
            .await;
    assert_eq!(update["type"], "update");
    assert_eq!(node(&update, "_ws.job.a").unwrap()["msg"], "more");

    stack.post("_ws.job", json!({"status": "finished"})).await;
    let last = line_until(&mut lines, "the root finished", |e| {
        node(e, "_ws.job").is_some_and(|n| n["status"] == "finished")
    })
    .await;
    let root = node(&last, "_ws.job").unwrap();
    let read = stack.get("/status/_ws.job").await;
    assert_eq!((&root["progress"], &root["status"]), (&read["progress"], &read["status"]));
    assert_eq!(lines.next_line().await.unwrap(), None, "the watch ends with the root");
    let status = tokio::time::timeout(common::WAIT, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_in_a_terminal_moves_its_bars_and_exits_with_the_root() {
    let stack = Stack::start().await;
    let command =
        format!("CAIRN_URL={} {} watch _wt.job", quote(&stack.base), quote(env!("CARGO_BIN_EXE_cairn")));
    let tmux = Tmux::start(&command, 110, 20);
    tmux.wait_for("the watch to wait for the key", |s| s.contains("waiting for _wt.job to appear")).await;

    stack.post("_wt.job.copy", json!({"progress": 0.3, "status": "running", "msg": "copying"})).await;
    stack.post("_wt.job.index", json!({"progress": 0.0, "status": "waiting"})).await;
    let screen = tmux
        .wait_for("the first bars", |s| s.contains("└ copy") && s.contains(" 30%") && s.contains("└ index"))
        .await;
    assert!(screen.contains("copying") && screen.contains(" 15%"), "the root rolls up: {screen}");

    stack.post("_wt.job.copy", json!({"progress": 0.7})).await;
    stack.post("_wt.job.index", json!({"progress": 0.5, "status": "running"})).await;
    tmux.wait_for("the bars to move", |s| s.contains(" 70%") && s.contains(" 60%") && s.contains(" 50%"))
        .await;

    stack.post("_wt.job.copy", json!({"progress": 1, "status": "finished"})).await;
    stack.post("_wt.job.index", json!({"progress": 1, "status": "finished"})).await;
    stack.post("_wt.job", json!({"status": "finished"})).await;
    let screen = tmux.wait_for("the watch to end", |s| s.contains("EXIT=")).await;
    assert!(screen.contains("EXIT=0") && screen.contains("_wt.job finished"), "{screen}");
    assert_eq!(screen.matches("100%").count(), 3, "{screen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_in_a_terminal_shows_the_request_live_then_its_result() {
    let stack = Stack::start().await;
    let command = format!(
        "CAIRN_URL={} {} submit steps {} --wait",
        quote(&stack.base),
        quote(env!("CARGO_BIN_EXE_cairn")),
        quote(r#"{"steps": 3, "step_ms": 1500}"#)
    );
    let tmux = Tmux::start(&command, 120, 24);
    let screen = tmux
        .wait_for("the steps as bars", |s| {
            s.contains("└ step-0") && s.contains("└ step-2") && s.contains("running")
        })
        .await;
    assert!(screen.contains("submitted "), "{screen}");
    assert!(
        screen.lines().any(|l| l.starts_with("_requests.") && l.contains('%')),
        "the request's bar: {screen}"
    );
    let screen = tmux.wait_for("the request to end", |s| s.contains("EXIT=")).await;
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("state         succeeded"), "{screen}");
    assert!(screen.contains("\"steps_done\": 3"), "{screen}");
    assert!(screen.matches("100%").count() >= 4, "the request and its three steps: {screen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_an_ingress_restart() {
    let mut stack = Stack::start().await;
    stack.post("_wr.job.a", json!({"progress": 0.2, "status": "running"})).await;
    let mut child = common::command(&stack.base).args(["watch", "_wr.job", "--json"]).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    line_until(&mut lines, "the snapshot", |e| e["type"] == "snapshot").await;
    stack.post("_wr.job.a", json!({"progress": 0.4})).await;
    line_until(&mut lines, "0.4", |e| node(e, "_wr.job.a").is_some_and(|n| n["progress"] == 0.4)).await;

    // The ingress goes away (its live streams end) and comes back on the same address.
    stack.restart_ingress().await;
    stack.post("_wr.job.a", json!({"progress": 0.9})).await;
    stack.post("_wr.job", json!({"status": "finished"})).await;
    let mut events = Vec::new();
    while let Some(line) = tokio::time::timeout(common::WAIT, lines.next_line()).await.unwrap().unwrap() {
        events.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    // Resumed after the last event seen: no second snapshot, and every later change arrives.
    assert!(events.iter().all(|e| e["type"] == "update"), "{events:#?}");
    assert!(events.iter().any(|e| node(e, "_wr.job.a").is_some_and(|n| n["progress"] == 0.9)), "{events:#?}");
    assert!(
        node(events.last().unwrap(), "_wr.job").is_some_and(|n| n["status"] == "finished"),
        "{events:#?}"
    );
    let output = tokio::time::timeout(common::WAIT, child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reconnecting"), "the drop was noticed: {stderr}");
}
