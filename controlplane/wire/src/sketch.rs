//! A latency distribution that merges by adding counts, so every core's, every node's and
//! every day's can be combined and percentiles read from the sum: values (microseconds) fall
//! in buckets whose bounds grow by a factor of [`GAMMA`], so a percentile read back is
//! within 1 % of a value actually recorded, whatever the range. Empty buckets take no room.

use std::collections::BTreeMap;

use crate::codec::{put_varint, InvalidMessage, Reader};

/// Each bucket's upper bound is this factor times its lower bound.
pub const GAMMA: f64 = 1.02;

/// Buckets a sketch may hold: values up to about 10^10 µs (almost three hours) fit in
/// fewer; a sketch decoded from the wire with more is refused.
pub const MAX_BUCKETS: usize = 1300;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sketch {
    /// Bucket index → count. Index 0 holds zero; index i ≥ 1 holds (γ^(i-1), γ^i].
    counts: BTreeMap<u16, u64>,
    total: u64,
}

fn index(micros: u64) -> u16 {
    if micros == 0 {
        return 0;
    }
    let i = ((micros as f64).ln() / GAMMA.ln()).ceil().max(1.0);
    // Far beyond any latency (about 10^10 µs): the last bucket.
    i.min((MAX_BUCKETS - 1) as f64) as u16
}

/// A bucket's representative value: the point whose relative distance to both bounds is
/// the same.
fn value(index: u16) -> u64 {
    if index == 0 {
        return 0;
    }
    let upper = GAMMA.powi(i32::from(index));
    (2.0 * upper / (GAMMA + 1.0)).round() as u64
}

impl Sketch {
    pub fn record(&mut self, micros: u64) {
        *self.counts.entry(index(micros)).or_default() += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &Sketch) {
        for (i, n) in &other.counts {
            *self.counts.entry(*i).or_default() += n;
        }
        self.total += other.total;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The value at quantile `q` (0 to 1), `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in &self.counts {
            seen += n;
            if seen >= rank {
                return Some(value(*i));
            }
        }
        self.counts.keys().next_back().map(|i| value(*i))
    }

    /// Pairs of (bucket index delta, count), varints.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut last = 0u16;
        for (i, n) in &self.counts {
            put_varint(out, u64::from(i - last));
            put_varint(out, *n);
            last = *i;
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(bytes);
        let mut s = Sketch::default();
        let mut index = 0u64;
        while !r.is_empty() {
            index += r.varint()?;
            let n = r.varint()?;
            if index >= MAX_BUCKETS as u64 || s.counts.len() >= MAX_BUCKETS {
                return Err(InvalidMessage::BadField { tag: 0 });
            }
            *s.counts.entry(index as u16).or_default() += n;
            s.total = s.total.saturating_add(n);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut s = Sketch::default();
        for v in 1..=10_000u64 {
            s.record(v * 100);
        }
        for (q, exact) in [(0.5, 500_000.0), (0.95, 950_000.0), (0.99, 990_000.0)] {
            let got = s.quantile(q).expect("values") as f64;
            assert!(
                (got - exact).abs() / exact < 0.011,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(Sketch::default().quantile(0.5), None);
    }

    proptest! {
        /// Merging equals recording everything in one; encoding round-trips.
        #[test]
        fn merges_and_round_trips(a in proptest::collection::vec(0u64..10_000_000_000, 0..200),
                                  b in proptest::collection::vec(0u64..10_000_000_000, 0..200)) {
            let (mut sa, mut sb, mut all) = (Sketch::default(), Sketch::default(), Sketch::default());
            for v in &a { sa.record(*v); all.record(*v); }
            for v in &b { sb.record(*v); all.record(*v); }
            sa.merge(&sb);
            prop_assert_eq!(&sa, &all);
            prop_assert_eq!(Sketch::decode(&all.to_bytes()).expect("decodes"), all);
        }

        /// Every value comes back within 1 % (zero as zero).
        #[test]
        fn a_single_value_comes_back_close(v in 0u64..10_000_000_000) {
            let mut s = Sketch::default();
            s.record(v);
            let got = s.quantile(0.5).expect("one value");
            let err = (got as f64 - v as f64).abs();
            prop_assert!(err <= (v as f64 * 0.0101).max(1.0), "{} → {}", v, got);
        }
    }
}
