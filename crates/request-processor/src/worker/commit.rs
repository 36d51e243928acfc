//! Storing outcomes: group commit into one fenced script call, retried while Redis is away.

use std::time::Duration;

use cairn_redis::requests::{Commit, RequestQueue};
use cairn_requests::{Backoff, RequestState};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::outcome::Committed;
use cairn_progress::now_ms;

type CommitReply = oneshot::Sender<Result<bool, String>>;

/// Group commit: outcomes finished at about the same time go to Redis in one fenced script
/// call instead of one round trip each. Each caller still learns whether its own was stored.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<(Commit, CommitReply)>,
}

impl Committer {
    /// Most outcomes stored in one script call.
    const BATCH: usize = 256;

    pub fn start(queue: RequestQueue, consumer: String) -> Committer {
        let (tx, mut rx) = mpsc::channel::<(Commit, CommitReply)>(4 * Self::BATCH);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(Self::BATCH);
            while rx.recv_many(&mut batch, Self::BATCH).await > 0 {
                let (commits, replies): (Vec<Commit>, Vec<CommitReply>) = batch.drain(..).unzip();
                match queue.commit(&consumer, &commits, now_ms()).await {
                    Ok(stored) => {
                        for (reply, ok) in replies.into_iter().zip(stored) {
                            let _ = reply.send(Ok(ok));
                        }
                    }
                    Err(error) => {
                        for reply in replies {
                            let _ = reply.send(Err(error.to_string()));
                        }
                    }
                }
            }
        });
        Committer { tx }
    }

    /// Stores one outcome: `Ok(false)` when the lease was lost, `Err` when Redis failed.
    async fn commit(&self, commit: Commit) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((commit, reply)).await.map_err(|_| "committer stopped".to_owned())?;
        answer.await.map_err(|_| "committer stopped".to_owned())?
    }
}

/// Delays between tries to store an outcome while Redis is away: 50 ms doubling up to 2 s.
/// Caps, not jittered delays: the outcome is stored as soon as possible.
const RETRY: Backoff = Backoff { base: Duration::from_millis(50), max: Duration::from_secs(2), factor: 2.0 };

/// Stores an outcome, retrying while Redis is away. Once the run was told to stop, gives up
/// after a few tries unless the outcome is `canceled` (still worth storing; a lost run's outcome
/// is refused anyway).
pub(super) async fn commit_with_retry(
    committer: &Committer,
    commit: &Commit,
    cancel: &CancellationToken,
) -> Committed {
    let mut tries = 0;
    loop {
        tries += 1;
        let delay = RETRY.cap(tries);
        match committer.commit(commit.clone()).await {
            Ok(true) => return Committed::Stored,
            Ok(false) => {
                metrics::counter!("cairn_requests_commit_refused_total").increment(1);
                warn!(request = %commit.entry.request_id, "outcome refused: the lease was lost to another processor");
                return Committed::Refused;
            }
            Err(error) => {
                warn!(%error, retry_in = ?delay, request = %commit.entry.request_id, "cannot store outcome")
            }
        }
        if cancel.is_cancelled() && commit.state != RequestState::Canceled && delay > Duration::from_secs(1) {
            return Committed::GaveUp;
        }
        tokio::time::sleep(delay).await;
    }
}
