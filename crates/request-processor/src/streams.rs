//! A request's data streams as its handler gets them: async readers over the chunks in Redis,
//! read from the start on every attempt, each counting the bytes it hands over and reporting
//! them to `{progress_key}.streams.{name}` (`bytes`, `total_bytes`, `progress`, weight 1).
//! What a handler leaves unread (an `echo` that never looks at its streams) is counted as
//! drained when the attempt succeeds, so a succeeded request shows every stream whole.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::handler::ProgressSink;
use bytes::Bytes;
use cairn_progress::{Key, Update};
use cairn_redis::BlobStore;
use cairn_requests::StreamInfo;
use futures::{Stream, TryStreamExt as _};
use tokio::io::AsyncRead;

/// An open data stream: read it to its end for all its bytes.
pub type StreamReader = Pin<Box<dyn AsyncRead + Send>>;

/// An open data stream as chunks (what HTTP bodies are built from).
pub type StreamChunks = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// The data streams of one attempt.
#[derive(Clone)]
pub struct Streams {
    inner: Arc<Inner>,
}

struct Inner {
    blobs: Option<BlobStore>,
    request_id: String,
    progress_key: Key,
    publisher: Option<Arc<dyn ProgressSink>>,
    list: Vec<StreamInfo>,
    /// Bytes handed to the handler so far, per stream (the furthest any reader got).
    sent: Vec<AtomicU64>,
}

impl Streams {
    pub(crate) fn new(
        blobs: BlobStore,
        request_id: &str,
        progress_key: &Key,
        publisher: Arc<dyn ProgressSink>,
        list: Vec<StreamInfo>,
    ) -> Streams {
        let sent = list.iter().map(|_| AtomicU64::new(0)).collect();
        Streams {
            inner: Arc::new(Inner {
                blobs: Some(blobs),
                request_id: request_id.to_owned(),
                progress_key: progress_key.clone(),
                publisher: Some(publisher),
                list,
                sent,
            }),
        }
    }

    /// No streams (a request without any, or a handler run outside a processor).
    pub fn none(progress_key: &Key) -> Streams {
        Streams {
            inner: Arc::new(Inner {
                blobs: None,
                request_id: String::new(),
                progress_key: progress_key.clone(),
                publisher: None,
                list: Vec::new(),
                sent: Vec::new(),
            }),
        }
    }

    /// The streams by name, with their sizes, in name order.
    pub fn list(&self) -> &[StreamInfo] {
        &self.inner.list
    }

    pub fn is_empty(&self) -> bool {
        self.inner.list.is_empty()
    }

    /// The stream `name` from its start, as an async reader; `None` if the request has none.
    pub fn open(&self, name: &str) -> Option<StreamReader> {
        let chunks = self.chunks(name)?;
        Some(Box::pin(tokio_util::io::StreamReader::new(chunks)))
    }

    /// The stream `name` from its start, chunk by chunk; `None` if the request has none.
    pub fn chunks(&self, name: &str) -> Option<StreamChunks> {
        let index = self.inner.list.iter().position(|s| s.name == name)?;
        let blobs = self.inner.blobs.as_ref()?;
        let base = blobs.stream_key(&self.inner.request_id, name);
        let total = self.inner.list[index].bytes;
        let inner = self.inner.clone();
        let mut read = 0u64;
        inner.report(index, 0, total);
        let chunks = blobs
            .read(&base)
            .map_err({
                let name = name.to_owned();
                move |e| io::Error::other(format!("data stream {name:?}: {e}"))
            })
            .inspect_ok(move |chunk| {
                read += chunk.len() as u64;
                if inner.sent[index].fetch_max(read, Ordering::Relaxed) < read {
                    inner.report(index, read, total);
                }
            });
        Some(Box::pin(chunks))
    }

    /// Counts every stream as handed over whole (after a successful attempt): what the handler
    /// did not read was drained.
    pub(crate) fn drained(&self) {
        for (index, stream) in self.inner.list.iter().enumerate() {
            self.inner.sent[index].store(stream.bytes, Ordering::Relaxed);
            self.inner.report(index, stream.bytes, stream.bytes);
        }
    }
}

impl Inner {
    fn report(&self, index: usize, bytes: u64, total: u64) {
        let Some(publisher) = &self.publisher else { return };
        let name = &self.list[index].name;
        let Ok(key) = Key::parse(&format!("{}.streams.{name}", self.progress_key)) else { return };
        publisher.send(key, bytes_update(bytes, total), None);
    }
}

/// `bytes`, `total_bytes`, `progress` and a status of a stream being handed over.
pub fn bytes_update(bytes: u64, total: u64) -> Update {
    let done = bytes >= total;
    #[allow(clippy::cast_precision_loss)]
    let progress = if total == 0 { 1.0 } else { (bytes as f64 / total as f64).min(1.0) };
    Update::new()
        .weight(1.0)
        .progress(progress)
        .status(if done { "finished" } else { "running" })
        .field("bytes", bytes)
        .field("total_bytes", total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_become_progress() {
        let json = bytes_update(1, 4).to_json();
        assert_eq!(json["progress"], 0.25);
        assert_eq!(json["status"], "running");
        assert_eq!(json["weight"], 1.0);
        let done = bytes_update(4, 4).to_json();
        assert_eq!((done["progress"].as_f64(), done["status"].as_str()), (Some(1.0), Some("finished")));
        assert_eq!(bytes_update(0, 0).to_json()["progress"], 1.0);
    }

    #[test]
    fn a_request_without_streams_has_none() {
        let streams = Streams::none(&Key::parse("_requests.x").unwrap());
        assert!(streams.is_empty());
        assert!(streams.open("data").is_none());
    }
}
