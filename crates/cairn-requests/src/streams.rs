//! Data streams of a request: files that travel with it (a multipart submission's parts, or
//! finished resumable uploads named in `"streams"`), stored apart from the record and handed to
//! its handler. The record lists them by name with their sizes.

use serde::{Deserialize, Serialize};

/// Most data streams one request may carry.
pub const MAX_STREAMS: usize = 32;

/// Longest stream name (a progress key segment).
pub const MAX_STREAM_NAME_CHARS: usize = 64;

/// A stream as the record lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub name: String,
    pub bytes: u64,
}

/// A stream's name becomes a progress key segment (`{progress_key}.streams.{name}`) and a file
/// name (a `command` handler's `CAIRN_STREAMS_DIR/{name}`): 1 to 64 characters of
/// `A-Z a-z 0-9 _ -`, not starting with `_` (a namespace) or `-`.
pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > MAX_STREAM_NAME_CHARS {
        return Err(format!("stream name {name:?} must have 1 to {MAX_STREAM_NAME_CHARS} characters"));
    }
    if let Some(ch) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!(
            "stream name {name:?} may only use A-Z a-z 0-9 _ -, found '{}'",
            ch.escape_debug()
        ));
    }
    if name.starts_with(['_', '-']) {
        return Err(format!("stream name {name:?} must not start with '_' or '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_key_segments_and_file_names() {
        assert!(check_stream_name("data").is_ok());
        assert!(check_stream_name("image-1_a").is_ok());
        assert!(check_stream_name("").is_err());
        assert!(check_stream_name("_x").unwrap_err().contains("must not start"));
        assert!(check_stream_name("-x").is_err());
        assert!(check_stream_name("a.b").unwrap_err().contains("found '.'"));
        assert!(check_stream_name("../etc").is_err());
        assert!(check_stream_name(&"a".repeat(65)).is_err());
    }
}
