//! Updates: the JSON object a producer posts to one key, merged field by field into its node.
//!
//! Builders never fail, so producers can chain them freely; [`Update::validate`] enforces the
//! limits of docs/contract.md §2 and every constructor from untrusted input calls it. Errors always name
//! the offending field so REST, gRPC and the AMQP dead-letter reason can pass them on as is.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

use crate::json::{self, OUT_OF_RANGE, ParseError, Position};

/// Most fields in one update.
pub const MAX_UPDATE_FIELDS: usize = 64;
/// Most bytes of JSON in one update.
pub const MAX_UPDATE_BYTES: usize = 64 * 1024;
/// Most characters in `status`.
pub const MAX_STATUS_CHARS: usize = 32;
/// Most bytes in `msg`.
pub const MAX_MSG_BYTES: usize = 4096;
/// Most characters in `name`.
pub const MAX_NAME_CHARS: usize = 256;
/// Most characters in a field name.
pub const MAX_FIELD_NAME_LEN: usize = 64;

/// Statuses that clients and the UI understand; any other string of at most 32 characters is
/// accepted too.
pub const WELL_KNOWN_STATUSES: [&str; 6] = ["waiting", "running", "finished", "failed", "canceled", "paused"];

/// Fields the server sets on every node; an update may not set them.
pub const SERVER_FIELDS: [&str; 4] = ["key", "start_time", "update_time", "tasks"];

const PROGRESS_RULE: &str = "must be a number between 0 and 1";
const WEIGHT_RULE: &str = "must be a number between 0 and 1e12";
/// Largest weight an update may carry: room for byte counts, while a parent's running
/// sums over a million such children stay exact enough in doubles.
pub const MAX_WEIGHT: f64 = 1e12;

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpdateError {
    #[error("update has {bytes} bytes of JSON; at most {max} are allowed")]
    TooLarge { bytes: usize, max: usize },
    #[error("update is not valid JSON: {detail}")]
    InvalidJson { detail: String },
    #[error("update must be a JSON object")]
    NotAnObject,
    #[error("update has {count} fields; at most {max} are allowed")]
    TooManyFields { count: usize, max: usize },
    /// `field` is the field's name, shortened when it is absurdly long.
    #[error("field {field:?}: {problem}")]
    Field { field: String, problem: String },
}

impl cairn_error::ServiceError for UpdateError {
    fn kind(&self) -> cairn_error::ErrorKind {
        match self {
            UpdateError::TooLarge { .. } => cairn_error::ErrorKind::TooLarge,
            _ => cairn_error::ErrorKind::BadRequest,
        }
    }
}

impl UpdateError {
    fn field(name: &str, problem: impl Into<String>) -> UpdateError {
        let field = if name.chars().count() > MAX_FIELD_NAME_LEN {
            let mut short: String = name.chars().take(MAX_FIELD_NAME_LEN).collect();
            short.push('…');
            short
        } else {
            name.to_owned()
        };
        UpdateError::Field { field, problem: problem.into() }
    }

    /// Maps a JSON parse failure, naming the field when the parser got that far.
    pub(crate) fn from_parse(err: ParseError) -> UpdateError {
        match err {
            ParseError::OutOfRange(Position { field: Some(field), .. }) => {
                UpdateError::field(&field, OUT_OF_RANGE)
            }
            ParseError::OutOfRange(_) => UpdateError::InvalidJson { detail: OUT_OF_RANGE.to_owned() },
            ParseError::Syntax(detail) => UpdateError::InvalidJson { detail },
        }
    }
}

/// A set of fields to merge into one node. Unset fields leave the node's values alone; an
/// update with no fields only touches `update_time`.
///
/// `extra` holds every field other than the five well-known ones; its values are JSON scalars.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Update {
    pub progress: Option<f64>,
    pub weight: Option<f64>,
    pub status: Option<String>,
    pub msg: Option<String>,
    pub name: Option<String>,
    pub extra: BTreeMap<String, Value>,
}

impl Update {
    pub fn new() -> Update {
        Update::default()
    }

    pub fn progress(mut self, progress: f64) -> Update {
        self.extra.remove("progress");
        self.progress = Some(progress);
        self
    }

    pub fn weight(mut self, weight: f64) -> Update {
        self.extra.remove("weight");
        self.weight = Some(weight);
        self
    }

    pub fn status(mut self, status: impl Into<String>) -> Update {
        self.extra.remove("status");
        self.status = Some(status.into());
        self
    }

    pub fn msg(mut self, msg: impl Into<String>) -> Update {
        self.extra.remove("msg");
        self.msg = Some(msg.into());
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Update {
        self.extra.remove("name");
        self.name = Some(name.into());
        self
    }

    /// Sets any field by name. A well-known name with a value of the right JSON type sets the
    /// typed field; anything else lands in `extra`, where [`Update::validate`] judges it.
    pub fn field(mut self, name: impl Into<String>, value: impl Into<Value>) -> Update {
        self.set(name.into(), value.into());
        self
    }

    fn set(&mut self, name: String, value: Value) {
        let number = value.as_f64();
        match (name.as_str(), value) {
            ("progress", Value::Number(_)) if number.is_some() => self.progress = number,
            ("weight", Value::Number(_)) if number.is_some() => self.weight = number,
            ("status", Value::String(s)) => self.status = Some(s),
            ("msg", Value::String(s)) => self.msg = Some(s),
            ("name", Value::String(s)) => self.name = Some(s),
            (_, value) => {
                self.extra.insert(name, value);
                return;
            }
        }
        self.extra.remove(&name);
    }

    /// Parses and validates an update from a JSON value.
    pub fn from_json(value: &Value) -> Result<Update, UpdateError> {
        let Value::Object(map) = value else {
            return Err(UpdateError::NotAnObject);
        };
        if map.len() > MAX_UPDATE_FIELDS {
            return Err(UpdateError::TooManyFields { count: map.len(), max: MAX_UPDATE_FIELDS });
        }
        let mut update = Update::default();
        for (name, value) in map {
            update.set(name.clone(), value.clone());
        }
        update.validate()?;
        Ok(update)
    }

    /// Parses and validates an update from a request or message body. The size is checked
    /// before any parsing.
    pub fn from_slice(bytes: &[u8]) -> Result<Update, UpdateError> {
        if bytes.len() > MAX_UPDATE_BYTES {
            return Err(UpdateError::TooLarge { bytes: bytes.len(), max: MAX_UPDATE_BYTES });
        }
        let value = json::parse(bytes).map_err(UpdateError::from_parse)?;
        Update::from_json(&value)
    }

    /// Checks every limit of docs/contract.md §2; the first problem found is returned.
    pub fn validate(&self) -> Result<(), UpdateError> {
        let count = self.field_count();
        if count > MAX_UPDATE_FIELDS {
            return Err(UpdateError::TooManyFields { count, max: MAX_UPDATE_FIELDS });
        }
        let bytes = json_len(&self.to_json());
        if bytes > MAX_UPDATE_BYTES {
            return Err(UpdateError::TooLarge { bytes, max: MAX_UPDATE_BYTES });
        }
        if let Some(p) = self.progress {
            check_progress(p).map_err(|problem| UpdateError::field("progress", problem))?;
        }
        if let Some(w) = self.weight {
            check_weight(w).map_err(|problem| UpdateError::field("weight", problem))?;
        }
        if let Some(status) = &self.status {
            check_chars(status, MAX_STATUS_CHARS).map_err(|problem| UpdateError::field("status", problem))?;
        }
        if let Some(msg) = &self.msg {
            check_msg(msg).map_err(|problem| UpdateError::field("msg", problem))?;
        }
        if let Some(name) = &self.name {
            check_chars(name, MAX_NAME_CHARS).map_err(|problem| UpdateError::field("name", problem))?;
        }
        for (name, value) in &self.extra {
            check_extra(name, value).map_err(|problem| UpdateError::field(name, problem))?;
        }
        Ok(())
    }

    /// Number of set fields, well-known and extra.
    pub fn field_count(&self) -> usize {
        [
            self.progress.is_some(),
            self.weight.is_some(),
            self.status.is_some(),
            self.msg.is_some(),
            self.name.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count()
            + self.extra.len()
    }

    pub fn is_empty(&self) -> bool {
        self.field_count() == 0
    }

    /// Every set field with its JSON value: the well-known ones first (`progress`, `weight`,
    /// `status`, `msg`, `name`), then the extras by name. A non-finite number, which only an
    /// unvalidated update can hold, becomes `null`.
    pub fn fields(&self) -> Vec<(String, Value)> {
        let mut out = Vec::with_capacity(self.field_count());
        if let Some(p) = self.progress {
            out.push(("progress".to_owned(), number(p)));
        }
        if let Some(w) = self.weight {
            out.push(("weight".to_owned(), number(w)));
        }
        if let Some(s) = &self.status {
            out.push(("status".to_owned(), Value::String(s.clone())));
        }
        if let Some(m) = &self.msg {
            out.push(("msg".to_owned(), Value::String(m.clone())));
        }
        if let Some(n) = &self.name {
            out.push(("name".to_owned(), Value::String(n.clone())));
        }
        out.extend(self.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }

    /// The update as a JSON object of its set fields (SCA's wire format).
    pub fn to_json(&self) -> Value {
        Value::Object(self.to_map())
    }

    pub(crate) fn to_map(&self) -> Map<String, Value> {
        let mut map = Map::new();
        // Extras last, so a well-known field wins over a stray extra of the same name.
        for (name, value) in self.fields() {
            map.entry(name).or_insert(value);
        }
        map
    }

    /// Folds a later update of the same key into this one: fields set in `later` win, the rest
    /// are kept. Producers use it to send only the latest state of each key.
    pub fn merge(&mut self, later: &Update) {
        if let Some(p) = later.progress {
            self.progress = Some(p);
        }
        if let Some(w) = later.weight {
            self.weight = Some(w);
        }
        if let Some(s) = &later.status {
            self.status = Some(s.clone());
        }
        if let Some(m) = &later.msg {
            self.msg = Some(m.clone());
        }
        if let Some(n) = &later.name {
            self.name = Some(n.clone());
        }
        for (name, value) in &later.extra {
            self.extra.insert(name.clone(), value.clone());
        }
    }
}

impl Serialize for Update {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Update {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Update, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Update::from_json(&value).map_err(serde::de::Error::custom)
    }
}

/// Length of `value` as compact JSON, without building the text.
pub fn json_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a Value into an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

fn number(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// A number for an error message: plain when short, scientific when huge.
fn show_number(x: f64) -> String {
    if x.is_finite() && x != 0.0 && !(1e-6..1e16).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

/// A JSON value for an error message, never more than a few dozen characters; a number as it was
/// sent (`3.0` stays `3.0`: shown as `3`, it would read like a valid integer).
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() > 32 => {
            format!("{:?}", format!("{}…", s.chars().take(32).collect::<String>()))
        }
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

fn check_progress(p: f64) -> Result<(), String> {
    if p.is_finite() && (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{PROGRESS_RULE}, got {}", show_number(p)))
    }
}

fn check_weight(w: f64) -> Result<(), String> {
    if w.is_finite() && (0.0..=MAX_WEIGHT).contains(&w) {
        Ok(())
    } else {
        Err(format!("{WEIGHT_RULE}, got {}", show_number(w)))
    }
}

fn check_chars(s: &str, max: usize) -> Result<(), String> {
    let chars = s.chars().count();
    if chars <= max {
        Ok(())
    } else {
        Err(format!("must be a string of at most {max} characters, got {chars} characters"))
    }
}

fn check_msg(msg: &str) -> Result<(), String> {
    if msg.len() <= MAX_MSG_BYTES {
        Ok(())
    } else {
        Err(format!("must be a string of at most {MAX_MSG_BYTES} bytes, got {} bytes", msg.len()))
    }
}

fn check_field_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("names must be 1 to {MAX_FIELD_NAME_LEN} characters"));
    }
    if name.starts_with('_') {
        return Err("names starting with \"_\" are reserved for the server".to_owned());
    }
    if let Some(ch) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!("names may only use A-Z a-z 0-9 _ -, found '{}'", ch.escape_debug()));
    }
    if name.len() > MAX_FIELD_NAME_LEN {
        return Err(format!("names may have at most {MAX_FIELD_NAME_LEN} characters, got {}", name.len()));
    }
    if SERVER_FIELDS.contains(&name) {
        return Err("is set by the server and cannot be updated".to_owned());
    }
    Ok(())
}

/// Judges a field kept in `extra`. Well-known names only end up there when their value has
/// the wrong JSON type (or when `extra` was filled by hand).
fn check_extra(name: &str, value: &Value) -> Result<(), String> {
    check_field_name(name)?;
    let typed_rule = match name {
        "progress" => Some(PROGRESS_RULE.to_owned()),
        "weight" => Some(WEIGHT_RULE.to_owned()),
        "status" => Some(format!("must be a string of at most {MAX_STATUS_CHARS} characters")),
        "msg" => Some(format!("must be a string of at most {MAX_MSG_BYTES} bytes")),
        "name" => Some(format!("must be a string of at most {MAX_NAME_CHARS} characters")),
        _ => None,
    };
    if let Some(rule) = typed_rule {
        let right_type = match name {
            "progress" | "weight" => value.is_number(),
            _ => value.is_string(),
        };
        return Err(if right_type {
            format!("is a well-known field; set it with Update::{name}, not in `extra`")
        } else {
            format!("{rule}, got {}", describe(value))
        });
    }
    match value {
        Value::Object(_) => Err("nested objects are not allowed".to_owned()),
        Value::Array(_) => Err("arrays are not allowed".to_owned()),
        Value::Number(n) if !n.as_f64().is_some_and(f64::is_finite) => Err(OUT_OF_RANGE.to_owned()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_error(body: &str) -> (String, String) {
        match Update::from_slice(body.as_bytes()) {
            Err(UpdateError::Field { field, problem }) => (field, problem),
            other => panic!("{body}: expected a field error, got {other:?}"),
        }
    }

    fn message(body: &str) -> String {
        Update::from_slice(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn parses_sca_update() {
        let u = Update::from_slice(
            br#"{"progress": 0.5, "weight": 2, "status": "running", "msg": "copying",
                "name": "Copy", "host": "n1", "n": 3, "ok": true, "none": null}"#,
        )
        .unwrap();
        assert_eq!(u.progress, Some(0.5));
        assert_eq!(u.weight, Some(2.0));
        assert_eq!(u.status.as_deref(), Some("running"));
        assert_eq!(u.msg.as_deref(), Some("copying"));
        assert_eq!(u.name.as_deref(), Some("Copy"));
        assert_eq!(u.extra.len(), 4);
        assert_eq!(u.extra["host"], json!("n1"));
        assert_eq!(u.extra["none"], Value::Null);
        assert_eq!(u.field_count(), 9);
    }

    #[test]
    fn empty_update_is_valid() {
        let u = Update::from_slice(b"{}").unwrap();
        assert!(u.is_empty());
        assert_eq!(u.to_json(), json!({}));
    }

    #[test]
    fn progress_must_be_in_unit_interval() {
        for ok in ["0", "1", "0.25", "1.0", "0e0"] {
            assert!(Update::from_slice(format!(r#"{{"progress": {ok}}}"#).as_bytes()).is_ok(), "{ok}");
        }
        assert_eq!(
            message(r#"{"progress": 1.5}"#),
            r#"field "progress": must be a number between 0 and 1, got 1.5"#
        );
        assert_eq!(
            message(r#"{"progress": -0.1}"#),
            r#"field "progress": must be a number between 0 and 1, got -0.1"#
        );
        assert_eq!(
            message(r#"{"progress": "50%"}"#),
            r#"field "progress": must be a number between 0 and 1, got "50%""#
        );
        assert_eq!(
            message(r#"{"progress": null}"#),
            r#"field "progress": must be a number between 0 and 1, got null"#
        );
        assert_eq!(
            message(r#"{"progress": 1e300}"#),
            r#"field "progress": must be a number between 0 and 1, got 1e300"#
        );
    }

    #[test]
    fn weight_must_be_non_negative() {
        assert_eq!(Update::from_slice(br#"{"weight": 0}"#).unwrap().weight, Some(0.0));
        assert_eq!(
            message(r#"{"weight": -1}"#),
            r#"field "weight": must be a number between 0 and 1e12, got -1"#
        );
        assert_eq!(
            message(r#"{"weight": [1]}"#),
            r#"field "weight": must be a number between 0 and 1e12, got an array"#
        );
    }

    #[test]
    fn non_finite_numbers_are_rejected() {
        assert_eq!(field_error(r#"{"progress": 1e400}"#), ("progress".to_owned(), OUT_OF_RANGE.to_owned()));
        assert_eq!(field_error(r#"{"a": 1, "size": -2e308}"#), ("size".to_owned(), OUT_OF_RANGE.to_owned()));
        // Not JSON at all, but what some encoders write: the field is named all the same.
        for (body, field) in [
            (r#"{"progress": NaN}"#, "progress"),
            (r#"{"a": 1, "weight":Infinity}"#, "weight"),
            ("{\n  \"x\": 1,\n  \"size\": -Infinity\n}", "size"),
        ] {
            assert_eq!(field_error(body), (field.to_owned(), OUT_OF_RANGE.to_owned()), "{body}");
        }
        assert_eq!(
            message(r#"{"weight": 1e999}"#),
            r#"field "weight": number is out of range; values must be finite numbers"#
        );
        assert_eq!(
            Update::new().progress(f64::NAN).validate().unwrap_err().to_string(),
            r#"field "progress": must be a number between 0 and 1, got NaN"#
        );
        assert_eq!(
            Update::new().weight(f64::INFINITY).validate().unwrap_err().to_string(),
            r#"field "weight": must be a number between 0 and 1e12, got inf"#
        );
        // Non-JSON spellings of non-finite numbers are refused naming their field.
        for body in [r#"{"progress": NaN}"#, r#"{"progress": Infinity}"#] {
            assert_eq!(
                message(body),
                r#"field "progress": number is out of range; values must be finite numbers"#,
                "{body}"
            );
        }
    }

    #[test]
    fn string_fields_have_limits() {
        let status = "s".repeat(33);
        assert_eq!(
            message(&format!(r#"{{"status": "{status}"}}"#)),
            r#"field "status": must be a string of at most 32 characters, got 33 characters"#
        );
        // Characters, not bytes.
        let status = "é".repeat(32);
        assert!(Update::from_slice(format!(r#"{{"status": "{status}"}}"#).as_bytes()).is_ok());
        assert_eq!(
            message(r#"{"status": 3}"#),
            r#"field "status": must be a string of at most 32 characters, got 3"#
        );
        // Any status string is allowed, not only the well-known ones.
        assert!(Update::from_slice(br#"{"status": "uploading"}"#).is_ok());

        let msg = "é".repeat(2049);
        assert_eq!(
            message(&format!(r#"{{"msg": "{msg}"}}"#)),
            r#"field "msg": must be a string of at most 4096 bytes, got 4098 bytes"#
        );
        let msg = "m".repeat(4096);
        assert!(Update::from_slice(format!(r#"{{"msg": "{msg}"}}"#).as_bytes()).is_ok());

        let name = "n".repeat(257);
        assert_eq!(
            message(&format!(r#"{{"name": "{name}"}}"#)),
            r#"field "name": must be a string of at most 256 characters, got 257 characters"#
        );
        assert_eq!(
            message(r#"{"name": {"first": "x"}}"#),
            r#"field "name": must be a string of at most 256 characters, got an object"#
        );
    }

    #[test]
    fn extra_values_must_be_scalars() {
        assert_eq!(message(r#"{"foo": {"a": 1}}"#), r#"field "foo": nested objects are not allowed"#);
        assert_eq!(message(r#"{"foo": [1, 2]}"#), r#"field "foo": arrays are not allowed"#);
        assert_eq!(
            Update::new().field("foo", json!({})).validate().unwrap_err(),
            UpdateError::Field { field: "foo".into(), problem: "nested objects are not allowed".into() }
        );
    }

    #[test]
    fn field_names_are_checked() {
        assert_eq!(
            message(r#"{"_x": 1}"#),
            r#"field "_x": names starting with "_" are reserved for the server"#
        );
        assert_eq!(
            message(r#"{"_counts": {}}"#),
            r#"field "_counts": names starting with "_" are reserved for the server"#
        );
        for server in SERVER_FIELDS {
            assert_eq!(
                message(&format!(r#"{{"{server}": 1}}"#)),
                format!(r#"field "{server}": is set by the server and cannot be updated"#)
            );
        }
        assert_eq!(message(r#"{"": 1}"#), r#"field "": names must be 1 to 64 characters"#);
        assert_eq!(message(r#"{"a b": 1}"#), r#"field "a b": names may only use A-Z a-z 0-9 _ -, found ' '"#);
        assert_eq!(message(r#"{"a.b": 1}"#), r#"field "a.b": names may only use A-Z a-z 0-9 _ -, found '.'"#);
        let long = "f".repeat(65);
        let (field, problem) = field_error(&format!(r#"{{"{long}": 1}}"#));
        assert_eq!(field, format!("{}…", "f".repeat(64)));
        assert_eq!(problem, "names may have at most 64 characters, got 65");
        assert!(Update::from_slice(format!(r#"{{"{}": 1}}"#, "f".repeat(64)).as_bytes()).is_ok());
    }

    #[test]
    fn too_many_fields() {
        let mut body = Map::new();
        for i in 0..65 {
            body.insert(format!("f{i}"), json!(i));
        }
        let err = Update::from_json(&Value::Object(body.clone())).unwrap_err();
        assert_eq!(err, UpdateError::TooManyFields { count: 65, max: 64 });
        assert_eq!(err.to_string(), "update has 65 fields; at most 64 are allowed");
        body.remove("f0");
        assert!(Update::from_json(&Value::Object(body)).is_ok());

        let mut u = Update::new().progress(0.1);
        for i in 0..64 {
            u = u.field(format!("f{i}"), i);
        }
        assert_eq!(u.validate().unwrap_err(), UpdateError::TooManyFields { count: 65, max: 64 });
    }

    #[test]
    fn oversized_updates() {
        let body = format!(r#"{{"a": "{}"}}"#, "x".repeat(MAX_UPDATE_BYTES));
        let err = Update::from_slice(body.as_bytes()).unwrap_err();
        assert_eq!(err, UpdateError::TooLarge { bytes: body.len(), max: MAX_UPDATE_BYTES });
        assert_eq!(
            err.to_string(),
            format!("update has {} bytes of JSON; at most 65536 are allowed", body.len())
        );
        // Built in memory, or parsed from a value: measured as compact JSON.
        let mut big = Map::new();
        for i in 0..40 {
            big.insert(format!("f{i}"), json!("y".repeat(2000)));
        }
        assert!(matches!(
            Update::from_json(&Value::Object(big)),
            Err(UpdateError::TooLarge { max: MAX_UPDATE_BYTES, .. })
        ));
        // Exactly at the limit is fine.
        let fill = MAX_UPDATE_BYTES - r#"{"a":""}"#.len();
        let body = format!(r#"{{"a":"{}"}}"#, "x".repeat(fill));
        assert_eq!(body.len(), MAX_UPDATE_BYTES);
        assert!(Update::from_slice(body.as_bytes()).is_ok());
    }

    #[test]
    fn invalid_json_and_non_objects() {
        let err = Update::from_slice(b"{\"progress\": ").unwrap_err();
        assert!(matches!(err, UpdateError::InvalidJson { .. }));
        assert!(err.to_string().starts_with("update is not valid JSON: "), "{err}");
        for body in ["[]", "\"x\"", "1", "null"] {
            let err = Update::from_slice(body.as_bytes()).unwrap_err();
            assert_eq!(err, UpdateError::NotAnObject, "{body}");
            assert_eq!(err.to_string(), "update must be a JSON object");
        }
        assert!(matches!(Update::from_slice(b"1e400"), Err(UpdateError::InvalidJson { .. })));
    }

    #[test]
    fn builder_and_to_json() {
        let u = Update::new()
            .progress(0.5)
            .status("running")
            .msg("step 1")
            .weight(2.0)
            .name("Job")
            .field("foo", json!(1))
            .field("bar", "x");
        u.validate().unwrap();
        assert_eq!(
            u.to_json(),
            json!({"progress": 0.5, "status": "running", "msg": "step 1", "weight": 2.0,
                   "name": "Job", "foo": 1, "bar": "x"})
        );
        let names: Vec<String> = u.fields().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["progress", "weight", "status", "msg", "name", "bar", "foo"]);
        assert_eq!(Update::from_json(&u.to_json()).unwrap(), u);
    }

    #[test]
    fn field_routes_well_known_names() {
        let u = Update::new().field("progress", 0.25).field("status", "waiting");
        assert_eq!(u.progress, Some(0.25));
        assert_eq!(u.status.as_deref(), Some("waiting"));
        assert!(u.extra.is_empty());

        let bad = Update::new().field("progress", "half");
        assert_eq!(bad.progress, None);
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            r#"field "progress": must be a number between 0 and 1, got "half""#
        );
        // A later well-typed value replaces the stray one.
        assert!(bad.field("progress", 0.5).validate().is_ok());

        let mut by_hand = Update::new();
        by_hand.extra.insert("weight".into(), json!(1));
        assert!(by_hand.validate().unwrap_err().to_string().contains("well-known field"));
    }

    #[test]
    fn merge_later_fields_win() {
        let mut a = Update::new().progress(0.1).status("running").field("x", 1);
        let b = Update::new().progress(0.2).msg("hi").field("y", 2).field("x", 3);
        a.merge(&b);
        assert_eq!(a, Update::new().progress(0.2).status("running").msg("hi").field("x", 3).field("y", 2));
        let before = a.clone();
        a.merge(&Update::new());
        assert_eq!(a, before);
    }

    #[test]
    fn serde_uses_the_wire_format() {
        let u = Update::new().progress(1.0).field("k2", false);
        let text = serde_json::to_string(&u).unwrap();
        assert_eq!(serde_json::from_str::<Update>(&text).unwrap(), u);
        let err = serde_json::from_str::<Update>(r#"{"progress": 2}"#).unwrap_err();
        assert!(err.to_string().contains(r#"field "progress""#), "{err}");
    }

    #[test]
    fn json_len_matches_serialization() {
        let v = json!({"a": [1, "é", null], "b": 1.5});
        assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len());
    }
}
