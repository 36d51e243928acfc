//! Keys typed while `cairn upload` runs on a terminal: `c` (counts) and `q` (finish and exit).
//! The terminal is put in raw mode only when stdin is one, with output post-processing kept on
//! so progress bars and printed lines still start at the left edge; it is restored on drop.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Counts,
    Quit,
}

/// Reads keys while alive; restores the terminal when dropped.
pub struct Keys {
    pub rx: mpsc::UnboundedReceiver<Key>,
    stop: Arc<AtomicBool>,
    raw: bool,
}

impl Keys {
    /// A key reader, or `None` when stdin is not a terminal.
    pub fn start() -> Option<Keys> {
        if !std::io::stdin().is_terminal() || crossterm::terminal::enable_raw_mode().is_err() {
            return None;
        }
        keep_output_processing();
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                if !event::poll(Duration::from_millis(200)).unwrap_or(false) {
                    continue;
                }
                let Ok(Event::Key(key)) = event::read() else { continue };
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                let sent = match key.code {
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => tx.send(Key::Quit),
                    KeyCode::Char('c' | 'C') => tx.send(Key::Counts),
                    KeyCode::Char('q' | 'Q') => tx.send(Key::Quit),
                    _ => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Some(Keys { rx, stop, raw: true })
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.raw {
            let _ = crossterm::terminal::disable_raw_mode();
        }
    }
}

/// Raw mode also turns off newline translation; lines would then step right. Turns it back on.
fn keep_output_processing() {
    use rustix::termios::{OptionalActions, OutputModes, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    if let Ok(mut termios) = tcgetattr(&stdin) {
        termios.output_modes.insert(OutputModes::OPOST | OutputModes::ONLCR);
        let _ = tcsetattr(&stdin, OptionalActions::Now, &termios);
    }
}
