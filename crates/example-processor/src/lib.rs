//! An example of building your own processor: a handler that works through steps and reports
//! each one as a sub-node of the request's progress, so the request's own progress rolls up.
//!
//! ```text
//! _requests.<id>            progress = mean of the steps (weights 1)
//! ├── _requests.<id>.step-0 finished, progress 1
//! ├── _requests.<id>.step-1 running,  progress 0.4
//! └── _requests.<id>.step-2 waiting,  progress 0
//! ```

use std::time::Duration;

use cairn_progress::Update;
use futures::FutureExt;
use futures::future::BoxFuture;
use request_processor::{Context, Handler, HandlerError};
use serde_json::{Value, json};

/// Payload: `{"steps": 3, "step_ms": 200}` (1–100 steps, each 0–60 000 ms).
pub struct Steps;

impl Steps {
    /// Checks the payload: `(steps, step_ms)`, or a permanent error naming the field.
    pub fn parse(payload: &Value) -> Result<(u64, u64), HandlerError> {
        let field = |name: &str, max: u64| {
            payload.get(name).and_then(Value::as_u64).filter(|n| *n <= max).ok_or_else(|| {
                HandlerError::Permanent(format!("payload field {name:?} must be an integer from 0 to {max}"))
            })
        };
        let steps = field("steps", 100)?;
        if steps == 0 {
            return Err(HandlerError::Permanent("payload field \"steps\" must be at least 1".into()));
        }
        Ok((steps, field("step_ms", 60_000)?))
    }
}

impl Handler for Steps {
    fn handle<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async move {
            let (steps, step_ms) = Self::parse(&ctx.payload)?;
            // Announce every step first: pending steps count as 0, so the parent's progress is
            // honest from the start.
            for i in 0..steps {
                ctx.report_step(&format!("step-{i}"), Update::new().progress(0.0).status("waiting"));
            }
            for i in 0..steps {
                let step = format!("step-{i}");
                ctx.report_step(&step, Update::new().status("running").msg(format!("working on {step}")));
                for tenth in 1..=10u32 {
                    tokio::select! {
                        () = ctx.cancel.cancelled() => return Err(HandlerError::Retryable("canceled".into())),
                        () = tokio::time::sleep(Duration::from_millis(step_ms / 10)) => {}
                    }
                    ctx.report_step(&step, Update::new().progress(f64::from(tenth) / 10.0));
                }
                ctx.report_step(&step, Update::new().progress(1.0).status("finished"));
            }
            Ok(json!({"steps_done": steps}))
        }
        .boxed()
    }
}
