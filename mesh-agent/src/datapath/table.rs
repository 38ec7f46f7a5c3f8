//! Lookup tables for the kernel, sized per service: Maglev permutations (as in the Maglev paper
//! and Cilium) and weight-proportional tables for weighted random choice.

use mesh_common::service::{LB_TABLE_MAX, LB_TABLE_MIN};

/// Table entries per endpoint the Maglev paper advises (M ≥ 100·N keeps shares within ~1 %).
pub const ENTRIES_PER_ENDPOINT: u64 = 100;

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Whether `size` may be set as a table size: a prime in `LB_TABLE_MIN..=LB_TABLE_MAX`.
#[must_use]
pub fn valid_size(size: u32) -> bool {
    (LB_TABLE_MIN..=LB_TABLE_MAX).contains(&size) && is_prime(size)
}

/// The table size for `endpoints`: `fixed` if set (validated by the caller), else the smallest
/// prime ≥ 100 × endpoints, within `LB_TABLE_MIN..=LB_TABLE_MAX` (Cilium's default is 16,381;
/// its largest, 131,071, is ours).
#[must_use]
pub fn size_for(endpoints: usize, fixed: Option<u32>) -> u32 {
    if let Some(size) = fixed {
        return size;
    }
    let want = (endpoints as u64 * ENTRIES_PER_ENDPOINT)
        .clamp(u64::from(LB_TABLE_MIN), u64::from(LB_TABLE_MAX)) as u32;
    (want..=LB_TABLE_MAX)
        .find(|n| is_prime(*n))
        .unwrap_or(LB_TABLE_MAX)
}

/// FNV-1a with a seed: stable across agent versions and restarts (unlike `DefaultHasher`), so a
/// restarted agent rebuilds exactly the same table.
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Maglev table of `m` (prime) entries: each backend (named by a stable byte string) fills the
/// table in its own permutation order, taking turns, so removing one backend remaps only its own
/// entries (plus a few displaced ones). `names` and `ids` are parallel.
#[must_use]
pub fn maglev(names: &[Vec<u8>], ids: &[u32], m: u32) -> Vec<u32> {
    let size = m as usize;
    if names.is_empty() {
        return vec![0; size];
    }
    let m64 = u64::from(m);
    let mut table = vec![u32::MAX; size];
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|n| {
            (
                fnv(0x5bd1_e995, n) % m64,
                fnv(0x9e37_79b9, n) % (m64 - 1) + 1,
            )
        })
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            loop {
                let c = ((offset + next[i] * skip) % m64) as usize;
                next[i] += 1;
                if table[c] == u32::MAX {
                    table[c] = ids[i];
                    filled += 1;
                    break;
                }
            }
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

/// Weighted table of `m` entries: backend `i` fills `m × weights[i] / Σ weights` of them (largest
/// remainders round up), in runs. The kernel indexes it uniformly at random, so runs are fine and
/// building stays O(m + n) even for 10,000 endpoints.
#[must_use]
pub fn weighted(weights: &[u32], ids: &[u32], m: u32) -> Vec<u32> {
    let size = m as usize;
    let total: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    if total == 0 {
        return vec![0; size];
    }
    let exact: Vec<(usize, u128)> = weights
        .iter()
        .map(|w| u128::from(*w) * u128::from(m))
        .enumerate()
        .collect();
    let mut counts: Vec<usize> = exact.iter().map(|(_, e)| (e / total) as usize).collect();
    let mut short = size - counts.iter().sum::<usize>();
    let mut by_remainder: Vec<(usize, u128)> = exact.iter().map(|(i, e)| (*i, e % total)).collect();
    by_remainder.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (i, _) in by_remainder {
        if short == 0 {
            break;
        }
        counts[i] += 1;
        short -= 1;
    }
    let mut table = Vec::with_capacity(size);
    for (i, c) in counts.iter().enumerate() {
        table.extend(std::iter::repeat_n(ids[i], *c));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:80", i / 250, i % 250).into_bytes())
            .collect()
    }

    #[test]
    fn maglev_is_balanced_and_stable_on_removal() {
        let n = 10;
        let ids: Vec<u32> = (1..=n as u32).collect();
        let m = size_for(n, None);
        let full = maglev(&names(n), &ids, m);
        for id in &ids {
            let share = full.iter().filter(|e| *e == id).count();
            assert!(
                (80..=125).contains(&share),
                "backend {id} owns {share} of {m} entries"
            );
        }
        // Remove backend 5: only its entries and a small margin may move.
        let (mut n2, mut ids2) = (names(n), ids.clone());
        n2.remove(4);
        ids2.remove(4);
        let less = maglev(&n2, &ids2, m);
        let moved = full
            .iter()
            .zip(&less)
            .filter(|(a, b)| a != b && **a != 5)
            .count();
        assert!(
            moved < m as usize / 20,
            "{moved} entries of surviving backends moved"
        );
    }

    #[test]
    fn every_endpoint_has_entries_up_to_ten_thousand() {
        for n in [1, 11, 1_000, 10_000] {
            let ids: Vec<u32> = (1..=n as u32).collect();
            let m = size_for(n, None);
            assert!(valid_size(m), "{m}");
            assert!(u64::from(m) >= (n as u64 * 100).min(u64::from(LB_TABLE_MAX)));
            let t = maglev(&names(n), &ids, m);
            let mut seen = vec![0usize; n + 1];
            for e in &t {
                seen[*e as usize] += 1;
            }
            let (lo, hi) = (
                seen[1..].iter().min().copied().unwrap(),
                seen[1..].iter().max().copied().unwrap(),
            );
            assert!(lo >= 1, "{n} endpoints: one has no entry");
            assert!(hi <= lo + 1 + lo / 10, "{n} endpoints: shares {lo}..{hi}");
        }
    }

    #[test]
    fn weighted_shares_follow_weights() {
        let t = weighted(&[1, 3], &[7, 9], 1021);
        let sevens = t.iter().filter(|e| **e == 7).count();
        assert_eq!(t.len(), 1021);
        assert!((254..=256).contains(&sevens), "{sevens}");
    }

    #[test]
    fn sizes_are_primes_in_range() {
        assert_eq!(size_for(3, None), 1021);
        assert_eq!(size_for(10_000, None), LB_TABLE_MAX);
        assert_eq!(size_for(5, Some(16_381)), 16_381);
        assert!(valid_size(16_381) && !valid_size(16_384) && !valid_size(1019));
    }
}
