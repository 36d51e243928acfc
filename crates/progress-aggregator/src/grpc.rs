//! gRPC `cairn.v1.Progress`: a thin adapter that validates input and calls the progress store.

use cairn_progress::{Key, Update};
use cairn_proto::struct_to_json;
use cairn_proto::v1::progress_server::Progress;
use cairn_proto::v1::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, Node, UpdateRequest, UpdateResponse,
};
use cairn_redis::progress::{Change, DEFAULT_LIMIT, ProgressStore, ReadOptions, StoreError};
use tonic::{Request, Response, Status};

use crate::consumer::now_ms;

pub struct ProgressService {
    store: ProgressStore,
}

impl ProgressService {
    pub fn new(store: ProgressStore) -> Self {
        Self { store }
    }
}

fn parse_key(raw: &str, what: &str) -> Result<Key, Status> {
    Key::parse(raw).map_err(|e| Status::invalid_argument(format!("{what} {raw:?}: {e}")))
}

/// The one classification of store errors: a caller mistake or a dependency being away.
fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::BadCursor { .. } | StoreError::BadDepth(_) | StoreError::BadLimit(_) => {
            Status::invalid_argument(error.to_string())
        }
        StoreError::Redis(_) => {
            tracing::warn!(%error, "progress store unavailable");
            Status::unavailable("the progress store is unavailable; try again")
        }
        StoreError::Protocol(_) => {
            tracing::error!(%error, "progress store answered something unexpected");
            Status::internal("internal error reading progress")
        }
    }
}

#[tonic::async_trait]
impl Progress for ProgressService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let request = request.into_inner();
        let key = parse_key(&request.key, "key")?;
        let after = match request.after.as_str() {
            "" => None,
            raw => Some(parse_key(raw, "after")?),
        };
        let options = ReadOptions {
            depth: if request.depth == 0 { 1 } else { request.depth },
            limit: if request.limit == 0 { DEFAULT_LIMIT } else { request.limit },
            after,
        };
        match self.store.get(&key, &options).await.map_err(store_status)? {
            Some(view) => Ok(Response::new(GetResponse { node: Some(Node::from(&view)) })),
            None => Err(Status::not_found(format!("no progress at key {:?}", key.as_str()))),
        }
    }

    async fn update(&self, request: Request<UpdateRequest>) -> Result<Response<UpdateResponse>, Status> {
        let request = request.into_inner();
        let key = parse_key(&request.key, "key")?;
        if key.is_namespace() {
            return Err(Status::invalid_argument(format!(
                "key {:?} is a namespace; post progress to a key below it",
                key.as_str()
            )));
        }
        let fields = request.fields.map(|s| struct_to_json(&s)).unwrap_or_else(|| serde_json::json!({}));
        let update = Update::from_json(&fields).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let change = Change { key, update, time_ms: now_ms() };
        let view = self.store.apply_and_read(&change).await.map_err(store_status)?;
        metrics::counter!("cairn_progress_updates_applied_total").increment(1);
        Ok(Response::new(UpdateResponse { node: Some(Node::from(&view)) }))
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let key = parse_key(&request.get_ref().key, "key")?;
        let removed = self.store.delete(&key, now_ms()).await.map_err(store_status)?;
        Ok(Response::new(DeleteResponse { removed }))
    }
}
