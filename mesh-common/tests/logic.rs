//! Property tests of the decision logic the kernel programs run (`mesh_common::logic`): circuit
//! transitions, the ejection cap and panic threshold, and the selection scheme — the algorithm's
//! pick, independent retries, then a reservoir pass — driven over thousands of generated services
//! and eligibility patterns, in milliseconds.

use mesh_common::{
    backend::{CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, PROBE_TIMEOUT_NS},
    logic::{self, Reservoir, Verdict, circuit},
    service::RANDOM_TRIES,
};
use proptest::prelude::*;

/// A deterministic stand-in for `bpf_get_prandom_u32` (xorshift64*).
struct Rng(u64);

impl Rng {
    fn u32(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }

    fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }
}

/// The kernel's selection for the random algorithm, over a slot → eligible table: first pick,
/// `RANDOM_TRIES` retries, then the reservoir pass. `None` = refused.
fn select(eligible: &[bool], rng: &mut Rng) -> Option<usize> {
    let n = eligible.len() as u32;
    if n == 0 {
        return None;
    }
    for _ in 0..=RANDOM_TRIES {
        let s = logic::below(rng.u32(), n) as usize;
        if eligible[s] {
            return Some(s);
        }
    }
    let mut r = Reservoir::default();
    for (i, ok) in eligible.iter().enumerate() {
        if *ok {
            r.offer(i as u32, 1, 0, rng.u64());
        }
    }
    r.found().then_some(r.chosen as usize)
}

/// Eligibility patterns: random, one contiguous run, or "all but k".
fn pattern() -> impl Strategy<Value = Vec<bool>> {
    prop_oneof![
        (1usize..2_000, 0.0f64..1.0, any::<u64>()).prop_map(|(n, p, seed)| {
            let mut rng = Rng(seed | 1);
            (0..n)
                .map(|_| f64::from(rng.u32()) / f64::from(u32::MAX) >= p)
                .collect()
        }),
        (1usize..2_000, any::<u16>(), any::<u16>()).prop_map(|(n, a, len)| {
            let start = usize::from(a) % n;
            let len = usize::from(len) % (n + 1);
            (0..n).map(|i| !(start..start + len).contains(&i)).collect()
        }),
        (1usize..10_001, 0usize..4).prop_map(|(n, k)| (0..n).map(|i| i + k >= n).collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Refused only when nothing is eligible; never an ineligible backend.
    #[test]
    fn refused_only_when_none_is_eligible(e in pattern(), seed in any::<u64>()) {
        let mut rng = Rng(seed | 1);
        for _ in 0..20 {
            match select(&e, &mut rng) {
                Some(s) => prop_assert!(e[s]),
                None => prop_assert!(e.iter().all(|ok| !ok)),
            }
        }
    }

    /// `below` is a uniform index under `n`.
    #[test]
    fn below_is_in_range(r in any::<u32>(), n in 1u32..) {
        prop_assert!(logic::below(r, n) < n);
    }

    /// Exactly one probe per ejection: once a probe's word is swapped in, no connect may probe
    /// again until the probe's grace ends; a late report of an older probe never matches.
    #[test]
    fn one_probe_per_ejection(now in 0u64..1u64 << 50, ms in 1u64..1_000_000, later in 0u64..1u64 << 40) {
        let open = circuit::open(now, ms);
        prop_assert_eq!(circuit::state(open), CIRCUIT_OPEN);
        prop_assert!(circuit::probe(open, now + ms * 1_000_000 - 1).is_none());
        let t = now + ms * 1_000_000 + later;
        let probe = circuit::probe(open, t).unwrap();
        prop_assert_eq!(circuit::state(probe), CIRCUIT_HALF_OPEN);
        // Anyone else at any time before the grace ends sees "open".
        prop_assert!(circuit::probe(probe, t + PROBE_TIMEOUT_NS - 1).is_none());
        prop_assert_eq!(logic::verdict(probe, 0, 0, t + 1, false), Verdict::Open);
        // After the grace a new, different word: the old probe's success can no longer close it.
        let retry = circuit::probe(probe, t + PROBE_TIMEOUT_NS).unwrap();
        prop_assert!(retry != probe);
    }

    /// Envoy's cap: at least one may be ejected; beyond that the share stays within the percent.
    #[test]
    fn ejection_cap(ejected in 0u64..1000, n in 1u32..1000, pct in 0u32..=100) {
        let ok = logic::may_eject(ejected, n, pct);
        if ejected == 0 {
            prop_assert!(ok);
        } else {
            prop_assert_eq!(ok, (ejected + 1) * 100 <= u64::from(pct) * u64::from(n));
        }
    }

    /// Panic below the threshold's share of healthy backends; never with threshold 0.
    #[test]
    fn panic_threshold(n in 1u32..10_000, ejected in 0u64..10_000, pct in 0u32..=100) {
        let healthy = u64::from(n) - ejected.min(u64::from(n));
        prop_assert_eq!(
            logic::in_panic(n, ejected, pct),
            pct != 0 && healthy * 100 < u64::from(pct) * u64::from(n)
        );
    }

    /// Ejection length grows with each ejection and is capped.
    #[test]
    fn ejection_length(base in 1u32..100_000, max in 0u32..1_000_000, k in 0u32..100) {
        let ms = logic::ejection_ms(base, max, k);
        prop_assert!(ms <= u64::from(max.max(base)));
        prop_assert!(ms >= u64::from(base).min(u64::from(max.max(base))));
        prop_assert!(logic::ejection_ms(base, max, k + 1) >= ms);
    }
}

/// 1,000 endpoints, a contiguous 10 % ejected (a whole node), 100,000 connects: the busiest
/// eligible backend stays within 1.5× its fair share, and the run's neighbour gets no more.
#[test]
fn shares_stay_fair_around_an_ejected_run() {
    let eligible: Vec<bool> = (0..1_000).map(|i| !(400..500).contains(&i)).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut counts = vec![0u32; 1_000];
    for _ in 0..100_000 {
        counts[select(&eligible, &mut rng).unwrap()] += 1;
    }
    let fair = 100_000.0 / 900.0;
    let busiest = f64::from(*counts.iter().max().unwrap());
    assert!(busiest / fair <= 1.5, "busiest {:.2}× fair", busiest / fair);
    assert!(
        f64::from(counts[500]) / fair <= 1.5,
        "neighbour {}",
        counts[500]
    );
    assert!(counts[400..500].iter().all(|c| *c == 0));
    assert!(
        counts
            .iter()
            .enumerate()
            .all(|(i, c)| (400..500).contains(&i) || *c > 0)
    );
}

/// With 90 % ejected the retries mostly miss and the reservoir pass decides: still uniform.
#[test]
fn shares_stay_fair_with_ninety_percent_ejected() {
    let eligible: Vec<bool> = (0..1_000).map(|i| i % 10 == 3).collect();
    let mut rng = Rng(7);
    let mut counts = vec![0u32; 1_000];
    for _ in 0..100_000 {
        counts[select(&eligible, &mut rng).unwrap()] += 1;
    }
    let fair = 100_000.0 / 100.0;
    let (lo, hi) = counts
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 == 3)
        .fold((u32::MAX, 0), |(lo, hi), (_, c)| (lo.min(*c), hi.max(*c)));
    assert!(
        f64::from(hi) / fair <= 1.2 && f64::from(lo) / fair >= 0.8,
        "{lo}..{hi}"
    );
}

/// Weighted reservoir: shares follow weights.
#[test]
fn reservoir_follows_weights() {
    let mut rng = Rng(3);
    let mut hits = [0u32; 3];
    for _ in 0..60_000 {
        let mut r = Reservoir::default();
        for (i, w) in [1u32, 2, 3].iter().enumerate() {
            r.offer(i as u32, *w, 0, rng.u64());
        }
        hits[r.chosen as usize] += 1;
    }
    for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
        let share = f64::from(hits[i]) / 60_000.0;
        assert!((share - w / 6.0).abs() < 0.01, "{i}: {share}");
    }
}

/// The circuit word round-trips state and deadline; closed is the zero word.
#[test]
fn circuit_word_round_trips() {
    assert_eq!(circuit::CLOSED, 0);
    assert_eq!(circuit::state(circuit::CLOSED), CIRCUIT_CLOSED);
    let w = circuit::word(CIRCUIT_HALF_OPEN, 123_456_789);
    assert_eq!(
        (circuit::state(w), circuit::deadline(w)),
        (CIRCUIT_HALF_OPEN, 123_456_789)
    );
    assert_eq!(
        logic::verdict(circuit::CLOSED, 5, 5, 0, false),
        Verdict::Full
    );
    assert_eq!(
        logic::verdict(circuit::open(0, 10), 0, 0, 1, true),
        Verdict::Take
    );
}
