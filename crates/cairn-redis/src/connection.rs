//! The connection the stores share: one Redis through a reconnecting [`ConnectionManager`], or a
//! Redis Cluster through redis-rs's cluster connection, which routes each command to the master
//! of its key's slot, follows `MOVED`/`ASK` and sends `FUNCTION LOAD` to every master
//! (docs/contract.md §8).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to one Redis or to a Redis Cluster; cheap to clone (clones share the sockets).
///
/// The stores build their keys by [`is_cluster`](Self::is_cluster): on a cluster every key of a
/// progress tree carries its root as hash tag, and what no single slot holds is written by
/// commands of its own after each function call.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    /// One Redis, a connection of one blocking reader's own.
    Dedicated(MultiplexedConnection),
    /// A cluster connection, with the client it came from when kept to say why no node
    /// answers ([`ready`](Self::ready)).
    Cluster(ClusterConnection, Option<Arc<ClusterClient>>),
}

impl RedisConnection {
    /// Whether this is a Redis Cluster (the hash-tagged key layout).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(..))
    }

    /// Whether Redis answers PING (the readiness check), and if not, why.
    ///
    /// A cluster connection made in the background answers every command with "no connections
    /// found" when it reaches no node, which says nothing of the cause. Then one connection to
    /// the seeds is tried, and its error (a certificate refused, a password wrong, a port
    /// closed) is the answer.
    pub async fn ready(&self) -> Result<(), String> {
        let error = match crate::ping(&mut self.clone()).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let RedisConnection::Cluster(_, Some(client)) = self else { return Err(error) };
        let config = ClusterConfig::new().set_connection_timeout(Duration::from_secs(2));
        match tokio::time::timeout(crate::PING_TIMEOUT, client.get_async_connection_with_config(config)).await
        {
            Ok(Err(why)) => Err(format!("redis: {why}")),
            _ => Err(error),
        }
    }
}

impl From<ConnectionManager> for RedisConnection {
    fn from(conn: ConnectionManager) -> Self {
        RedisConnection::Single(conn)
    }
}

impl From<MultiplexedConnection> for RedisConnection {
    fn from(conn: MultiplexedConnection) -> Self {
        RedisConnection::Dedicated(conn)
    }
}

impl From<ClusterConnection> for RedisConnection {
    fn from(conn: ClusterConnection) -> Self {
        RedisConnection::Cluster(conn, None)
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(conn) => conn.req_packed_command(cmd),
            RedisConnection::Dedicated(conn) => conn.req_packed_command(cmd),
            RedisConnection::Cluster(conn, _) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Dedicated(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(conn, _) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(conn) => conn.get_db(),
            RedisConnection::Dedicated(conn) => conn.get_db(),
            RedisConnection::Cluster(conn, _) => conn.get_db(),
        }
    }
}
