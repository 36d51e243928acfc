//! The terminal view of a watch: one indicatif bar per node of the tree, indented under its
//! parent, with percentage, status, stalled marker, ETA and message. The bars are rebuilt only
//! when the set of shown nodes changes; otherwise each bar moves in place. The view fits the
//! terminal: at most its height in bars (the rest counted on a last line), lines cut to its width.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::feed::Link;
use super::tree::{self, Row, Tree};

/// Bar positions are thousandths of the node's progress.
const SCALE: u64 = 1000;
/// Cells of each bar.
const BAR_WIDTH: usize = 24;
/// The widest label column; longer labels are cut (also to leave room for the message).
const MAX_LABEL: usize = 64;
/// Columns kept for the message, when the terminal is narrow.
const MIN_MESSAGE: usize = 20;

pub struct Bars {
    multi: MultiProgress,
    /// The shown nodes' keys and bars, in display order.
    bars: Vec<(String, ProgressBar)>,
    /// The last line: nodes that did not fit, and the connection's state.
    footer: Option<ProgressBar>,
    link: Option<String>,
    hidden: usize,
    /// Shown while the key has no node yet (the stream waits for it to appear).
    waiting: Option<String>,
    key: String,
}

impl Bars {
    pub fn new(key: &str) -> Bars {
        Bars {
            waiting: None,
            key: key.to_owned(),
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            bars: Vec::new(),
            footer: None,
            link: None,
            hidden: 0,
        }
    }

    fn size() -> (usize, usize) {
        let (rows, columns) = console::Term::stdout().size();
        (usize::from(rows), usize::from(columns))
    }

    pub fn show(&mut self, tree: &Tree) {
        let (height, width) = Self::size();
        // One line for the footer, one for the cursor.
        let (rows, hidden) = tree.rows(height.saturating_sub(2).max(1));
        self.hidden = hidden;
        self.waiting = rows.is_empty().then(|| format!("waiting for {} to appear", self.key));
        let keys_changed = rows.len() != self.bars.len()
            || rows.iter().zip(&self.bars).any(|(row, (key, _))| &row.key != key);
        if keys_changed {
            self.rebuild(&rows);
        }
        let label_cap = width.saturating_sub(BAR_WIDTH + 10 + MIN_MESSAGE).clamp(16, MAX_LABEL);
        let label_width = rows
            .iter()
            .map(|r| console::measure_text_width(&tree::indented_label(r)))
            .max()
            .unwrap_or(0)
            .min(label_cap);
        // label, space, [bar], space, percentage, two spaces
        let message_width = width.saturating_sub(label_width + BAR_WIDTH + 10).max(8);
        for (row, (_, bar)) in rows.iter().zip(&self.bars) {
            let label = crate::output::truncate(&tree::indented_label(row), label_width);
            let pad = label_width.saturating_sub(console::measure_text_width(&label));
            let prefix = format!("{label}{}", " ".repeat(pad));
            let message = crate::output::truncate(&row.summary(), message_width);
            let position = position(row);
            if bar.prefix() == prefix && bar.message() == message && bar.position() == position {
                continue;
            }
            bar.set_prefix(prefix);
            bar.set_position(position);
            bar.set_message(message);
            // indicatif drops draws past its rate limit; the last state of every changed bar
            // must reach the screen, so draw it regardless.
            bar.force_draw();
        }
        self.update_footer();
    }

    fn rebuild(&mut self, rows: &[Row]) {
        for (_, bar) in self.bars.drain(..) {
            self.multi.remove(&bar);
        }
        if let Some(footer) = self.footer.take() {
            self.multi.remove(&footer);
        }
        let style = ProgressStyle::with_template(&format!(
            "{{prefix}} [{{bar:{BAR_WIDTH}.green/white}}] {{percent:>3}}%  {{msg}}"
        ))
        .expect("valid bar template")
        .progress_chars("█▉▊▋▌▍▎▏ ");
        for row in rows {
            let bar = self.multi.add(ProgressBar::new(SCALE).with_style(style.clone()));
            self.bars.push((row.key.clone(), bar));
        }
    }

    fn update_footer(&mut self) {
        let mut parts = Vec::new();
        if let Some(waiting) = &self.waiting {
            parts.push(waiting.clone());
        }
        if self.hidden > 0 {
            parts.push(format!("… and {} more nodes (see `cairn status`)", self.hidden));
        }
        if let Some(link) = &self.link {
            parts.push(console::style(link).yellow().to_string());
        }
        match (parts.is_empty(), &self.footer) {
            (true, Some(footer)) => {
                self.multi.remove(footer);
                self.footer = None;
            }
            (true, None) => {}
            (false, Some(footer)) => {
                let message = parts.join("  ");
                if footer.message() != message {
                    footer.set_message(message);
                    footer.force_draw();
                }
            }
            (false, None) => {
                let footer = self.multi.add(
                    ProgressBar::new_spinner()
                        .with_style(ProgressStyle::with_template("{msg}").expect("valid footer template")),
                );
                footer.set_message(parts.join("  "));
                footer.force_draw();
                self.footer = Some(footer);
            }
        }
    }

    pub fn link(&mut self, link: &Link) {
        self.link = match link {
            Link::Connected => None,
            Link::Reconnecting(reason) => Some(format!("reconnecting: {reason}")),
        };
        self.update_footer();
    }

    /// Draws the final state and leaves the bars on screen.
    pub fn finish(&mut self, tree: &Tree) {
        self.link = None;
        self.show(tree);
        for (_, bar) in &self.bars {
            bar.finish();
        }
        if let Some(footer) = &self.footer {
            footer.finish();
        }
    }

    /// Leaves the bars as they are (an error message follows).
    pub fn abandon(&mut self) {
        for (_, bar) in &self.bars {
            bar.abandon();
        }
    }
}

fn position(row: &Row) -> u64 {
    (row.progress.unwrap_or(0.0).clamp(0.0, 1.0) * SCALE as f64).round() as u64
}
