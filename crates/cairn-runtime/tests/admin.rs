//! The admin port served on a real socket, probed the way container runtimes and Prometheus do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cairn_runtime::{Admin, Readiness, healthcheck, serve_admin};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct Fixed(Result<(), String>);

impl Readiness for Fixed {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let result = self.0.clone();
        Box::pin(async move { result })
    }
}

struct Hangs;

impl Readiness for Hangs {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(std::future::pending())
    }
    fn name(&self) -> &str {
        "hanging-dependency"
    }
}

/// Serves `admin` on a fresh port; the returned token stops the server.
async fn serve(admin: Admin) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve_admin(listener, admin.router(), stop.clone()));
    (addr, stop)
}

/// A plain HTTP/1.1 GET returning the status code, the lower-cased head and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn healthz_and_readyz_when_everything_is_ready() {
    let admin =
        Admin::new("test-service").readiness(Arc::new(Fixed(Ok(())))).readiness(Arc::new(Fixed(Ok(()))));
    let (addr, stop) = serve(admin).await;

    let (status, _, body) = get(addr, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(json(&body), serde_json::json!({"status": "ok", "service": "test-service"}));

    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(json(&body), serde_json::json!({"status": "ready"}));

    healthcheck(&format!("http://{addr}/healthz")).await.unwrap();
    healthcheck(&format!("http://{addr}/readyz")).await.unwrap();
    stop.cancel();
}

#[tokio::test]
async fn readyz_lists_every_failing_check_but_healthz_stays_up() {
    let admin = Admin::new("test-service")
        .readiness(Arc::new(Fixed(Ok(()))))
        .readiness(Arc::new(Fixed(Err("redis: connection refused".into()))))
        .readiness(Arc::new(Fixed(Err("amqp: channel closed".into()))));
    let (addr, stop) = serve(admin).await;

    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        json(&body),
        serde_json::json!({
            "status": "not ready",
            "problems": ["redis: connection refused", "amqp: channel closed"],
        })
    );

    let err = healthcheck(&format!("http://{addr}/readyz")).await.unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("503"), "{err}");
    assert!(err.contains("redis: connection refused"), "{err}");

    healthcheck(&format!("http://{addr}/healthz")).await.unwrap();
    stop.cancel();
}

#[tokio::test]
async fn readyz_bounds_a_hanging_check() {
    let (addr, stop) = serve(Admin::new("test-service").readiness(Arc::new(Hangs))).await;

    let started = std::time::Instant::now();
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let problems = json(&body)["problems"].clone();
    assert!(problems[0].as_str().unwrap().starts_with("hanging-dependency:"), "{problems}");
    stop.cancel();
}

#[tokio::test]
async fn readyz_turns_unavailable_once_shutdown_starts() {
    let shutdown = CancellationToken::new();
    let admin = Admin::new("test-service").readiness(Arc::new(Fixed(Ok(())))).with_shutdown(shutdown.clone());
    let (addr, stop) = serve(admin).await;

    assert_eq!(get(addr, "/readyz").await.0, 200);
    shutdown.cancel();
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(json(&body), serde_json::json!({"status": "not ready", "problems": ["shutting down"]}));
    // Still alive while draining.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    stop.cancel();
}

#[tokio::test]
async fn metrics_renders_prometheus_text() {
    let (addr, stop) = serve(Admin::new("test-service")).await;
    metrics::counter!("cairn_test_total").increment(1);
    metrics::histogram!("cairn_test_seconds").record(0.2);

    let (status, head, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
    assert!(body.contains("cairn_test_total 1"), "{body}");
    assert!(body.contains("cairn_test_seconds_bucket{le=\"0.25\"} 1"), "{body}");
    stop.cancel();
}

#[tokio::test]
async fn serve_admin_returns_when_stopped() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_admin(listener, Admin::new("t").router(), stop.clone()));
    healthcheck(&format!("http://{addr}/healthz")).await.unwrap();

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops after cancel")
        .unwrap()
        .unwrap();
    let err = healthcheck(&format!("http://{addr}/healthz")).await.unwrap_err();
    assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
}

#[tokio::test]
async fn healthcheck_names_the_problem() {
    // A port nobody listens on: bind, note it, release it.
    let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let err = format!("{:#}", healthcheck(&format!("http://{addr}/healthz")).await.unwrap_err());
    assert!(err.contains(&addr.to_string()) && err.contains("cannot connect"), "{err}");

    let (served, stop) = serve(Admin::new("t")).await;
    let err = format!("{:#}", healthcheck(&format!("http://{served}/nope")).await.unwrap_err());
    assert!(err.contains("404"), "{err}");
    stop.cancel();

    let err = format!("{:#}", healthcheck("https://127.0.0.1:1/healthz").await.unwrap_err());
    assert!(err.contains("http://host:port/path"), "{err}");
}

#[tokio::test]
async fn healthcheck_times_out_on_a_silent_server() {
    // Accepts connections but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let err = format!("{:#}", healthcheck(&format!("http://{addr}/healthz")).await.unwrap_err());
    assert!(err.contains("did not answer within 3s"), "{err}");
}
