//! Per-repetition values of a benchmark's metrics, by key; the reports are their medians.

use std::collections::BTreeMap;

/// Every value each key took, one per repetition (or round).
#[derive(Debug, Default)]
pub struct Samples(pub BTreeMap<String, Vec<f64>>);

impl Samples {
    pub fn push(&mut self, key: impl Into<String>, v: f64) {
        self.0.entry(key.into()).or_default().push(v);
    }

    /// The median of `key`'s values (mean of the middle two for an even count).
    #[must_use]
    pub fn median(&self, key: &str) -> Option<f64> {
        let mut v = self.0.get(key)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            f64::midpoint(v[n / 2 - 1], v[n / 2])
        })
    }

    /// (lowest, highest) of `key`'s values, when there are at least two.
    #[must_use]
    pub fn range(&self, key: &str) -> Option<(f64, f64)> {
        let v = self.0.get(key)?;
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (v.len() > 1).then_some((lo, hi))
    }

    /// Every key's median.
    #[must_use]
    pub fn medians(&self) -> BTreeMap<String, f64> {
        self.0
            .keys()
            .filter_map(|k| Some((k.clone(), self.median(k)?)))
            .collect()
    }
}
