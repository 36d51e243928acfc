//! `echo`: returns the payload. For smoke tests and benchmarks.

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

use crate::handler::{Context, Handler, HandlerError};

pub struct Echo;

impl Handler for Echo {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        std::future::ready(Ok(ctx.payload.clone())).boxed()
    }
}
