//! One attempt: the handler in a task of its own, bounded by the request's timeout and stopped
//! when the run is.

use std::sync::Arc;
use std::time::Duration;

use cairn_requests::{Failure, RequestRecord};
use serde_json::Value;

use super::Deps;
use super::outcome::Attempt;
use super::registry::{RunSignals, Stop};
use crate::handler::{Context, HandlerError, ProgressSink};
use crate::streams::Streams;

/// How long a told-to-stop handler gets to clean up (kill its process) before it is aborted.
const STOP_GRACE: Duration = Duration::from_secs(2);

pub(super) async fn run_attempt(
    deps: &Deps,
    record: &RequestRecord,
    attempt: u32,
    signals: &RunSignals,
) -> Attempt {
    let Some(handler) = deps.handlers.get(&record.handler) else {
        let known: Vec<&str> = deps.handlers.names().collect();
        let message =
            format!("no handler named {:?} on this processor (it has: {})", record.handler, known.join(", "));
        return Attempt::Failed(Failure::Permanent(message));
    };
    let run_cancel = signals.cancel.child_token();
    let sink: Arc<dyn ProgressSink> = Arc::new(deps.publisher.clone());
    let streams = if record.streams.is_empty() {
        Streams::none(&record.progress_key)
    } else {
        Streams::new(
            deps.blobs.clone(),
            &record.id,
            &record.progress_key,
            sink.clone(),
            record.streams.clone(),
        )
    };
    let ctx = Context {
        request_id: record.id.clone(),
        handler: record.handler.clone(),
        payload: record.payload.clone(),
        attempt,
        progress_key: record.progress_key.clone(),
        progress_url: format!(
            "{}/status/{}",
            deps.settings.public_url.trim_end_matches('/'),
            record.progress_key
        ),
        traceparent: record.traceparent.clone(),
        cancel: run_cancel.clone(),
        streams: streams.clone(),
        progress_token: deps.settings.minter.as_ref().map(|minter| {
            // Valid for the run's timeout and a minute more to report its end; a day without one.
            let ttl = record.timeout_ms.map_or(24 * 3600, |ms| ms.div_ceil(1000) + 60);
            minter.progress_token(&format!("request:{}", record.id), record.progress_key.as_str(), ttl)
        }),
        publisher: sink,
        last_progress: signals.progress.clone(),
    };
    // Its own task, so a panic fails this request only.
    let mut task = tokio::spawn(async move { handler.handle(&ctx).await });
    let timeout = record.timeout_ms.map_or(Duration::MAX, Duration::from_millis);
    let stopped = tokio::select! {
        joined = &mut task => {
            let attempt = attempt_from(joined);
            if matches!(attempt, Attempt::Done(_)) {
                streams.drained();
            }
            return attempt;
        }
        () = signals.cancel.cancelled() => signals.reason().unwrap_or(Stop::Shutdown),
        () = tokio::time::sleep(timeout) => {
            run_cancel.cancel();
            finish_or_abort(task).await;
            return Attempt::Failed(Failure::Retryable(format!("timed out after {} ms", timeout.as_millis())));
        }
    };
    finish_or_abort(task).await;
    Attempt::Stopped(stopped)
}

/// Gives a told-to-stop handler a moment to clean up, then aborts it.
async fn finish_or_abort(mut task: tokio::task::JoinHandle<Result<Value, HandlerError>>) {
    if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
        task.abort();
    }
}

/// A handler's answer as an attempt's end; a panic is a retryable failure.
fn attempt_from(joined: Result<Result<Value, HandlerError>, tokio::task::JoinError>) -> Attempt {
    match joined {
        Ok(Ok(value)) => Attempt::Done(value),
        Ok(Err(HandlerError::Retryable(message))) => Attempt::Failed(Failure::Retryable(message)),
        Ok(Err(HandlerError::Permanent(message))) => Attempt::Failed(Failure::Permanent(message)),
        Err(error) if error.is_panic() => {
            let payload = error.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Attempt::Failed(Failure::Retryable(format!("handler panicked: {message}")))
        }
        Err(_) => Attempt::Stopped(Stop::Shutdown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn handler_answers_and_panics_become_attempts() {
        let ok = tokio::spawn(async { Ok(json!(7)) }).await;
        assert_eq!(attempt_from(ok), Attempt::Done(json!(7)));
        let retry = tokio::spawn(async { Err(HandlerError::Retryable("503".into())) }).await;
        assert_eq!(attempt_from(retry), Attempt::Failed(Failure::Retryable("503".into())));
        let permanent = tokio::spawn(async { Err(HandlerError::Permanent("400".into())) }).await;
        assert_eq!(attempt_from(permanent), Attempt::Failed(Failure::Permanent("400".into())));
        let panicked = tokio::spawn(async {
            if true {
                panic!("boom {}", 1);
            }
            Ok(Value::Null)
        })
        .await;
        assert_eq!(
            attempt_from(panicked),
            Attempt::Failed(Failure::Retryable("handler panicked: boom 1".into()))
        );
        let aborted = tokio::spawn(std::future::pending::<Result<Value, HandlerError>>());
        aborted.abort();
        assert_eq!(attempt_from(aborted.await), Attempt::Stopped(Stop::Shutdown));
    }
}
