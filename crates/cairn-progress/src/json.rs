//! JSON parsing that can say which field broke it.
//!
//! serde_json refuses numbers beyond f64 (`1e400`) with a bare "number out of range at line 1
//! column 17". Users need the field name, so on that error the body is walked a second time
//! with a visitor that records the burst element and update field it was in when parsing failed.

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Where in a body (an update object, or a burst array of them) parsing stopped.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Position {
    /// Index of the burst element, when the body is an array.
    pub element: Option<usize>,
    /// Top-level field of the update object (nested values report their enclosing field).
    pub field: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ParseError {
    /// A number does not fit in an f64.
    OutOfRange(Position),
    /// Any other syntax error, as serde_json describes it.
    Syntax(String),
}

/// What an update field says when its number does not fit in an f64.
pub(crate) const OUT_OF_RANGE: &str = "number is out of range; values must be finite numbers";

pub(crate) fn parse(bytes: &[u8]) -> Result<Value, ParseError> {
    serde_json::from_slice(bytes).map_err(|err| {
        if err.to_string().starts_with("number out of range")
            || non_finite_at(bytes, err.line(), err.column())
        {
            ParseError::OutOfRange(locate(bytes))
        } else {
            ParseError::Syntax(err.to_string())
        }
    })
}

/// Whether the parser stopped at `NaN` or an infinity (which some encoders write although JSON
/// has no such numbers): then the field gets named like any other number out of range.
fn non_finite_at(bytes: &[u8], line: usize, column: usize) -> bool {
    if line == 0 {
        return false;
    }
    let line_start = if line == 1 {
        0
    } else {
        match bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(line - 2) {
            Some((at, _)) => at + 1,
            None => return false,
        }
    };
    // serde_json points at, or just after, the first byte it could not take.
    let at = line_start + column;
    (at.saturating_sub(2)..=at).any(|start| {
        let rest = bytes.get(start..).unwrap_or_default();
        [&b"NaN"[..], b"Infinity", b"-Infinity", b"+Infinity", b"-NaN"]
            .iter()
            .any(|token| rest.starts_with(token))
    })
}

fn locate(bytes: &[u8]) -> Position {
    let position = RefCell::new(Position::default());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    // The walk is expected to fail at the bad number; what matters is where it stopped.
    let _ = Locate { position: &position, level: Level::Top }.deserialize(&mut de);
    position.into_inner()
}

#[derive(Clone, Copy, PartialEq)]
enum Level {
    /// The body itself: an update object or a burst array.
    Top,
    /// One element of a burst array.
    Element,
    /// Anything inside a field value.
    Nested,
}

struct Locate<'a> {
    position: &'a RefCell<Position>,
    level: Level,
}

impl Locate<'_> {
    fn at(&self, level: Level) -> Self {
        Locate { position: self.position, level }
    }
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let is_update = self.level != Level::Nested;
        while let Some(name) = map.next_key::<String>()? {
            if is_update {
                self.position.borrow_mut().field = Some(name);
            }
            map.next_value_seed(self.at(Level::Nested))?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let top = self.level == Level::Top;
        let mut index = 0;
        loop {
            if top {
                let mut position = self.position.borrow_mut();
                position.element = Some(index);
                position.field = None;
            }
            let level = if top { Level::Element } else { Level::Nested };
            if seq.next_element_seed(self.at(level))?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out_of_range(body: &str) -> Position {
        match parse(body.as_bytes()) {
            Err(ParseError::OutOfRange(position)) => position,
            other => panic!("{body}: expected out of range, got {other:?}"),
        }
    }

    #[test]
    fn parses_valid_json() {
        assert_eq!(parse(br#"{"a": [1, 2.5]}"#).unwrap(), serde_json::json!({"a": [1, 2.5]}));
    }

    #[test]
    fn syntax_errors_keep_serde_detail() {
        match parse(b"{\"a\": ").unwrap_err() {
            ParseError::Syntax(detail) => assert!(detail.contains("EOF"), "{detail}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn locates_out_of_range_numbers() {
        assert_eq!(
            out_of_range(r#"{"progress": 1e400}"#),
            Position { element: None, field: Some("progress".into()) }
        );
        assert_eq!(
            out_of_range(r#"{"a": 1, "b": {"c": [1, -1e999]}}"#),
            Position { element: None, field: Some("b".into()) }
        );
        assert_eq!(
            out_of_range(r#"[{"key": "a", "x": 1}, "s", [1], {"key": "a.b", "weight": 2e308}]"#),
            Position { element: Some(3), field: Some("weight".into()) }
        );
        assert_eq!(out_of_range("1e400"), Position::default());
        assert_eq!(out_of_range("[1, 1e400]"), Position { element: Some(1), field: None });
    }
}
