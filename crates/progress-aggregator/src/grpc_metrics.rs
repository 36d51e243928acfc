//! RED metrics of the gRPC server, named as the Go gRPC ecosystem names them:
//! `grpc_server_handled_total{grpc_service, grpc_method, grpc_code}` counts finished calls and
//! `grpc_server_handling_seconds{grpc_service, grpc_method}` is a histogram of their duration,
//! from the request until the call's status (the trailers of the response stream).
//!
//! A call for a method the server does not have is counted under `unknown`/`unknown`, so
//! clients cannot create label values at will.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tonic::Code;

pub const HANDLED_TOTAL: &str = "grpc_server_handled_total";
pub const HANDLING_SECONDS: &str = "grpc_server_handling_seconds";

/// The tower layer for `tonic::transport::Server::builder().layer(..)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Body + Unpin,
{
    type Response = http::Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = service_and_method(request.uri().path());
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            let mut call = Call { service, method, started, done: false };
            // A trailers-only response (an error before any message) has its status in the headers.
            if let Some(code) = status_of(response.headers()) {
                call.finish(code);
            }
            Ok(response.map(|body| MeteredBody { inner: body, call }))
        })
    }
}

fn service_and_method(path: &str) -> (String, String) {
    match path.trim_start_matches('/').split_once('/') {
        Some((service, method)) if !service.is_empty() && !method.is_empty() && !method.contains('/') => {
            (service.to_owned(), method.to_owned())
        }
        _ => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.trim().parse().ok()?))
}

/// One call until its status is known.
struct Call {
    service: String,
    method: String,
    started: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if self.done {
            return;
        }
        self.done = true;
        let (service, method) = if code == Code::Unimplemented {
            ("unknown".to_owned(), "unknown".to_owned())
        } else {
            (std::mem::take(&mut self.service), std::mem::take(&mut self.method))
        };
        metrics::histogram!(HANDLING_SECONDS, "grpc_service" => service.clone(), "grpc_method" => method.clone())
            .record(self.started.elapsed().as_secs_f64());
        metrics::counter!(
            HANDLED_TOTAL,
            "grpc_service" => service,
            "grpc_method" => method,
            "grpc_code" => code_name(code),
        )
        .increment(1);
    }
}

/// The response body, watched for the trailers carrying the call's status.
pub struct MeteredBody<B> {
    inner: B,
    call: Call,
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish(Code::Internal),
            // Ended without a status: nothing says the call failed.
            Poll::Ready(None) => this.call.finish(Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        // The client went away (or the server stopped) before the status was sent.
        self.call.finish(Code::Cancelled);
    }
}

/// The status names the Go gRPC libraries put in `grpc_code`.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(service_and_method("/cairn.v1.Progress/Get"), ("cairn.v1.Progress".into(), "Get".into()));
        assert_eq!(service_and_method("/"), ("unknown".into(), "unknown".into()));
        assert_eq!(service_and_method("/a/b/c"), ("unknown".into(), "unknown".into()));
        assert_eq!(service_and_method("/onlyservice"), ("unknown".into(), "unknown".into()));
    }
}
