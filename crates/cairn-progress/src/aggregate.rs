//! The roll-up maths every implementation shares (the Rust model and the Redis Lua scripts).
//!
//! A parent keeps running sums over its direct children, `Σwᵢ` and `Σwᵢ·pᵢ`, adjusted by each
//! child's change in [`contribution`], so one update costs O(depth) whatever the fan-out.

/// Weight of a node that never set one.
pub const DEFAULT_WEIGHT: f64 = 1.0;

/// Below this, a parent's `Σwᵢ` counts as zero: running sums that went up and back down by the
/// same weights can leave rounding residue instead of an exact 0.
pub const EPSILON: f64 = 1e-9;

/// What one child adds to its parent's sums: `(w, w·p)`, with `w` defaulting to
/// [`DEFAULT_WEIGHT`] and `p` to 0 (a child with no progress yet holds its parent back).
pub fn contribution(weight: Option<f64>, progress: Option<f64>) -> (f64, f64) {
    let w = weight.unwrap_or(DEFAULT_WEIGHT);
    let p = progress.unwrap_or(0.0);
    (w, w * p)
}

/// A parent's progress from its sums, or `None` when `Σwᵢ` is zero (all children weigh 0, or
/// none are left) and the parent keeps the value it has.
pub fn rollup(sum_w: f64, sum_wp: f64) -> Option<f64> {
    (sum_w > EPSILON).then(|| (sum_wp / sum_w).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contribution_defaults() {
        assert_eq!(contribution(None, None), (1.0, 0.0));
        assert_eq!(contribution(None, Some(0.5)), (1.0, 0.5));
        assert_eq!(contribution(Some(2.0), Some(0.25)), (2.0, 0.5));
        assert_eq!(contribution(Some(0.0), Some(1.0)), (0.0, 0.0));
        assert_eq!(contribution(Some(3.0), None), (3.0, 0.0));
    }

    #[test]
    fn rollup_weighted_mean() {
        assert_eq!(rollup(2.0, 1.0), Some(0.5));
        assert_eq!(rollup(4.0, 1.0), Some(0.25));
        assert_eq!(rollup(0.0, 0.0), None);
        assert_eq!(rollup(EPSILON, 0.0), None);
        assert_eq!(rollup(-1e-12, 0.0), None);
        assert_eq!(rollup(1e-6, 1e-6), Some(1.0));
    }

    #[test]
    fn rollup_clamps_rounding_residue() {
        assert_eq!(rollup(1.0, 1.0 + 1e-12), Some(1.0));
        assert_eq!(rollup(1.0, -1e-12), Some(0.0));
    }
}
