//! Where a suite runs: a prefix of its own on the shared Redis, or a private Redis Cluster of
//! three masters (docs/contract.md §8). The same test bodies run on both.

#![allow(dead_code)] // each test binary uses a part of it

use std::sync::Arc;

use cairn_redis::progress::ProgressStore;
use cairn_redis::progress::feed::Feed;
use cairn_redis::{RedisConfig, RedisConnection};
use cairn_testkit::{RedisCluster, RedisNamespace, unique_name};

/// A key prefix on one Redis or on a cluster.
pub struct Target {
    pub config: RedisConfig,
    pub prefix: String,
    _namespace: Option<RedisNamespace>,
    _cluster: Option<Arc<RedisCluster>>,
}

impl Target {
    /// A prefix of its own on the shared Redis, its keys deleted on drop.
    pub fn single() -> Self {
        let ns = RedisNamespace::new();
        Target {
            config: RedisConfig::new(ns.url.clone(), ns.prefix.clone()),
            prefix: ns.prefix.clone(),
            _namespace: Some(ns),
            _cluster: None,
        }
    }

    /// A cluster of its own, stopped on drop.
    pub async fn cluster() -> Self {
        Self::on(&Arc::new(RedisCluster::new().await))
    }

    /// A fresh prefix on a cluster shared by several cases.
    pub fn on(cluster: &Arc<RedisCluster>) -> Self {
        let prefix = unique_name("c");
        Target {
            config: RedisConfig::cluster(cluster.url(), prefix.clone()),
            prefix,
            _namespace: None,
            _cluster: Some(cluster.clone()),
        }
    }

    /// A fresh prefix on the cluster given, or on the shared Redis.
    pub fn new(cluster: Option<&Arc<RedisCluster>>) -> Self {
        cluster.map_or_else(Self::single, Self::on)
    }

    pub fn is_cluster(&self) -> bool {
        self.config.cluster
    }

    pub fn store(&self) -> ProgressStore {
        ProgressStore::new(self.connection(), self.prefix.clone())
    }

    pub fn feed(&self) -> Feed {
        Feed::new(self.connection(), self.prefix.clone())
    }

    /// The connection the stores use: commands on it reach the node of their key.
    pub fn connection(&self) -> RedisConnection {
        self.config.connection().expect("redis url")
    }

    /// `{prefix}:{name}`.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// A tree's change feed key, in the layout of this target.
    pub fn feed_key(&self, root: &str) -> String {
        cairn_redis::keys::progress::feed_in(self.is_cluster(), &self.prefix, root)
    }
}

/// Runs each named `async fn(&Target)` as two tests, `single_redis` and `cluster`, in a module
/// of its name.
#[macro_export]
macro_rules! on_redis_and_cluster {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn single_redis() {
                    super::$name(&super::common::Target::single()).await
                }

                #[tokio::test]
                async fn cluster() {
                    super::$name(&super::common::Target::cluster().await).await
                }
            }
        )*
    };
}
