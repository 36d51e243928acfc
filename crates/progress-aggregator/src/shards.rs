//! Which shard queues this replica consumes: aggregator replicas share them (docs/contract.md §8).
//!
//! Each replica announces itself in a members sorted set in Redis (`{prefix}:aggregator:members:
//! {queue}`, scored by when its announcement runs out) and holds a lease per shard it consumes
//! (`{prefix}:aggregator:shard:{queue}.{i}`, the [`Lease`] the trimmer uses). Every third of the
//! lease's ttl it renews what it holds and aims at its fair share, `⌈shards / live replicas⌉`:
//! it hands back the shards above it (after it stopped consuming them) and takes free ones below
//! it. A replica that dies stops renewing, and its shards go to the others once its leases run
//! out.
//!
//! Order across a handover never depends on the leases being exact: the shard queues are
//! single-active-consumer, so RabbitMQ delivers a queue to one consumer at a time, and a
//! consumer that goes away (closing its channel, or its connection dying) hands its unacked
//! messages back to the queue's head. A replica that lost a lease it could not renew (Redis
//! away, a pause) and another that took it may both subscribe for a moment; the broker still
//! feeds only the first.

use std::collections::BTreeSet;
use std::time::Duration;

use cairn_redis::RedisConnection;
use cairn_redis::streams::{Lease, LeaseState, StreamError};

/// The most shards one replica should hold with `members` replicas alive (at least one: itself).
pub fn fair_share(shards: u16, members: usize) -> usize {
    usize::from(shards).div_ceil(members.max(1))
}

/// What a replica should do with its shards, from what it holds and how many it should hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Held above the fair share: stop consuming them, then hand them back (highest first).
    pub release: Vec<u16>,
    /// Worth trying to take, in this order, until the fair share is reached.
    pub candidates: Vec<u16>,
}

/// Plans the shards of a replica holding `held` of `shards`, with a fair share of `target`.
/// Candidates start at `start` and wrap around, so replicas starting at different places do not
/// all race for shard 0.
pub fn plan(shards: u16, held: &BTreeSet<u16>, target: usize, start: u16) -> Plan {
    if held.len() > target {
        let release = held.iter().rev().take(held.len() - target).copied().collect();
        return Plan { release, candidates: Vec::new() };
    }
    if held.len() == target || shards == 0 {
        return Plan::default();
    }
    let candidates =
        (0..shards).map(|i| (start % shards + i) % shards).filter(|shard| !held.contains(shard)).collect();
    Plan { release: Vec::new(), candidates }
}

/// A replica's membership and shard leases in Redis.
pub struct ShardLeases {
    conn: RedisConnection,
    members_key: String,
    leases: Vec<Lease>,
    instance: String,
    ttl: Duration,
}

impl ShardLeases {
    /// `queues`: the shard queues in shard order; `instance` must be unique among replicas.
    pub fn new(
        conn: impl Into<RedisConnection>,
        prefix: &str,
        queue: &str,
        queues: &[String],
        instance: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        let (conn, instance) = (conn.into(), instance.into());
        let leases = queues
            .iter()
            .map(|q| {
                Lease::new(conn.clone(), format!("{prefix}:aggregator:shard:{q}"), instance.clone(), ttl)
            })
            .collect();
        Self { conn, members_key: format!("{prefix}:aggregator:members:{queue}"), leases, instance, ttl }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Where this replica starts looking for free shards: spread by its name.
    pub fn start(&self) -> u16 {
        let hash = self.instance.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        (hash % u32::from(self.leases.len().max(1) as u16)) as u16
    }

    /// Announces this replica for another ttl and counts the live ones (itself included).
    pub async fn heartbeat(&self, now_ms: i64) -> Result<usize, StreamError> {
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let (live,): (usize,) = redis::pipe()
            .atomic()
            .zadd(&self.members_key, &self.instance, now_ms.saturating_add(ttl_ms))
            .ignore()
            .zrembyscore(&self.members_key, "-inf", now_ms)
            .ignore()
            .zcard(&self.members_key)
            .pexpire(&self.members_key, ttl_ms.saturating_mul(2))
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(live.max(1))
    }

    /// Takes or renews the lease of one shard.
    pub async fn acquire_or_renew(&self, shard: u16) -> Result<LeaseState, StreamError> {
        self.leases[usize::from(shard)].acquire_or_renew().await
    }

    /// Hands one shard's lease back (only once nothing of this replica consumes it).
    pub async fn release(&self, shard: u16) -> Result<bool, StreamError> {
        self.leases[usize::from(shard)].release().await
    }

    /// Leaves the members set, so the others count one replica fewer at once.
    pub async fn leave(&self) -> Result<(), StreamError> {
        let _: () = redis::cmd("ZREM")
            .arg(&self.members_key)
            .arg(&self.instance)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}

/// A name for this replica that no other shares: host, pid and a random tag.
pub fn default_instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{}-{}-{tag}", if host.is_empty() { "aggregator" } else { host }, std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(shards: &[u16]) -> BTreeSet<u16> {
        shards.iter().copied().collect()
    }

    #[test]
    fn the_fair_share_rounds_up_so_every_shard_has_an_owner() {
        assert_eq!(fair_share(4, 1), 4);
        assert_eq!(fair_share(4, 2), 2);
        assert_eq!(fair_share(4, 3), 2);
        assert_eq!(fair_share(4, 4), 1);
        assert_eq!(fair_share(4, 9), 1, "more replicas than shards: some hold none, each at most one");
        assert_eq!(fair_share(4, 0), 4, "a replica always counts itself");
        assert_eq!(fair_share(1, 3), 1);
    }

    #[test]
    fn a_replica_above_its_share_hands_back_its_highest_shards() {
        let plan = plan(4, &set(&[0, 1, 2, 3]), 2, 0);
        assert_eq!(plan, Plan { release: vec![3, 2], candidates: vec![] });
    }

    #[test]
    fn a_replica_below_its_share_tries_the_others_from_its_start() {
        assert_eq!(plan(4, &set(&[1]), 2, 3), Plan { release: vec![], candidates: vec![3, 0, 2] });
        assert_eq!(plan(4, &set(&[]), 4, 0).candidates, vec![0, 1, 2, 3]);
        assert_eq!(plan(4, &set(&[]), 1, 9).candidates, vec![1, 2, 3, 0], "the start wraps around");
    }

    #[test]
    fn a_replica_at_its_share_changes_nothing() {
        assert_eq!(plan(4, &set(&[0, 2]), 2, 1), Plan::default());
    }
}
