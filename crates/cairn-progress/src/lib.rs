//! The progress domain, pure and free of I/O: validated dotted [`Key`]s, field [`Update`]s and
//! their limits, parsing of AMQP progress messages (SCA's one-object body and Cairn's bursts),
//! the weighted roll-up maths in [`aggregate`], and [`Tree`], an in-memory reference model of
//! the aggregation semantics that every store (the Redis Lua scripts in particular) must match.

pub mod aggregate;
mod json;
pub mod key;
pub mod message;
pub mod model;
pub mod update;
pub mod view;

pub use aggregate::{DEFAULT_WEIGHT, EPSILON, contribution, rollup};
pub use key::{Key, KeyError, MAX_KEY_BYTES, MAX_SEGMENT_LEN, MAX_SEGMENTS};
pub use message::{
    MAX_BURST_BYTES, MAX_BURST_UPDATES, MessageError, encode_burst, encode_bursts, parse_message,
};
pub use model::{ETA_SAMPLE_MS, Node, Pace, Tree};
/// Milliseconds since the Unix epoch by the wall clock: the time of every update, record, lease
/// and event Cairn stores (0 for a clock before 1970). The one clock every crate reads, so
/// times written by different services compare.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub use update::{
    MAX_FIELD_NAME_LEN, MAX_MSG_BYTES, MAX_NAME_CHARS, MAX_STATUS_CHARS, MAX_UPDATE_BYTES, MAX_UPDATE_FIELDS,
    SERVER_FIELDS, Update, UpdateError, WELL_KNOWN_STATUSES,
};
