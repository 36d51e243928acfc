//! The ingress never holds a data stream whole: a spawned ingress process receives 8 concurrent
//! multipart submissions of 64 MiB each, and its resident memory stays within a bound far below
//! what holding them would take (512 MiB). The peak (`VmHWM`) growth is printed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use cairn_testkit::{RedisNamespace, wait_until};
use reqwest::multipart::{Form, Part};

const STREAM_BYTES: u64 = 64 * 1024 * 1024;
const CLIENTS: usize = 8;
/// Generous: holding the streams would take 512 MiB; chunked, the ingress needs a few MiB each.
const MAX_GROWTH_KIB: u64 = 256 * 1024;

struct Ingress(Child);

impl Drop for Ingress {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `len` bytes in 64 KiB pieces that share one buffer: the client holds almost nothing.
fn generated(len: u64) -> reqwest::Body {
    let piece = Bytes::from((0..64 * 1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let pieces = len / piece.len() as u64;
    let stream = futures::stream::iter((0..pieces).map(move |_| Ok::<_, std::io::Error>(piece.clone())));
    reqwest::Body::wrap_stream(stream)
}

fn form(len: u64) -> Form {
    let request = Part::text(r#"{"handler": "echo", "payload": null}"#).mime_str("application/json").unwrap();
    Form::new()
        .part("request", request)
        .part("data", Part::stream_with_length(generated(len), len).file_name("data"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_memory_stays_flat_while_clients_send_large_streams() {
    let ns = RedisNamespace::new();
    let (port, admin) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_ingress"))
        .args(["--addr", &format!("127.0.0.1:{port}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--redis-url", &ns.url, "--key-prefix", &ns.prefix, "--aggregator-url", "http://127.0.0.1:1"])
        .args(["--body-timeout", "300s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ingress starts");
    let ingress = Ingress(child);
    let pid = ingress.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
    wait_until("ingress answers", Duration::from_secs(20), || async {
        http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await
    .unwrap();
    // Warm up: connection pools, the Redis function library, allocator arenas.
    for _ in 0..2 {
        let reply =
            http.post(format!("{base}/v1/requests")).multipart(form(4 * 1024 * 1024)).send().await.unwrap();
        assert_eq!(reply.status(), 202, "{}", reply.text().await.unwrap());
    }
    let before = status_kib(pid, "VmRSS:");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, url) = (http.clone(), format!("{base}/v1/requests"));
            tokio::spawn(async move { http.post(url).multipart(form(STREAM_BYTES)).send().await })
        })
        .collect();
    for client in clients {
        let reply = client.await.unwrap().expect("the ingress answers");
        let status = reply.status();
        let body: serde_json::Value = reply.json().await.unwrap();
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["state"], "queued");
    }
    let peak = status_kib(pid, "VmHWM:");
    let after = status_kib(pid, "VmRSS:");
    let growth = peak.saturating_sub(before);
    println!(
        "ingress RSS before {before} KiB, peak {peak} KiB (growth {growth} KiB), after {after} KiB, for {CLIENTS} x {} MiB streams",
        STREAM_BYTES >> 20
    );
    assert!(growth < MAX_GROWTH_KIB, "ingress grew by {growth} KiB while receiving {CLIENTS} streams");
}
