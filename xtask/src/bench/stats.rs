//! Percentiles of a sample, the one piece of arithmetic every section shares.
use serde::Serialize;

/// A sample of nanosecond figures, summarised. Signed: some are differences that may go
/// below zero (a record made before the sysfs write returned). Percentiles are nearest-rank:
/// the value at rank `ceil(p/100 * n)`, always one of the samples (so with fewer than 100
/// samples p99 is the maximum, which is the honest answer).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min_ns: i64,
    pub p50_ns: i64,
    pub p99_ns: i64,
    pub max_ns: i64,
    pub mean_ns: i64,
}

impl Summary {
    /// `None` for an empty sample.
    pub fn of(samples: &[i64]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let sum: i128 = sorted.iter().map(|&s| i128::from(s)).sum();
        Some(Self {
            n: sorted.len(),
            min_ns: *sorted.first()?,
            p50_ns: percentile(&sorted, 50.0)?,
            p99_ns: percentile(&sorted, 99.0)?,
            max_ns: *sorted.last()?,
            mean_ns: (sum / sorted.len() as i128) as i64,
        })
    }
}

/// Nearest-rank percentile of an ascending slice; `None` when it is empty.
pub fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    debug_assert!(sorted.is_sorted(), "percentile needs sorted input");
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let hundred: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 50.0), Some(50));
        assert_eq!(percentile(&hundred, 99.0), Some(99));
        assert_eq!(percentile(&hundred, 100.0), Some(100));
        assert_eq!(percentile(&hundred, 0.0), Some(1));
        // Fewer than 100 samples: p99 is the maximum.
        assert_eq!(percentile(&[10, 20, 30], 99.0), Some(30));
        assert_eq!(percentile(&[10, 20, 30], 50.0), Some(20));
        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_its_input() {
        let s = Summary::of(&[30, 10, 20, 40]).unwrap();
        assert_eq!(
            s,
            Summary {
                n: 4,
                min_ns: 10,
                p50_ns: 20,
                p99_ns: 40,
                max_ns: 40,
                mean_ns: 25,
            }
        );
        assert_eq!(Summary::of(&[]), None);
        let signed = Summary::of(&[-5, 10, -20]).unwrap();
        assert_eq!((signed.min_ns, signed.p50_ns, signed.max_ns), (-20, -5, 10));
    }
}
