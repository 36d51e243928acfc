//! gRPC `cairn.v1.Progress`: a thin adapter that validates input and calls the progress store,
//! and, for `Watch`, the process's live fan-out (`cairn-live`).

use cairn_auth::{Grant, Verifier};
use cairn_error::{ErrorKind, ServiceError};
use cairn_progress::view::NodeView;
use cairn_progress::{Key, Update};
use cairn_proto::struct_to_json;
use cairn_proto::v1::progress_server::Progress;
use cairn_proto::v1::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, Node, UpdateRequest, UpdateResponse, WatchEvent,
    WatchRequest,
};
use std::pin::Pin;

use cairn_live::{EventKind, Live, LiveError, Watch};
use cairn_redis::progress::{Change, DEFAULT_LIMIT, ProgressStore, ReadOptions, StoreError};
use futures::Stream;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use cairn_progress::now_ms;

pub struct ProgressService {
    store: ProgressStore,
    updates: UpdateBatcher,
    live: Live,
}

impl ProgressService {
    pub fn new(store: ProgressStore, live: Live) -> Self {
        Self { updates: UpdateBatcher::start(store.clone()), store, live }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send + 'static>>;

type UpdateReply = oneshot::Sender<Result<NodeView, Status>>;

/// Group commit of `Update` calls: whatever concurrent calls are waiting go to Redis in one
/// script call (in arrival order), and each caller gets its node as that batch left it.
#[derive(Clone)]
struct UpdateBatcher {
    tx: mpsc::Sender<(Change, UpdateReply)>,
}

impl UpdateBatcher {
    const BATCH: usize = 256;
    const IN_FLIGHT: usize = 8;

    fn start(store: ProgressStore) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Change, UpdateReply)>(4 * Self::BATCH);
        tokio::spawn(async move {
            // Up to IN_FLIGHT batches at once. Batches in flight never hold two updates whose order
            // is defined: a caller's next Update starts only after its previous one was answered,
            // and concurrent calls have no order to keep.
            let mut in_flight = FuturesOrdered::new();
            let mut batch = Vec::with_capacity(Self::BATCH);
            loop {
                tokio::select! {
                    received = rx.recv_many(&mut batch, Self::BATCH), if in_flight.len() < Self::IN_FLIGHT => {
                        if received == 0 {
                            break;
                        }
                        let (changes, replies): (Vec<Change>, Vec<UpdateReply>) = batch.drain(..).unzip();
                        let store = store.clone();
                        in_flight.push_back(async move { (store.apply_and_read_many(&changes).await, replies) });
                    }
                    Some((result, replies)) = in_flight.next(), if !in_flight.is_empty() => answer(result, replies),
                }
            }
            while let Some((result, replies)) = in_flight.next().await {
                answer(result, replies);
            }
        });
        Self { tx }
    }

    async fn apply(&self, change: Change) -> Result<NodeView, Status> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Status::unavailable("the progress aggregator is stopping");
        self.tx.send((change, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn parse_key(raw: &str, what: &str) -> Result<Key, Status> {
    Key::parse(raw).map_err(|e| bad_request(format!("{what} {raw:?}: {e}")))
}

fn bad_request(message: String) -> Status {
    Status::new(ErrorKind::BadRequest.grpc_code(), message)
}

/// A domain error as a gRPC status, by its kind (`cairn_error`, the one mapping): the caller's
/// mistakes with their message; the rest logged here and answered in general terms.
fn status(error: impl ServiceError) -> Status {
    let kind = error.kind();
    let code = kind.grpc_code();
    if kind.is_caller_error() {
        Status::new(code, error.to_string())
    } else if kind.is_retryable() {
        tracing::warn!(%error, "progress store unavailable");
        Status::new(code, "the progress store is unavailable; try again")
    } else {
        tracing::error!(%error, "progress store answered something unexpected");
        Status::new(code, "internal error reading progress")
    }
}

fn answer(result: Result<Vec<NodeView>, StoreError>, replies: Vec<UpdateReply>) {
    match result {
        Ok(nodes) => {
            metrics::counter!("cairn_progress_updates_applied_total").increment(nodes.len() as u64);
            for (reply, node) in replies.into_iter().zip(nodes) {
                let _ = reply.send(Ok(node));
            }
        }
        Err(error) => {
            let status = status(error);
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

/// The gRPC side of auth: verifies the bearer token in `authorization` metadata (missing or bad:
/// `UNAUTHENTICATED`) and leaves the caller's [`Grant`] in the request's extensions, where each
/// method checks the key it touches (`PERMISSION_DENIED`). Open when `verifier` is `None`.
pub fn authenticate(
    verifier: Option<Verifier>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let grant = match &verifier {
            None => Grant::open(),
            Some(verifier) => {
                let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
                verifier.verify_header(header).map_err(status)?
            }
        };
        request.extensions_mut().insert(grant);
        Ok(request)
    }
}

/// The caller's grant, as [`authenticate`] left it.
fn grant<T>(request: &Request<T>) -> Result<Grant, Status> {
    request.extensions().get::<Grant>().cloned().ok_or_else(|| {
        tracing::error!("progress call reached without the auth interceptor");
        Status::internal("internal error")
    })
}

#[tonic::async_trait]
impl Progress for ProgressService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let grant = grant(&request)?;
        let request = request.into_inner();
        let key = parse_key(&request.key, "key")?;
        grant.read(key.as_str()).map_err(status)?;
        let after = match request.after.as_str() {
            "" => None,
            raw => Some(raw.parse().map_err(|e: cairn_live::BadFeedId| bad_request(format!("after: {e}")))?),
        };
        let watch = Watch {
            key,
            depth: if request.depth == 0 { 8 } else { request.depth },
            limit: if request.limit == 0 { DEFAULT_LIMIT } else { request.limit },
            after,
        };
        // Every live error's message is written for the caller ("too many subscribers; try later").
        let subscription = self
            .live
            .subscribe(watch)
            .map_err(|e: LiveError| Status::new(e.kind().grpc_code(), e.to_string()))?;
        let stall = i64::try_from(self.live.settings().stall_after.as_millis()).unwrap_or(i64::MAX);
        let events = subscription.into_stream().map(move |event| {
            let now = cairn_progress::now_ms();
            let nodes = match event.kind {
                EventKind::Delete => {
                    event.deleted.iter().map(|key| Node { key: key.clone(), ..Node::default() }).collect()
                }
                _ => event.nodes.iter().map(|node| cairn_proto::node_at(node, now, stall)).collect(),
            };
            Ok(WatchEvent {
                r#type: event.kind.as_str().to_owned(),
                id: event.id.to_string(),
                key: event.key,
                nodes,
            })
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let grant = grant(&request)?;
        let request = request.into_inner();
        let key = parse_key(&request.key, "key")?;
        grant.read(key.as_str()).map_err(status)?;
        let after = match request.after.as_str() {
            "" => None,
            raw => Some(parse_key(raw, "after")?),
        };
        let options = ReadOptions {
            depth: if request.depth == 0 { 1 } else { request.depth },
            limit: if request.limit == 0 { DEFAULT_LIMIT } else { request.limit },
            after,
        };
        match self.store.get(&key, &options).await.map_err(status)? {
            Some(view) => Ok(Response::new(GetResponse { node: Some(Node::from(&view)) })),
            None => Err(Status::new(
                ErrorKind::NotFound.grpc_code(),
                format!("no progress at key {:?}", key.as_str()),
            )),
        }
    }

    async fn update(&self, request: Request<UpdateRequest>) -> Result<Response<UpdateResponse>, Status> {
        let grant = grant(&request)?;
        let request = request.into_inner();
        let key = parse_key(&request.key, "key")?;
        grant.write(key.as_str()).map_err(status)?;
        if key.is_namespace() {
            return Err(bad_request(format!(
                "key {:?} is a namespace; post progress to a key below it",
                key.as_str()
            )));
        }
        let fields = request.fields.map(|s| struct_to_json(&s)).unwrap_or_else(|| serde_json::json!({}));
        let update = Update::from_json(&fields).map_err(status)?;
        let change = Change { key, update, time_ms: now_ms() };
        let view = self.updates.apply(change).await?;
        Ok(Response::new(UpdateResponse { node: Some(Node::from(&view)) }))
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let key = parse_key(&request.get_ref().key, "key")?;
        grant(&request)?.write(key.as_str()).map_err(status)?;
        let removed = self.store.delete(&key, now_ms()).await.map_err(status)?;
        Ok(Response::new(DeleteResponse { removed }))
    }
}
