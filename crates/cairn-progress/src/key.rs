//! Progress keys: validated dotted paths such as `_portal.job123.step2`.
//!
//! A segment starting with `_` is a namespace. Progress never rolls up into a namespace, so the
//! tree structure (what [`Key::parent`] returns) stops below it: `_portal.job123` is a root.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most segments a key may have.
pub const MAX_SEGMENTS: usize = 16;
/// Most characters in one segment.
pub const MAX_SEGMENT_LEN: usize = 64;
/// Most bytes in a whole key, dots included.
pub const MAX_KEY_BYTES: usize = 512;

/// Why a string is not a valid [`Key`]. Segment indexes count from 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is empty; a key is 1 to {MAX_SEGMENTS} segments separated by '.'")]
    Empty,
    #[error("key has {bytes} bytes; at most {MAX_KEY_BYTES} are allowed")]
    TooLong { bytes: usize },
    #[error("key has {count} segments; at most {MAX_SEGMENTS} are allowed")]
    TooManySegments { count: usize },
    #[error("key segment {index} is empty")]
    EmptySegment { index: usize },
    #[error("key segment {index} has {len} characters; at most {MAX_SEGMENT_LEN} are allowed")]
    SegmentTooLong { index: usize, len: usize },
    #[error(
        "key contains '{}' in segment {index}; segments may only use A-Z a-z 0-9 _ -",
        ch.escape_debug()
    )]
    InvalidChar { index: usize, ch: char },
}

/// A validated progress key: 1–16 segments of 1–64 `[A-Za-z0-9_-]` characters joined by `.`,
/// at most 512 bytes. Orders and compares as its string; serializes as a plain JSON string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

impl Key {
    /// Validates `s` and wraps it.
    pub fn parse(s: &str) -> Result<Key, KeyError> {
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        if s.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong { bytes: s.len() });
        }
        let count = s.split('.').count();
        if count > MAX_SEGMENTS {
            return Err(KeyError::TooManySegments { count });
        }
        for (index, segment) in s.split('.').enumerate() {
            if segment.is_empty() {
                return Err(KeyError::EmptySegment { index });
            }
            if let Some(ch) = segment.chars().find(|c| !is_key_char(*c)) {
                return Err(KeyError::InvalidChar { index, ch });
            }
            // Only ASCII is left, so bytes are characters.
            if segment.len() > MAX_SEGMENT_LEN {
                return Err(KeyError::SegmentTooLong { index, len: segment.len() });
            }
        }
        Ok(Key(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }

    /// Number of segments.
    pub fn depth(&self) -> usize {
        self.0.bytes().filter(|b| *b == b'.').count() + 1
    }

    pub fn last_segment(&self) -> &str {
        match self.0.rfind('.') {
            Some(dot) => &self.0[dot + 1..],
            None => &self.0,
        }
    }

    /// True when the last segment starts with `_` (`_portal`, `a._tmp`).
    pub fn is_namespace(&self) -> bool {
        self.last_segment().starts_with('_')
    }

    /// The node this key's progress rolls up into: the key without its last segment, or `None`
    /// when the key has one segment or that prefix is a namespace (`_portal.job123` is a root).
    pub fn parent(&self) -> Option<Key> {
        let dot = self.0.rfind('.')?;
        let parent = Key(self.0[..dot].to_owned());
        (!parent.is_namespace()).then_some(parent)
    }

    /// Parent, grandparent, … up to the root, nearest first.
    pub fn ancestors(&self) -> Vec<Key> {
        let mut out = Vec::new();
        let mut current = self.parent();
        while let Some(key) = current {
            current = key.parent();
            out.push(key);
        }
        out
    }

    /// The top of this key's tree (the key itself when it has no parent).
    pub fn root(&self) -> Key {
        let mut key = self.clone();
        while let Some(parent) = key.parent() {
            key = parent;
        }
        key
    }

    /// The routing key a producer's burst holding this key is sent with: the key's tree
    /// [root](Key::root), or the namespace that root sits in (`_requests.abc` and `_requests.xyz`
    /// both travel as `_requests`). A namespace holds many small trees (one per request, one per
    /// portal job), and one burst for all of them costs the broker one message instead of one per
    /// tree. Every key with one route goes to one shard queue, so their order is kept.
    pub fn burst_route(&self) -> Key {
        let root = self.root();
        match root.0.rfind('.') {
            // a root with a dot sits directly under a namespace (its name-parent)
            Some(dot) => Key(root.0[..dot].to_owned()),
            None => root,
        }
    }

    /// True when `other` is this key or lies below it, segment-wise (`a.b` does not contain
    /// `a.bc`). Purely by name: it also holds across namespace boundaries (`a` contains `a._x.y`).
    pub fn contains(&self, other: &Key) -> bool {
        match other.0.strip_prefix(self.0.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('.'),
            None => false,
        }
    }

    /// The longest key that [contains](Key::contains) both, by name; `None` when even the first
    /// segments differ. Producers use it as the routing key of a burst.
    pub fn common_prefix(&self, other: &Key) -> Option<Key> {
        let mut len = 0;
        for (a, b) in self.segments().zip(other.segments()) {
            if a != b {
                break;
            }
            len += a.len() + usize::from(len > 0);
        }
        (len > 0).then(|| Key(self.0[..len].to_owned()))
    }

    /// This key extended by one segment.
    pub fn child(&self, segment: &str) -> Result<Key, KeyError> {
        Key::parse(&format!("{}.{segment}", self.0))
    }
}

impl FromStr for Key {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Key, KeyError> {
        Key::parse(s)
    }
}

impl TryFrom<&str> for Key {
    type Error = KeyError;

    fn try_from(s: &str) -> Result<Key, KeyError> {
        Key::parse(s)
    }
}

impl TryFrom<String> for Key {
    type Error = KeyError;

    fn try_from(s: String) -> Result<Key, KeyError> {
        Key::parse(&s)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<Key> for String {
    fn from(key: Key) -> String {
        key.0
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        let s = String::deserialize(deserializer)?;
        Key::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key::parse(s).unwrap()
    }

    #[test]
    fn accepts_valid_keys() {
        for s in ["a", "_portal.job123", "A-b_c.9", "x.y.z", &"s".repeat(64)] {
            assert_eq!(Key::parse(s).unwrap().as_str(), s);
        }
        let sixteen = vec!["ab"; 16].join(".");
        assert_eq!(key(&sixteen).depth(), 16);
        let max_bytes = [vec!["a".repeat(64); 7], vec!["b".repeat(57)]].concat().join(".");
        assert_eq!(max_bytes.len(), MAX_KEY_BYTES);
        assert!(Key::parse(&max_bytes).is_ok());
    }

    #[test]
    fn rejects_empty_key() {
        let err = Key::parse("").unwrap_err();
        assert_eq!(err, KeyError::Empty);
        assert!(err.to_string().contains("key is empty"));
    }

    #[test]
    fn rejects_too_long_key() {
        let s = [vec!["a".repeat(64); 7], vec!["b".repeat(58)]].concat().join(".");
        let err = Key::parse(&s).unwrap_err();
        assert_eq!(err, KeyError::TooLong { bytes: 513 });
        assert_eq!(err.to_string(), "key has 513 bytes; at most 512 are allowed");
    }

    #[test]
    fn rejects_too_many_segments() {
        let err = Key::parse(&vec!["a"; 17].join(".")).unwrap_err();
        assert_eq!(err, KeyError::TooManySegments { count: 17 });
        assert_eq!(err.to_string(), "key has 17 segments; at most 16 are allowed");
    }

    #[test]
    fn rejects_empty_segments() {
        assert_eq!(Key::parse("a..b").unwrap_err(), KeyError::EmptySegment { index: 1 });
        assert_eq!(Key::parse(".a").unwrap_err(), KeyError::EmptySegment { index: 0 });
        let err = Key::parse("a.").unwrap_err();
        assert_eq!(err, KeyError::EmptySegment { index: 1 });
        assert_eq!(err.to_string(), "key segment 1 is empty");
    }

    #[test]
    fn rejects_long_segments() {
        let err = Key::parse(&format!("a.b.{}", "x".repeat(70))).unwrap_err();
        assert_eq!(err, KeyError::SegmentTooLong { index: 2, len: 70 });
        assert_eq!(err.to_string(), "key segment 2 has 70 characters; at most 64 are allowed");
    }

    #[test]
    fn rejects_invalid_characters() {
        let err = Key::parse("a.b/c").unwrap_err();
        assert_eq!(err, KeyError::InvalidChar { index: 1, ch: '/' });
        assert_eq!(err.to_string(), "key contains '/' in segment 1; segments may only use A-Z a-z 0-9 _ -");
        for (s, ch) in [("a b", ' '), ("é", 'é'), ("a*", '*'), ("a.#", '#'), ("x\n", '\n')] {
            match Key::parse(s).unwrap_err() {
                KeyError::InvalidChar { ch: found, .. } => assert_eq!(found, ch, "{s:?}"),
                other => panic!("{s:?}: unexpected {other:?}"),
            }
        }
        assert!(Key::parse("x\n").unwrap_err().to_string().contains("'\\n'"));
    }

    #[test]
    fn namespace_and_parents() {
        assert!(key("_portal").is_namespace());
        assert!(key("a._b").is_namespace());
        assert!(!key("_a.b").is_namespace());

        assert_eq!(key("a.b").parent(), Some(key("a")));
        assert_eq!(key("a").parent(), None);
        assert_eq!(key("_portal.job123").parent(), None);
        assert_eq!(key("a._b.c").parent(), None);
        assert_eq!(key("a._b").parent(), Some(key("a")));
        assert_eq!(key("_test.scott1.task1").parent(), Some(key("_test.scott1")));
    }

    #[test]
    fn ancestors_and_root() {
        assert_eq!(key("_ns.a.b.c").ancestors(), vec![key("_ns.a.b"), key("_ns.a")]);
        assert_eq!(key("_ns.a.b.c").root(), key("_ns.a"));
        assert_eq!(key("x.y").ancestors(), vec![key("x")]);
        assert_eq!(key("x").ancestors(), Vec::<Key>::new());
        assert_eq!(key("x").root(), key("x"));
        assert_eq!(key("a._b.c.d").root(), key("a._b.c"));
    }

    #[test]
    fn bursts_route_by_root_or_its_namespace() {
        assert_eq!(key("job.step.sub").burst_route(), key("job"));
        assert_eq!(key("job").burst_route(), key("job"));
        assert_eq!(key("_requests.abc").burst_route(), key("_requests"));
        assert_eq!(key("_ns.a.b.c").burst_route(), key("_ns"));
        assert_eq!(key("a._b.c.d").burst_route(), key("a._b"));
        for k in ["job.step.sub", "_requests.abc", "_ns.a.b.c", "a._b.c.d"] {
            assert!(key(k).burst_route().contains(&key(k)), "{k}");
        }
    }

    #[test]
    fn segments_and_depth() {
        let k = key("_ns.job.step");
        assert_eq!(k.segments().collect::<Vec<_>>(), ["_ns", "job", "step"]);
        assert_eq!(k.depth(), 3);
        assert_eq!(k.last_segment(), "step");
        assert_eq!(key("solo").last_segment(), "solo");
        assert_eq!(k.child("x").unwrap(), key("_ns.job.step.x"));
        assert!(k.child("x.").is_err());
    }

    #[test]
    fn contains_is_segment_wise() {
        assert!(key("a.b").contains(&key("a.b")));
        assert!(key("a.b").contains(&key("a.b.c")));
        assert!(!key("a.b").contains(&key("a.bc")));
        assert!(!key("a.b").contains(&key("a")));
        assert!(!key("a.b").contains(&key("b.a.b")));
    }

    #[test]
    fn common_prefix_is_segment_wise() {
        assert_eq!(key("a.b.c").common_prefix(&key("a.b.d")), Some(key("a.b")));
        assert_eq!(key("a.b").common_prefix(&key("a.b.c")), Some(key("a.b")));
        assert_eq!(key("a.bc").common_prefix(&key("a.b")), Some(key("a")));
        assert_eq!(key("x").common_prefix(&key("x")), Some(key("x")));
        assert_eq!(key("a.b").common_prefix(&key("b.b")), None);
    }

    #[test]
    fn serde_round_trip_as_string() {
        let k = key("_portal.job1");
        assert_eq!(serde_json::to_string(&k).unwrap(), "\"_portal.job1\"");
        let back: Key = serde_json::from_str("\"_portal.job1\"").unwrap();
        assert_eq!(back, k);
        let err = serde_json::from_str::<Key>("\"a..b\"").unwrap_err();
        assert!(err.to_string().contains("key segment 1 is empty"), "{err}");
        assert_eq!("a.b".parse::<Key>().unwrap().to_string(), "a.b");
    }
}
