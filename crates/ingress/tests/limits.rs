//! Slow and greedy clients against the ingress listener: raw TCP clients that dribble headers or a
//! body, sit idle, or hold more connections and long-polls than allowed.

mod common;

use std::time::Duration;

use common::Stack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

const REDIS: &str = "redis://127.0.0.1:6379";

fn args(pairs: &[(&str, &str)]) -> Vec<String> {
    pairs.iter().flat_map(|(flag, value)| [flag.to_string(), value.to_string()]).collect()
}

async fn connect(stack: &Stack) -> TcpStream {
    TcpStream::connect(stack.base.trim_start_matches("http://")).await.expect("connect to ingress")
}

/// Reads until the peer closes or `limit` passes; returns what arrived and whether it closed.
async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> (String, bool) {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[tokio::test]
async fn headers_sent_a_line_at_a_time_are_cut_off() {
    let stack = Stack::ingress_on(REDIS, &args(&[("--header-timeout", "1s")])).await;
    let mut tcp = connect(&stack).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let started = Instant::now();
    // A header line every 300 ms, for up to 10 s: the server must hang up long before.
    let mut closed = false;
    for i in 0..33 {
        if tcp.write_all(format!("x-slow-{i}: y\r\n").as_bytes()).await.is_err() {
            closed = true;
            break;
        }
        let (_, gone) = read_until_closed(&mut tcp, Duration::from_millis(300)).await;
        if gone {
            closed = true;
            break;
        }
    }
    assert!(closed, "the connection was still open after 10 s of dribbled headers");
    assert!(started.elapsed() < Duration::from_secs(5), "closed only after {:?}", started.elapsed());
}

#[tokio::test]
async fn a_dribbled_body_is_answered_408() {
    let stack = Stack::ingress_on(REDIS, &args(&[("--body-timeout", "1s")])).await;
    let mut tcp = connect(&stack).await;
    tcp.write_all(b"POST /v1/requests HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    let mut answer = String::new();
    for _ in 0..30 {
        let _ = tcp.write_all(b" ").await;
        let (got, closed) = read_until_closed(&mut tcp, Duration::from_millis(300)).await;
        answer.push_str(&got);
        if closed || answer.contains("\r\n\r\n") {
            break;
        }
    }
    assert!(answer.starts_with("HTTP/1.1 408"), "answer: {answer:?}");
    assert!(answer.contains("did not arrive within"), "answer names the problem: {answer:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let stack = Stack::ingress_on(REDIS, &args(&[("--idle-timeout", "1s")])).await;
    let mut tcp = connect(&stack).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let (answer, closed) = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");
    assert!(closed, "an idle connection is closed within its idle timeout");
}

#[tokio::test]
async fn connections_past_the_cap_wait_to_be_served() {
    let stack = Stack::ingress_on(REDIS, &args(&[("--max-connections", "2")])).await;
    let mut first = connect(&stack).await;
    let _second = connect(&stack).await;
    sleep(Duration::from_millis(200)).await;
    let mut third = connect(&stack).await; // the kernel accepts it; the ingress does not yet
    third.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let (answer, _) = read_until_closed(&mut third, Duration::from_millis(700)).await;
    assert_eq!(answer, "", "a third connection is not served while two are open");
    first.shutdown().await.unwrap();
    drop(first);
    let (answer, _) = read_until_closed(&mut third, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "served once a slot frees: {answer:?}");
}

#[tokio::test]
async fn long_polls_past_the_cap_get_503() {
    let stack = Stack::ingress_on(REDIS, &args(&[("--max-waiters", "1")])).await;
    let submitted = stack.submit(&serde_json::json!({"handler": "echo", "payload": 1}), None).await;
    assert_eq!(submitted.status, 202, "{:?}", submitted.json);
    let id = submitted.json["id"].as_str().unwrap().to_owned();
    // Nobody processes it: a long-poll holds its slot for its whole wait.
    let mut first = connect(&stack).await;
    let request = format!("GET /v1/requests/{id} HTTP/1.1\r\nhost: x\r\nprefer: wait=5\r\n\r\n");
    first.write_all(request.as_bytes()).await.unwrap();
    sleep(Duration::from_millis(300)).await;
    let mut second = connect(&stack).await;
    second.write_all(request.as_bytes()).await.unwrap();
    let (answer, _) = read_until_closed(&mut second, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "answer: {answer:?}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "answer: {answer:?}");
    // Requests that do not wait are not held by the waiters.
    assert_eq!(stack.request_state(&id, None).await.status, 200);
}
