//! Lookup tables for the kernel: Maglev permutations (as in the Maglev paper and Cilium) and
//! weight-proportional tables for weighted random choice.

use mesh_common::service::LB_TABLE_SIZE;

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

/// Maglev table: each backend (named by a stable byte string) fills the table in its own
/// permutation order, taking turns, so removing one backend remaps only its own entries (plus
/// a few displaced ones). `names` and the returned ids are parallel.
#[must_use]
pub fn maglev(names: &[Vec<u8>], ids: &[u32]) -> [u32; LB_TABLE_SIZE] {
    let m = LB_TABLE_SIZE as u64;
    let mut table = [u32::MAX; LB_TABLE_SIZE];
    if names.is_empty() {
        return [0; LB_TABLE_SIZE];
    }
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|n| (fnv(0x5bd1_e995, n) % m, fnv(0x9e37_79b9, n) % (m - 1) + 1))
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            loop {
                let c = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[c] == u32::MAX {
                    table[c] = ids[i];
                    filled += 1;
                    break;
                }
            }
            if filled == LB_TABLE_SIZE {
                break 'fill;
            }
        }
    }
    table
}

/// Weighted table: backend `i` fills about `weights[i] / Σ weights` of the entries, interleaved
/// (smooth weighted round robin) so any random index sees the shares.
#[must_use]
pub fn weighted(weights: &[u32], ids: &[u32]) -> [u32; LB_TABLE_SIZE] {
    let mut table = [0u32; LB_TABLE_SIZE];
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    if total == 0 {
        return table;
    }
    let mut current = vec![0i64; weights.len()];
    for entry in &mut table {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        *entry = ids[best];
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.0.0.{i}:80").into_bytes())
            .collect()
    }

    #[test]
    fn maglev_is_balanced_and_stable_on_removal() {
        let n = 10;
        let ids: Vec<u32> = (1..=n as u32).collect();
        let full = maglev(&names(n), &ids);
        for id in &ids {
            let share = full.iter().filter(|e| *e == id).count();
            assert!(
                (80..=125).contains(&share),
                "backend {id} owns {share} of 1021 entries"
            );
        }
        // Remove backend 5: only its entries and a small margin may move.
        let (mut n2, mut ids2) = (names(n), ids.clone());
        n2.remove(4);
        ids2.remove(4);
        let less = maglev(&n2, &ids2);
        let moved = full
            .iter()
            .zip(&less)
            .filter(|(a, b)| a != b && **a != 5)
            .count();
        assert!(
            moved < LB_TABLE_SIZE / 20,
            "{moved} entries of surviving backends moved"
        );
    }

    #[test]
    fn weighted_shares_follow_weights() {
        let t = weighted(&[1, 3], &[7, 9]);
        let sevens = t.iter().filter(|e| **e == 7).count();
        assert!((250..=260).contains(&sevens), "{sevens}");
    }
}
