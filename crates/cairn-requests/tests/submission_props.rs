//! Property tests of submissions: whatever a client sends, parsing never panics, and every
//! refusal says what is wrong: the field it names, the JSON problem, or the size.

use cairn_requests::{Submission, SubmitError};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Values of every JSON type, including extreme and nested ones.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(Value::from),
        Just(json!(1e308)),
        Just(json!(u64::MAX)),
        ".{0,40}".prop_map(Value::from),
        "_?[A-Za-z0-9_.-]{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects that mostly use the submission's own field names, with values of any type.
fn submission_like() -> impl Strategy<Value = Value> {
    let name = prop_oneof![
        Just("handler".to_owned()),
        Just("payload".to_owned()),
        Just("progress_key".to_owned()),
        Just("max_attempts".to_owned()),
        Just("timeout_ms".to_owned()),
        Just("idempotency_key".to_owned()),
        "[a-z_]{1,12}",
    ];
    prop::collection::btree_map(name, value(), 0..7)
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()))
}

fn explains_itself(error: &SubmitError) -> bool {
    let text = error.to_string();
    match error {
        SubmitError::Field { field, problem } => !problem.is_empty() && text.contains(&**field),
        _ => !text.is_empty(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Err(error) = Submission::from_slice(&bytes) {
            prop_assert!(explains_itself(&error), "{error:?}");
        }
    }

    #[test]
    fn submission_like_objects_are_accepted_or_refused_naming_the_field(body in submission_like()) {
        match Submission::from_slice(body.to_string().as_bytes()) {
            Ok(submission) => {
                // Accepted: the fields it holds are the ones sent, within their rules.
                prop_assert_eq!(Some(submission.handler.as_str()), body["handler"].as_str());
                if let Some(key) = &submission.progress_key {
                    prop_assert!(!key.is_namespace(), "a namespace progress_key was accepted: {key}");
                }
            }
            Err(error) => prop_assert!(explains_itself(&error), "{error:?} for {body}"),
        }
    }
}
