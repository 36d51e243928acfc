//! JSON parsing that can say which field broke it.
//!
//! serde_json refuses numbers beyond f64 (`1e400`) with a bare "number out of range at line 1
//! column 17". Users need the field name, so on that error the body is walked a second time
//! with a visitor that records the burst element and update field it was in when parsing failed.
//! serde_json's `Error` has no code telling that error from other syntax errors, and its text is
//! not a contract, so the error is recognised by what the body holds where parsing stopped.

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
        if err.is_syntax() && bad_number_at(bytes, err.line(), err.column()) {
            ParseError::OutOfRange(locate(bytes))
        } else {
            ParseError::Syntax(err.to_string())
        }
    })
}

/// Whether parsing stopped at a number an f64 cannot hold: a literal beyond f64's range (serde_json
/// stops right after it), or `NaN` or an infinity, which some encoders write although JSON has no
/// such numbers (serde_json stops at, or just after, its first byte). Then the field gets named.
fn bad_number_at(bytes: &[u8], line: usize, column: usize) -> bool {
    let Some(at) = offset(bytes, line, column) else { return false };
    out_of_range_before(bytes, at) || non_finite_at(bytes, at)
}

/// The byte offset of serde_json's `line` (from 1) and `column` (bytes consumed on that line).
fn offset(bytes: &[u8], line: usize, column: usize) -> Option<usize> {
    let line_start = match line {
        0 => return None,
        1 => 0,
        _ => bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(line - 2)?.0 + 1,
    };
    Some(line_start + column)
}

/// Whether the bytes just before `at` end a number literal that is a value of its own (not the
/// inside of a string) and overflows an f64.
fn out_of_range_before(bytes: &[u8], at: usize) -> bool {
    let is_number_byte = |b: &u8| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E');
    let Some(before) = bytes.get(..at) else { return false };
    let start = before.iter().rposition(|b| !is_number_byte(b)).map_or(0, |i| i + 1);
    let starts_a_value =
        start == 0 || matches!(before[start - 1], b'[' | b',' | b':' | b' ' | b'\t' | b'\n' | b'\r');
    let literal = &before[start..];
    starts_a_value
        && !literal.is_empty()
        && std::str::from_utf8(literal)
            .ok()
            .and_then(|text| text.parse::<f64>().ok())
            .is_some_and(f64::is_infinite)
}

fn non_finite_at(bytes: &[u8], at: usize) -> bool {
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
    fn only_numbers_out_of_range_are_out_of_range() {
        for body in [
            "{\"a\": \"1e400",
            "{\"a\": \"x\"\n\"1e400\"}",
            "[1, 2 3]",
            "{\"a\": 1e30 }x",
            "{\"a\": 1e-400, }",
            "",
        ] {
            assert!(
                matches!(parse(body.as_bytes()), Err(ParseError::Syntax(_))),
                "{body}: {:?}",
                parse(body.as_bytes())
            );
        }
        assert_eq!(parse(b"[1e-400]").unwrap(), serde_json::json!([0.0]), "underflow is zero, not an error");
        assert_eq!(out_of_range(&format!("{{\"big\": 1{}}}", "0".repeat(400))).field.as_deref(), Some("big"));
        assert_eq!(out_of_range("{\"a\": 1,\n \"b\":\n-1.5E+400}").field.as_deref(), Some("b"));
        assert_eq!(out_of_range("{\"e\": 1e99999999999999999999}").field.as_deref(), Some("e"));
        assert_eq!(out_of_range("{\"n\": NaN}").field.as_deref(), Some("n"));
        assert_eq!(out_of_range("{\"n\": -Infinity}").field.as_deref(), Some("n"));
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
