//! The ingress never holds a data stream whole: a spawned ingress process receives 8 concurrent
//! multipart submissions of 64 MiB each, and its resident memory stays within a bound far below
//! what holding them would take (512 MiB). The peak (`VmHWM`) growth is printed.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use cairn_testkit::{RedisNamespace, ServiceProcess, free_port, wait_until};
use reqwest::multipart::{Form, Part};

const STREAM_BYTES: u64 = 64 * 1024 * 1024;
const CLIENTS: usize = 8;
/// Generous: holding the streams would take 512 MiB; chunked, the ingress needs a few MiB each.
const MAX_GROWTH_KIB: u64 = 256 * 1024;

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
    let (addr, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let logs = tempfile::tempdir().unwrap();
    let args = [
        ["--addr", &addr, "--admin-addr", &admin].as_slice(),
        &["--redis-url", &ns.url, "--key-prefix", &ns.prefix, "--aggregator-url", "http://127.0.0.1:1"],
        &["--body-timeout", "300s"],
    ]
    .concat();
    let mut ingress =
        ServiceProcess::new("ingress", env!("CARGO_BIN_EXE_ingress"), &args, BTreeMap::new(), logs.path());
    ingress.start();
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
    wait_until("ingress answers", Duration::from_secs(20), || async {
        http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; its log ends:\n{}", ingress.log_tail(20)));
    let kib = |value: Option<u64>| {
        value.unwrap_or_else(|| panic!("ingress died; its log ends:\n{}", ingress.log_tail(20)))
    };
    // Warm up: connection pools, the Redis function library, allocator arenas.
    for _ in 0..2 {
        let reply =
            http.post(format!("{base}/v1/requests")).multipart(form(4 * 1024 * 1024)).send().await.unwrap();
        assert_eq!(reply.status(), 202, "{}", reply.text().await.unwrap());
    }
    let before = kib(ingress.rss_kib());
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
    let peak = kib(ingress.peak_rss_kib());
    let after = kib(ingress.rss_kib());
    let growth = peak.saturating_sub(before);
    println!(
        "ingress RSS before {before} KiB, peak {peak} KiB (growth {growth} KiB), after {after} KiB, for {CLIENTS} x {} MiB streams",
        STREAM_BYTES >> 20
    );
    assert!(growth < MAX_GROWTH_KIB, "ingress grew by {growth} KiB while receiving {CLIENTS} streams");
}
