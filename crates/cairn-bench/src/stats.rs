//! The statistics every benchmark reports, defined once so their figures compare.

use std::time::Duration;

/// The `p`-quantile (0..=1, nearest rank) of sorted latencies, in milliseconds rounded to the
/// microsecond; NaN (reported as `null`) for no samples.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    (sorted[rank - 1].as_secs_f64() * 1e6).round() / 1e3
}

/// `x` rounded to `digits` decimals.
pub fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&sorted, 0.5), 50.0);
        assert_eq!(percentile_ms(&sorted, 0.99), 99.0);
        assert_eq!(percentile_ms(&sorted, 1.0), 100.0);
        assert_eq!(percentile_ms(&sorted[..1], 0.5), 1.0);
        assert!(percentile_ms(&[], 0.5).is_nan());
    }
}
