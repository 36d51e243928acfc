//! The retention purge (docs/contract.md §4): request records and progress trees that finished longer ago
//! than their retention. Nothing unfinished is ever purged; each decision is re-checked inside
//! the script that deletes, so a record retried or a tree updated meanwhile stays.

use std::sync::LazyLock;

use super::StreamError;
use crate::library::{Function, LIBRARY};
use crate::requests::{QueueLayout, QueueNames};
use crate::{BlobStore, RedisConnection, StoreError, keys};

static PURGE_REQUESTS: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("retention_purge_requests"));
/// The progress store's own delete (a function of the library: retention/purge_tree.lua, then
/// progress/delete.lua) behind a guard: the same subtree removal and index clean-up as
/// [`crate::ProgressStore::delete`], only when the tree is finished and old enough.
static PURGE_TREE: LazyLock<Function> = LazyLock::new(|| LIBRARY.function("retention_purge_tree"));

/// The root of an upload's progress tree is this and the upload's id (`_uploads.<id>`).
const UPLOADS: &str = "_uploads.";

/// One call of [`Purger::purge_requests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestPurge {
    /// Records (and their idempotency keys) deleted.
    pub purged: u64,
    /// Index entries looked at; fewer than the limit means none older than the cutoff are left.
    pub examined: u64,
}

/// Purges finished data of one key prefix: the requests of its queue layout's partitions, and
/// progress trees.
#[derive(Clone)]
pub struct Purger {
    conn: RedisConnection,
    /// Tagged exactly when `conn` is a cluster's.
    layout: QueueLayout,
}

impl Purger {
    /// The purger of a prefix whose request queue has one partition (the default layout).
    pub fn new(conn: impl Into<RedisConnection>, prefix: impl Into<String>) -> Self {
        let layout = QueueLayout::new(&prefix.into(), "requests", "processors");
        Self::for_layout(conn, &layout)
    }

    /// The purger of `layout`'s prefix and partitions (`CAIRN_REQUEST_PARTITIONS`); its keys are
    /// tagged exactly when `conn` is a cluster's.
    pub fn for_layout(conn: impl Into<RedisConnection>, layout: &QueueLayout) -> Self {
        let conn = conn.into();
        let layout = layout.clone().tagged(conn.is_cluster());
        Self { conn, layout }
    }

    pub fn layout(&self) -> &QueueLayout {
        &self.layout
    }

    /// The partition count the request queue records (`RequestQueues::check_partitions`), if
    /// any; a value that is no count is `None`.
    pub async fn recorded_partitions(&self) -> Result<Option<u16>, redis::RedisError> {
        let key = keys::requests::partitions(&self.layout.prefix, &self.layout.stream);
        let recorded: Option<String> = redis::cmd("GET").arg(key).query_async(&mut self.conn.clone()).await?;
        Ok(recorded.and_then(|text| text.parse().ok()))
    }

    /// The partitions with a finished index of their own, which [`Self::purge_requests`] takes:
    /// every partition on a cluster; on one Redis the first, whose index the others share.
    pub fn partitions(&self) -> Vec<QueueNames> {
        let mut partitions = self.layout.all();
        partitions.dedup_by(|a, b| a.finished() == b.finished());
        partitions
    }

    /// The roots of the progress trees, scored by their latest update time.
    pub fn progress_roots(&self) -> String {
        keys::progress::roots(&self.layout.prefix)
    }

    /// Deletes up to `limit` request records of `partition`'s finished index in a terminal state
    /// (succeeded, canceled) that finished at or before `cutoff_ms`, and dead ones that died at
    /// or before `dead_cutoff_ms` (`None`: dead ones are kept until retried or deleted), with
    /// their idempotency keys and data streams. One call touches the partition's slot only.
    pub async fn purge_requests(
        &self,
        partition: &QueueNames,
        cutoff_ms: i64,
        dead_cutoff_ms: Option<i64>,
        limit: usize,
    ) -> Result<RequestPurge, StreamError> {
        let (purged, examined): (u64, u64) = PURGE_REQUESTS
            .prepare_invoke_with_keys(&[&partition.finished()])
            .arg(&partition.prefix)
            .arg(cutoff_ms)
            .arg(limit)
            .arg(dead_cutoff_ms.map_or(-1, |cutoff| cutoff.max(0)))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(RequestPurge { purged, examined })
    }

    /// Progress roots last updated at or before `cutoff_ms`, oldest first: `count` of them from
    /// position `offset` (roots skipped because they are unfinished stay in the range).
    pub async fn old_roots(
        &self,
        cutoff_ms: i64,
        offset: usize,
        count: usize,
    ) -> Result<Vec<String>, StreamError> {
        let roots: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.progress_roots())
            .arg("-inf")
            .arg(cutoff_ms)
            .arg("LIMIT")
            .arg(offset)
            .arg(count)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(roots)
    }

    /// Removes the tree at `root` (its nodes, child indexes and `proots` entry) if its root's
    /// status is finished, failed or canceled and it was last updated at or before `cutoff_ms`.
    /// Returns the number of nodes removed, or `None` when the tree stays.
    pub async fn purge_tree(
        &self,
        root: &str,
        now_ms: i64,
        cutoff_ms: i64,
    ) -> Result<Option<u64>, StreamError> {
        let (tagged, prefix) = (self.layout.tagged, &self.layout.prefix);
        let mut invocation =
            PURGE_TREE.prepare_invoke_with_keys(&[&keys::progress::node_in(tagged, prefix, root)]);
        invocation.arg(prefix).arg(root).arg(now_ms).arg(cutoff_ms);
        if tagged {
            // An upload's key is in its partition's slot, not in the tree's: looked for here. An
            // upload that is gone never comes back (ids are not reused), so the answer holds.
            let gone = match root.strip_prefix(UPLOADS) {
                Some(id) => {
                    let upload = BlobStore::new(self.conn.clone(), &self.layout).upload_key(id);
                    !redis::cmd("EXISTS").arg(upload).query_async::<bool>(&mut self.conn.clone()).await?
                }
                None => false,
            };
            invocation.arg(if gone { "1" } else { "0" });
        }
        let mut reply: redis::Value = invocation.invoke_async(&mut self.conn.clone()).await?;
        if tagged {
            reply = crate::progress::write_deferred(&mut self.conn.clone(), prefix, reply).await.map_err(
                |error| match error {
                    StoreError::Redis(e) | StoreError::Rejected(e) => StreamError::Redis(e),
                    other => StreamError::Protocol(other.to_string()),
                },
            )?;
        }
        let removed: i64 = redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
        Ok(u64::try_from(removed).ok())
    }
}
