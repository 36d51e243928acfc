//! request-processor: runs requests from the Redis stream's consumer group through handlers.

pub mod handler;
pub mod handlers;

pub use handler::{Context, Handler, HandlerError, HandlerSet};
