//! The request commands over `/v1/requests`: `submit` (optionally waiting with the live view),
//! `requests` (the list), `request ID` and `cancel ID`. With `--json` each prints the REST
//! answer as it came (`submit --wait` the finished request).

use std::io::IsTerminal as _;
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};

use super::progress::progress_cell;
use super::{parse_json, read_input, read_stdin};
use crate::cli::{IdArg, RequestList, RequestShow, Submit};
use crate::client::Client;
use crate::error::{CliError, Exit};
use crate::output::{self, Output, cell, timestamp};
use crate::watch;

/// Seconds one long poll asks the server to hold (it cuts this to its `CAIRN_MAX_WAIT`).
const LONG_POLL_SECS: u64 = 60;

pub async fn submit(client: &Client, out: Output, args: Submit) -> Result<Exit, CliError> {
    let body = submission(&args)?;
    let request = client.request(Method::POST, &["v1", "requests"]);
    let request = if args.files.is_empty() {
        request.json(&body)
    } else {
        request.multipart(form(&body, &args.files).await?)
    };
    let answer = client.call(request, None).await?;
    let id = answer.json["id"]
        .as_str()
        .ok_or_else(|| {
            CliError::Other(anyhow::anyhow!("the submission's answer has no id: {}", answer.json))
        })?
        .to_owned();
    if !args.wait {
        if out.json {
            out.json(&answer.json);
        } else {
            let key = answer.json["progress_key"].as_str().unwrap_or("?");
            let state = answer.json["state"].as_str().unwrap_or("queued");
            out.text(&format!(
                "submitted {id} ({state})\n  follow it:   cairn watch {key}\n  its result:  cairn request {id} --wait"
            ));
        }
        return Ok(Exit::Success);
    }
    // A repeated idempotency key may name a request that has already ended.
    let finished = answer.status == StatusCode::OK;
    if out.terminal && !finished {
        let key = answer.json["progress_key"].as_str().unwrap_or_default().to_owned();
        output::print(&format!("submitted {id} (Ctrl-C stops watching, not the request)\n"));
        match watch::follow(client, &key, 8, out).await {
            Ok(_) => {}
            // Without a live endpoint the wait below still works.
            Err(CliError::Api { status: 404, message }) => {
                eprintln!("{message}; waiting without a live view")
            }
            Err(error) => return Err(error),
        }
    }
    let view = wait_until_ended(client, &id).await?;
    print_request(out, &view);
    Ok(exit_of(&view))
}

/// The submission body from the arguments.
fn submission(args: &Submit) -> Result<Value, CliError> {
    let text = match args.payload.as_deref() {
        Some(arg) => Some(read_input(arg, "payload")?),
        None if !std::io::stdin().is_terminal() => Some(read_stdin("payload")?),
        None => None,
    };
    let payload = match text {
        None => Value::Null,
        Some(text) if args.text => Value::String(text),
        Some(text) if text.trim().is_empty() && args.payload.is_none() => Value::Null,
        Some(text) => parse_json(&text, "payload")
            .map_err(|e| CliError::usage(format!("{e}; or send it as a string with --text")))?,
    };
    let mut body = Map::new();
    body.insert("handler".into(), json!(args.handler));
    body.insert("payload".into(), payload);
    if let Some(key) = &args.progress_key {
        body.insert("progress_key".into(), json!(key));
    }
    if let Some(n) = args.max_attempts {
        body.insert("max_attempts".into(), json!(n));
    }
    if let Some(timeout) = args.timeout {
        body.insert("timeout_ms".into(), json!(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)));
    }
    if let Some(key) = &args.idempotency_key {
        body.insert("idempotency_key".into(), json!(key));
    }
    Ok(Value::Object(body))
}

/// The multipart body of a submission with files: the part `request` (the JSON submission)
/// first, then one part per file, named by its stream name, its bytes streamed from disk.
async fn form(body: &Value, files: &[(String, std::path::PathBuf)]) -> Result<Form, CliError> {
    let request = Part::text(body.to_string())
        .mime_str("application/json")
        .map_err(|e| CliError::Other(anyhow::anyhow!("multipart: {e}")))?;
    let mut form = Form::new().part("request", request);
    let mut seen = std::collections::HashSet::new();
    for (name, path) in files {
        if !seen.insert(name) {
            return Err(CliError::usage(format!("--file names the stream {name:?} twice")));
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| CliError::usage(format!("--file {name}={}: {e}", path.display())))?;
        let length = file
            .metadata()
            .await
            .map_err(|e| CliError::usage(format!("--file {name}={}: {e}", path.display())))?
            .len();
        let stream = tokio_util::io::ReaderStream::new(file);
        let file_name = path.file_name().map_or_else(|| name.clone(), |n| n.to_string_lossy().into_owned());
        let part = Part::stream_with_length(reqwest::Body::wrap_stream(stream), length)
            .file_name(file_name)
            .mime_str("application/octet-stream")
            .map_err(|e| CliError::Other(anyhow::anyhow!("multipart: {e}")))?;
        form = form.part(name.clone(), part);
    }
    Ok(form)
}

/// Long-polls the request until it is in a terminal state.
async fn wait_until_ended(client: &Client, id: &str) -> Result<Value, CliError> {
    loop {
        let request = client
            .request(Method::GET, &["v1", "requests", id])
            .header("prefer", format!("wait={LONG_POLL_SECS}"));
        let view = client.call(request, Some(Duration::from_secs(LONG_POLL_SECS))).await?.json;
        if is_terminal(&view) {
            return Ok(view);
        }
    }
}

fn is_terminal(view: &Value) -> bool {
    matches!(view["state"].as_str(), Some("succeeded" | "canceled" | "dead"))
}

/// 0 for a request that succeeded or has not ended, 1 for one canceled or dead.
fn exit_of(view: &Value) -> Exit {
    match view["state"].as_str() {
        Some("canceled" | "dead") => Exit::Failed,
        _ => Exit::Success,
    }
}

pub async fn show(client: &Client, out: Output, args: RequestShow) -> Result<Exit, CliError> {
    let view = if args.wait {
        wait_until_ended(client, &args.id).await?
    } else {
        client.get(&["v1", "requests", &args.id], &[]).await?
    };
    print_request(out, &view);
    Ok(exit_of(&view))
}

/// A request view: JSON, or one field per line.
pub fn print_request(out: Output, view: &Value) {
    if out.json {
        out.json(view);
        return;
    }
    let state = view["state"].as_str().unwrap_or("?");
    let mut lines = vec![
        format!("request       {}", cell(&view["id"])),
        format!("handler       {}", cell(&view["handler"])),
        format!("state         {}", output::status_style(state).apply_to(state)),
        format!("attempts      {} of {}", cell(&view["attempts"]), cell(&view["max_attempts"])),
        format!("progress      {}  ({})", progress_cell(&view["progress"]), cell(&view["progress_key"])),
        format!("created       {}", timestamp(view["created_at"].as_i64())),
        format!("started       {}", timestamp(view["started_at"].as_i64())),
        format!("finished      {}", timestamp(view["finished_at"].as_i64())),
    ];
    if let Some(heartbeat) = view["heartbeat_at"].as_i64().filter(|_| !is_terminal(view)) {
        lines.push(format!(
            "heartbeat     {} ago",
            output::short_duration(cairn_progress::now_ms() - heartbeat)
        ));
    }
    if view["cancel_requested"] == Value::Bool(true) {
        lines.push("cancel        requested".to_owned());
    }
    if let Some(error) = view.get("error").filter(|e| !e.is_null()) {
        lines.push(format!("error         {}", cell(error)));
    }
    if let Some(result) = view.get("result") {
        let text = serde_json::to_string_pretty(result).unwrap_or_default();
        lines.push(format!("result        {}", text.replace('\n', "\n              ")));
    }
    out.text(&lines.join("\n"));
}

pub async fn list(client: &Client, out: Output, args: RequestList) -> Result<Exit, CliError> {
    let mut query = vec![("limit", args.limit.to_string())];
    if let Some(state) = args.state {
        query.push(("state", state));
    }
    if let Some(handler) = args.handler {
        query.push(("handler", handler));
    }
    if let Some(after) = &args.after {
        query.push(("after", after.clone()));
    }
    let page = match client.get(&["v1", "requests"], &query).await {
        Err(CliError::Api { status: 404 | 405, .. }) => {
            return Err(CliError::Api {
                status: 404,
                message: format!(
                    "{} has no request list (GET /v1/requests); upgrade ingress, or look up one request with `cairn request ID`",
                    client.base()
                ),
            });
        }
        page => page?,
    };
    if out.json {
        out.json(&page);
        return Ok(Exit::Success);
    }
    let items = page_items(&page);
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let state = r["state"].as_str().unwrap_or("?");
            vec![
                cell(&r["id"]),
                cell(&r["handler"]),
                output::status_style(state).apply_to(state).to_string(),
                format!("{}/{}", cell(&r["attempts"]), cell(&r["max_attempts"])),
                timestamp(r["created_at"].as_i64()),
                took(r),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.text("no requests");
    } else {
        out.text(&output::table(&["ID", "HANDLER", "STATE", "ATTEMPTS", "CREATED", "TOOK"], &rows));
    }
    // The same filters and page size, from where this page ended.
    let again: Vec<String> = query
        .iter()
        .filter(|(name, _)| *name != "after")
        .map(|(name, value)| format!("--{name} {value}"))
        .collect();
    print_next(out, &page, &format!("cairn requests {}", again.join(" ")));
    Ok(Exit::Success)
}

/// How long a request ran (start to finish), or has been running; `-` before it starts.
fn took(view: &Value) -> String {
    match (view["started_at"].as_i64(), view["finished_at"].as_i64()) {
        (Some(start), Some(end)) => output::short_duration(end - start),
        (Some(start), None) => format!("{}…", output::short_duration(cairn_progress::now_ms() - start)),
        _ => "-".to_owned(),
    }
}

/// The items of a paged answer (`{"items": […], "next": …}`, or a bare list).
pub fn page_items(page: &Value) -> Vec<Value> {
    match page {
        Value::Array(items) => items.clone(),
        page => page["items"].as_array().cloned().unwrap_or_default(),
    }
}

/// How to get the next page, when there is one.
pub fn print_next(out: Output, page: &Value, command: &str) {
    if let Some(next) = page.get("next").and_then(Value::as_str) {
        out.text(&format!("more: {command} --after {next}"));
    }
}

pub async fn cancel(client: &Client, out: Output, args: IdArg) -> Result<Exit, CliError> {
    let answer = client.call(client.request(Method::DELETE, &["v1", "requests", &args.id]), None).await?;
    if out.json {
        out.json(&answer.json);
    } else if answer.status == StatusCode::OK {
        out.text(&format!("canceled {}: it had not started and never will", args.id));
    } else {
        out.text(&format!(
            "asked {} to stop: it is running, and its handler stops within one heartbeat interval",
            args.id
        ));
    }
    Ok(Exit::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(payload: Option<&str>, text: bool) -> Submit {
        Submit {
            handler: "echo".into(),
            payload: payload.map(Into::into),
            text,
            progress_key: Some("_t.k".into()),
            max_attempts: Some(2),
            timeout: Some(Duration::from_secs(30)),
            idempotency_key: None,
            wait: false,
            files: Vec::new(),
        }
    }

    #[test]
    fn submissions_carry_every_option() {
        let body = submission(&args(Some(r#"{"x": 1}"#), false)).unwrap();
        assert_eq!(
            body,
            json!({"handler": "echo", "payload": {"x": 1}, "progress_key": "_t.k", "max_attempts": 2, "timeout_ms": 30000})
        );
        assert_eq!(submission(&args(Some("hello"), true)).unwrap()["payload"], "hello");
        let error = submission(&args(Some("hello"), false)).unwrap_err();
        assert_eq!(error.exit() as u8, 2);
        assert!(error.to_string().contains("--text"), "{error}");
    }

    #[test]
    fn exit_codes_follow_the_state() {
        assert_eq!(exit_of(&json!({"state": "succeeded"})), Exit::Success);
        assert_eq!(exit_of(&json!({"state": "dead"})), Exit::Failed);
        assert_eq!(exit_of(&json!({"state": "canceled"})), Exit::Failed);
        assert!(!is_terminal(&json!({"state": "failed"})), "a failed attempt is retried");
        assert_eq!(took(&json!({"started_at": 1000, "finished_at": 3500})), "2s");
        assert_eq!(took(&json!({"started_at": null})), "-");
    }
}
