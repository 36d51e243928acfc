//! A request's lifecycle as progress of its own node (coalesced; never blocks the work).

use cairn_amqp::ProgressPublisher;
use cairn_requests::{RequestRecord, RequestState};
use serde_json::json;

/// Longest error message put on a progress node.
const MAX_MESSAGE: usize = 1024;

pub(super) fn report(
    publisher: &ProgressPublisher,
    record: &RequestRecord,
    state: RequestState,
    error: Option<&str>,
) {
    let key = record.progress_key.clone();
    let mut update = state
        .progress_update()
        .field("attempts", json!(record.attempts))
        .field("handler", json!(record.handler));
    if state == RequestState::Succeeded {
        update = update.progress(1.0);
    }
    if let Some(error) = error {
        update = update.msg(truncate(error, MAX_MESSAGE));
    }
    publisher.publish_traced(key, update, record.traceparent.as_deref());
}

/// At most `max` bytes of `s`, cut on a character boundary, marked with `…` when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_cuts_on_a_char_boundary() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("abcdef", 3), "abc…");
        // 'é' is two bytes: a cut inside it moves back before it.
        assert_eq!(truncate("aé", 2), "a…");
    }
}
