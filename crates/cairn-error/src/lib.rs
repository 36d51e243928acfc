//! The kinds of failure every Cairn interface speaks, and the one table that maps each to an HTTP
//! status, a gRPC code and whether the same call may succeed later (quickwit's
//! `ServiceErrorCode`).
//!
//! Each domain error says which kind it is ([`ServiceError`]); transports never look at a domain
//! error's variants or its text: REST answers `kind.http_status()`, gRPC `kind.grpc_code()`, and a
//! consumer retries what [`ErrorKind::is_retryable`] and dead-letters the rest. A transport shows
//! the caller a domain error's own message for the caller's mistakes
//! ([`ErrorKind::is_caller_error`]); for the rest it logs the message and answers in general
//! terms (unless the error's message is written for users), so internals never leak.

mod backoff;

pub use backoff::{Backoff, Retries};
use http::StatusCode;
use tonic::Code;

/// What kind of failure an error is, seen from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The input is wrong; the message names what to change.
    BadRequest,
    /// No credentials, or credentials that do not verify.
    Unauthenticated,
    /// The caller is known but may not do this.
    Forbidden,
    /// What the call names does not exist.
    NotFound,
    /// The resource exists but does not answer this method.
    MethodNotAllowed,
    /// The client did not send its request in time.
    ClientTimeout,
    /// The call conflicts with the state of what it names.
    Conflict,
    /// The input is over a size limit.
    TooLarge,
    /// This caller asks too often; it may try again later.
    RateLimited,
    /// A dependency (Redis, the aggregator) or this service's capacity is away or full.
    Unavailable,
    /// A dependency did not answer in time.
    Timeout,
    /// A fault of ours: a reply that makes no sense, a call Redis refused, a broken invariant.
    Internal,
}

/// A domain error that knows its [`ErrorKind`].
pub trait ServiceError: std::error::Error {
    fn kind(&self) -> ErrorKind;
}

impl ErrorKind {
    /// Every kind, for tables and tests.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::BadRequest,
        ErrorKind::Unauthenticated,
        ErrorKind::Forbidden,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::ClientTimeout,
        ErrorKind::Conflict,
        ErrorKind::TooLarge,
        ErrorKind::RateLimited,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::Internal,
    ];

    /// The one mapping: HTTP status, gRPC code, retryable.
    const fn mapping(self) -> (StatusCode, Code, bool) {
        match self {
            ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, Code::InvalidArgument, false),
            ErrorKind::Unauthenticated => (StatusCode::UNAUTHORIZED, Code::Unauthenticated, false),
            ErrorKind::Forbidden => (StatusCode::FORBIDDEN, Code::PermissionDenied, false),
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, Code::NotFound, false),
            ErrorKind::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, Code::Unimplemented, false),
            ErrorKind::ClientTimeout => (StatusCode::REQUEST_TIMEOUT, Code::Cancelled, true),
            ErrorKind::Conflict => (StatusCode::CONFLICT, Code::FailedPrecondition, false),
            // gRPC has no "too large" of the caller's: a wrong argument, as the message says.
            ErrorKind::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, Code::InvalidArgument, false),
            ErrorKind::RateLimited => (StatusCode::TOO_MANY_REQUESTS, Code::ResourceExhausted, true),
            ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, true),
            ErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, Code::DeadlineExceeded, true),
            ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, false),
        }
    }

    pub const fn http_status(self) -> StatusCode {
        self.mapping().0
    }

    pub const fn grpc_code(self) -> Code {
        self.mapping().1
    }

    /// Whether the same call may succeed later by itself (a consumer retries it, a client gets
    /// `Retry-After`); otherwise retrying is pointless (a consumer dead-letters it).
    pub const fn is_retryable(self) -> bool {
        self.mapping().2
    }

    /// Whether the failure is the caller's to fix, so its message is shown to the caller.
    /// Being told to slow down (429) is not: its message is ours.
    pub fn is_caller_error(self) -> bool {
        self.http_status().is_client_error() && !matches!(self, ErrorKind::RateLimited)
    }

    /// The kind of a gRPC answer: the inverse of [`ErrorKind::grpc_code`]; codes no kind maps to
    /// are our fault. `Ok` is no error and maps to `Internal` (a caller never asks).
    pub const fn from_grpc(code: Code) -> ErrorKind {
        match code {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::BadRequest,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::PermissionDenied => ErrorKind::Forbidden,
            Code::NotFound => ErrorKind::NotFound,
            Code::Unimplemented => ErrorKind::MethodNotAllowed,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => ErrorKind::Conflict,
            Code::ResourceExhausted => ErrorKind::RateLimited,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            // A cancellation reaching a client is the server's or the call's, not a slow body:
            // only a client's own timeout (told apart by the caller) is `Timeout`.
            Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss | Code::Ok => {
                ErrorKind::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_table() {
        use ErrorKind::*;
        let table = [
            (BadRequest, 400, Code::InvalidArgument, false),
            (Unauthenticated, 401, Code::Unauthenticated, false),
            (Forbidden, 403, Code::PermissionDenied, false),
            (NotFound, 404, Code::NotFound, false),
            (MethodNotAllowed, 405, Code::Unimplemented, false),
            (ClientTimeout, 408, Code::Cancelled, true),
            (Conflict, 409, Code::FailedPrecondition, false),
            (TooLarge, 413, Code::InvalidArgument, false),
            (RateLimited, 429, Code::ResourceExhausted, true),
            (Unavailable, 503, Code::Unavailable, true),
            (Timeout, 504, Code::DeadlineExceeded, true),
            (Internal, 500, Code::Internal, false),
        ];
        assert_eq!(table.len(), ErrorKind::ALL.len());
        for (kind, http, grpc, retryable) in table {
            assert_eq!(kind.http_status().as_u16(), http, "{kind:?}");
            assert_eq!(kind.grpc_code(), grpc, "{kind:?}");
            assert_eq!(kind.is_retryable(), retryable, "{kind:?}");
        }
    }

    #[test]
    fn grpc_codes_come_back_as_their_kind() {
        for kind in ErrorKind::ALL {
            // The client's timeout is told apart by its source, not its code; a size is an argument.
            if !matches!(kind, ErrorKind::ClientTimeout | ErrorKind::TooLarge) {
                assert_eq!(ErrorKind::from_grpc(kind.grpc_code()), kind, "{kind:?}");
            }
        }
        assert_eq!(ErrorKind::from_grpc(Code::Unknown), ErrorKind::Internal);
        assert_eq!(ErrorKind::from_grpc(Code::Cancelled), ErrorKind::Internal);
        assert_eq!(ErrorKind::from_grpc(Code::AlreadyExists), ErrorKind::Conflict);
    }

    #[test]
    fn only_the_callers_mistakes_are_shown() {
        let shown: Vec<_> = ErrorKind::ALL.into_iter().filter(|k| k.is_caller_error()).collect();
        use ErrorKind::*;
        assert_eq!(
            shown,
            [
                BadRequest,
                Unauthenticated,
                Forbidden,
                NotFound,
                MethodNotAllowed,
                ClientTimeout,
                Conflict,
                TooLarge
            ]
        );
    }
}
