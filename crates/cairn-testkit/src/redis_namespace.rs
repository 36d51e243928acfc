use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

const DEFAULT_URL: &str = "redis://127.0.0.1:6379";
const CLEANUP_BATCH: usize = 500;

/// A key prefix of its own in the shared Redis; every key under `{prefix}:` is deleted on drop.
///
/// Give `prefix` to the code under test as its configured key prefix. Keys outside it are never
/// touched, so tests sharing one Redis cannot see or clean up each other's data.
#[derive(Debug)]
pub struct RedisNamespace {
    pub url: String,
    /// `t:<8 hex digits>`, without a trailing colon.
    pub prefix: String,
}

impl RedisNamespace {
    /// A fresh prefix on the Redis named by `CAIRN_TEST_REDIS_URL` (default
    /// `redis://127.0.0.1:6379`).
    pub fn new() -> Self {
        Self::with_url(crate::env_or("CAIRN_TEST_REDIS_URL", DEFAULT_URL))
    }

    /// A fresh prefix on another Redis, e.g. a [`crate::RedisServer`].
    pub fn with_url(url: impl Into<String>) -> Self {
        Self { url: url.into(), prefix: format!("t:{}", crate::short_id()) }
    }

    /// `{prefix}:{name}`.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// A reconnecting connection with a 10 s response timeout (redis-rs defaults to 500 ms,
    /// which blocking stream reads in tests would exceed).
    pub async fn connection(&self) -> ConnectionManager {
        let client = redis::Client::open(self.url.as_str())
            .unwrap_or_else(|e| panic!("invalid Redis URL {:?} (CAIRN_TEST_REDIS_URL): {e}", self.url));
        let config = ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        ConnectionManager::new_with_config(client, config).await.unwrap_or_else(|e| {
            panic!("cannot connect to Redis at {} (set CAIRN_TEST_REDIS_URL): {e}", self.url)
        })
    }
}

impl Default for RedisNamespace {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RedisNamespace {
    fn drop(&mut self) {
        let url = self.url.clone();
        let pattern = format!("{}:*", self.prefix);
        // A plain thread with the sync client works whether or not the drop happens on a
        // runtime thread (blocking calls there would panic or stall the runtime's I/O).
        let cleanup = std::thread::spawn(move || delete_matching(&url, &pattern));
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("cairn-testkit: could not delete Redis keys {}:* at {}: {e}", self.prefix, self.url)
            }
            Err(_) => eprintln!("cairn-testkit: Redis cleanup thread panicked"),
        }
    }
}

fn delete_matching(url: &str, pattern: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    con.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(CLEANUP_BATCH)
            .query(&mut con)?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(&keys).exec(&mut con)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
