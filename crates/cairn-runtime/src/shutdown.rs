use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// A token cancelled when the process receives SIGTERM or SIGINT.
///
/// Each call installs its own listener, so several services in one process (`cairn dev`) may
/// each hold one and all see the same signal. Must be called inside a tokio runtime. If the
/// signal handlers cannot be installed the token is never cancelled by a signal, and an error
/// is logged.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(error), _) | (_, Err(error)) => {
                error!(%error, "could not install SIGTERM/SIGINT handlers; shutdown by signal is disabled");
                return;
            }
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            () = cancel.cancelled() => return,
        };
        info!(signal = name, "received shutdown signal");
        cancel.cancel();
    });
    token
}

/// Awaits `fut` (a service's in-flight work winding down) for at most `grace`.
///
/// Returns `true` when the work finished in time. When the grace period runs out the future is
/// dropped, which abandons whatever it was doing; that is logged because unacknowledged work
/// will be redelivered to another replica.
pub async fn drain<F>(name: &str, grace: Duration, fut: F) -> bool
where
    F: Future,
{
    match tokio::time::timeout(grace, fut).await {
        Ok(_) => true,
        Err(_) => {
            warn!(service = name, grace = ?grace, "grace period ran out; abandoning in-flight work");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_reports_completion_and_timeout() {
        let grace = Duration::from_millis(200);
        assert!(drain("t", grace, tokio::time::sleep(Duration::from_millis(10))).await);
        assert!(!drain("t", grace, std::future::pending::<()>()).await);
    }

    #[tokio::test]
    async fn token_starts_uncancelled() {
        let token = shutdown_token();
        assert!(!token.is_cancelled());
        // Cancelling it ourselves ends the signal task instead of leaking it.
        token.cancel();
    }
}
