//! How commands print: JSON for scripts (`--json`), aligned tables and text for people. Colours
//! and progress bars only when stdout is a terminal, and no colours when `NO_COLOR` is set.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, UNIX_EPOCH};

use console::Style;
use serde_json::Value;

/// Where output goes and in which form.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// `--json`: JSON documents (JSON lines for streams) instead of text.
    pub json: bool,
    /// stdout is a terminal: live progress bars are drawn.
    pub terminal: bool,
}

impl Output {
    /// Looks at stdout and `NO_COLOR` once, and switches `console`'s colours off when they must
    /// not be used (so every `Style` and indicatif template follows).
    pub fn detect(json: bool) -> Output {
        let terminal = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let colors = terminal && !no_color && !json;
        console::set_colors_enabled(colors);
        console::set_colors_enabled_stderr(colors && std::io::stderr().is_terminal());
        Output { json, terminal: terminal && !json }
    }

    /// Prints one JSON document on one line (so a stream of them is JSON lines).
    pub fn json_line(&self, value: &Value) {
        print(&format!("{value}\n"));
    }

    /// Prints one JSON document, indented.
    pub fn json(&self, value: &Value) {
        let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
        print(&format!("{text}\n"));
    }

    /// Prints text, ending it with a newline when it has none.
    pub fn text(&self, text: &str) {
        if text.ends_with('\n') { print(text) } else { print(&format!("{text}\n")) }
    }
}

/// Writes `text` to stdout and flushes it. When the reader has gone (`cairn watch --json | head`)
/// there is nobody left to tell anything: the command ends at once, successfully, as `head`
/// asked.
pub fn print(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
    if let Err(error) = written
        && error.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Columns aligned by their widest cell, two spaces apart, no trailing spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(console::measure_text_width(cell));
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().take(columns).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[i].saturating_sub(console::measure_text_width(cell));
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A progress or request status in its colour (when colours are on).
pub fn status_style(status: &str) -> Style {
    match status {
        "finished" | "succeeded" => Style::new().green(),
        "failed" | "dead" => Style::new().red().bold(),
        "canceled" => Style::new().yellow(),
        "running" => Style::new().cyan(),
        "waiting" | "queued" | "paused" => Style::new().dim(),
        _ => Style::new(),
    }
}

/// A millisecond timestamp as RFC 3339 UTC (`2026-12-05T12:23:00Z`), `-` when absent.
pub fn timestamp(ms: Option<i64>) -> String {
    match ms.and_then(|ms| u64::try_from(ms).ok()) {
        Some(ms) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string(),
        None => "-".to_owned(),
    }
}

/// A duration in the two largest units: `950ms`, `12s`, `3m05s`, `2h10m`, `3d04h`.
pub fn short_duration(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A text bar of `width` cells for `progress` in [0, 1]: `█████░░░░░`.
pub fn text_bar(progress: f64, width: usize) -> String {
    let filled = ((progress.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

/// A percentage with no decimals, `  5%`..`100%`; `-` when there is no progress.
pub fn percent(progress: Option<f64>) -> String {
    match progress {
        Some(p) => format!("{:>3}%", (p.clamp(0.0, 1.0) * 100.0).floor() as u32),
        None => "   -".to_owned(),
    }
}

/// `s` cut to `max` display columns, with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if console::measure_text_width(s) <= max {
        return s.to_owned();
    }
    console::truncate_str(s, max, "…").into_owned()
}

/// A JSON value as a table cell: strings bare, null as `-`.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let rows = vec![
            vec!["a".to_owned(), "long value".to_owned(), String::new()],
            vec!["bbbb".to_owned(), "x".to_owned(), "z".to_owned()],
        ];
        assert_eq!(
            table(&["ID", "WHAT", "Z"], &rows),
            "ID    WHAT        Z\na     long value\nbbbb  x           z\n"
        );
    }

    #[test]
    fn durations_and_bars() {
        assert_eq!(short_duration(950), "950ms");
        assert_eq!(short_duration(12_400), "12s");
        assert_eq!(short_duration(185_000), "3m05s");
        assert_eq!(short_duration(7_800_000), "2h10m");
        assert_eq!(short_duration(-5), "0ms");
        assert_eq!(text_bar(0.5, 10), "█████░░░░░");
        assert_eq!(text_bar(1.7, 4), "████");
        assert_eq!(percent(Some(0.999)), " 99%");
        assert_eq!(percent(Some(1.0)), "100%");
        assert_eq!(percent(None), "   -");
        assert_eq!(timestamp(Some(0)), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(None), "-");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
