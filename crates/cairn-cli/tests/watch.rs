//! `cairn watch`: JSON lines and text outside a terminal, nested progress bars in a real
//! pseudo-terminal (tmux), resuming with `Last-Event-ID` after a dropped connection, and the exit
//! code from the root's final status. A scripted SSE server drives what the real stack cannot
//! (a dropped connection at a chosen event); the real stack drives the rest.

mod common;

use common::live::{ScriptedLive, Tmux, quote};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

fn node(key: &str, start: i64, progress: f64, status: &str) -> Value {
    json!({"key": key, "start_time": start, "update_time": start, "progress": progress, "status": status})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_a_dropped_connection() {
    let live = ScriptedLive::start().await;
    let mut child = common::command(&live.base).args(["watch", "_w.job", "--json"]).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let mut root = node("_w.job", 1, 0.0, "running");
    root["tasks"] = json!([node("_w.job.a", 2, 0.0, "waiting")]);
    live.event("snapshot", "1-0", root);
    live.event(
        "update",
        "2-0",
        json!([node("_w.job", 1, 0.5, "running"), node("_w.job.a", 2, 0.5, "running")]),
    );
    let first: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!((first["type"].as_str(), first["id"].as_str()), (Some("snapshot"), Some("1-0")));
    assert_eq!(first["nodes"][0]["tasks"][0]["key"], "_w.job.a");
    let second: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(
        second,
        json!({"type": "update", "id": "2-0", "key": "_w.job",
        "nodes": [node("_w.job", 1, 0.5, "running"), node("_w.job.a", 2, 0.5, "running")]})
    );

    // The connection drops; the watch reconnects by itself, resuming after event 2-0.
    live.close();
    live.event("delete", "3-0", json!(["_w.job.a"]));
    live.event("update", "4-0", json!([node("_w.job", 1, 1.0, "finished")]));
    let third: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(third, json!({"type": "delete", "id": "3-0", "key": "_w.job", "keys": ["_w.job.a"]}));
    let fourth: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(fourth["nodes"][0]["status"], "finished");
    assert_eq!(lines.next_line().await.unwrap(), None, "nothing after the root finished");
    let status = tokio::time::timeout(common::WAIT, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(live.connections(), [None, Some("2-0".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_outside_a_terminal_prints_lines_and_exits_1_when_the_root_fails() {
    let live = ScriptedLive::start().await;
    let child = common::command(&live.base).args(["watch", "_w.job"]).spawn().unwrap();
    let mut root = node("_w.job", 1, 0.25, "running");
    root["tasks"] = json!([node("_w.job.a", 2, 0.25, "running")]);
    root["_child_count"] = json!(1);
    live.event("snapshot", "1-0", root);
    let mut failed = node("_w.job", 1, 0.25, "failed");
    failed["msg"] = json!("disk full");
    live.event("update", "2-0", json!([failed, node("_w.job.a", 2, 0.25, "failed")]));
    let output = tokio::time::timeout(common::WAIT, child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert!(lines[0].starts_with("_w.job ") && lines[0].contains(" 25%  running"), "{stdout}");
    assert!(lines[1].contains("└ a") && lines[1].contains(" 25%  running"), "{stdout}");
    assert_eq!(lines[2], "_w.job  25%  failed  disk full");
    assert_eq!(lines[3], "_w.job.a  25%  failed");
    assert_eq!(lines[4], "_w.job failed in 0ms: disk full");
    assert!(!stdout.contains('\x1b'), "no colours outside a terminal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_draws_moving_bars_in_a_terminal() {
    let live = ScriptedLive::start().await;
    let command =
        format!("CAIRN_URL={} {} watch _w.job", quote(&live.base), quote(env!("CARGO_BIN_EXE_cairn")));
    let tmux = Tmux::start(&command, 110, 20);
    let mut root = node("_w.job", 1, 0.1, "running");
    root["tasks"] = json!([node("_w.job.copy", 2, 0.2, "running"), node("_w.job.index", 3, 0.0, "waiting")]);
    live.event("snapshot", "1-0", root);
    let screen = tmux
        .wait_for("the first bars", |s| s.contains(" 10%") && s.contains(" 20%") && s.contains("waiting"))
        .await;
    let lines: Vec<&str> = screen.lines().filter(|l| l.contains('%')).collect();
    assert_eq!(lines.len(), 3, "{screen}");
    assert!(lines[0].starts_with("_w.job ") && lines[0].contains("running"), "{screen}");
    assert!(
        lines[1].contains("└ copy") && lines[2].contains("└ index") && lines[2].contains("waiting"),
        "{screen}"
    );

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut copy = node("_w.job.copy", 2, 0.8, "running");
    copy["msg"] = json!("copying part 4");
    copy["_eta"] = json!(now + 90_000);
    let mut index = node("_w.job.index", 3, 0.1, "running");
    index["_stalled"] = json!(true);
    index["_age_ms"] = json!(75_000);
    live.event("update", "2-0", json!([node("_w.job", 1, 0.45, "running"), copy, index]));
    // indicatif redraws as each bar changes: wait for the whole update to be on screen.
    let screen = tmux
        .wait_for("the bars to move", |s| {
            s.contains(" 45%")
                && s.contains(" 80%")
                && s.contains("copying part 4")
                && s.contains("⚠ stalled 1m15s")
        })
        .await;
    assert!(screen.contains("ETA 1m"), "{screen}");
    assert!(screen.contains('█'), "{screen}");

    live.event(
        "update",
        "3-0",
        json!([
            node("_w.job", 1, 1.0, "finished"),
            node("_w.job.copy", 2, 1.0, "finished"),
            node("_w.job.index", 3, 1.0, "finished")
        ]),
    );
    let screen = tmux.wait_for("the watch to end", |s| s.contains("EXIT=")).await;
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("_w.job finished"), "{screen}");
    assert_eq!(screen.matches("100%").count(), 3, "{screen}");
    assert!(!screen.contains("stalled"), "{screen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_color_turns_colours_off_but_keeps_the_bars() {
    for no_color in [false, true] {
        let live = ScriptedLive::start().await;
        let env = if no_color { "NO_COLOR=1 " } else { "" };
        let command = format!(
            "{env}CAIRN_URL={} {} watch _w.job",
            quote(&live.base),
            quote(env!("CARGO_BIN_EXE_cairn"))
        );
        let tmux = Tmux::start(&command, 100, 10);
        live.event("snapshot", "1-0", node("_w.job", 1, 0.5, "running"));
        tmux.wait_for("the bar", |s| s.contains(" 50%") && s.contains("running")).await;
        let styled = tmux.styled_screen();
        // SGR colour codes: 30-37 foreground, 40-47 background.
        let coloured = (30..48)
            .any(|code| styled.contains(&format!("\x1b[{code}m")) || styled.contains(&format!(";{code}m")));
        assert_eq!(coloured, !no_color, "NO_COLOR={no_color}: {styled:?}");
        assert!(styled.contains('█'), "bars either way: {styled:?}");
        live.event("update", "2-0", json!([node("_w.job", 1, 1.0, "finished")]));
        tmux.wait_for("the end", |s| s.contains("EXIT=0")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_constant_updates_every_bar_shows_its_last_state() {
    let live = std::sync::Arc::new(ScriptedLive::start().await);
    let command =
        format!("CAIRN_URL={} {} watch _w.job", quote(&live.base), quote(env!("CARGO_BIN_EXE_cairn")));
    let tmux = Tmux::start(&command, 110, 20);
    let mut root = node("_w.job", 1, 0.0, "running");
    root["tasks"] = json!([node("_w.job.a", 2, 0.0, "running"), node("_w.job.b", 3, 0.0, "running")]);
    live.event("snapshot", "1-0", root);
    tmux.wait_for("the bars", |s| s.contains("└ b")).await;
    // The root alone changes far faster than indicatif draws (20 a second) for 5 s; after 1 s
    // the children change once, with it.
    let ticker = live.clone();
    tokio::spawn(async move {
        for i in 0..500u32 {
            let mut update = node("_w.job", 1, 0.45, "running");
            update["msg"] = json!(format!("tick {i}"));
            let nodes = if i == 100 {
                json!([update, node("_w.job.a", 2, 0.6, "running"), node("_w.job.b", 3, 0.3, "running")])
            } else {
                json!([update])
            };
            ticker.event("update", &format!("{}-0", i + 2), nodes);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
    let mut seen = false;
    for _ in 0..200 {
        let screen = tmux.screen();
        assert!(!screen.contains("tick 499"), "the children never showed their last state:\n{screen}");
        if screen.contains(" 45%") && screen.contains(" 60%") && screen.contains(" 30%") {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(seen, "the children never showed their last state:\n{}", tmux.screen());
    live.event("update", "999-0", json!([node("_w.job", 1, 1.0, "finished")]));
    tmux.wait_for("the end", |s| s.contains("EXIT=0")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_ends_when_its_reader_goes() {
    // `cairn watch KEY --json | head -1`: once head has its line, the watch ends (exit 0) instead
    // of following a tree nobody reads.
    let live = ScriptedLive::start().await;
    let mut child = common::command(&live.base).args(["watch", "_w.job", "--json"]).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    live.event("snapshot", "1-0", node("_w.job", 1, 0.1, "running"));
    assert!(lines.next_line().await.unwrap().is_some());
    drop(lines);
    live.event("update", "2-0", json!([node("_w.job", 1, 0.2, "running")]));
    let status = tokio::time::timeout(common::WAIT, child.wait()).await.expect("the watch ends").unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_taller_than_the_terminal_shows_what_fits_and_counts_the_rest() {
    let live = ScriptedLive::start().await;
    let command =
        format!("CAIRN_URL={} {} watch _w.big", quote(&live.base), quote(env!("CARGO_BIN_EXE_cairn")));
    let tmux = Tmux::start(&command, 100, 12);
    let mut root = node("_w.big", 1, 0.0, "running");
    root["tasks"] =
        Value::Array((0..30).map(|i| node(&format!("_w.big.n{i:02}"), 2 + i, 0.0, "waiting")).collect());
    live.event("snapshot", "1-0", root);
    // 12 rows: 10 bars, the count of the rest, and the cursor's row
    let screen = tmux.wait_for("the footer", |s| s.contains("… and 21 more nodes")).await;
    let bars = screen.lines().filter(|l| l.contains('%')).count();
    assert_eq!(bars, 10, "{screen}");
    assert!(screen.contains("└ n00") && screen.contains("└ n08") && !screen.contains("└ n09"), "{screen}");
    live.event("update", "2-0", json!([node("_w.big", 1, 1.0, "finished")]));
    tmux.wait_for("the end", |s| s.contains("EXIT=0")).await;
}
