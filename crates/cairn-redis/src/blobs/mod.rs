//! Byte sequences stored in Redis in chunks: resumable uploads and the data streams of requests.
//!
//! A blob at base key `B` is three keys:
//!
//! - `B` hash: `offset` (bytes that are part of the blob), `seq` (chunk counter), `received`
//!   (bytes ever written, discarded ones included), `length` (the declared size, when known), `created_ms`, `expires_ms` and any caller fields (`metadata`);
//! - `B:c` hash: chunk number → bytes (at most [`CHUNK_BYTES`] each);
//! - `B:i` list: the chunk numbers that make up the blob, in order.
//!
//! Writers never hold a whole blob: they send it a chunk at a time ([`BlobWriter`]). An append
//! names the offset it expects, checked in the Lua step that writes, so two writers at one offset
//! never interleave. A checksummed write stages its chunks (stored, not yet listed) and lists
//! them in one step once the checksum matched, so a refused write leaves the blob as it was.
//! Readers fetch one chunk at a time ([`BlobStore::read`]).
//!
//! An upload a submission copies into a request in another slot is claimed first
//! (`claimed_by`, `claimed_until` in `B`: [`BlobStore::claim`]), so no other submission gets it.
//!
//! Keys: an upload is `P:upload:<id>`; a request's stream `<name>` is `P:req:<id>:s:<name>`
//! (an upload a request uses is renamed there by the submission's own step). Uploads expire
//! by Redis TTL (`PEXPIREAT` on all three keys, moved forward by every write); a request's
//! streams have no TTL and are deleted with its record by the retention purge.

use std::collections::{HashMap, VecDeque};
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use redis::AsyncCommands;

use crate::RedisConnection;
use crate::library::{Function, LIBRARY};
use crate::requests::QueueLayout;

static APPEND: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("blobs_append"));
static STAGE: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("blobs_stage"));
static COMMIT: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("blobs_commit"));
static CLAIM: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("blobs_claim"));

/// Largest chunk stored: big enough that a round trip per chunk is cheap, small enough that a
/// reader or writer holds little.
pub const CHUNK_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("redis is unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    /// The blob is gone (expired, deleted, used by a request).
    #[error("the data is gone")]
    Missing,
    /// Someone else wrote to the blob meanwhile: it has `offset` bytes now.
    #[error("the data has {offset} bytes, not the {expected} this write started at")]
    Offset { offset: u64, expected: u64 },
    /// The write would pass the blob's declared length.
    #[error("the data would be longer than its declared length")]
    TooLong { offset: u64 },
    #[error("unexpected reply from a blob script: {0}")]
    Protocol(String),
}

impl cairn_error::ServiceError for BlobError {
    fn kind(&self) -> cairn_error::ErrorKind {
        use cairn_error::ErrorKind;
        match self {
            BlobError::Redis(e) => crate::error_kind(e),
            BlobError::Missing => ErrorKind::NotFound,
            BlobError::Offset { .. } => ErrorKind::Conflict,
            BlobError::TooLong { .. } => ErrorKind::TooLarge,
            BlobError::Protocol(_) => ErrorKind::Internal,
        }
    }
}

/// What the store knows of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Bytes that are part of the blob.
    pub offset: u64,
    /// Declared size, when the writer said it.
    pub length: Option<u64>,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    /// Every field of the blob's hash, the ones above included.
    pub fields: HashMap<String, String>,
}

impl BlobInfo {
    fn from_hash(fields: HashMap<String, String>) -> Result<BlobInfo, BlobError> {
        let number = |name: &str| -> Result<Option<i64>, BlobError> {
            fields
                .get(name)
                .map(|v| v.parse::<i64>().map_err(|_| BlobError::Protocol(format!("{name} is {v:?}"))))
                .transpose()
        };
        let offset = number("offset")?.ok_or(BlobError::Missing)?;
        Ok(BlobInfo {
            offset: u64::try_from(offset).unwrap_or(0),
            length: number("length")?.and_then(|n| u64::try_from(n).ok()),
            created_ms: number("created_ms")?.unwrap_or(0),
            expires_ms: number("expires_ms")?,
            fields,
        })
    }

    /// Whether every declared byte arrived.
    pub fn is_complete(&self) -> bool {
        self.length == Some(self.offset)
    }
}

/// Who claims an upload for a submission ([`BlobStore::claim`]; `upload_claimant` in
/// requests/common.lua): its idempotency key when it has one, so a repeat racing its first
/// submission shares the claim, else its request id.
pub fn upload_claimant(request_id: &str, idempotency_key: Option<&str>) -> String {
    match idempotency_key {
        Some(key) if !key.is_empty() => format!("idem:{key}"),
        _ => format!("req:{request_id}"),
    }
}

/// What [`BlobStore::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The upload is the claimant's until it is used, released or the claim lapses.
    Taken,
    /// There is no such upload.
    Missing,
    /// Another submission holds it.
    Held(String),
}

/// The blobs of one key prefix, laid out as its request queue is: on a Redis Cluster a blob's
/// keys carry the hash tag of the partition its id falls in (a request's data streams its
/// request's, an upload the one of its own id), so a blob's three keys share a slot and a
/// request takes over an upload of its partition in one step.
#[derive(Clone)]
pub struct BlobStore {
    conn: RedisConnection,
    layout: QueueLayout,
}

impl BlobStore {
    /// The blobs next to the request queue of `layout` on `conn` (keys tagged on a cluster).
    pub fn new(conn: impl Into<RedisConnection>, layout: &QueueLayout) -> Self {
        let conn = conn.into();
        let layout = layout.clone().tagged(conn.is_cluster());
        Self { conn, layout }
    }

    /// Base key of the resumable upload `id`.
    pub fn upload_key(&self, id: &str) -> String {
        let names = self.layout.partition(self.layout.partition_of(id));
        format!("{}:upload:{}{id}", names.prefix, names.tag)
    }

    /// Base key of the data stream `name` of request `request_id`.
    pub fn stream_key(&self, request_id: &str, name: &str) -> String {
        let names = self.layout.partition(self.layout.partition_of(request_id));
        format!("{}:s:{name}", names.record(request_id))
    }

    /// Creates an empty blob with `fields` (plus `offset`, `seq` and `created_ms`), expiring at
    /// `expire_at_ms` if given. An existing blob at `base` is replaced.
    pub async fn create(
        &self,
        base: &str,
        fields: &[(&str, String)],
        now_ms: i64,
        expire_at_ms: Option<i64>,
    ) -> Result<(), BlobError> {
        let mut pipe = redis::pipe();
        pipe.atomic().del(&keys(base)[..]).ignore();
        let mut all: Vec<(&str, String)> =
            vec![("offset", "0".into()), ("seq", "0".into()), ("created_ms", now_ms.to_string())];
        if let Some(at) = expire_at_ms {
            all.push(("expires_ms", at.to_string()));
        }
        all.extend(fields.iter().cloned());
        pipe.hset_multiple(base, &all).ignore();
        if let Some(at) = expire_at_ms {
            pipe.cmd("PEXPIREAT").arg(base).arg(at).ignore();
        }
        let () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// The blob's state, or `None` when there is none at `base`.
    pub async fn info(&self, base: &str) -> Result<Option<BlobInfo>, BlobError> {
        let fields: HashMap<String, String> = self.conn.clone().hgetall(base).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        BlobInfo::from_hash(fields).map(Some)
    }

    /// Sets one field of the blob's hash (its expiry moves with the blob).
    pub async fn set_field(&self, base: &str, name: &str, value: &str) -> Result<(), BlobError> {
        let () = self.conn.clone().hset(base, name, value).await?;
        Ok(())
    }

    /// Appends `data` (at most [`CHUNK_BYTES`]) if the blob has `expected` bytes; its new size.
    pub async fn append(
        &self,
        base: &str,
        expected: u64,
        data: &[u8],
        expire_at_ms: Option<i64>,
    ) -> Result<u64, BlobError> {
        let reply: (String, u64) = APPEND
            .prepare_invoke_with_keys(&[base])
            .arg(&self.layout.prefix)
            .arg(base)
            .arg(expected)
            .arg(expire_at_ms.unwrap_or(0))
            .arg(data)
            .invoke_async(&mut self.conn.clone())
            .await?;
        append_outcome(reply, expected)
    }

    /// Stores `data` as a chunk of the blob that is not yet part of it (see [`Self::commit`]).
    pub async fn stage(&self, base: &str, data: &[u8], expire_at_ms: Option<i64>) -> Result<u64, BlobError> {
        let seq: u64 = STAGE
            .prepare_invoke_with_keys(&[base])
            .arg(&self.layout.prefix)
            .arg(base)
            .arg(expire_at_ms.unwrap_or(0))
            .arg(data)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if seq == 0 { Err(BlobError::Missing) } else { Ok(seq) }
    }

    /// Makes staged chunks part of the blob, in order, if it has `expected` bytes; its new size.
    pub async fn commit(
        &self,
        base: &str,
        expected: u64,
        staged: &[u64],
        expire_at_ms: Option<i64>,
    ) -> Result<u64, BlobError> {
        let mut invocation = COMMIT.prepare_invoke_with_keys(&[base]);
        invocation.arg(&self.layout.prefix).arg(base).arg(expected).arg(expire_at_ms.unwrap_or(0));
        for seq in staged {
            invocation.arg(*seq);
        }
        let reply: (String, u64) = invocation.invoke_async(&mut self.conn.clone()).await?;
        append_outcome(reply, expected)
    }

    /// Drops staged chunks that will not be committed.
    pub async fn discard(&self, base: &str, staged: &[u64]) -> Result<(), BlobError> {
        if staged.is_empty() {
            return Ok(());
        }
        let () = self.conn.clone().hdel(format!("{base}:c"), staged).await?;
        Ok(())
    }

    /// Claims the upload at `base` for `claimant` ([`upload_claimant`]) for `hold_ms`: the one
    /// submission that copies it into a request in another slot holds it meanwhile, and no
    /// other submission copies it or takes it over (the submission's step refuses it).
    pub async fn claim(&self, base: &str, claimant: &str, hold_ms: u64) -> Result<Claim, BlobError> {
        let reply: Vec<String> = self.claim_call(base, claimant, hold_ms, "take").await?;
        match reply.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["ok"] => Ok(Claim::Taken),
            ["missing"] => Ok(Claim::Missing),
            ["held", holder] => Ok(Claim::Held(holder.to_owned())),
            _ => Err(BlobError::Protocol(format!("claim answered {reply:?}"))),
        }
    }

    /// Gives up `claimant`'s claim on the upload at `base`, if it holds one.
    pub async fn release(&self, base: &str, claimant: &str) -> Result<(), BlobError> {
        let _: Vec<String> = self.claim_call(base, claimant, 0, "drop").await?;
        Ok(())
    }

    async fn claim_call(
        &self,
        base: &str,
        claimant: &str,
        hold_ms: u64,
        mode: &str,
    ) -> Result<Vec<String>, BlobError> {
        Ok(CLAIM
            .prepare_invoke_with_keys(&[base])
            .arg(&self.layout.prefix)
            .arg(base)
            .arg(claimant)
            .arg(hold_ms)
            .arg(mode)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    /// Deletes the blob; true if there was one.
    pub async fn delete(&self, base: &str) -> Result<bool, BlobError> {
        let deleted: u64 = self.conn.clone().del(&keys(base)[..]).await?;
        Ok(deleted > 0)
    }

    /// Removes the blob's expiry (it belongs to a request now).
    pub async fn persist(&self, base: &str) -> Result<(), BlobError> {
        let mut pipe = redis::pipe();
        for key in keys(base) {
            pipe.persist(key).ignore();
        }
        let () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// The blob's bytes, one chunk per item, from the start. The list of chunks is read first;
    /// a blob deleted while it is read ends in [`BlobError::Missing`].
    pub fn read(&self, base: &str) -> impl Stream<Item = Result<Bytes, BlobError>> + Send + 'static {
        struct State {
            conn: RedisConnection,
            base: String,
            chunks: Option<VecDeque<String>>,
        }
        let state = State { conn: self.conn.clone(), base: base.to_owned(), chunks: None };
        futures::stream::try_unfold(state, |mut state| async move {
            if state.chunks.is_none() {
                let index: Vec<String> = state.conn.lrange(format!("{}:i", state.base), 0, -1).await?;
                let exists: bool = state.conn.exists(&state.base).await?;
                if !exists {
                    return Err(BlobError::Missing);
                }
                state.chunks = Some(index.into());
            }
            let Some(seq) = state.chunks.as_mut().and_then(VecDeque::pop_front) else {
                return Ok(None);
            };
            let chunk: Option<Vec<u8>> = state.conn.hget(format!("{}:c", state.base), &seq).await?;
            let chunk = chunk.ok_or(BlobError::Missing)?;
            Ok(Some((Bytes::from(chunk), state)))
        })
    }
}

/// The three keys of the blob at `base`.
pub fn keys(base: &str) -> [String; 3] {
    [base.to_owned(), format!("{base}:c"), format!("{base}:i")]
}

fn append_outcome((outcome, offset): (String, u64), expected: u64) -> Result<u64, BlobError> {
    match outcome.as_str() {
        "ok" => Ok(offset),
        "offset" => Err(BlobError::Offset { offset, expected }),
        "length" => Err(BlobError::TooLong { offset }),
        "missing" => Err(BlobError::Missing),
        other => Err(BlobError::Protocol(format!("append answered {other:?}"))),
    }
}

/// How a [`BlobWriter`] makes its bytes part of the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Each chunk as it is written: an interrupted write keeps what arrived.
    Direct,
    /// All at once in [`BlobWriter::finish`]: nothing counts until then (a checksummed write).
    Staged,
}

/// Writes a blob from its current offset in chunks of [`CHUNK_BYTES`], holding at most one chunk.
pub struct BlobWriter {
    store: BlobStore,
    base: String,
    /// What the blob holds, as far as this writer knows (committed bytes).
    offset: u64,
    /// Bytes written through this writer (committed or staged or buffered).
    written: u64,
    buffer: BytesMut,
    mode: WriteMode,
    staged: Vec<u64>,
    expire_at_ms: Option<i64>,
}

impl BlobWriter {
    /// A writer appending to the blob at `base`, which has `offset` bytes.
    pub fn new(
        store: BlobStore,
        base: impl Into<String>,
        offset: u64,
        mode: WriteMode,
        expire_at_ms: Option<i64>,
    ) -> Self {
        BlobWriter {
            store,
            base: base.into(),
            offset,
            written: 0,
            buffer: BytesMut::new(),
            mode,
            staged: Vec::new(),
            expire_at_ms,
        }
    }

    /// Bytes written through this writer so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The blob's committed size, as far as this writer knows.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Takes `data`; full chunks go to Redis at once.
    pub async fn write(&mut self, mut data: Bytes) -> Result<(), BlobError> {
        self.written += data.len() as u64;
        while !data.is_empty() {
            if self.buffer.is_empty() && data.len() >= CHUNK_BYTES {
                let chunk = data.split_to(CHUNK_BYTES);
                self.flush_chunk(&chunk).await?;
                continue;
            }
            let take = (CHUNK_BYTES - self.buffer.len()).min(data.len());
            self.buffer.extend_from_slice(&data.split_to(take));
            if self.buffer.len() == CHUNK_BYTES {
                let chunk = self.buffer.split().freeze();
                self.flush_chunk(&chunk).await?;
            }
        }
        Ok(())
    }

    async fn flush_chunk(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        match self.mode {
            WriteMode::Direct => {
                self.offset = self.store.append(&self.base, self.offset, chunk, self.expire_at_ms).await?;
            }
            WriteMode::Staged => {
                let seq = self.store.stage(&self.base, chunk, self.expire_at_ms).await?;
                self.staged.push(seq);
            }
        }
        Ok(())
    }

    /// Writes what is buffered and, for a staged write, makes every chunk part of the blob. The
    /// blob's new size.
    pub async fn finish(mut self) -> Result<u64, BlobError> {
        if !self.buffer.is_empty() {
            let chunk = self.buffer.split().freeze();
            self.flush_chunk(&chunk).await?;
        }
        if self.mode == WriteMode::Staged {
            let staged = std::mem::take(&mut self.staged);
            match self.store.commit(&self.base, self.offset, &staged, self.expire_at_ms).await {
                Ok(offset) => self.offset = offset,
                Err(error) => {
                    let _ = self.store.discard(&self.base, &staged).await;
                    return Err(error);
                }
            }
        }
        Ok(self.offset)
    }

    /// Gives up. A direct write keeps every byte it received, the buffered ones included (an
    /// interrupted upload resumes after them); a staged write drops its chunks. The blob's size.
    pub async fn abandon(mut self) -> u64 {
        match self.mode {
            WriteMode::Direct if !self.buffer.is_empty() => {
                let chunk = self.buffer.split().freeze();
                let _ = self.flush_chunk(&chunk).await;
            }
            WriteMode::Direct => {}
            WriteMode::Staged => {
                let staged = std::mem::take(&mut self.staged);
                let _ = self.store.discard(&self.base, &staged).await;
            }
        }
        self.offset
    }
}
