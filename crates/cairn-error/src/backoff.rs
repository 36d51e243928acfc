//! How long to wait before trying again: one [`Backoff`] for every retry and reconnection loop
//! in Cairn (request attempts, Redis and RabbitMQ reconnections, store retries), and
//! [`Retries`], the count of failures in a row that a loop keeps to pick its next delay.
//!
//! Backoff uses "full jitter" (a uniform delay between zero and an exponentially growing cap)
//! where many clients fail together and should not come back at once (request attempts, the
//! processors' reconnections); loops with one client per process wait the cap itself
//! ([`Retries::doubling`]). No I/O here: a loop sleeps the delay itself, so it stays cancellable.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: the delay before attempt `n + 1` is uniform in
/// `[0, cap(n)]` with `cap(n) = min(max, base · factor^(n-1))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Cap after the first failed attempt.
    pub base: Duration,
    /// Largest cap, whatever the attempt.
    pub max: Duration,
    /// Growth of the cap per attempt. Values below 1, and NaN, count as 1, so caps never
    /// shrink from one attempt to the next.
    pub factor: f64,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { base: Duration::from_millis(200), max: Duration::from_secs(30), factor: 2.0 }
    }
}

impl Backoff {
    /// The largest delay after `attempt` failed attempts (attempt 0 counts as 1): never above
    /// `max`, and never smaller than the cap of an earlier attempt.
    pub fn cap(&self, attempt: u32) -> Duration {
        let factor = if self.factor >= 1.0 { self.factor } else { 1.0 };
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        // Infinite once the growth overflows f64; the comparison below clamps that to `max`.
        let nanos = self.base.as_nanos() as f64 * factor.powi(exponent);
        if nanos >= self.max.as_nanos() as f64 {
            self.max
        } else {
            duration_from_nanos(nanos as u128).min(self.max)
        }
    }

    /// The delay after `attempt` failed attempts, given `jitter` uniform in `[0, 1]` from the
    /// caller's random source. Jitter outside that range is clamped (NaN counts as 0).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let jitter = if jitter.is_nan() { 0.0 } else { jitter.clamp(0.0, 1.0) };
        let cap = self.cap(attempt);
        duration_from_nanos((cap.as_nanos() as f64 * jitter) as u128).min(cap)
    }

    pub fn delay_with_rng(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        self.delay(attempt, rng.random::<f64>())
    }
}

/// Saturates at [`Duration::MAX`].
fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below 10⁹, so it fits in a u32.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

/// Failures in a row of one loop, and the delay to wait after each: the cap of its [`Backoff`]
/// ([`Retries::doubling`]) or a full-jitter delay under it ([`Retries::jittered`]).
#[derive(Debug, Clone)]
pub struct Retries {
    backoff: Backoff,
    jitter: bool,
    failures: u32,
}

impl Retries {
    /// `base`, twice that, four times… up to `max`, without jitter.
    pub const fn doubling(base: Duration, max: Duration) -> Retries {
        Retries { backoff: Backoff { base, max, factor: 2.0 }, jitter: false, failures: 0 }
    }

    /// Uniform delays under the caps of `backoff`.
    pub const fn jittered(backoff: Backoff) -> Retries {
        Retries { backoff, jitter: true, failures: 0 }
    }

    /// Counts a failure; the delay before the next try.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if self.jitter {
            self.backoff.delay_with_rng(self.failures, &mut rand::rng())
        } else {
            self.backoff.cap(self.failures)
        }
    }

    /// Starts over: the next failure waits the first delay again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn backoff(&self) -> Backoff {
        self.backoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubling_retries_wait_each_cap_and_start_over() {
        let mut retries = Retries::doubling(ms(100), Duration::from_secs(5));
        let delays: Vec<u128> = (0..8).map(|_| retries.failed().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(retries.failures(), 8);
        retries.succeeded();
        assert_eq!(retries.failures(), 0);
        assert_eq!(retries.failed(), ms(100));
    }

    #[test]
    fn jittered_retries_stay_under_each_cap() {
        let backoff = Backoff { base: ms(100), max: Duration::from_secs(2), factor: 2.0 };
        let mut retries = Retries::jittered(backoff);
        for n in 1..=12 {
            let delay = retries.failed();
            assert!(delay <= backoff.cap(n), "failure {n}: {delay:?} > {:?}", backoff.cap(n));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| retries.failed()).collect();
        assert!(spread.len() > 40, "{} distinct delays", spread.len());
        assert_eq!(retries.backoff(), backoff);
    }

    #[test]
    fn default_caps_double_up_to_max() {
        let b = Backoff::default();
        let caps: Vec<u128> = (0..=10).map(|n| b.cap(n).as_millis()).collect();
        assert_eq!(caps, [200, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
        assert_eq!(b.cap(u32::MAX), b.max);
    }

    #[test]
    fn delay_is_jitter_times_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(1, 0.0), Duration::ZERO);
        assert_eq!(b.delay(1, 1.0), ms(200));
        assert_eq!(b.delay(3, 0.5), ms(400));
        assert_eq!(b.delay(3, 0.25), ms(200));
        // Out-of-range jitter is clamped.
        assert_eq!(b.delay(3, 7.0), ms(800));
        assert_eq!(b.delay(3, -1.0), Duration::ZERO);
        assert_eq!(b.delay(3, f64::NAN), Duration::ZERO);
        assert_eq!(b.delay(3, f64::INFINITY), ms(800));
    }

    #[test]
    fn odd_settings_are_tamed() {
        let shrinking = Backoff { factor: 0.5, ..Backoff::default() };
        assert_eq!(shrinking.cap(5), ms(200));
        let nan = Backoff { factor: f64::NAN, ..Backoff::default() };
        assert_eq!(nan.cap(5), ms(200));
        let inf = Backoff { factor: f64::INFINITY, ..Backoff::default() };
        assert_eq!(inf.cap(1), ms(200));
        assert_eq!(inf.cap(2), inf.max);
        let max_below_base = Backoff { base: ms(500), max: ms(100), factor: 2.0 };
        assert_eq!(max_below_base.cap(1), ms(100));
        let zero = Backoff { base: Duration::ZERO, ..Backoff::default() };
        assert_eq!(zero.cap(40), Duration::ZERO);
        let huge = Backoff { base: Duration::MAX, max: Duration::MAX, factor: 10.0 };
        assert_eq!(huge.cap(1), Duration::MAX);
        assert_eq!(huge.cap(u32::MAX), Duration::MAX);
        assert!(huge.delay(3, 1.0) <= Duration::MAX);
        assert_eq!(huge.delay(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn delay_with_rng_stays_under_cap_and_varies() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..100).map(|_| b.delay_with_rng(4, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= ms(1600)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 90, "{} distinct delays", distinct.len());
    }

    #[test]
    fn duration_from_nanos_saturates() {
        assert_eq!(duration_from_nanos(1_500_000_001), Duration::new(1, 500_000_001));
        assert_eq!(duration_from_nanos(u128::MAX), Duration::MAX);
        assert_eq!(duration_from_nanos(Duration::MAX.as_nanos()), Duration::MAX);
    }

    fn backoff() -> impl Strategy<Value = Backoff> {
        (0u64..=60_000_000_000, 0u64..=3_600_000_000_000, prop_oneof![Just(2.0), 0.0f64..10.0]).prop_map(
            |(base, max, factor)| Backoff {
                base: Duration::from_nanos(base),
                max: Duration::from_nanos(max),
                factor,
            },
        )
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_cap_or_max(b in backoff(), attempt in any::<u32>(), jitter in -0.5f64..1.5) {
            let cap = b.cap(attempt);
            prop_assert!(cap <= b.max);
            let delay = b.delay(attempt, jitter);
            prop_assert!(delay <= cap, "{delay:?} > {cap:?}");
            prop_assert!(delay <= b.max);
        }

        #[test]
        fn caps_grow_monotonically(b in backoff(), start in prop_oneof![0u32..80, any::<u32>()], steps in 1u32..64) {
            let mut previous = b.cap(start);
            for attempt in start.saturating_add(1)..=start.saturating_add(steps) {
                let cap = b.cap(attempt);
                prop_assert!(cap >= previous, "cap({attempt}) = {cap:?} < {previous:?}");
                previous = cap;
            }
            prop_assert!(b.cap(0) <= b.cap(start));
        }
    }
}
