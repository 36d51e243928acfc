//! Which files have settled: a file is ready once its size and modification time stayed the
//! same for the lag. Watch events only say "look at this path"; the decision is made on what
//! `stat` shows, since events coalesce and arrive out of order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

/// A file's size and modification time (ns since the epoch).
pub type Stamp = (u64, u64);

pub struct Settler {
    lag: Duration,
    /// Each candidate's last seen stamp and since when it has been unchanged.
    seen: HashMap<PathBuf, (Stamp, Instant)>,
}

impl Settler {
    pub fn new(lag: Duration) -> Settler {
        Settler { lag, seen: HashMap::new() }
    }

    /// Records what `stat` shows of `path` now; a changed stamp restarts its wait.
    pub fn observe(&mut self, path: PathBuf, stamp: Stamp, now: Instant) {
        match self.seen.get_mut(&path) {
            Some((old, since)) if *old != stamp => {
                *old = stamp;
                *since = now;
            }
            Some(_) => {}
            None => {
                self.seen.insert(path, (stamp, now));
            }
        }
    }

    /// Forgets a path (deleted, or taken).
    pub fn forget(&mut self, path: &PathBuf) {
        self.seen.remove(path);
    }

    /// The candidates, to re-stat at a tick.
    pub fn candidates(&self) -> Vec<PathBuf> {
        self.seen.keys().cloned().collect()
    }

    /// Takes the paths unchanged for the lag by `now`.
    pub fn take_settled(&mut self, now: Instant) -> Vec<(PathBuf, Stamp)> {
        let lag = self.lag;
        let ready: Vec<PathBuf> =
            self.seen.iter().filter(|(_, (_, since))| now - *since >= lag).map(|(p, _)| p.clone()).collect();
        let mut settled: Vec<_> =
            ready.into_iter().filter_map(|p| self.seen.remove(&p).map(|(stamp, _)| (p, stamp))).collect();
        settled.sort();
        settled
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_file_settles_after_the_lag_without_change() {
        let mut settler = Settler::new(Duration::from_secs(3));
        let a = PathBuf::from("a");
        let b = PathBuf::from("b");
        settler.observe(a.clone(), (10, 1), Instant::now());
        settler.observe(b.clone(), (5, 1), Instant::now());
        tokio::time::advance(Duration::from_secs(2)).await;
        // a keeps growing; b does not
        settler.observe(a.clone(), (20, 2), Instant::now());
        settler.observe(b.clone(), (5, 1), Instant::now());
        assert!(settler.take_settled(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(settler.take_settled(Instant::now()), vec![(b.clone(), (5, 1))]);
        tokio::time::advance(Duration::from_millis(1999)).await;
        settler.observe(a.clone(), (20, 2), Instant::now());
        assert!(settler.take_settled(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(settler.take_settled(Instant::now()), vec![(a, (20, 2))]);
        assert!(settler.is_empty());
    }
}
