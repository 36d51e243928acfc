//! One AMQP progress message: the routing key names the progress key and the body is either
//! one update object (SCA's format) or a burst, a JSON array of updates each carrying its
//! absolute `key` inside the routing key's subtree, applied in order.
//!
//! A message is accepted or refused whole: one bad element refuses the burst, so the
//! aggregator can dead-letter it with the reason before applying anything.

use serde_json::Value;

use crate::json::{self, OUT_OF_RANGE, ParseError};
use crate::key::{Key, KeyError};
use crate::update::{MAX_UPDATE_BYTES, Update, UpdateError, describe, json_len};

/// Most updates in one burst.
pub const MAX_BURST_UPDATES: usize = 4096;
/// Most bytes in one message body.
pub const MAX_BURST_BYTES: usize = 8 * 1024 * 1024;

/// Why a message was refused. Burst element indexes count from 0.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    #[error("invalid routing key: {0}")]
    InvalidRoutingKey(KeyError),
    #[error("update {index} of the burst: {source}")]
    InvalidKey { index: usize, source: KeyError },
    #[error(
        "update {index} of the burst: key \"{key}\" is outside the subtree of routing key \"{routing_key}\""
    )]
    OutsideSubtree { index: usize, key: Key, routing_key: Key },
    /// Namespaces (`_portal`, `a._x`) are boundaries, never nodes: post below them.
    #[error("{}key \"{key}\" is a namespace; post progress to a key below it", burst_position(*index))]
    NamespaceKey { index: Option<usize>, key: Key },
    /// `index` is `None` for a single-update (SCA) body.
    #[error("{}{source}", burst_position(*index))]
    Update { index: Option<usize>, source: UpdateError },
    #[error("body is not valid JSON: {detail}")]
    InvalidJson { detail: String },
    #[error("body must be a JSON object (one update) or a JSON array of objects with a \"key\" (a burst)")]
    NotAnObjectOrArray,
    #[error("burst is empty; send at least one update")]
    EmptyBurst,
    #[error("burst has {count} updates; at most {max} are allowed")]
    TooManyUpdates { count: usize, max: usize },
    #[error("body has {bytes} bytes; at most {max} are allowed")]
    TooLarge { bytes: usize, max: usize },
}

fn burst_position(index: Option<usize>) -> String {
    index.map_or_else(String::new, |i| format!("update {i} of the burst: "))
}

/// Parses and validates one message into the updates it carries, in the order to apply them.
pub fn parse_message(routing_key: &str, body: &[u8]) -> Result<Vec<(Key, Update)>, MessageError> {
    let routing_key = Key::parse(routing_key).map_err(MessageError::InvalidRoutingKey)?;
    if body.len() > MAX_BURST_BYTES {
        return Err(MessageError::TooLarge { bytes: body.len(), max: MAX_BURST_BYTES });
    }
    let value = json::parse(body).map_err(parse_error)?;
    match value {
        Value::Object(_) => {
            if body.len() > MAX_UPDATE_BYTES {
                return Err(MessageError::Update {
                    index: None,
                    source: UpdateError::TooLarge { bytes: body.len(), max: MAX_UPDATE_BYTES },
                });
            }
            if routing_key.is_namespace() {
                return Err(MessageError::NamespaceKey { index: None, key: routing_key });
            }
            let update =
                Update::from_json(&value).map_err(|source| MessageError::Update { index: None, source })?;
            Ok(vec![(routing_key, update)])
        }
        Value::Array(items) => parse_burst(&routing_key, items),
        _ => Err(MessageError::NotAnObjectOrArray),
    }
}

fn parse_error(err: ParseError) -> MessageError {
    match err {
        ParseError::OutOfRange(position) if position.element.is_some() || position.field.is_some() => {
            MessageError::Update {
                index: position.element,
                source: UpdateError::from_parse(ParseError::OutOfRange(position)),
            }
        }
        ParseError::OutOfRange(_) => MessageError::InvalidJson { detail: OUT_OF_RANGE.to_owned() },
        ParseError::Syntax(detail) => MessageError::InvalidJson { detail },
    }
}

fn parse_burst(routing_key: &Key, items: Vec<Value>) -> Result<Vec<(Key, Update)>, MessageError> {
    if items.is_empty() {
        return Err(MessageError::EmptyBurst);
    }
    if items.len() > MAX_BURST_UPDATES {
        return Err(MessageError::TooManyUpdates { count: items.len(), max: MAX_BURST_UPDATES });
    }
    let mut out = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let update_error = |source| MessageError::Update { index: Some(index), source };
        let bytes = json_len(&item);
        let Value::Object(mut fields) = item else {
            return Err(update_error(UpdateError::NotAnObject));
        };
        if bytes > MAX_UPDATE_BYTES {
            return Err(update_error(UpdateError::TooLarge { bytes, max: MAX_UPDATE_BYTES }));
        }
        let key = match fields.remove("key") {
            Some(Value::String(key)) => {
                Key::parse(&key).map_err(|source| MessageError::InvalidKey { index, source })?
            }
            Some(other) => {
                return Err(update_error(UpdateError::Field {
                    field: "key".to_owned(),
                    problem: format!("must be a string holding the progress key, got {}", describe(&other)),
                }));
            }
            None => {
                return Err(update_error(UpdateError::Field {
                    field: "key".to_owned(),
                    problem: "is required in every update of a burst".to_owned(),
                }));
            }
        };
        if !routing_key.contains(&key) {
            return Err(MessageError::OutsideSubtree { index, key, routing_key: routing_key.clone() });
        }
        if key.is_namespace() {
            return Err(MessageError::NamespaceKey { index: Some(index), key });
        }
        let update = Update::from_json(&Value::Object(fields)).map_err(update_error)?;
        out.push((key, update));
    }
    Ok(out)
}

fn encode_element(key: &Key, update: &Update) -> Vec<u8> {
    let mut map = update.to_map();
    map.insert("key".to_owned(), Value::String(key.as_str().to_owned()));
    // Serializing a Value into memory cannot fail.
    serde_json::to_vec(&Value::Object(map)).unwrap_or_default()
}

/// Encodes updates as one burst body, the inverse of [`parse_message`] for arrays. The caller
/// picks a routing key that contains every key ([`Key::common_prefix`]) and keeps within
/// [`MAX_BURST_UPDATES`] and [`MAX_BURST_BYTES`] (or uses [`encode_bursts`]). An empty slice
/// encodes as `[]`, which receivers refuse.
pub fn encode_burst(updates: &[(Key, Update)]) -> Vec<u8> {
    let mut body = vec![b'['];
    for (i, (key, update)) in updates.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend(encode_element(key, update));
    }
    body.push(b']');
    body
}

/// Like [`encode_burst`], split into as few bodies as the burst limits allow, order kept.
pub fn encode_bursts(updates: &[(Key, Update)]) -> Vec<Vec<u8>> {
    let mut bursts = Vec::new();
    let mut current = Vec::new();
    let mut count = 0;
    for (key, update) in updates {
        let element = encode_element(key, update);
        // One byte for the separator, one for the closing bracket.
        let full = count == MAX_BURST_UPDATES || current.len() + element.len() + 2 > MAX_BURST_BYTES;
        if count > 0 && full {
            current.push(b']');
            bursts.push(std::mem::take(&mut current));
            count = 0;
        }
        current.push(if count == 0 { b'[' } else { b',' });
        current.extend(element);
        count += 1;
    }
    if count > 0 {
        current.push(b']');
        bursts.push(current);
    }
    bursts
}

#[cfg(test)]
mod namespace_tests {
    use super::*;

    #[test]
    fn namespace_keys_are_refused_but_may_route_bursts() {
        let err = parse_message("_portal", br#"{"progress": 0.5}"#).unwrap_err();
        assert_eq!(err.to_string(), "key \"_portal\" is a namespace; post progress to a key below it");
        let err = parse_message("_r", br#"[{"key": "_r.a._b", "progress": 1}]"#).unwrap_err();
        assert!(matches!(err, MessageError::NamespaceKey { index: Some(0), .. }), "{err}");
        assert_eq!(parse_message("_r", br#"[{"key": "_r.a", "progress": 1}]"#).unwrap().len(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(s: &str) -> Key {
        Key::parse(s).unwrap()
    }

    fn parse(routing_key: &str, body: &str) -> Result<Vec<(Key, Update)>, MessageError> {
        parse_message(routing_key, body.as_bytes())
    }

    #[test]
    fn sca_body_updates_the_routing_key() {
        let out = parse("_sca.job1", r#"{"progress": 0.5, "msg": "half"}"#).unwrap();
        assert_eq!(out, vec![(key("_sca.job1"), Update::new().progress(0.5).msg("half"))]);
        assert_eq!(parse("_sca.job1", "{}").unwrap(), vec![(key("_sca.job1"), Update::new())]);
    }

    #[test]
    fn burst_applies_in_order() {
        let body = r#"[
            {"key": "job", "status": "running"},
            {"key": "job.a.b", "progress": 0.1},
            {"key": "job.a.b", "progress": 0.2, "x": "y"}
        ]"#;
        let out = parse("job", body).unwrap();
        assert_eq!(
            out,
            vec![
                (key("job"), Update::new().status("running")),
                (key("job.a.b"), Update::new().progress(0.1)),
                (key("job.a.b"), Update::new().progress(0.2).field("x", "y")),
            ]
        );
    }

    #[test]
    fn invalid_routing_key() {
        let err = parse("a..b", "{}").unwrap_err();
        assert_eq!(err, MessageError::InvalidRoutingKey(KeyError::EmptySegment { index: 1 }));
        assert_eq!(err.to_string(), "invalid routing key: key segment 1 is empty");
        assert!(matches!(
            parse("a.*", "{}"),
            Err(MessageError::InvalidRoutingKey(KeyError::InvalidChar { ch: '*', .. }))
        ));
    }

    #[test]
    fn burst_key_outside_subtree() {
        let err = parse("job.a", r#"[{"key": "job.a.x"}, {"key": "job.ab"}]"#).unwrap_err();
        assert_eq!(
            err,
            MessageError::OutsideSubtree { index: 1, key: key("job.ab"), routing_key: key("job.a") }
        );
        assert_eq!(
            err.to_string(),
            r#"update 1 of the burst: key "job.ab" is outside the subtree of routing key "job.a""#
        );
        assert!(matches!(
            parse("job.a", r#"[{"key": "job"}]"#),
            Err(MessageError::OutsideSubtree { index: 0, .. })
        ));
    }

    #[test]
    fn burst_key_must_be_a_valid_string() {
        let err = parse("job", r#"[{"key": "job"}, {"key": "job..x"}]"#).unwrap_err();
        assert_eq!(err, MessageError::InvalidKey { index: 1, source: KeyError::EmptySegment { index: 1 } });
        assert_eq!(err.to_string(), "update 1 of the burst: key segment 1 is empty");

        let err = parse("job", r#"[{"key": 5}]"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"update 0 of the burst: field "key": must be a string holding the progress key, got 5"#
        );
        let err = parse("job", r#"[{"key": ["job"]}]"#).unwrap_err();
        assert!(err.to_string().contains("got an array"), "{err}");
        let err = parse("job", r#"[{"progress": 1}]"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"update 0 of the burst: field "key": is required in every update of a burst"#
        );
    }

    #[test]
    fn burst_elements_are_validated() {
        let err = parse(
            "job",
            r#"[{"key": "job"}, {"key": "job"}, {"key": "job"}, {"key": "job.x", "progress": 1.5}]"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"update 3 of the burst: field "progress": must be a number between 0 and 1, got 1.5"#
        );
        assert!(matches!(err, MessageError::Update { index: Some(3), source: UpdateError::Field { .. } }));
        let err = parse("job", r#"[{"key": "job", "foo": {"a": 1}}]"#).unwrap_err();
        assert_eq!(err.to_string(), r#"update 0 of the burst: field "foo": nested objects are not allowed"#);
        let err = parse("job", r#"[{"key": "job"}, 3]"#).unwrap_err();
        assert_eq!(err, MessageError::Update { index: Some(1), source: UpdateError::NotAnObject });
        let err = parse("job", r#"[{"key": "job", "weight": 1e400}]"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"update 0 of the burst: field "weight": number is out of range; values must be finite numbers"#
        );
    }

    #[test]
    fn burst_element_limits() {
        // 64 fields besides "key" are fine, 65 are not.
        let mut element = serde_json::Map::new();
        element.insert("key".into(), json!("job"));
        for i in 0..64 {
            element.insert(format!("f{i}"), json!(i));
        }
        let body = Value::Array(vec![Value::Object(element.clone())]).to_string();
        assert_eq!(parse("job", &body).unwrap()[0].1.field_count(), 64);
        element.insert("f64".into(), json!(64));
        let body = Value::Array(vec![Value::Object(element)]).to_string();
        assert_eq!(
            parse("job", &body).unwrap_err(),
            MessageError::Update {
                index: Some(0),
                source: UpdateError::TooManyFields { count: 65, max: 64 }
            }
        );

        let big = json!([{"key": "job"}, {"key": "job", "blob": "z".repeat(MAX_UPDATE_BYTES)}]);
        assert!(matches!(
            parse("job", &big.to_string()),
            Err(MessageError::Update {
                index: Some(1),
                source: UpdateError::TooLarge { max: MAX_UPDATE_BYTES, .. }
            })
        ));
    }

    #[test]
    fn burst_count_limits() {
        let err = parse("job", "[]").unwrap_err();
        assert_eq!(err, MessageError::EmptyBurst);
        assert_eq!(err.to_string(), "burst is empty; send at least one update");

        let ok = Value::Array(vec![json!({"key": "job"}); MAX_BURST_UPDATES]).to_string();
        assert_eq!(parse("job", &ok).unwrap().len(), MAX_BURST_UPDATES);
        let too_many = Value::Array(vec![json!({"key": "job"}); MAX_BURST_UPDATES + 1]).to_string();
        let err = parse("job", &too_many).unwrap_err();
        assert_eq!(err, MessageError::TooManyUpdates { count: 4097, max: 4096 });
        assert_eq!(err.to_string(), "burst has 4097 updates; at most 4096 are allowed");
    }

    #[test]
    fn body_size_limits() {
        let huge = vec![b' '; MAX_BURST_BYTES + 1];
        let err = parse_message("job", &huge).unwrap_err();
        assert_eq!(err, MessageError::TooLarge { bytes: MAX_BURST_BYTES + 1, max: MAX_BURST_BYTES });
        assert_eq!(err.to_string(), "body has 8388609 bytes; at most 8388608 are allowed");
        // A single update keeps the per-update limit even though bursts may be bigger.
        let body = format!(r#"{{"a": "{}"}}"#, "x".repeat(MAX_UPDATE_BYTES));
        let err = parse("job", &body).unwrap_err();
        assert_eq!(
            err,
            MessageError::Update {
                index: None,
                source: UpdateError::TooLarge { bytes: body.len(), max: MAX_UPDATE_BYTES }
            }
        );
    }

    #[test]
    fn bodies_that_are_neither_object_nor_array() {
        for body in ["\"x\"", "1", "true", "null"] {
            let err = parse("job", body).unwrap_err();
            assert_eq!(err, MessageError::NotAnObjectOrArray, "{body}");
        }
        assert!(MessageError::NotAnObjectOrArray.to_string().starts_with("body must be a JSON object"));
        let err = parse("job", "{\"progress\": 0.5").unwrap_err();
        assert!(matches!(err, MessageError::InvalidJson { .. }));
        assert!(err.to_string().starts_with("body is not valid JSON: "), "{err}");
        assert!(matches!(parse("job", ""), Err(MessageError::InvalidJson { .. })));
        assert!(matches!(parse("job", "1e999"), Err(MessageError::InvalidJson { .. })));
    }

    #[test]
    fn single_update_errors_have_no_position() {
        let err = parse("job", r#"{"progress": 2}"#).unwrap_err();
        assert_eq!(err.to_string(), r#"field "progress": must be a number between 0 and 1, got 2"#);
        let err = parse("job", r#"{"progress": 2e400}"#).unwrap_err();
        assert_eq!(
            err,
            MessageError::Update {
                index: None,
                source: UpdateError::Field { field: "progress".into(), problem: OUT_OF_RANGE.into() }
            }
        );
        assert!(matches!(parse("job", r#"{"_x": 1}"#), Err(MessageError::Update { index: None, .. })));
    }

    #[test]
    fn encode_burst_round_trips() {
        let updates = vec![
            (key("_r.job"), Update::new().status("running").name("Job")),
            (key("_r.job.s1"), Update::new().progress(1.0).weight(0.0)),
            (key("_r.job.s1"), Update::new().field("bytes", 10).msg("done")),
        ];
        let body = encode_burst(&updates);
        assert_eq!(parse_message("_r.job", &body).unwrap(), updates);
        assert_eq!(encode_burst(&[]), b"[]");
    }

    #[test]
    fn encode_bursts_respects_limits() {
        let updates: Vec<(Key, Update)> =
            (0..MAX_BURST_UPDATES + 10).map(|i| (key("job"), Update::new().field("i", i))).collect();
        let bursts = encode_bursts(&updates);
        assert_eq!(bursts.len(), 2);
        let decoded: Vec<(Key, Update)> =
            bursts.iter().flat_map(|body| parse_message("job", body).unwrap()).collect();
        assert_eq!(decoded, updates);

        let blob = "b".repeat(60_000);
        let updates: Vec<(Key, Update)> = (0..300)
            .map(|i| (key("job.x"), Update::new().field("i", i).field("blob", blob.as_str())))
            .collect();
        let bursts = encode_bursts(&updates);
        assert!(bursts.len() >= 3, "{}", bursts.len());
        let mut decoded = Vec::new();
        for body in &bursts {
            assert!(body.len() <= MAX_BURST_BYTES);
            decoded.extend(parse_message("job", body).unwrap());
        }
        assert_eq!(decoded, updates);
        assert!(encode_bursts(&[]).is_empty());
    }
}
