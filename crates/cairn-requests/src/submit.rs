//! Submissions: the JSON body of `POST /v1/requests` (or the `request` part of a multipart
//! upload), validated field by field, plus request ids and the default progress key.
//!
//! Validation is strict: unknown top-level fields are refused, so a typo such as `"handlr"` or
//! `"max_attempt"` is reported instead of silently running with defaults. Every error names the
//! field so ingress can answer 400 (413 for [`SubmitError::is_too_large`]) with it as is.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cairn_progress::Key;
use cairn_progress::update::{describe, json_len};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::streams::{MAX_STREAMS, check_stream_name};

/// Most bytes in a payload, measured as compact JSON.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Most bytes in a whole submission body, checked before parsing. Twice the payload limit, so
/// a pretty-printed payload that fits [`MAX_PAYLOAD_BYTES`] once compacted is still accepted.
pub const MAX_SUBMISSION_BYTES: usize = 2 * MAX_PAYLOAD_BYTES;
/// Most characters in a handler name.
pub const MAX_HANDLER_CHARS: usize = 64;
/// Attempts a request gets when it names none (docs/contract.md §3); the processor's config may change it.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Largest `max_attempts` a client may ask for.
pub const MAX_MAX_ATTEMPTS: u32 = 100;
/// Largest `timeout_ms`: one day.
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Most characters in an idempotency key.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;

/// The top-level fields a submission may have, in documentation order.
const FIELDS: [&str; 7] =
    ["handler", "payload", "progress_key", "max_attempts", "timeout_ms", "idempotency_key", "streams"];

const HANDLER_RULE: &str = "must be a string of 1 to 64 characters A-Z a-z 0-9 _ -";
const MAX_ATTEMPTS_RULE: &str = "must be an integer between 1 and 100";
const TIMEOUT_RULE: &str = "must be an integer between 1 and 86400000 (milliseconds)";
const IDEMPOTENCY_RULE: &str = "must be a string of 1 to 128 visible ASCII characters";

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("request is not valid JSON: {detail}")]
    InvalidJson { detail: String },
    #[error("request must be a JSON object")]
    NotAnObject,
    /// The payload, as compact JSON, is over [`MAX_PAYLOAD_BYTES`].
    #[error("field \"payload\": has {bytes} bytes of JSON; at most {max} are allowed")]
    TooLarge { bytes: usize, max: usize },
    /// The raw body is over [`MAX_SUBMISSION_BYTES`]; refused before parsing.
    #[error("request body has {bytes} bytes; at most {max} are allowed")]
    BodyTooLarge { bytes: usize, max: usize },
    #[error("field {0:?} is required")]
    MissingField(&'static str),
    /// The name is shortened when it is absurdly long.
    #[error("{}", unknown_field_message(.0))]
    UnknownField(String),
    #[error("field {field:?}: {problem}")]
    Field { field: &'static str, problem: String },
}

impl SubmitError {
    /// True for the size errors, which HTTP answers with 413 rather than 400.
    pub fn is_too_large(&self) -> bool {
        matches!(self, SubmitError::TooLarge { .. } | SubmitError::BodyTooLarge { .. })
    }

    fn field(field: &'static str, problem: impl Into<String>) -> SubmitError {
        SubmitError::Field { field, problem: problem.into() }
    }
}

impl cairn_error::ServiceError for SubmitError {
    fn kind(&self) -> cairn_error::ErrorKind {
        if self.is_too_large() {
            cairn_error::ErrorKind::TooLarge
        } else {
            cairn_error::ErrorKind::BadRequest
        }
    }
}

fn unknown_field_message(name: &str) -> String {
    let mut message = format!("unknown field {name:?}; expected one of {}", FIELDS.join(", "));
    if let Some(known) = FIELDS.iter().find(|known| edit_distance(name, known) <= 2) {
        let _ = write!(message, " (did you mean {known:?}?)");
    }
    message
}

/// Levenshtein distance, for "did you mean" hints on short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A validated request submission. Optional fields left out stay `None`; defaults
/// (`max_attempts`, the progress key) are applied when the request record is created.
///
/// Build one by hand with [`Submission::new`] and the public fields, then call
/// [`Submission::validate`]; [`Submission::from_slice`] and [`Submission::from_json`] validate
/// by themselves.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// Name of the handler that runs the request.
    pub handler: String,
    /// Handed to the handler as is; `null` when the body has none.
    pub payload: Value,
    pub progress_key: Option<Key>,
    pub max_attempts: Option<u32>,
    /// Limit of one attempt, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// A client's name for this submission: submitting the same key again answers with the
    /// first request instead of creating another (see [`Submission::fingerprint`]).
    pub idempotency_key: Option<String>,
    /// Data streams by name, each a finished resumable upload's id.
    pub streams: BTreeMap<String, String>,
}

impl Submission {
    pub fn new(handler: impl Into<String>, payload: Value) -> Submission {
        Submission {
            handler: handler.into(),
            payload,
            progress_key: None,
            max_attempts: None,
            timeout_ms: None,
            idempotency_key: None,
            streams: BTreeMap::new(),
        }
    }

    /// Parses and validates a submission body. The size is checked before any parsing.
    pub fn from_slice(bytes: &[u8]) -> Result<Submission, SubmitError> {
        if bytes.len() > MAX_SUBMISSION_BYTES {
            return Err(SubmitError::BodyTooLarge { bytes: bytes.len(), max: MAX_SUBMISSION_BYTES });
        }
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|err| SubmitError::InvalidJson { detail: err.to_string() })?;
        Submission::from_value(value)
    }

    /// Parses and validates a submission from a JSON value. `null` counts as absent for the
    /// optional fields, as JSON clients commonly send it.
    pub fn from_json(value: &Value) -> Result<Submission, SubmitError> {
        if !value.is_object() {
            return Err(SubmitError::NotAnObject);
        }
        Submission::from_value(value.clone())
    }

    /// [`Submission::from_json`] for an owned value, which saves copying a large payload.
    pub fn from_value(value: Value) -> Result<Submission, SubmitError> {
        let Value::Object(mut map) = value else {
            return Err(SubmitError::NotAnObject);
        };
        if let Some(unknown) = map.keys().find(|name| !FIELDS.contains(&name.as_str())) {
            return Err(SubmitError::UnknownField(shorten(unknown)));
        }
        let handler = match map.get("handler") {
            None => return Err(SubmitError::MissingField("handler")),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(SubmitError::field(
                    "handler",
                    format!("{HANDLER_RULE}, got {}", describe(other)),
                ));
            }
        };
        let progress_key = match present(&map, "progress_key") {
            None => None,
            Some(Value::String(s)) => {
                let key = Key::parse(s).map_err(|err| SubmitError::field("progress_key", err.to_string()))?;
                // A namespace names no node: the request's lifecycle could never be written there.
                if key.is_namespace() {
                    return Err(SubmitError::field(
                        "progress_key",
                        format!(
                            "{s:?} is a namespace (its last segment starts with '_'); name a key below it"
                        ),
                    ));
                }
                Some(key)
            }
            Some(other) => {
                return Err(SubmitError::field(
                    "progress_key",
                    format!("must be a string (a dotted progress key), got {}", describe(other)),
                ));
            }
        };
        let max_attempts = match present(&map, "max_attempts") {
            None => None,
            Some(value) => Some(
                value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| (1..=MAX_MAX_ATTEMPTS).contains(n))
                    .ok_or_else(|| {
                        SubmitError::field(
                            "max_attempts",
                            format!("{MAX_ATTEMPTS_RULE}, got {}", describe(value)),
                        )
                    })?,
            ),
        };
        let timeout_ms = match present(&map, "timeout_ms") {
            None => None,
            Some(value) => {
                Some(value.as_u64().filter(|n| (1..=MAX_TIMEOUT_MS).contains(n)).ok_or_else(|| {
                    SubmitError::field("timeout_ms", format!("{TIMEOUT_RULE}, got {}", describe(value)))
                })?)
            }
        };
        let idempotency_key = match present(&map, "idempotency_key") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(SubmitError::field(
                    "idempotency_key",
                    format!("{IDEMPOTENCY_RULE}, got {}", describe(other)),
                ));
            }
        };
        let streams = match present(&map, "streams") {
            None => BTreeMap::new(),
            Some(Value::Object(streams)) => {
                let mut out = BTreeMap::new();
                for (name, upload) in streams {
                    let Value::String(upload) = upload else {
                        return Err(SubmitError::field(
                            "streams",
                            format!(
                                "stream {:?} must name an upload id (a string), got {}",
                                shorten(name),
                                describe(upload)
                            ),
                        ));
                    };
                    out.insert(name.clone(), upload.clone());
                }
                out
            }
            Some(other) => {
                return Err(SubmitError::field(
                    "streams",
                    format!("must be an object of stream name to upload id, got {}", describe(other)),
                ));
            }
        };
        let submission = Submission {
            handler,
            payload: map.remove("payload").unwrap_or(Value::Null),
            progress_key,
            max_attempts,
            timeout_ms,
            idempotency_key,
            streams,
        };
        submission.validate()?;
        Ok(submission)
    }

    /// Checks every limit; the first problem found is returned.
    pub fn validate(&self) -> Result<(), SubmitError> {
        check_handler(&self.handler).map_err(|problem| SubmitError::field("handler", problem))?;
        let bytes = json_len(&self.payload);
        if bytes > MAX_PAYLOAD_BYTES {
            return Err(SubmitError::TooLarge { bytes, max: MAX_PAYLOAD_BYTES });
        }
        if let Some(n) = self.max_attempts.filter(|n| !(1..=MAX_MAX_ATTEMPTS).contains(n)) {
            return Err(SubmitError::field("max_attempts", format!("{MAX_ATTEMPTS_RULE}, got {n}")));
        }
        if let Some(n) = self.timeout_ms.filter(|n| !(1..=MAX_TIMEOUT_MS).contains(n)) {
            return Err(SubmitError::field("timeout_ms", format!("{TIMEOUT_RULE}, got {n}")));
        }
        if let Some(key) = &self.idempotency_key {
            check_idempotency_key(key).map_err(|problem| SubmitError::field("idempotency_key", problem))?;
        }
        if self.streams.len() > MAX_STREAMS {
            return Err(SubmitError::field(
                "streams",
                format!("has {} streams; at most {MAX_STREAMS} are allowed", self.streams.len()),
            ));
        }
        for (name, upload) in &self.streams {
            check_stream_name(name).map_err(|problem| SubmitError::field("streams", problem))?;
            if !is_valid_request_id(upload) {
                return Err(SubmitError::field(
                    "streams",
                    format!(
                        "stream {name:?} must name an upload id such as 0190f5c2-7b8e-4c3d-9a2b-123456789abc, got {:?}",
                        shorten(upload)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The submission as a JSON object: `handler` and `payload` always, the optional fields
    /// when set. [`Submission::from_json`] reads it back unchanged.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("handler".into(), Value::String(self.handler.clone()));
        map.insert("payload".into(), self.payload.clone());
        if let Some(key) = &self.progress_key {
            map.insert("progress_key".into(), Value::String(key.to_string()));
        }
        if let Some(n) = self.max_attempts {
            map.insert("max_attempts".into(), n.into());
        }
        if let Some(n) = self.timeout_ms {
            map.insert("timeout_ms".into(), n.into());
        }
        if let Some(key) = &self.idempotency_key {
            map.insert("idempotency_key".into(), Value::String(key.clone()));
        }
        if !self.streams.is_empty() {
            let streams = self.streams.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
            map.insert("streams".into(), Value::Object(streams));
        }
        Value::Object(map)
    }

    /// A stable digest of everything that defines the work (handler, payload, progress key,
    /// attempts, timeout — not the idempotency key itself): 16 hex digits of FNV-1a 64 over
    /// canonical JSON. Two submissions with the same idempotency key but different
    /// fingerprints are a client error, not a retry of the same request.
    ///
    /// Canonical JSON sorts object keys at every level and is compact, so reordering keys does
    /// not change the fingerprint; numbers are compared as written (`1` and `1.0` differ), and
    /// an absent optional field differs from one set to its default. The digest is stored in
    /// request records: changing this function breaks idempotency of requests in flight.
    pub fn fingerprint(&self) -> String {
        let mut map = Map::new();
        map.insert("handler".into(), Value::String(self.handler.clone()));
        map.insert("payload".into(), self.payload.clone());
        map.insert(
            "progress_key".into(),
            self.progress_key.as_ref().map_or(Value::Null, |key| Value::String(key.to_string())),
        );
        map.insert("max_attempts".into(), self.max_attempts.map_or(Value::Null, Value::from));
        map.insert("timeout_ms".into(), self.timeout_ms.map_or(Value::Null, Value::from));
        // Only when there are some, so the fingerprints of requests without streams stay as
        // they were.
        if !self.streams.is_empty() {
            let streams = self.streams.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
            map.insert("streams".into(), Value::Object(streams));
        }
        let mut canonical = String::new();
        write_canonical(&Value::Object(map), &mut canonical);
        format!("{:016x}", fnv1a64(canonical.as_bytes()))
    }
}

impl Serialize for Submission {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Submission {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Submission, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Submission::from_value(value).map_err(serde::de::Error::custom)
    }
}

/// The progress key of a request that names none: `_requests.{id}`, a tree root in the
/// `_requests` namespace.
///
/// # Panics
/// When `id` is not a valid key segment (1–64 characters of `A-Z a-z 0-9 _ -`). Ids from
/// [`new_request_id`], and any id [`is_valid_request_id`] accepts, always are; check ids that
/// come from clients first.
pub fn default_progress_key(id: &str) -> Key {
    assert!(!id.contains('.'), "request id {id:?} cannot be a progress key segment: it contains '.'");
    match Key::parse(&format!("_requests.{id}")) {
        Ok(key) => key,
        Err(err) => panic!("request id {id:?} cannot be a progress key segment: {err}"),
    }
}

/// A fresh random request id, formatted as a version 4 UUID (lowercase, 8-4-4-4-12 hex), in no
/// particular partition of the request queue. Services take a new request's id from the queue's
/// layout (`cairn_redis::requests::QueueLayout::new_id`), which draws these until one falls in
/// the partition it needs.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// True for ids in the canonical UUID text form: 8-4-4-4-12 lowercase hex digits. Any UUID
/// version is accepted, not only the v4 ids [`new_request_id`] makes. Uppercase is refused
/// because ids are case-sensitive Redis keys.
pub fn is_valid_request_id(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// The optional field `name`, treating `null` as absent.
fn present<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name).filter(|value| !value.is_null())
}

fn check_handler(handler: &str) -> Result<(), String> {
    if let Some(ch) = handler.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!("may only use A-Z a-z 0-9 _ -, found '{}'", ch.escape_debug()));
    }
    // Only ASCII is left, so bytes are characters.
    if handler.is_empty() || handler.len() > MAX_HANDLER_CHARS {
        return Err(format!("{HANDLER_RULE}, got {} characters", handler.len()));
    }
    Ok(())
}

fn check_idempotency_key(key: &str) -> Result<(), String> {
    if let Some(ch) = key.chars().find(|c| !('\x21'..='\x7e').contains(c)) {
        return Err(format!("{IDEMPOTENCY_RULE}, found '{}'", ch.escape_debug()));
    }
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(format!("{IDEMPOTENCY_RULE}, got {} characters", key.len()));
    }
    Ok(())
}

fn shorten(name: &str) -> String {
    const MAX: usize = 64;
    if name.chars().count() > MAX {
        let mut short: String = name.chars().take(MAX).collect();
        short.push('…');
        short
    } else {
        name.to_owned()
    }
}

/// Compact JSON with object keys sorted (by UTF-8 bytes) at every level, whatever order the
/// map keeps them in (serde_json's `preserve_order` feature may be on in the build).
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (name, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(name.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        // Scalars print the same whatever the feature flags: strings escaped, numbers as parsed.
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn message(body: &str) -> String {
        Submission::from_slice(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn parses_full_submission() {
        let s = Submission::from_slice(
            br#"{"handler": "http-echo_1", "payload": {"a": [1, 2]}, "progress_key": "_portal.job1",
                "max_attempts": 5, "timeout_ms": 60000, "idempotency_key": "order-42"}"#,
        )
        .unwrap();
        assert_eq!(s.handler, "http-echo_1");
        assert_eq!(s.payload, json!({"a": [1, 2]}));
        assert_eq!(s.progress_key, Some(Key::parse("_portal.job1").unwrap()));
        assert_eq!(s.max_attempts, Some(5));
        assert_eq!(s.timeout_ms, Some(60_000));
        assert_eq!(s.idempotency_key.as_deref(), Some("order-42"));
        assert_eq!(Submission::from_json(&s.to_json()).unwrap(), s);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Submission>(&text).unwrap(), s);
    }

    #[test]
    fn minimal_submission_has_defaults() {
        let s = Submission::from_slice(br#"{"handler": "h"}"#).unwrap();
        assert_eq!(s, Submission::new("h", Value::Null));
        assert_eq!(s.to_json(), json!({"handler": "h", "payload": null}));
        // Explicit nulls count as absent.
        let nulls = Submission::from_slice(
            br#"{"handler": "h", "payload": null, "progress_key": null, "max_attempts": null,
                "timeout_ms": null, "idempotency_key": null}"#,
        )
        .unwrap();
        assert_eq!(nulls, s);
        // Any JSON is a payload.
        for payload in [json!(1), json!("x"), json!([]), json!(true), json!({"deep": {"er": [{}]}})] {
            let body = json!({"handler": "h", "payload": payload});
            assert_eq!(Submission::from_json(&body).unwrap().payload, payload);
        }
    }

    #[test]
    fn body_must_be_a_json_object() {
        let err = Submission::from_slice(b"{\"handler\": ").unwrap_err();
        assert!(matches!(err, SubmitError::InvalidJson { .. }));
        assert!(err.to_string().starts_with("request is not valid JSON: "), "{err}");
        assert!(matches!(Submission::from_slice(b""), Err(SubmitError::InvalidJson { .. })));
        for body in ["[]", "\"h\"", "1", "null"] {
            let err = Submission::from_slice(body.as_bytes()).unwrap_err();
            assert_eq!(err, SubmitError::NotAnObject, "{body}");
            assert_eq!(err.to_string(), "request must be a JSON object");
        }
    }

    #[test]
    fn streams_name_finished_uploads() {
        let upload = "0190f5c2-7b8e-4c3d-9a2b-123456789abc";
        let body = format!(r#"{{"handler": "h", "streams": {{"image": "{upload}"}}}}"#);
        let s = Submission::from_slice(body.as_bytes()).unwrap();
        assert_eq!(s.streams.get("image").map(String::as_str), Some(upload));
        assert_eq!(Submission::from_json(&s.to_json()).unwrap(), s);
        assert_ne!(s.fingerprint(), Submission::new("h", Value::Null).fingerprint());
        let plain = Submission::from_slice(br#"{"handler": "h", "streams": null}"#).unwrap();
        assert_eq!(plain.fingerprint(), Submission::new("h", Value::Null).fingerprint());
        let message = |body: &str| Submission::from_slice(body.as_bytes()).unwrap_err().to_string();
        assert!(
            message(r#"{"handler": "h", "streams": ["a"]}"#).contains("field \"streams\": must be an object")
        );
        assert!(message(r#"{"handler": "h", "streams": {"a.b": "x"}}"#).contains("found '.'"));
        assert!(message(r#"{"handler": "h", "streams": {"a": "nope"}}"#).contains("must name an upload id"));
        assert!(message(r#"{"handler": "h", "streams": {"a": 1}}"#).contains("must name an upload id"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Submission::from_slice(br#"{"handlr": "h"}"#).unwrap_err();
        assert_eq!(err, SubmitError::UnknownField("handlr".into()));
        assert_eq!(
            err.to_string(),
            "unknown field \"handlr\"; expected one of handler, payload, progress_key, max_attempts, \
             timeout_ms, idempotency_key, streams (did you mean \"handler\"?)"
        );
        assert!(
            message(r#"{"handler": "h", "max_attempt": 2}"#).ends_with("(did you mean \"max_attempts\"?)")
        );
        let far = message(r#"{"handler": "h", "priority": 1}"#);
        assert!(far.starts_with("unknown field \"priority\"; expected one of handler,"), "{far}");
        assert!(!far.contains("did you mean"), "{far}");
        let long = "z".repeat(100);
        let err = Submission::from_slice(format!(r#"{{"{long}": 1}}"#).as_bytes()).unwrap_err();
        assert_eq!(err, SubmitError::UnknownField(format!("{}…", "z".repeat(64))));
    }

    #[test]
    fn handler_is_required_and_checked() {
        let err = Submission::from_slice(br#"{"payload": 1}"#).unwrap_err();
        assert_eq!(err, SubmitError::MissingField("handler"));
        assert_eq!(err.to_string(), r#"field "handler" is required"#);
        assert_eq!(
            message(r#"{"handler": 3}"#),
            r#"field "handler": must be a string of 1 to 64 characters A-Z a-z 0-9 _ -, got 3"#
        );
        assert_eq!(
            message(r#"{"handler": null}"#),
            r#"field "handler": must be a string of 1 to 64 characters A-Z a-z 0-9 _ -, got null"#
        );
        assert_eq!(
            message(r#"{"handler": ""}"#),
            r#"field "handler": must be a string of 1 to 64 characters A-Z a-z 0-9 _ -, got 0 characters"#
        );
        assert_eq!(
            message(&format!(r#"{{"handler": "{}"}}"#, "h".repeat(65))),
            r#"field "handler": must be a string of 1 to 64 characters A-Z a-z 0-9 _ -, got 65 characters"#
        );
        assert!(Submission::from_slice(format!(r#"{{"handler": "{}"}}"#, "h".repeat(64)).as_bytes()).is_ok());
        assert_eq!(
            message(r#"{"handler": "a/b"}"#),
            r#"field "handler": may only use A-Z a-z 0-9 _ -, found '/'"#
        );
        assert_eq!(
            message(r#"{"handler": "a.b"}"#),
            r#"field "handler": may only use A-Z a-z 0-9 _ -, found '.'"#
        );
        assert_eq!(
            message(r#"{"handler": "é"}"#),
            r#"field "handler": may only use A-Z a-z 0-9 _ -, found 'é'"#
        );
        assert_eq!(
            message(r#"{"handler": "a\nb"}"#),
            r#"field "handler": may only use A-Z a-z 0-9 _ -, found '\n'"#
        );
    }

    #[test]
    fn max_attempts_is_an_integer_in_range() {
        for ok in [1, 3, 100] {
            let s = Submission::from_slice(format!(r#"{{"handler": "h", "max_attempts": {ok}}}"#).as_bytes());
            assert_eq!(s.unwrap().max_attempts, Some(ok));
        }
        for (bad, shown) in [
            ("\"3\"", "\"3\""),
            ("0", "0"),
            ("101", "101"),
            ("-1", "-1"),
            ("2.5", "2.5"),
            ("3.0", "3.0"),
            ("true", "true"),
            ("[3]", "an array"),
            ("4294967299", "4294967299"),
        ] {
            assert_eq!(
                message(&format!(r#"{{"handler": "h", "max_attempts": {bad}}}"#)),
                format!(r#"field "max_attempts": must be an integer between 1 and 100, got {shown}"#),
                "{bad}"
            );
        }
    }

    #[test]
    fn timeout_is_an_integer_in_range() {
        for ok in [1, 30_000, MAX_TIMEOUT_MS] {
            let s = Submission::from_slice(format!(r#"{{"handler": "h", "timeout_ms": {ok}}}"#).as_bytes());
            assert_eq!(s.unwrap().timeout_ms, Some(ok));
        }
        for (bad, shown) in [("0", "0"), ("86400001", "86400001"), ("\"1s\"", "\"1s\""), ("1.5", "1.5")] {
            assert_eq!(
                message(&format!(r#"{{"handler": "h", "timeout_ms": {bad}}}"#)),
                format!(
                    r#"field "timeout_ms": must be an integer between 1 and 86400000 (milliseconds), got {shown}"#
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn progress_key_is_not_a_namespace() {
        for key in ["_portal", "a._x", "_requests._y"] {
            let body = format!(r#"{{"handler": "h", "progress_key": "{key}"}}"#);
            assert_eq!(
                message(&body),
                format!(
                    r#"field "progress_key": "{key}" is a namespace (its last segment starts with '_'); name a key below it"#
                )
            );
        }
    }

    #[test]
    fn progress_key_is_a_valid_key() {
        assert_eq!(
            message(r#"{"handler": "h", "progress_key": "a..b"}"#),
            r#"field "progress_key": key segment 1 is empty"#
        );
        assert_eq!(
            message(r#"{"handler": "h", "progress_key": "a b"}"#),
            r#"field "progress_key": key contains ' ' in segment 0; segments may only use A-Z a-z 0-9 _ -"#
        );
        assert_eq!(
            message(r#"{"handler": "h", "progress_key": ["a"]}"#),
            r#"field "progress_key": must be a string (a dotted progress key), got an array"#
        );
    }

    #[test]
    fn idempotency_key_is_visible_ascii() {
        let key = "!~".repeat(64);
        let s =
            Submission::from_slice(format!(r#"{{"handler": "h", "idempotency_key": "{key}"}}"#).as_bytes());
        assert_eq!(s.unwrap().idempotency_key, Some(key));
        let rule = "must be a string of 1 to 128 visible ASCII characters";
        assert_eq!(
            message(r#"{"handler": "h", "idempotency_key": ""}"#),
            format!(r#"field "idempotency_key": {rule}, got 0 characters"#)
        );
        assert_eq!(
            message(&format!(r#"{{"handler": "h", "idempotency_key": "{}"}}"#, "k".repeat(129))),
            format!(r#"field "idempotency_key": {rule}, got 129 characters"#)
        );
        assert_eq!(
            message(r#"{"handler": "h", "idempotency_key": "a b"}"#),
            format!(r#"field "idempotency_key": {rule}, found ' '"#)
        );
        assert_eq!(
            message(r#"{"handler": "h", "idempotency_key": "ké"}"#),
            format!(r#"field "idempotency_key": {rule}, found 'é'"#)
        );
        assert_eq!(
            message(r#"{"handler": "h", "idempotency_key": 42}"#),
            format!(r#"field "idempotency_key": {rule}, got 42"#)
        );
    }

    #[test]
    fn payload_size_is_limited() {
        let fill = MAX_PAYLOAD_BYTES - 2;
        let at_limit = json!({"handler": "h", "payload": "x".repeat(fill)});
        assert!(Submission::from_json(&at_limit).is_ok());

        let over = json!({"handler": "h", "payload": "x".repeat(fill + 1)});
        let err = Submission::from_json(&over).unwrap_err();
        assert_eq!(err, SubmitError::TooLarge { bytes: MAX_PAYLOAD_BYTES + 1, max: MAX_PAYLOAD_BYTES });
        assert_eq!(
            err.to_string(),
            r#"field "payload": has 1048577 bytes of JSON; at most 1048576 are allowed"#
        );
        assert!(err.is_too_large());

        // Whitespace in the body does not count against the payload.
        let spaced = format!(r#"{{"handler": "h", "payload": [{}1]}}"#, "1,      ".repeat(200_000));
        assert!(spaced.len() > MAX_PAYLOAD_BYTES);
        assert!(Submission::from_slice(spaced.as_bytes()).is_ok());

        let huge = vec![b' '; MAX_SUBMISSION_BYTES + 1];
        let err = Submission::from_slice(&huge).unwrap_err();
        assert_eq!(
            err,
            SubmitError::BodyTooLarge { bytes: MAX_SUBMISSION_BYTES + 1, max: MAX_SUBMISSION_BYTES }
        );
        assert_eq!(err.to_string(), "request body has 2097153 bytes; at most 2097152 are allowed");
        assert!(err.is_too_large());
        assert!(!SubmitError::NotAnObject.is_too_large());
    }

    #[test]
    fn validate_checks_hand_built_submissions() {
        let mut s = Submission::new("h", json!({}));
        assert!(s.validate().is_ok());
        s.max_attempts = Some(0);
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            r#"field "max_attempts": must be an integer between 1 and 100, got 0"#
        );
        s.max_attempts = None;
        s.timeout_ms = Some(MAX_TIMEOUT_MS + 1);
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            r#"field "timeout_ms": must be an integer between 1 and 86400000 (milliseconds), got 86400001"#
        );
        assert!(Submission::new("", Value::Null).validate().is_err());
    }

    #[test]
    fn fingerprint_covers_the_work_not_the_idempotency_key() {
        let base =
            Submission::from_slice(br#"{"handler": "h", "payload": {"a": 1, "b": [1, {"c": 2, "d": 3}]}}"#)
                .unwrap();
        let fp = base.fingerprint();
        assert_eq!(fp.len(), 16);
        assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
        let reordered =
            Submission::from_slice(br#"{"payload": {"b": [1, {"d": 3, "c": 2}], "a": 1}, "handler": "h"}"#)
                .unwrap();
        assert_eq!(reordered.fingerprint(), fp);
        let mut keyed = base.clone();
        keyed.idempotency_key = Some("k1".into());
        assert_eq!(keyed.fingerprint(), fp);

        let mut changed = Vec::new();
        let mut s = base.clone();
        s.handler = "h2".into();
        changed.push(s);
        let mut s = base.clone();
        s.payload = json!({"a": 1, "b": [{"c": 2, "d": 3}, 1]});
        changed.push(s);
        let mut s = base.clone();
        s.progress_key = Some(Key::parse("_x.y").unwrap());
        changed.push(s);
        let mut s = base.clone();
        s.max_attempts = Some(3);
        changed.push(s);
        let mut s = base.clone();
        s.timeout_ms = Some(1000);
        changed.push(s);
        for s in changed {
            assert_ne!(s.fingerprint(), fp, "{s:?}");
        }
    }

    #[test]
    fn fingerprint_is_pinned() {
        // Stored in records: this must not change between releases.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut s = Submission::new("h", json!({"b": 1, "a": "\u{e9}\n"}));
        s.progress_key = Some(Key::parse("_p.q").unwrap());
        s.max_attempts = Some(2);
        s.idempotency_key = Some("ignored".into());
        let canonical_text = "{\"handler\":\"h\",\"max_attempts\":2,\"payload\":{\"a\":\"\u{e9}\\n\",\"b\":1},\
                              \"progress_key\":\"_p.q\",\"timeout_ms\":null}";
        assert_eq!(s.fingerprint(), format!("{:016x}", fnv1a64(canonical_text.as_bytes())));
    }

    #[test]
    fn canonical_json_sorts_keys_and_escapes() {
        let value = json!({"z": [3, {"y": null, "x": true}], "a": "q\"\\", "m": 1.5, "é": -2});
        assert_eq!(canonical(&value), r#"{"a":"q\"\\","m":1.5,"z":[3,{"x":true,"y":null}],"é":-2}"#);
        assert_eq!(serde_json::from_str::<Value>(&canonical(&value)).unwrap(), value);
    }

    #[test]
    fn request_ids_look_like_uuid_v4() {
        let id = new_request_id();
        assert!(is_valid_request_id(&id), "{id}");
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(new_request_id(), id);
        // The text form of 128 random bits with the version and variant set, as ids are made.
        let request_id_from_bits =
            |bits: u128| uuid::Builder::from_random_bytes(bits.to_be_bytes()).into_uuid().to_string();
        assert_eq!(request_id_from_bits(0), "00000000-0000-4000-8000-000000000000");
        assert_eq!(request_id_from_bits(u128::MAX), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(default_progress_key(&id).as_str(), format!("_requests.{id}"));
        assert!(default_progress_key(&id).parent().is_none());
    }

    #[test]
    fn request_id_validation() {
        assert!(is_valid_request_id("0190f5c2-7b8e-7c3d-9a2b-123456789abc"));
        for bad in [
            "",
            "0190f5c2-7b8e-4c3d-9a2b-123456789ab",
            "0190f5c2-7b8e-4c3d-9a2b-123456789abcd",
            "0190F5C2-7B8E-4C3D-9A2B-123456789ABC",
            "0190f5c27b8e-4c3d-9a2b-123456789abc-",
            "0190f5c2-7b8e-4c3d-9a2b_123456789abc",
            "g190f5c2-7b8e-4c3d-9a2b-123456789abc",
            "../../../etc/passwd-0000000000000000",
        ] {
            assert!(!is_valid_request_id(bad), "{bad}");
        }
    }

    #[test]
    #[should_panic(expected = "cannot be a progress key segment")]
    fn default_progress_key_refuses_dotted_ids() {
        default_progress_key("a.b");
    }

    #[test]
    #[should_panic(expected = "cannot be a progress key segment: key contains '/'")]
    fn default_progress_key_refuses_bad_characters() {
        default_progress_key("a/b");
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("handlr", "handler"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    fn canonical(value: &Value) -> String {
        let mut out = String::new();
        write_canonical(value, &mut out);
        out
    }

    /// A JSON value whose objects are built in random key order.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            // Dyadic fractions: exact in decimal, so text round trips compare equal.
            any::<i32>().prop_map(|n| Value::from(f64::from(n) / 8.0)),
            "[a-z\"\\\\é ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-e]{1,3}", inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// The same value with every object's entries in a shuffled order. Only observable when
    /// serde_json keeps insertion order, but canonicalization must not depend on it either way.
    fn reordered(value: &Value, seed: u64) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.iter().map(|v| reordered(v, seed)).collect()),
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by_key(|(k, _)| fnv1a64(format!("{seed}{k}").as_bytes()));
                Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), reordered(v, seed))).collect())
            }
            other => other.clone(),
        }
    }

    proptest! {
        #[test]
        fn fingerprint_ignores_key_order(payload in json_value(), seed in any::<u64>()) {
            let a = Submission::new("h", payload.clone());
            let b = Submission::new("h", reordered(&payload, seed));
            prop_assert_eq!(a.fingerprint(), b.fingerprint());
            // Canonical text parses back to the same value.
            prop_assert_eq!(serde_json::from_str::<Value>(&canonical(&payload)).unwrap(), payload);
        }

        #[test]
        fn fingerprint_tells_payloads_apart(a in json_value(), b in json_value()) {
            prop_assume!(a != b);
            prop_assert_ne!(Submission::new("h", a).fingerprint(), Submission::new("h", b).fingerprint());
        }

        #[test]
        fn valid_submissions_round_trip(
            handler in "[A-Za-z0-9_-]{1,64}",
            payload in json_value(),
            max_attempts in proptest::option::of(1u32..=100),
            timeout_ms in proptest::option::of(1u64..=MAX_TIMEOUT_MS),
            idempotency_key in proptest::option::of("[!-~]{1,128}"),
        ) {
            let s = Submission {
                handler,
                payload,
                progress_key: None,
                max_attempts,
                timeout_ms,
                idempotency_key,
                streams: BTreeMap::new(),
            };
            let bytes = serde_json::to_vec(&s).unwrap();
            prop_assert_eq!(Submission::from_slice(&bytes).unwrap(), s);
        }
    }
}
