//! `cairn streams`: the registered Redis streams and their consumer groups, read from Redis
//! directly (the one remote command that does not go through ingress).

use anyhow::Context;
use cairn_redis::RedisConfig;
use cairn_redis::streams::{StreamInfo, Streams};
use serde_json::{Value, json};

use crate::output::Output;

pub async fn streams(redis: &RedisConfig, out: Output) -> anyhow::Result<()> {
    let conn = redis.connection().context("invalid Redis settings")?;
    let streams = Streams::new(conn, redis.prefix.clone());
    let keys = streams.registered().await.with_context(|| {
        format!(
            "cannot read the stream registry {} at {}",
            streams.registry(),
            cairn_runtime::redact_url(&redis.url)
        )
    })?;
    let mut found = Vec::with_capacity(keys.len());
    for key in &keys {
        match streams.info(key).await.with_context(|| format!("cannot read stream {key}"))? {
            Some(info) => found.push(info),
            None => eprintln!("{key}: registered but gone (the trimmer unregisters it at its next run)"),
        }
    }
    if out.json {
        out.json(&Value::Array(found.iter().map(|info| to_json(&redis.prefix, info)).collect()));
        return Ok(());
    }
    if found.is_empty() {
        out.text(&format!("no streams registered under prefix {:?} ({})", redis.prefix, streams.registry()));
        return Ok(());
    }
    out.text(&table(&redis.prefix, &found));
    Ok(())
}

/// A stream as `--json` prints it: its name without the prefix, and every group's state.
fn to_json(prefix: &str, info: &StreamInfo) -> Value {
    let groups: Vec<Value> = info
        .groups
        .iter()
        .map(|g| {
            json!({
                "name": g.name, "consumers": g.consumers, "pending": g.pending, "lag": g.lag,
                "last_delivered": g.last_delivered, "oldest_pending": g.oldest_pending,
            })
        })
        .collect();
    json!({
        "stream": short_name(prefix, &info.key), "key": info.key, "length": info.length,
        "first": info.first, "last": info.last, "groups": groups,
    })
}

fn short_name<'a>(prefix: &str, key: &'a str) -> &'a str {
    key.strip_prefix(prefix).and_then(|k| k.strip_prefix(':')).unwrap_or(key)
}

/// One row per consumer group (a stream without groups gets one row with `-`); the stream's
/// columns are shown on its first row only.
fn table(prefix: &str, streams: &[StreamInfo]) -> String {
    let header = ["STREAM", "LENGTH", "FIRST", "LAST", "GROUP", "LAG", "PENDING"].map(str::to_owned);
    let mut rows = vec![header];
    for info in streams {
        let name = short_name(prefix, &info.key);
        let id = |id: &Option<String>| id.clone().unwrap_or_else(|| "-".to_owned());
        let stream = [name.to_owned(), info.length.to_string(), id(&info.first), id(&info.last)];
        let groups: Vec<[String; 3]> = if info.groups.is_empty() {
            vec![["-", "-", "-"].map(str::to_owned)]
        } else {
            let lag = |lag: Option<u64>| lag.map_or_else(|| "?".to_owned(), |lag| lag.to_string());
            info.groups.iter().map(|g| [g.name.clone(), lag(g.lag), g.pending.to_string()]).collect()
        };
        for (i, [group, lag, pending]) in groups.into_iter().enumerate() {
            let [a, b, c, d] = if i == 0 { stream.clone() } else { Default::default() };
            rows.push([a, b, c, d, group, lag, pending]);
        }
    }
    let widths: Vec<usize> = (0..7).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use cairn_redis::streams::GroupState;

    use super::*;

    fn group(name: &str, lag: Option<u64>, pending: u64) -> GroupState {
        GroupState {
            name: name.into(),
            consumers: 1,
            pending,
            last_delivered: "1-0".into(),
            oldest_pending: None,
            lag,
        }
    }

    #[test]
    fn table_has_a_row_per_group() {
        let streams = [
            StreamInfo {
                key: "cairn:requests".into(),
                length: 12,
                first: Some("1-0".into()),
                last: Some("9-3".into()),
                groups: vec![group("processors", Some(4), 2), group("audit", None, 0)],
            },
            StreamInfo { key: "cairn:replies:a".into(), length: 0, first: None, last: None, groups: vec![] },
        ];
        let text = table("cairn", &streams);
        let expected = "\
STREAM     LENGTH  FIRST  LAST  GROUP       LAG  PENDING
requests   12      1-0    9-3   processors  4    2
                                audit       ?    0
replies:a  0       -      -     -           -    -
";
        assert_eq!(text, expected);
    }
}
