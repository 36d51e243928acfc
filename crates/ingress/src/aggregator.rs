//! The ingress's side of `cairn.v1.Progress`: one lazily-connecting gRPC channel to the progress
//! aggregator, shared by the progress client and the `grpc.health.v1` client. gRPC stops here:
//! a failed call is a [`CallError`] of an [`ErrorKind`], never a `tonic::Status`.

use std::error::Error as _;
use std::time::Duration;

use cairn_error::{ErrorKind, ServiceError};
use cairn_progress::view::NodeView;
use cairn_progress::{Key, Update};
use cairn_proto::map_to_struct;
use cairn_proto::v1::progress_client::ProgressClient;
use cairn_proto::v1::{DeleteRequest, GetRequest, Node, UpdateRequest};
use cairn_runtime::Readiness;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Upper bound on establishing the connection; a host that drops packets fails this fast rather
/// than after the whole request timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the aggregator URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("expected http://host:port")]
    Scheme,
    #[error(transparent)]
    Invalid(#[from] tonic::transport::Error),
}

/// A failed call: its kind and the aggregator's message (shown to clients only for their own
/// mistakes). Classified, and logged unless it is the caller's mistake, where it happened.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    kind: ErrorKind,
    message: String,
}

impl ServiceError for CallError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl From<tonic::Status> for CallError {
    fn from(status: tonic::Status) -> CallError {
        let kind = effective_kind(&status);
        let detail = status.message();
        match kind {
            _ if kind.is_caller_error() => {}
            ErrorKind::Unavailable => tracing::warn!(detail, "progress aggregator unavailable"),
            ErrorKind::Timeout => tracing::warn!(detail, "progress aggregator call timed out"),
            ErrorKind::RateLimited => {
                tracing::warn!(detail, "progress aggregator refused a call as too much")
            }
            _ => tracing::error!(code = ?status.code(), detail, "progress aggregator call failed"),
        }
        CallError { kind, message: detail.to_owned() }
    }
}

/// The status's kind, except that the client's own timeout (which tonic reports as `CANCELLED`
/// with a [`tonic::TimeoutExpired`] source) is a [`ErrorKind::Timeout`].
fn effective_kind(status: &tonic::Status) -> ErrorKind {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return ErrorKind::Timeout;
        }
        source = error.source();
    }
    ErrorKind::from_grpc(status.code())
}

/// A page of children to read: which key, how deep, and where the page starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    pub key: Key,
    pub depth: u32,
    pub limit: u32,
    pub after: Option<Key>,
}

/// Client of the progress aggregator. Cheap to clone: clones share one HTTP/2 connection.
#[derive(Clone)]
pub struct Aggregator {
    progress: ProgressClient<Channel>,
    health: HealthClient<Channel>,
}

impl Aggregator {
    /// Prepares a channel to `url` without connecting: the first call connects, and a call made
    /// while the aggregator is away fails with `UNAVAILABLE` instead of waiting for it.
    /// `timeout` bounds every call.
    pub fn connect_lazy(url: &str, timeout: Duration) -> Result<Aggregator, UrlError> {
        if !url.starts_with("http://") {
            return Err(UrlError::Scheme);
        }
        let channel = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .timeout(timeout)
            .connect_lazy();
        Ok(Aggregator { progress: ProgressClient::new(channel.clone()), health: HealthClient::new(channel) })
    }

    /// The node at `read.key` with a page of its children, or `NOT_FOUND`. `token` (the
    /// caller's, already checked here) goes along in every call.
    pub async fn get(&self, read: &Read, token: Option<&str>) -> Result<NodeView, CallError> {
        let request = GetRequest {
            key: read.key.to_string(),
            depth: read.depth,
            limit: read.limit,
            after: read.after.as_ref().map(Key::to_string).unwrap_or_default(),
        };
        let response = self.progress.clone().get(authorized(request, token)).await?.into_inner();
        node_view(response.node)
    }

    /// Applies `update` and returns the node as it is right after.
    pub async fn update(
        &self,
        key: &Key,
        update: &Update,
        token: Option<&str>,
    ) -> Result<NodeView, CallError> {
        let fields: serde_json::Map<String, serde_json::Value> = update.fields().into_iter().collect();
        let request = UpdateRequest { key: key.to_string(), fields: Some(map_to_struct(&fields)) };
        let response = self.progress.clone().update(authorized(request, token)).await?.into_inner();
        node_view(response.node)
    }

    /// Removes the subtree at `key`; the number of nodes removed (0 when there was none).
    pub async fn delete(&self, key: &Key, token: Option<&str>) -> Result<u64, CallError> {
        let request = authorized(DeleteRequest { key: key.to_string() }, token);
        let response = self.progress.clone().delete(request).await?;
        Ok(response.into_inner().removed)
    }

    /// Asks the aggregator's `grpc.health.v1` service whether it answers. Its status also
    /// says whether it consumes AMQP, which ingress does not need: reads and writes through
    /// gRPC work while RabbitMQ is away, so an aggregator that answers at all counts, unless it
    /// is shutting down (`SERVICE_UNKNOWN` never comes back for the empty name).
    /// `Err` is a message for people: what is wrong, without internals.
    pub async fn check_health(&self) -> Result<(), String> {
        let request = HealthCheckRequest { service: String::new() };
        match self.health.clone().check(request).await {
            Ok(response) => match response.into_inner().status() {
                ServingStatus::Serving | ServingStatus::NotServing => Ok(()),
                status => Err(format!("the progress aggregator reports {}", status.as_str_name())),
            },
            Err(status) => {
                tracing::debug!(code = ?status.code(), detail = status.message(), "aggregator health check failed");
                Err(format!("the progress aggregator did not answer its health check ({:?})", status.code()))
            }
        }
    }
}

/// The call with the caller's bearer token, which the aggregator checks again.
fn authorized<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn node_view(node: Option<Node>) -> Result<NodeView, CallError> {
    node.map(NodeView::from).ok_or_else(|| {
        tonic::Status::new(ErrorKind::Internal.grpc_code(), "the aggregator answered without a node").into()
    })
}

impl Readiness for Aggregator {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        self.check_health().boxed()
    }

    fn name(&self) -> &str {
        "progress-aggregator"
    }
}
