//! Property tests of keys and messages: valid keys round-trip and their ancestry agrees with
//! `contains`, encoded bursts parse back to what was encoded, and arbitrary bytes never panic.

use cairn_progress::{Key, MessageError, Update, encode_burst, encode_bursts, parse_message};
use proptest::prelude::*;
use serde_json::Value;

fn segment() -> impl Strategy<Value = String> {
    "_?[A-Za-z0-9_-]{1,8}"
}

fn key_strategy() -> impl Strategy<Value = Key> {
    prop::collection::vec(segment(), 1..=6)
        .prop_map(|segments| Key::parse(&segments.join(".")).expect("generated keys are valid"))
}

fn update_strategy() -> impl Strategy<Value = Update> {
    (
        // Short decimals: serde_json's default float parsing is exact for them.
        prop::option::of((0..=1000u32).prop_map(|n| f64::from(n) / 1000.0)),
        prop::option::of((0..1_000_000u32).prop_map(|n| f64::from(n) / 100.0)),
        prop::option::of("[a-z]{1,10}"),
        prop::option::of(".{0,20}"),
        prop::collection::btree_map(
            "[a-z][a-z0-9_-]{0,10}",
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                (-1_000_000_000i64..1_000_000_000).prop_map(|n| Value::from(n as f64 / 1000.0)),
                ".{0,12}".prop_map(Value::from),
            ],
            0..5,
        ),
    )
        .prop_map(|(progress, weight, status, msg, extra)| {
            let mut update = Update::new();
            update.progress = progress;
            update.weight = weight;
            update.status = status;
            update.msg = msg;
            for (name, value) in extra {
                let reserved = ["progress", "weight", "status", "msg", "name"]
                    .iter()
                    .chain(&cairn_progress::SERVER_FIELDS)
                    .any(|r| *r == name);
                if !reserved {
                    update = update.field(name, value);
                }
            }
            update
        })
}

proptest! {
    #[test]
    fn keys_round_trip_and_nest(key in key_strategy()) {
        let parsed = Key::parse(key.as_str()).unwrap();
        prop_assert_eq!(&parsed, &key);
        prop_assert_eq!(key.segments().count(), key.depth());
        let ancestors = key.ancestors();
        for ancestor in &ancestors {
            prop_assert!(ancestor.contains(&key));
            prop_assert!(!ancestor.is_namespace());
        }
        prop_assert_eq!(ancestors.last().cloned().unwrap_or_else(|| key.clone()), key.root());
        prop_assert_eq!(key.parent(), ancestors.first().cloned());
    }

    #[test]
    fn bursts_round_trip(
        root in key_strategy(),
        items in prop::collection::vec((prop::collection::vec(segment(), 0..3), update_strategy()), 1..20),
    ) {
        let updates: Vec<(Key, Update)> = items
            .into_iter()
            .filter_map(|(suffix, update)| {
                let mut key = root.clone();
                for s in suffix {
                    key = key.child(&s).ok()?;
                }
                // Namespaces are boundaries, never written to (they are refused; see below).
                (!key.is_namespace()).then_some((key, update))
            })
            .collect();
        prop_assume!(!updates.is_empty());
        let parsed = parse_message(root.as_str(), &encode_burst(&updates)).unwrap();
        prop_assert_eq!(&parsed, &updates);
        let split: Vec<(Key, Update)> = encode_bursts(&updates)
            .iter()
            .flat_map(|body| parse_message(root.as_str(), body).unwrap())
            .collect();
        prop_assert_eq!(split, updates);
    }

    #[test]
    fn single_updates_round_trip(key in key_strategy(), update in update_strategy()) {
        let body = serde_json::to_vec(&update.to_json()).unwrap();
        prop_assert_eq!(Update::from_slice(&body).unwrap(), update.clone());
        if key.is_namespace() {
            let refused = matches!(parse_message(key.as_str(), &body), Err(MessageError::NamespaceKey { .. }));
            prop_assert!(refused, "a namespace key is refused as a write target");
        } else {
            prop_assert_eq!(parse_message(key.as_str(), &body).unwrap(), vec![(key, update)]);
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic(routing_key in ".{0,20}", body in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_message(&routing_key, &body);
        let _ = Update::from_slice(&body);
    }

    #[test]
    fn json_shaped_bodies_never_panic(body in r#"[\[\]{}",:0-9a-z. e+-]{0,60}"#) {
        match parse_message("job", body.as_bytes()) {
            Ok(updates) => prop_assert!(!updates.is_empty()),
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }
}

#[test]
fn out_of_subtree_is_reported_before_field_errors_of_later_elements() {
    let body = br#"[{"key": "a.b"}, {"key": "z"}, {"key": "a", "progress": 5}]"#;
    assert!(matches!(parse_message("a", body), Err(MessageError::OutsideSubtree { index: 1, .. })));
}
