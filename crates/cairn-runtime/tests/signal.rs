//! SIGTERM cancels the shutdown token. Alone in its own test binary: the signal goes to the
//! whole process.

use std::time::Duration;

#[tokio::test]
async fn sigterm_cancels_every_shutdown_token() {
    let first = cairn_runtime::shutdown_token();
    let second = cairn_runtime::shutdown_token();
    // Let the listener tasks install their handlers before the signal is sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!first.is_cancelled());

    use rustix::process::{Signal, getpid, kill_process};
    kill_process(getpid(), Signal::TERM).expect("SIGTERM sent");

    tokio::time::timeout(Duration::from_secs(5), async {
        first.cancelled().await;
        second.cancelled().await;
    })
    .await
    .expect("SIGTERM cancels both tokens");
}
