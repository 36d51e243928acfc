//! `cairn upload DIR` against a real stack whose `ingest` handler is `http`, pointing at a
//! receiving server in this test: files arrive at the handler whole (SHA-256 of the bytes it
//! read) with their relative paths, skipped files never leave, and a `kill -9` in the middle of
//! a large file costs little on restart and still delivers the file once.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Multipart, State};
use cairn_testkit::{Signal, hex, sha256_hex, test_bytes};
use common::{Stack, WAIT};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// What the handler received in one call: the payload and the SHA-256 and length of the stream
/// `file`, as it read them.
#[derive(Debug, Clone)]
struct Received {
    payload: Value,
    sha256: String,
    bytes: u64,
}

type Inbox = Arc<Mutex<Vec<Received>>>;

/// The upstream of the `http` handler: records every multipart call.
async fn receiver() -> (String, Inbox) {
    async fn ingest(State(inbox): State<Inbox>, mut form: Multipart) -> axum::Json<Value> {
        let mut payload = Value::Null;
        let mut hasher = Sha256::new();
        let mut bytes = 0;
        while let Some(mut field) = form.next_field().await.expect("multipart body") {
            match field.name() {
                Some("payload") => payload = serde_json::from_slice(&field.bytes().await.unwrap()).unwrap(),
                Some("file") => {
                    while let Some(chunk) = field.chunk().await.expect("file part") {
                        bytes += chunk.len() as u64;
                        hasher.update(&chunk);
                    }
                }
                other => panic!("unexpected part {other:?}"),
            }
        }
        let sha256 = hex(&hasher.finalize());
        inbox.lock().unwrap().push(Received { payload, sha256, bytes });
        axum::Json(json!({"stored": true}))
    }
    let inbox = Inbox::default();
    let app = axum::Router::new()
        .route("/ingest", axum::routing::post(ingest))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(inbox.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ingest", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, inbox)
}

async fn stack_with_receiver() -> (Stack, Inbox) {
    let (url, inbox) = receiver().await;
    let stack = Stack::start_with(&format!("[handlers.ingest]\nkind = \"http\"\nurl = \"{url}\"\n")).await;
    (stack, inbox)
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// The JSON lines of a `--json` run.
fn lines(stdout: &str) -> Vec<Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_nested_folders_arrive_whole_with_their_paths() {
    let (stack, inbox) = stack_with_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut expected = BTreeMap::new();
    let mut add = |rel: String, seed: u64, len: usize| {
        let data = test_bytes(len, seed);
        write(root, &rel, &data);
        expected.insert(rel, sha256_hex(&data));
    };
    // two files are there before the command starts
    add("before.bin".into(), 1, 40_000);
    add("old/nested/before2.txt".into(), 2, 0);

    let child = common::command(&stack.base)
        .args(["upload", root.to_str().unwrap(), "--handler", "ingest", "--upload-existing"])
        .args(["--lag", "300ms", "--chunk-size", "16KiB", "--threads", "3", "--json"])
        .spawn()
        .expect("cairn upload starts");

    for i in 0..18u64 {
        let rel = match i % 3 {
            0 => format!("a/file{i}.dat"),
            1 => format!("a/b/c/file{i}.dat"),
            _ => format!("d/e/file{i}.csv"),
        };
        add(rel, i + 10, (i as usize) * 7_919 + 1);
    }
    // skipped by the default filter
    write(root, ".hidden", b"secret");
    write(root, "a/.cache/x.dat", b"secret");
    write(root, "a/b/run.log", b"log line\n");
    assert_eq!(expected.len(), 20);

    cairn_testkit::wait_until("20 files at the handler", WAIT, || async {
        inbox.lock().unwrap().len() >= 20
    })
    .await
    .unwrap();
    // `q` (or SIGTERM) finishes what is queued and exits
    cairn_testkit::signal_process(child.id().unwrap(), Signal::TERM).unwrap();
    let output = tokio::time::timeout(WAIT, child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));

    let received = inbox.lock().unwrap().clone();
    let mut at_handler = BTreeMap::new();
    for item in &received {
        let path = item.payload["path"].as_str().expect("payload names the path").to_owned();
        assert_eq!(item.payload["sha256"], item.sha256, "{path}: the bytes the handler read");
        assert_eq!(item.payload["size"], item.bytes, "{path}");
        assert!(at_handler.insert(path.clone(), item.sha256.clone()).is_none(), "{path} arrived twice");
    }
    assert_eq!(at_handler, expected);

    let reports = lines(&stdout);
    let summary = reports.last().unwrap();
    assert_eq!((summary["uploaded"].as_u64(), summary["failed"].as_u64()), (Some(20), Some(0)), "{stdout}");

    // a second run finds every file done in the journal and sends nothing
    let run = stack
        .cairn(&[
            "upload",
            root.to_str().unwrap(),
            "--handler",
            "ingest",
            "--once",
            "--lag",
            "50ms",
            "--json",
        ])
        .await;
    let summary = lines(&run.expect(0).stdout).pop().unwrap();
    assert_eq!(summary, json!({"uploaded": 0, "skipped": 20, "failed": 0, "bytes_sent": 0}));
    assert_eq!(inbox.lock().unwrap().len(), 20);
}

/// A proxy to `upstream` that counts the bytes clients send through it, slowed to about
/// 8 MB/s so a test can act while an upload is under way.
async fn counting_proxy(upstream: String) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let counted = Arc::new(AtomicU64::new(0));
    let count = counted.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = async move {
                    let mut buffer = vec![0; 16 << 10];
                    loop {
                        let n = match client_read.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                        count.fetch_add(n as u64, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    let _ = server_write.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (url, counted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_upload_resumes_and_delivers_the_file_once() {
    let (stack, inbox) = stack_with_receiver().await;
    let (proxy, counted) = counting_proxy(stack.base.trim_start_matches("http://").to_owned()).await;
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 16 << 20;
    let data = test_bytes(size as usize, 99);
    write(dir.path(), "big/large.bin", &data);
    let sha256 = sha256_hex(&data);
    let args = [
        "upload",
        dir.path().to_str().unwrap(),
        "--handler",
        "ingest",
        "--once",
        "--lag",
        "100ms",
        "--chunk-size",
        "64KiB",
        "--threads",
        "1",
        "--json",
    ];

    let mut child = common::command(&proxy).args(args).spawn().expect("cairn upload starts");
    cairn_testkit::wait_until("half the file sent", Duration::from_secs(60), || async {
        counted.load(Ordering::SeqCst) >= size / 2
    })
    .await
    .unwrap();
    child.start_kill().expect("kill -9");
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), None, "killed by a signal, not finished");
    let before = counted.load(Ordering::SeqCst);
    assert!(before < size, "the kill came before the whole file was sent ({before} bytes)");
    assert!(inbox.lock().unwrap().is_empty(), "nothing submitted yet");

    let output = tokio::time::timeout(Duration::from_secs(60), common::command(&proxy).args(args).output())
        .await
        .expect("the restart ends")
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let after = counted.load(Ordering::SeqCst) - before;
    let reports = lines(&stdout);
    assert!(reports[0]["resumed_from"].as_u64().unwrap() > 0, "{stdout}");

    // bytes that crossed twice (sent before the kill and again after), HTTP headers included
    let resent = (before + after).saturating_sub(size);
    eprintln!("file {size} bytes: sent {before} before the kill, {after} after; {resent} twice");
    assert!(resent < size / 4, "resent {resent} of {size} bytes (before the kill {before}, after {after})");

    cairn_testkit::wait_until("the file at the handler", WAIT, || async {
        !inbox.lock().unwrap().is_empty()
    })
    .await
    .unwrap();
    // once more: the journal knows it is done
    let run = stack.cairn(&args).await.expect(0);
    assert_eq!(lines(&run.stdout).pop().unwrap()["skipped"], 1);
    let received = inbox.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "delivered exactly once: {received:?}");
    assert_eq!(received[0].sha256, sha256);
    assert_eq!(received[0].bytes, size);
    assert_eq!(received[0].payload["path"], "big/large.bin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_with_files_sends_multipart_streams() {
    let (stack, inbox) = stack_with_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let data = test_bytes(300_000, 7);
    write(dir.path(), "photo.jpg", &data);
    let file = format!("file={}", dir.path().join("photo.jpg").display());
    let run =
        stack.cairn(&["submit", "ingest", r#"{"path": "p"}"#, "--file", &file, "--wait", "--json"]).await;
    let view = run.expect(0).json();
    assert_eq!(view["state"], "succeeded", "{view}");
    let received = inbox.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].sha256, sha256_hex(&data));
    assert_eq!(received[0].payload, json!({"path": "p"}));

    // a missing file and a repeated name are usage errors naming them
    let run = stack.cairn(&["submit", "ingest", "--file", "file=/nonexistent/x"]).await.expect(2);
    assert!(run.stderr.contains("/nonexistent/x"), "{run:?}");
    let run = stack.cairn(&["submit", "ingest", "--file", &file, "--file", &file]).await.expect(2);
    assert!(run.stderr.contains("twice"), "{run:?}");
    stack.cairn(&["submit", "ingest", "--file", "nopath"]).await.expect(2);
}

#[tokio::test]
async fn upload_refuses_bad_arguments_and_stops_when_cairn_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let url = "http://127.0.0.1:1";
    for (args, needle) in [
        (vec!["--chunk-size", "3MiB"], "power of two"),
        (vec!["--chunk-size", "8KiB"], "power of two"),
        (vec!["--upload-regex", "("], "--upload-regex"),
    ] {
        let mut all = vec!["upload", root, "--handler", "ingest", "--once"];
        all.extend(args);
        let run = common::cairn_at(url, &all).await.expect(2);
        assert!(run.stderr.contains(needle), "{run:?}");
    }
    let run = common::cairn_at(url, &["upload", "/nonexistent/dir", "--handler", "h"]).await.expect(2);
    assert!(run.stderr.contains("/nonexistent/dir"), "{run:?}");

    // nothing to send: success without a server
    common::cairn_at(url, &["upload", root, "--handler", "h", "--once", "--lag", "10ms"]).await.expect(0);
    write(dir.path(), "a.bin", b"data");
    let run =
        common::cairn_at(url, &["upload", root, "--handler", "h", "--once", "--lag", "10ms"]).await.expect(3);
    assert!(run.stderr.contains("127.0.0.1:1"), "{run:?}");
}
