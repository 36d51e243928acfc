//! The request domain, pure and free of I/O: the lifecycle [`RequestState`]s, validation of a
//! client's [`Submission`] (`POST /v1/requests`) and its idempotency fingerprint, request ids,
//! the [`RequestRecord`] stored as a Redis hash together with its field names, the retry policy
//! ([`Backoff`] with full jitter, [`next_step`]) and the lease timings a processor keeps while a
//! request runs. Services do the I/O; this crate decides what is valid and what happens next.

pub mod lease;
pub mod record;
pub mod retry;
pub mod state;
pub mod streams;
pub mod submit;

pub use lease::{LeaseError, LeaseSettings, MIN_RECLAIM_INTERVAL};
pub use record::{RecordError, RequestRecord, fields};
pub use retry::{Backoff, Failure, Next, next_step};
pub use state::{ParseStateError, RequestState};
pub use streams::{MAX_STREAMS, StreamInfo, check_stream_name};
pub use submit::{
    DEFAULT_MAX_ATTEMPTS, MAX_HANDLER_CHARS, MAX_IDEMPOTENCY_KEY_CHARS, MAX_MAX_ATTEMPTS, MAX_PAYLOAD_BYTES,
    MAX_SUBMISSION_BYTES, MAX_TIMEOUT_MS, Submission, SubmitError, default_progress_key, is_valid_request_id,
    new_request_id,
};
