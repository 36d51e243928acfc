//! (e) Whether an update costs the same whatever the number of its siblings (docs/contract.md §2: O(depth)).
//!
//! Parent A (`_bench.e.a`) gets 10 children and parent B (`_bench.e.b`) `--siblings` children,
//! built with `ProgressStore::apply` in batches of 2 000. Then one child of each gets
//! `--sibling-updates` sequential single-update `apply` calls, in rounds of `--sibling-round`
//! ordered A B B A A B …, so drift (other load, Redis rehashing) falls on both alike. Both
//! children sit at the same depth, so the same number of ancestors is walked. Besides the time
//! a call takes end to end, Redis's own script time per call is reported.

use std::time::{Duration, Instant};

use anyhow::ensure;
use cairn_progress::now_ms;
use cairn_progress::{Key, Update};
use cairn_redis::ProgressStore;
use cairn_redis::progress::{Change, ReadOptions};
use cairn_testkit::RedisNamespace;
use serde_json::{Map, Value, json};

use super::{Args, key, round, store};
use crate::system::Probe;

const FEW_SIBLINGS: u64 = 10;
const BUILD_BATCH: u64 = 2_000;

/// Time of the timed calls to one child, end to end and inside Redis.
#[derive(Default)]
struct Timing {
    calls: u64,
    elapsed: Duration,
    script_usec: u64,
}

impl Timing {
    fn us_per_call(&self) -> f64 {
        round(self.elapsed.as_secs_f64() * 1e6 / self.calls as f64, 2)
    }

    fn script_us_per_call(&self) -> f64 {
        round(self.script_usec as f64 / self.calls as f64, 2)
    }
}

pub(super) async fn measure(args: &Args) -> anyhow::Result<Map<String, Value>> {
    let ns = RedisNamespace::new();
    let store = store(&ns)?;
    eprintln!("cairn-bench: (e) building parents with {FEW_SIBLINGS} and {} children", args.siblings);
    let few = build(&store, "_bench.e.a", FEW_SIBLINGS).await?;
    let many = build(&store, "_bench.e.b", args.siblings).await?;

    eprintln!("cairn-bench: (e) timing {} updates under each parent", args.sibling_updates);
    let mut probe = Probe::new(&ns.url).await?;
    let (mut a, mut b) = (Timing::default(), Timing::default());
    let mut done = 0;
    let mut round_index = 0u64;
    while done < args.sibling_updates {
        let n = args.sibling_round.min(args.sibling_updates - done);
        // A B, B A, A B …: each parent goes first every other round.
        let order = if round_index.is_multiple_of(2) {
            [(&few, &mut a), (&many, &mut b)]
        } else {
            [(&many, &mut b), (&few, &mut a)]
        };
        for (child, timing) in order {
            let before = probe.sample().await?;
            let started = Instant::now();
            for i in 0..n {
                let progress = ((done + i) % 100) as f64 / 100.0;
                let change = Change {
                    key: child.clone(),
                    update: Update::new().progress(progress),
                    time_ms: now_ms(),
                };
                store.apply(std::slice::from_ref(&change)).await?;
            }
            timing.elapsed += started.elapsed();
            timing.calls += n;
            timing.script_usec += probe.sample().await?.script_usec_since(&before);
        }
        done += n;
        round_index += 1;
    }
    let parent = store.get(&key("_bench.e.b")?, &ReadOptions::default()).await?;
    let count = parent.map_or(0, |p| p.child_count);
    ensure!(count == args.siblings, "parent B has {count} children, expected {}", args.siblings);

    let ratio = round(b.us_per_call() / a.us_per_call(), 3);
    eprintln!("cairn-bench: (e) {} µs vs {} µs per update (ratio {ratio})", a.us_per_call(), b.us_per_call());
    let mut out = Map::new();
    out.insert("e_us_per_update_10_siblings".into(), json!(a.us_per_call()));
    out.insert("e_us_per_update_100k_siblings".into(), json!(b.us_per_call()));
    out.insert("e_ratio".into(), json!(ratio));
    out.insert("e_redis_script_us_10_siblings".into(), json!(a.script_us_per_call()));
    out.insert("e_redis_script_us_100k_siblings".into(), json!(b.script_us_per_call()));
    out.insert(
        "e_redis_script_ratio".into(),
        json!(round(b.script_us_per_call() / a.script_us_per_call(), 3)),
    );
    eprintln!("cairn-bench: (e) cleaning up the key prefix");
    Ok(out)
}

/// Creates `children` children under `parent` (`{parent}.c{i}`); returns the first child, the
/// one the timed updates go to.
async fn build(store: &ProgressStore, parent: &str, children: u64) -> anyhow::Result<Key> {
    let time_ms = now_ms();
    let mut start = 0;
    while start < children {
        let end = (start + BUILD_BATCH).min(children);
        let changes = (start..end)
            .map(|i| {
                Ok(Change {
                    key: key(&format!("{parent}.c{i}"))?,
                    update: Update::new().progress(0.5),
                    time_ms,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        store.apply(&changes).await?;
        start = end;
    }
    key(&format!("{parent}.c0"))
}
