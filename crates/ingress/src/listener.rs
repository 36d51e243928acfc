//! The ingress's HTTP listener: an accept loop over hyper that keeps slow and greedy clients from
//! holding the service. axum's own `serve` arms no timer, so a client could send its headers a
//! byte a minute and hold a connection for ever; here every connection has deadlines:
//!
//! - headers must arrive within `header_timeout` (hyper's header read timeout; it also closes a
//!   keep-alive connection that sends nothing after its last answer within that time);
//! - a connection with no request in flight and no byte moved for `idle_timeout` is closed;
//! - a request body must arrive whole within `body_timeout`, or the request is answered 408 and
//!   the connection closed;
//! - at most `max_connections` connections are open: past that, new ones wait in the kernel's
//!   accept queue;
//! - at most `max_concurrent` requests run at once: past that a request waits up to
//!   `concurrency_wait` for a slot, then gets 503 with `Retry-After`; long-polls (`Prefer: wait`)
//!   have their own cap, `max_waiters`, answered 503 at once when full.
//!
//! Shutdown stops accepting, asks every connection to finish its in-flight requests and close
//! (HTTP/1 keep-alive off, HTTP/2 GOAWAY), and waits for them within the caller's grace period.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, warn};

use cairn_error::ErrorKind;

use crate::error::ApiError;

/// The listener's limits; every one is a `CAIRN_*` setting of the ingress (README).
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub max_concurrent: usize,
    pub concurrency_wait: Duration,
    pub max_waiters: usize,
}

/// Accepts connections on `listener` and serves `router` on each until `stop` fires; then lets
/// each connection finish what it is answering. Returns when every connection is closed (the
/// caller bounds that with its grace period).
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, stop: CancellationToken) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let router = router.layer(axum::middleware::from_fn_with_state(Arc::new(Admission::new(&limits)), admit));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (tcp, remote) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small request/response pairs must not wait on Nagle and delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let (router, limits, stop) = (router.clone(), limits.clone(), stop.clone());
        tracker.spawn(async move {
            serve_connection(tcp, remote, router, &limits, stop).await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    router: Router,
    limits: &Limits,
    stop: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked { inner: tcp, activity: activity.clone() });
    let in_flight = activity.clone();
    let body_timeout = limits.body_timeout;
    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let (router, guard) = (router.clone(), InFlight::enter(&in_flight));
        async move {
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(ConnectInfo(remote));
            let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let body = Body::new(DeadlineBody::new(body, body_timeout, expired.clone()));
            let mut response =
                router.oneshot(Request::from_parts(parts, body)).await.unwrap_or_else(|e| match e {});
            if expired.load(Ordering::SeqCst) {
                response = body_too_slow(body_timeout);
            }
            drop(guard);
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let mut check =
        tokio::time::interval(limits.idle_timeout.min(Duration::from_secs(1)).max(Duration::from_millis(10)));
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(%remote, %error, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = check.tick(), if !closing => {
                if activity.idle_for() >= limits.idle_timeout {
                    debug!(%remote, "closing an idle connection");
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

fn body_too_slow(timeout: Duration) -> Response {
    let mut response = ApiError::new(
        ErrorKind::ClientTimeout,
        format!("the request body did not arrive within {timeout:?}"),
    )
    .into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// When a connection last moved a byte, and how many of its requests are being answered.
struct Activity {
    started: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity { started: Instant::now(), last_ms: AtomicU64::new(0), in_flight: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long the connection has been idle: zero while a request is in flight.
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP stream that records when it last moved a byte.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body that must arrive whole before a deadline (from the first poll, that is from
/// when a handler starts reading it): past it, reading fails and `expired` is set, so the
/// request is answered 408 whatever the handler made of the error.
struct DeadlineBody {
    inner: hyper::body::Incoming,
    timeout: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: Arc<std::sync::atomic::AtomicBool>,
}

impl DeadlineBody {
    fn new(
        inner: hyper::body::Incoming,
        timeout: Duration,
        expired: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        DeadlineBody { inner, timeout, deadline: None, expired }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let timeout = self.timeout;
        let deadline = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::SeqCst);
            return Poll::Ready(Some(Err(format!("request body not received within {timeout:?}").into())));
        }
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The request caps: requests at once, and long-polls at once.
struct Admission {
    requests: Semaphore,
    waiters: Semaphore,
    wait: Duration,
}

impl Admission {
    fn new(limits: &Limits) -> Self {
        Admission {
            requests: Semaphore::new(limits.max_concurrent),
            waiters: Semaphore::new(limits.max_waiters),
            wait: limits.concurrency_wait,
        }
    }
}

/// Lets a request in when a slot is free. A long-poll (`Prefer: wait`) takes a waiter slot or is
/// refused at once; any other request waits briefly for a request slot. Probes are never held.
async fn admit(
    axum::extract::State(admission): axum::extract::State<Arc<Admission>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(request).await;
    }
    let long_poll =
        request.headers().get_all("prefer").iter().any(|v| v.to_str().is_ok_and(|v| v.contains("wait")));
    if long_poll {
        let Ok(_permit) = admission.waiters.try_acquire() else {
            metrics::counter!("cairn_ingress_refused_total", "reason" => "waiters").increment(1);
            return busy("too many clients are waiting for answers; try again shortly");
        };
        return next.run(request).await;
    }
    let permit = match admission.requests.try_acquire() {
        Ok(permit) => permit,
        Err(_) => match tokio::time::timeout(admission.wait, admission.requests.acquire()).await {
            Ok(permit) => permit.expect("the semaphore is never closed"),
            Err(_) => {
                metrics::counter!("cairn_ingress_refused_total", "reason" => "concurrency").increment(1);
                return busy("too many requests at once; try again shortly");
            }
        },
    };
    let response = next.run(request).await;
    drop(permit);
    response
}

fn busy(message: &str) -> Response {
    ApiError::new(ErrorKind::Unavailable, message.to_owned()).into_response()
}
