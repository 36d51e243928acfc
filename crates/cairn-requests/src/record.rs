//! The request record: one Redis hash per request, the source of truth for its state.
//!
//! Field names live in [`fields`] so Rust code and Lua scripts agree on them. Values are text:
//! numbers in decimal, JSON values (`payload`, `result`) as compact JSON text, booleans as
//! `"1"`. An optional field that is missing or empty reads as unset, so a script may clear one
//! with `HSET key field ""` as well as with `HDEL`.

use std::collections::HashMap;

use cairn_progress::Key;
use serde_json::{Map, Value, json};

use crate::state::RequestState;
use crate::streams::StreamInfo;
use crate::submit::{Submission, default_progress_key};

/// Names of the fields of a request's hash.
pub mod fields {
    pub const ID: &str = "id";
    pub const HANDLER: &str = "handler";
    /// JSON text.
    pub const PAYLOAD: &str = "payload";
    pub const PROGRESS_KEY: &str = "progress_key";
    pub const MAX_ATTEMPTS: &str = "max_attempts";
    /// Milliseconds; `0` means no timeout.
    pub const TIMEOUT_MS: &str = "timeout_ms";
    pub const IDEMPOTENCY_KEY: &str = "idempotency_key";
    /// [`Submission::fingerprint`](crate::Submission::fingerprint) of the submitted body.
    pub const FINGERPRINT: &str = "fingerprint";
    /// A [`RequestState`](crate::RequestState) name.
    pub const STATE: &str = "state";
    /// Attempts started so far.
    pub const ATTEMPTS: &str = "attempts";
    pub const CREATED_MS: &str = "created_ms";
    /// Start of the latest attempt.
    pub const STARTED_MS: &str = "started_ms";
    pub const FINISHED_MS: &str = "finished_ms";
    /// Last heartbeat of the processor running it.
    pub const HEARTBEAT_MS: &str = "heartbeat_ms";
    /// The progress the handler last reported for the request's own node, as that heartbeat
    /// carried it (a decimal in 0..=1).
    pub const HEARTBEAT_PROGRESS: &str = "heartbeat_progress";
    /// JSON text.
    pub const RESULT: &str = "result";
    /// The last attempt's error message.
    pub const ERROR: &str = "error";
    /// Id of the entry in the requests stream.
    pub const ENTRY_ID: &str = "entry_id";
    /// Where the ingress replica waiting for the answer listens.
    pub const REPLY_TO: &str = "reply_to";
    /// `"1"` once cancellation was asked for.
    pub const CANCEL: &str = "cancel";
    /// The processor (consumer name) running the current attempt.
    pub const OWNER: &str = "owner";
    /// W3C trace context of the submission.
    pub const TRACEPARENT: &str = "traceparent";
    /// JSON text: the data streams, `[{"name", "bytes"}]`.
    pub const STREAMS: &str = "streams";

    /// Every field, in the order [`RequestRecord::to_fields`](crate::RequestRecord::to_fields)
    /// writes them; handy for `HMGET`.
    pub const ALL: [&str; 23] = [
        ID,
        HANDLER,
        PAYLOAD,
        PROGRESS_KEY,
        MAX_ATTEMPTS,
        TIMEOUT_MS,
        FINGERPRINT,
        STATE,
        ATTEMPTS,
        CREATED_MS,
        IDEMPOTENCY_KEY,
        STARTED_MS,
        FINISHED_MS,
        HEARTBEAT_MS,
        HEARTBEAT_PROGRESS,
        RESULT,
        ERROR,
        ENTRY_ID,
        REPLY_TO,
        CANCEL,
        OWNER,
        TRACEPARENT,
        STREAMS,
    ];
}

/// Why a hash is not a valid request record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("request record has no field {field:?}")]
    Missing { field: &'static str },
    #[error("request record field {field:?}: {problem}")]
    Invalid { field: &'static str, problem: String },
}

/// A request as stored. Timestamps are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    pub id: String,
    pub handler: String,
    pub payload: Value,
    pub progress_key: Key,
    pub max_attempts: u32,
    pub timeout_ms: Option<u64>,
    pub idempotency_key: Option<String>,
    pub fingerprint: String,
    pub state: RequestState,
    /// Attempts started so far, the current one included.
    pub attempts: u32,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub heartbeat_ms: Option<i64>,
    /// The handler's own progress as the last heartbeat carried it (docs/contract.md §3: heartbeats carry
    /// progress, so it is known even while progress reports over AMQP lag or are away).
    pub heartbeat_progress: Option<f64>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub entry_id: Option<String>,
    pub reply_to: Option<String>,
    pub cancel_requested: bool,
    pub owner: Option<String>,
    pub traceparent: Option<String>,
    /// Its data streams, stored apart (`{prefix}:req:{id}:s:{name}`), in name order.
    pub streams: Vec<StreamInfo>,
}

impl RequestRecord {
    /// The queued record of a new request: defaults applied (`_requests.{id}` as progress key,
    /// `default_max_attempts` when the submission names none) and the fingerprint computed.
    ///
    /// # Panics
    /// When `id` cannot be a progress key segment and the submission names no progress key;
    /// see [`default_progress_key`].
    pub fn queued(
        id: String,
        submission: Submission,
        default_max_attempts: u32,
        created_ms: i64,
    ) -> RequestRecord {
        let fingerprint = submission.fingerprint();
        RequestRecord {
            progress_key: submission.progress_key.unwrap_or_else(|| default_progress_key(&id)),
            id,
            handler: submission.handler,
            payload: submission.payload,
            max_attempts: submission.max_attempts.unwrap_or(default_max_attempts),
            timeout_ms: submission.timeout_ms,
            idempotency_key: submission.idempotency_key,
            fingerprint,
            state: RequestState::Queued,
            attempts: 0,
            created_ms,
            started_ms: None,
            finished_ms: None,
            heartbeat_ms: None,
            heartbeat_progress: None,
            result: None,
            error: None,
            entry_id: None,
            reply_to: None,
            cancel_requested: false,
            owner: None,
            traceparent: None,
            streams: Vec::new(),
        }
    }

    /// Reads a record from its hash (`HGETALL`). Fields it does not know are ignored, so older
    /// code can read records written by newer code.
    pub fn from_hash(hash: &HashMap<String, String>) -> Result<RequestRecord, RecordError> {
        let get = |field: &'static str| hash.get(field).map(String::as_str).filter(|v| !v.is_empty());
        let required = |field: &'static str| get(field).ok_or(RecordError::Missing { field });
        let text = |field: &'static str| get(field).map(str::to_owned);

        let progress_key = required(fields::PROGRESS_KEY)?;
        let state = required(fields::STATE)?;
        Ok(RequestRecord {
            id: required(fields::ID)?.to_owned(),
            handler: required(fields::HANDLER)?.to_owned(),
            payload: parse_json(fields::PAYLOAD, required(fields::PAYLOAD)?)?,
            progress_key: Key::parse(progress_key).map_err(|err| invalid(fields::PROGRESS_KEY, err))?,
            max_attempts: parse_number(fields::MAX_ATTEMPTS, required(fields::MAX_ATTEMPTS)?)?,
            timeout_ms: get(fields::TIMEOUT_MS)
                .map(|v| parse_number::<u64>(fields::TIMEOUT_MS, v))
                .transpose()?
                .filter(|ms| *ms > 0),
            idempotency_key: text(fields::IDEMPOTENCY_KEY),
            fingerprint: required(fields::FINGERPRINT)?.to_owned(),
            state: state.parse().map_err(|err| invalid(fields::STATE, err))?,
            attempts: get(fields::ATTEMPTS).map_or(Ok(0), |v| parse_number(fields::ATTEMPTS, v))?,
            created_ms: parse_number(fields::CREATED_MS, required(fields::CREATED_MS)?)?,
            started_ms: get(fields::STARTED_MS).map(|v| parse_number(fields::STARTED_MS, v)).transpose()?,
            finished_ms: get(fields::FINISHED_MS)
                .map(|v| parse_number(fields::FINISHED_MS, v))
                .transpose()?,
            heartbeat_ms: get(fields::HEARTBEAT_MS)
                .map(|v| parse_number(fields::HEARTBEAT_MS, v))
                .transpose()?,
            heartbeat_progress: get(fields::HEARTBEAT_PROGRESS)
                .map(|v| parse_progress(fields::HEARTBEAT_PROGRESS, v))
                .transpose()?,
            result: get(fields::RESULT).map(|v| parse_json(fields::RESULT, v)).transpose()?,
            error: text(fields::ERROR),
            entry_id: text(fields::ENTRY_ID),
            reply_to: text(fields::REPLY_TO),
            cancel_requested: match get(fields::CANCEL) {
                None | Some("0") => false,
                Some("1") => true,
                Some(other) => {
                    return Err(invalid(
                        fields::CANCEL,
                        format!("expected \"1\" or \"0\", got {}", show(other)),
                    ));
                }
            },
            owner: text(fields::OWNER),
            traceparent: text(fields::TRACEPARENT),
            streams: match get(fields::STREAMS) {
                None => Vec::new(),
                Some(text) => serde_json::from_str(text)
                    .map_err(|err| invalid(fields::STREAMS, format!("invalid JSON: {err}")))?,
            },
        })
    }

    /// The fields to `HSET`, in [`fields::ALL`] order: every required field, `timeout_ms` (as
    /// `0` when unset) and `attempts` always, the other optional ones only when set (`cancel`
    /// only when requested). [`RequestRecord::from_hash`] reads the result back unchanged,
    /// provided optional strings are not empty and `timeout_ms` is not `Some(0)`.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (fields::ID, self.id.clone()),
            (fields::HANDLER, self.handler.clone()),
            (fields::PAYLOAD, self.payload.to_string()),
            (fields::PROGRESS_KEY, self.progress_key.to_string()),
            (fields::MAX_ATTEMPTS, self.max_attempts.to_string()),
            (fields::TIMEOUT_MS, self.timeout_ms.unwrap_or(0).to_string()),
            (fields::FINGERPRINT, self.fingerprint.clone()),
            (fields::STATE, self.state.to_string()),
            (fields::ATTEMPTS, self.attempts.to_string()),
            (fields::CREATED_MS, self.created_ms.to_string()),
        ];
        let optional = [
            (fields::IDEMPOTENCY_KEY, self.idempotency_key.clone()),
            (fields::STARTED_MS, self.started_ms.map(|ms| ms.to_string())),
            (fields::FINISHED_MS, self.finished_ms.map(|ms| ms.to_string())),
            (fields::HEARTBEAT_MS, self.heartbeat_ms.map(|ms| ms.to_string())),
            (fields::HEARTBEAT_PROGRESS, self.heartbeat_progress.map(|p| p.to_string())),
            (fields::RESULT, self.result.as_ref().map(Value::to_string)),
            (fields::ERROR, self.error.clone()),
            (fields::ENTRY_ID, self.entry_id.clone()),
            (fields::REPLY_TO, self.reply_to.clone()),
            (fields::CANCEL, self.cancel_requested.then(|| "1".to_owned())),
            (fields::OWNER, self.owner.clone()),
            (fields::TRACEPARENT, self.traceparent.clone()),
            (
                fields::STREAMS,
                (!self.streams.is_empty()).then(|| serde_json::to_string(&self.streams).unwrap_or_default()),
            ),
        ];
        out.extend(optional.into_iter().filter_map(|(field, value)| Some((field, value?))));
        out
    }

    /// The public view served by `GET /v1/requests/{id}`: no payload, fingerprint, owner or
    /// stream entry. Timestamps are ms epoch numbers or `null`; `result` and `error` appear only
    /// when set.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("id".into(), json!(self.id));
        map.insert("handler".into(), json!(self.handler));
        map.insert("state".into(), json!(self.state));
        map.insert("attempts".into(), json!(self.attempts));
        map.insert("max_attempts".into(), json!(self.max_attempts));
        map.insert("progress_key".into(), json!(self.progress_key));
        map.insert("created_at".into(), json!(self.created_ms));
        map.insert("started_at".into(), json!(self.started_ms));
        map.insert("finished_at".into(), json!(self.finished_ms));
        map.insert("heartbeat_at".into(), json!(self.heartbeat_ms));
        if let Some(result) = &self.result {
            map.insert("result".into(), result.clone());
        }
        if let Some(error) = &self.error {
            map.insert("error".into(), json!(error));
        }
        map.insert("cancel_requested".into(), json!(self.cancel_requested));
        if !self.streams.is_empty() {
            map.insert("streams".into(), json!(self.streams));
        }
        Value::Object(map)
    }
}

fn invalid(field: &'static str, problem: impl ToString) -> RecordError {
    RecordError::Invalid { field, problem: problem.to_string() }
}

fn parse_number<T: std::str::FromStr>(field: &'static str, value: &str) -> Result<T, RecordError> {
    value.parse().map_err(|_| invalid(field, format!("expected an integer, got {}", show(value))))
}

fn parse_progress(field: &'static str, value: &str) -> Result<f64, RecordError> {
    match value.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(invalid(field, format!("expected a number from 0 to 1, got {}", show(value)))),
    }
}

fn parse_json(field: &'static str, value: &str) -> Result<Value, RecordError> {
    serde_json::from_str(value).map_err(|err| invalid(field, format!("invalid JSON: {err}")))
}

/// A stored value for an error message, shortened.
fn show(value: &str) -> String {
    if value.chars().count() > 32 {
        format!("{:?}", format!("{}…", value.chars().take(32).collect::<String>()))
    } else {
        format!("{value:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full_record() -> RequestRecord {
        RequestRecord {
            id: "0190f5c2-7b8e-4c3d-9a2b-123456789abc".into(),
            handler: "http".into(),
            payload: json!({"url": "/x", "n": [1, 2]}),
            progress_key: Key::parse("_portal.job1").unwrap(),
            max_attempts: 5,
            timeout_ms: Some(60_000),
            idempotency_key: Some("order-42".into()),
            fingerprint: "0123456789abcdef".into(),
            state: RequestState::Succeeded,
            attempts: 2,
            created_ms: 1_700_000_000_000,
            started_ms: Some(1_700_000_000_100),
            finished_ms: Some(1_700_000_000_900),
            heartbeat_ms: Some(1_700_000_000_500),
            heartbeat_progress: Some(0.25),
            result: Some(json!({"ok": true})),
            error: Some("upstream answered 503".into()),
            entry_id: Some("1700000000000-0".into()),
            reply_to: Some("replies:ingress-1".into()),
            cancel_requested: true,
            owner: Some("processor-a".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            streams: vec![StreamInfo { name: "image".into(), bytes: 1234 }],
        }
    }

    fn hash(record: &RequestRecord) -> HashMap<String, String> {
        record.to_fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    #[test]
    fn queued_applies_defaults() {
        let id = crate::new_request_id();
        let submission = Submission::new("h", json!([1]));
        let fingerprint = submission.fingerprint();
        let record = RequestRecord::queued(id.clone(), submission, 3, 42);
        assert_eq!(record.progress_key, default_progress_key(&id));
        assert_eq!(record.max_attempts, 3);
        assert_eq!(record.fingerprint, fingerprint);
        assert_eq!(record.state, RequestState::Queued);
        assert_eq!(record.attempts, 0);
        assert_eq!(record.created_ms, 42);
        assert_eq!(record.payload, json!([1]));

        let mut submission = Submission::new("h", Value::Null);
        submission.progress_key = Some(Key::parse("_portal.x").unwrap());
        submission.max_attempts = Some(7);
        submission.timeout_ms = Some(10);
        let record = RequestRecord::queued(id, submission, 3, 42);
        assert_eq!(record.progress_key.as_str(), "_portal.x");
        assert_eq!(record.max_attempts, 7);
        assert_eq!(record.timeout_ms, Some(10));
    }

    #[test]
    fn full_record_round_trips() {
        let record = full_record();
        let fields = record.to_fields();
        let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, fields::ALL);
        assert_eq!(RequestRecord::from_hash(&hash(&record)).unwrap(), record);
    }

    #[test]
    fn only_set_fields_are_written() {
        let record = RequestRecord::queued("r1".into(), Submission::new("h", Value::Null), 3, 7);
        let fields: Vec<(&str, String)> = record.to_fields();
        assert_eq!(
            fields,
            [
                ("id", "r1".to_owned()),
                ("handler", "h".to_owned()),
                ("payload", "null".to_owned()),
                ("progress_key", "_requests.r1".to_owned()),
                ("max_attempts", "3".to_owned()),
                ("timeout_ms", "0".to_owned()),
                ("fingerprint", record.fingerprint.clone()),
                ("state", "queued".to_owned()),
                ("attempts", "0".to_owned()),
                ("created_ms", "7".to_owned()),
            ]
        );
        assert_eq!(RequestRecord::from_hash(&hash(&record)).unwrap(), record);
    }

    #[test]
    fn missing_required_fields_are_named() {
        for field in [
            fields::ID,
            fields::HANDLER,
            fields::PAYLOAD,
            fields::PROGRESS_KEY,
            fields::MAX_ATTEMPTS,
            fields::FINGERPRINT,
            fields::STATE,
            fields::CREATED_MS,
        ] {
            for absent in [None, Some(String::new())] {
                let mut h = hash(&full_record());
                match absent {
                    None => h.remove(field),
                    Some(empty) => h.insert(field.to_owned(), empty),
                };
                let err = RequestRecord::from_hash(&h).unwrap_err();
                assert_eq!(err, RecordError::Missing { field });
                assert_eq!(err.to_string(), format!("request record has no field \"{field}\""));
            }
        }
    }

    #[test]
    fn optional_fields_may_be_missing_or_empty() {
        let mut h = hash(&full_record());
        for field in [fields::ATTEMPTS, fields::TIMEOUT_MS, fields::IDEMPOTENCY_KEY, fields::STARTED_MS] {
            h.remove(field);
        }
        for field in [fields::ERROR, fields::OWNER, fields::RESULT, fields::CANCEL, fields::HEARTBEAT_MS] {
            h.insert(field.to_owned(), String::new());
        }
        h.insert("future_field".into(), "whatever".into());
        let record = RequestRecord::from_hash(&h).unwrap();
        assert_eq!(record.attempts, 0);
        assert_eq!(record.timeout_ms, None);
        assert_eq!(record.idempotency_key, None);
        assert_eq!(record.started_ms, None);
        assert_eq!(record.error, None);
        assert_eq!(record.owner, None);
        assert_eq!(record.result, None);
        assert!(!record.cancel_requested);
        assert_eq!(record.heartbeat_ms, None);

        h.insert(fields::TIMEOUT_MS.into(), "0".into());
        h.insert(fields::CANCEL.into(), "0".into());
        let record = RequestRecord::from_hash(&h).unwrap();
        assert_eq!(record.timeout_ms, None);
        assert!(!record.cancel_requested);
    }

    #[test]
    fn invalid_values_are_named() {
        let cases = [
            (
                fields::STATE,
                "done",
                "unknown request state \"done\"; expected one of queued, running, failed, succeeded, canceled, dead",
            ),
            (fields::PROGRESS_KEY, "a..b", "key segment 1 is empty"),
            (fields::MAX_ATTEMPTS, "-1", "expected an integer, got \"-1\""),
            (fields::ATTEMPTS, "two", "expected an integer, got \"two\""),
            (fields::TIMEOUT_MS, "1.5", "expected an integer, got \"1.5\""),
            (fields::CREATED_MS, "x", "expected an integer, got \"x\""),
            (fields::STARTED_MS, "9223372036854775808", "expected an integer, got \"9223372036854775808\""),
            (fields::FINISHED_MS, " 1", "expected an integer, got \" 1\""),
            (fields::HEARTBEAT_MS, "1e3", "expected an integer, got \"1e3\""),
            (fields::HEARTBEAT_PROGRESS, "1.5", "expected a number from 0 to 1, got \"1.5\""),
            (fields::HEARTBEAT_PROGRESS, "NaN", "expected a number from 0 to 1, got \"NaN\""),
            (fields::CANCEL, "yes", "expected \"1\" or \"0\", got \"yes\""),
        ];
        for (field, value, problem) in cases {
            let mut h = hash(&full_record());
            h.insert(field.to_owned(), value.to_owned());
            let err = RequestRecord::from_hash(&h).unwrap_err();
            assert_eq!(err, RecordError::Invalid { field, problem: problem.to_owned() }, "{field}");
            assert_eq!(err.to_string(), format!("request record field \"{field}\": {problem}"));
        }
        for field in [fields::PAYLOAD, fields::RESULT] {
            let mut h = hash(&full_record());
            h.insert(field.to_owned(), "{oops".to_owned());
            match RequestRecord::from_hash(&h).unwrap_err() {
                RecordError::Invalid { field: named, problem } => {
                    assert_eq!(named, field);
                    assert!(problem.starts_with("invalid JSON: "), "{problem}");
                }
                other => panic!("{field}: unexpected {other:?}"),
            }
        }
        let mut h = hash(&full_record());
        h.insert(fields::ATTEMPTS.to_owned(), "x".repeat(100));
        let problem = RequestRecord::from_hash(&h).unwrap_err().to_string();
        assert!(problem.ends_with(&format!("got \"{}…\"", "x".repeat(32))), "{problem}");
    }

    #[test]
    fn public_view() {
        let record = full_record();
        assert_eq!(
            record.to_json(),
            json!({
                "id": "0190f5c2-7b8e-4c3d-9a2b-123456789abc",
                "handler": "http",
                "state": "succeeded",
                "attempts": 2,
                "max_attempts": 5,
                "progress_key": "_portal.job1",
                "created_at": 1_700_000_000_000i64,
                "started_at": 1_700_000_000_100i64,
                "finished_at": 1_700_000_000_900i64,
                "heartbeat_at": 1_700_000_000_500i64,
                "result": {"ok": true},
                "error": "upstream answered 503",
                "cancel_requested": true,
                "streams": [{"name": "image", "bytes": 1234}],
            })
        );
        let queued = RequestRecord::queued("r1".into(), Submission::new("h", json!({"secret": 1})), 3, 7);
        assert_eq!(
            queued.to_json(),
            json!({
                "id": "r1", "handler": "h", "state": "queued", "attempts": 0, "max_attempts": 3,
                "progress_key": "_requests.r1", "created_at": 7, "started_at": null,
                "finished_at": null, "heartbeat_at": null, "cancel_requested": false,
            })
        );
        // A null result is still a result.
        let with_null = RequestRecord { result: Some(Value::Null), ..queued };
        assert_eq!(with_null.to_json()["result"], Value::Null);
        assert!(with_null.to_json().as_object().unwrap().contains_key("result"));
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("[ -~é]{1,40}")
    }

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            "[a-z\"\\\\]{0,10}".prop_map(Value::from),
            prop::collection::btree_map("[a-c]", any::<bool>(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k, Value::Bool(v))).collect())),
        ]
    }

    fn record() -> impl Strategy<Value = RequestRecord> {
        (
            (
                "[a-z0-9-]{1,36}",
                "[A-Za-z0-9_-]{1,64}",
                json_leaf(),
                "_?[a-z]{1,8}(\\.[a-z0-9_-]{1,8}){0,3}",
                any::<u32>(),
                proptest::option::of(1u64..),
                opt_text(),
                "[0-9a-f]{16}",
            ),
            (
                proptest::sample::select(RequestState::ALL.to_vec()),
                any::<u32>(),
                any::<i64>(),
                proptest::option::of(any::<i64>()),
                proptest::option::of(any::<i64>()),
                proptest::option::of(any::<i64>()),
                proptest::option::of(json_leaf()),
                proptest::option::of(0.0f64..=1.0),
            ),
            (opt_text(), opt_text(), opt_text(), any::<bool>(), opt_text(), opt_text()),
        )
            .prop_map(
                |(
                    (id, handler, payload, key, max_attempts, timeout_ms, idempotency_key, fingerprint),
                    (
                        state,
                        attempts,
                        created_ms,
                        started_ms,
                        finished_ms,
                        heartbeat_ms,
                        result,
                        heartbeat_progress,
                    ),
                    (error, entry_id, reply_to, cancel_requested, owner, traceparent),
                )| RequestRecord {
                    id,
                    handler,
                    payload,
                    progress_key: Key::parse(&key).unwrap(),
                    max_attempts,
                    timeout_ms,
                    idempotency_key,
                    fingerprint,
                    state,
                    attempts,
                    created_ms,
                    started_ms,
                    finished_ms,
                    heartbeat_ms,
                    heartbeat_progress,
                    result,
                    error,
                    entry_id,
                    reply_to,
                    cancel_requested,
                    owner,
                    traceparent,
                    streams: Vec::new(),
                },
            )
    }

    proptest! {
        #[test]
        fn to_fields_from_hash_round_trip(record in record()) {
            let fields = record.to_fields();
            prop_assert!(fields.iter().all(|(_, value)| !value.is_empty()));
            prop_assert_eq!(RequestRecord::from_hash(&hash(&record)).unwrap(), record);
        }
    }
}
