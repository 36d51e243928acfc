//! Test doubles for the live view: a scripted SSE server (the test decides each event and when a
//! connection drops, and sees the `Last-Event-ID` of every connection), and a tmux session on a
//! private server that runs a command in a real pseudo-terminal and captures its screen.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use futures::Stream;
use serde_json::Value;
use tokio::sync::mpsc;

use super::WAIT;

/// What the scripted server does next on the open connection.
pub enum Step {
    Event {
        kind: &'static str,
        id: String,
        data: Value,
    },
    /// Ends the response: the client sees its connection drop.
    Close,
}

#[derive(Clone)]
struct Script {
    steps: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Step>>>,
    connections: Arc<Mutex<Vec<Option<String>>>>,
}

/// An SSE endpoint at `/status/{key}/events` that plays the steps sent to it.
pub struct ScriptedLive {
    pub base: String,
    steps: mpsc::UnboundedSender<Step>,
    connections: Arc<Mutex<Vec<Option<String>>>>,
}

impl ScriptedLive {
    pub async fn start() -> ScriptedLive {
        let (steps, received) = mpsc::unbounded_channel();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let script =
            Script { steps: Arc::new(tokio::sync::Mutex::new(received)), connections: connections.clone() };
        let app = Router::new().route("/status/{key}/events", get(events)).with_state(script);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        ScriptedLive { base, steps, connections }
    }

    pub fn event(&self, kind: &'static str, id: &str, data: Value) {
        self.steps.send(Step::Event { kind, id: id.to_owned(), data }).unwrap();
    }

    pub fn close(&self) {
        self.steps.send(Step::Close).unwrap();
    }

    /// The `Last-Event-ID` each connection so far came with.
    pub fn connections(&self) -> Vec<Option<String>> {
        self.connections.lock().unwrap().clone()
    }
}

async fn events(
    State(script): State<Script>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    script.connections.lock().unwrap().push(last);
    let stream = futures::stream::unfold(script.steps, |steps| async move {
        let step = steps.lock().await.recv().await?;
        match step {
            Step::Event { kind, id, data } => {
                Some((Ok(Event::default().event(kind).id(id).data(data.to_string())), steps))
            }
            Step::Close => None,
        }
    });
    Sse::new(stream)
}

/// A command running in a detached tmux session of its own tmux server; both go when dropped.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// Runs `command` (a shell command line) in a `columns`×`rows` terminal. When it ends, the
    /// pane shows `EXIT=<code>` and stays open.
    pub fn start(command: &str, columns: u16, rows: u16) -> Tmux {
        let socket = format!("cairn-cli-test-{}", uuid_like());
        let line = format!("{command}; echo EXIT=$?; sleep 600");
        let status = std::process::Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null", "new-session", "-d", "-s", "t"])
            .args(["-x", &columns.to_string(), "-y", &rows.to_string(), &line])
            .env_remove("TMUX")
            .status()
            .expect("tmux runs (apt-get install tmux)");
        assert!(status.success(), "tmux new-session failed");
        Tmux { socket }
    }

    /// The visible screen, as text.
    pub fn screen(&self) -> String {
        self.capture(false)
    }

    /// The visible screen with its colours and attributes as escape sequences.
    pub fn styled_screen(&self) -> String {
        self.capture(true)
    }

    fn capture(&self, escapes: bool) -> String {
        let flags = if escapes { "-pe" } else { "-p" };
        let output = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", flags, "-t", "t"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until the screen satisfies `check`, and returns it; fails the test with the last
    /// screen after [`WAIT`].
    pub async fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// A shell word for `s` (single quotes).
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
