//! `cairn dlq list|show|retry` over `/v1/dead-letters`: requests that failed for good, their
//! last error, and running one again with fresh attempts.

use reqwest::Method;

use super::requests::{page_items, print_next, print_request};
use crate::cli::Dlq;
use crate::client::Client;
use crate::error::{CliError, Exit};
use crate::output::{self, Output, cell, timestamp};

pub async fn run(client: &Client, out: Output, command: Dlq) -> Result<Exit, CliError> {
    match command {
        Dlq::List { limit, after } => {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(after) = after {
                query.push(("after", after));
            }
            let page = client.get(&["v1", "dead-letters"], &query).await?;
            if out.json {
                out.json(&page);
                return Ok(Exit::Success);
            }
            let rows: Vec<Vec<String>> = page_items(&page)
                .iter()
                .map(|letter| {
                    let error = cell(&letter["error"]).replace('\n', " ");
                    vec![
                        cell(&letter["id"]),
                        timestamp(letter["time"].as_i64()),
                        output::truncate(&error, 80),
                    ]
                })
                .collect();
            if rows.is_empty() {
                out.text("no dead letters");
            } else {
                out.text(&output::table(&["ID", "DIED", "ERROR"], &rows));
            }
            print_next(out, &page, &format!("cairn dlq list --limit {limit}"));
            Ok(Exit::Success)
        }
        Dlq::Show(id) => {
            let view = client.get(&["v1", "dead-letters", &id.id], &[]).await?;
            print_request(out, &view);
            Ok(Exit::Success)
        }
        Dlq::Retry(id) => {
            let request = client.request(Method::POST, &["v1", "dead-letters", &id.id, "retry"]);
            let answer = client.call(request, None).await?.json;
            if out.json {
                out.json(&answer);
            } else {
                out.text(&format!(
                    "{} queued again with fresh attempts\n  follow it:   cairn request {} --wait",
                    id.id, id.id
                ));
            }
            Ok(Exit::Success)
        }
    }
}
