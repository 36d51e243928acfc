//! The progress commands: `status KEY` (the tree), `post KEY JSON`, `delete KEY`, over
//! ingress's `/status/{key}`. With `--json` each prints the REST answer as it came.

use reqwest::Method;
use serde_json::Value;

use super::{parse_json, read_input};
use crate::cli::{KeyArg, Post, Status};
use crate::client::Client;
use crate::error::{CliError, Exit};
use crate::output::{self, Output};
use crate::watch::tree::{self, Tree};

/// Lines a `status` tree prints at most.
const MAX_ROWS: usize = 1000;

pub async fn status(client: &Client, out: Output, args: Status) -> Result<Exit, CliError> {
    let query = [("depth", args.depth.to_string()), ("limit", args.limit.to_string())];
    let node = client.get(&["status", &args.key], &query).await?;
    if out.json {
        out.json(&node);
    } else {
        let width = if out.terminal { usize::from(console::Term::stdout().size().1) } else { 200 };
        out.text(&Tree::from_snapshot(&args.key, &node).render_text(MAX_ROWS, width));
    }
    Ok(Exit::Success)
}

pub async fn post(client: &Client, out: Output, args: Post) -> Result<Exit, CliError> {
    let update = parse_json(&read_input(&args.update, "update")?, "update")?;
    if !update.is_object() {
        return Err(CliError::usage(format!(
            "the update must be a JSON object such as '{{\"progress\": 0.5}}', got {update}"
        )));
    }
    let request = client.request(Method::POST, &["status", &args.key]).json(&update);
    let answer = client.call(request, None).await?.json;
    if out.json {
        out.json(&answer);
    } else {
        let node = &answer["node"];
        let row = Tree::from_snapshot(&args.key, node).rows(1).0;
        out.text(&tree::lines(&row, 200).join("\n"));
    }
    Ok(Exit::Success)
}

pub async fn delete(client: &Client, out: Output, args: KeyArg) -> Result<Exit, CliError> {
    let answer = client.call(client.request(Method::DELETE, &["status", &args.key]), None).await?.json;
    if out.json {
        out.json(&answer);
    } else {
        let removed = answer["removed"].as_u64().map_or_else(String::new, |n| format!(" ({n} nodes)"));
        out.text(&format!("deleted {} and everything below it{removed}", args.key));
    }
    Ok(Exit::Success)
}

/// A progress fraction from a JSON value, for tables.
pub fn progress_cell(value: &Value) -> String {
    output::percent(value.as_f64()).trim_start().to_owned()
}
