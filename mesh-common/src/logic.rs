//! Pure decision logic of the data path, shared by the kernel programs and host tests: the circuit
//! word and its transitions, the ejection cap and panic threshold, uniform and weighted picks.
//!
//! Everything here is plain `no_std` arithmetic with no map access, so the kernel calls exactly the
//! code that the host property tests (`tests/logic.rs`) exercise at thousands of generated cases.

use crate::backend::{CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, PROBE_TIMEOUT_NS};

/// The circuit of a backend as one `u64`: `deadline_ns << 2 | state`. One word means every
/// transition is a single compare-and-swap, and a probe is named by the word its admission wrote.
pub mod circuit {
    use super::{CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, PROBE_TIMEOUT_NS};

    /// The word of a closed circuit (no deadline).
    pub const CLOSED: u64 = 0;

    /// Packs a state and its deadline (monotonic ns; 62 bits are 146 years of uptime).
    #[must_use]
    pub const fn word(state: u32, deadline_ns: u64) -> u64 {
        (deadline_ns << 2) | (state as u64 & 3)
    }

    /// The `CIRCUIT_*` state of a word.
    #[must_use]
    pub const fn state(w: u64) -> u32 {
        (w & 3) as u32
    }

    /// The deadline of a word: end of the ejection (open) or of the probe's grace (half-open).
    #[must_use]
    pub const fn deadline(w: u64) -> u64 {
        w >> 2
    }

    /// The word that opens a circuit at `now` for `ms` milliseconds.
    #[must_use]
    pub const fn open(now: u64, ms: u64) -> u64 {
        word(CIRCUIT_OPEN, now + ms * 1_000_000)
    }

    /// If a connect at `now` may become the circuit's probe: the word to swap in. An open circuit
    /// past its ejection, or a half-open one whose probe never reported within
    /// [`PROBE_TIMEOUT_NS`], yields exactly one probe: the CPU whose swap succeeds.
    #[must_use]
    pub const fn probe(w: u64, now: u64) -> Option<u64> {
        let s = state(w);
        if (s == CIRCUIT_OPEN || s == CIRCUIT_HALF_OPEN) && now >= deadline(w) {
            // Strictly later than any earlier probe's word, so a late report of an older probe
            // can never match (and move) the circuit again.
            Some(word(CIRCUIT_HALF_OPEN, now + PROBE_TIMEOUT_NS))
        } else {
            None
        }
    }

    /// Whether the word is closed.
    #[must_use]
    pub const fn is_closed(w: u64) -> bool {
        state(w) == CIRCUIT_CLOSED
    }
}

/// Length of the next ejection: `base × (ejections + 1)`, capped by `max(max, base)` (Envoy's
/// `base_ejection_time` × times ejected, capped by `max_ejection_time`).
#[must_use]
pub fn ejection_ms(base_ms: u32, max_ms: u32, ejections: u32) -> u64 {
    let n = u64::from(ejections) + 1;
    (u64::from(base_ms) * n).min(u64::from(max_ms.max(base_ms)))
}

/// Envoy's ejection cap: one more backend may be ejected if none is, or if the share stays within
/// `max_pct` of `backend_count`.
#[must_use]
pub fn may_eject(ejected: u64, backend_count: u32, max_pct: u32) -> bool {
    ejected == 0 || (ejected + 1) * 100 <= u64::from(max_pct) * u64::from(backend_count)
}

/// Envoy's panic threshold: fewer than `panic_pct` % of the backends are healthy, so balance over
/// all of them rather than overload the few (or refuse everything). 0 disables it.
#[must_use]
pub fn in_panic(backend_count: u32, ejected: u64, panic_pct: u32) -> bool {
    let n = u64::from(backend_count);
    panic_pct != 0 && n != 0 && (n - ejected.min(n)) * 100 < u64::from(panic_pct) * n
}

/// A uniform index below `n` from a uniform `u32` (multiply-shift: no division, no modulo bias
/// beyond 2⁻³²·n).
#[must_use]
pub const fn below(rand: u32, n: u32) -> u32 {
    ((rand as u64 * n as u64) >> 32) as u32
}

/// Finalizer of splitmix64: a flow's stable position in a Maglev table.
#[must_use]
pub const fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The `k`-th table position of a flow with hash `hash` in a table of `m` entries: `k = 0` is its
/// Maglev entry; later ones are its deterministic fallbacks when that backend is ineligible, each
/// an independent uniform position, so an ejected backend's flows spread over all the others in
/// proportion to their table shares instead of landing on a neighbour.
#[must_use]
pub const fn table_pos(hash: u64, k: u32, m: u32) -> u32 {
    if m == 0 {
        return 0;
    }
    (mix(hash.wrapping_add((k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))) % m as u64) as u32
}

/// What a backend can do for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Take it.
    Take,
    /// Take it as the circuit's probe if swapping the circuit word to this value succeeds.
    Probe(u64),
    /// At `max_connections`.
    Full,
    /// Circuit open (or its probe in flight).
    Open,
}

/// Whether a backend with circuit word `w` and `active` connections may take a connection at
/// `now`. `panic`: the service is below its panic threshold, so an open circuit does not exclude
/// the backend (connection limits still hold, as Envoy's circuit breakers do in panic).
#[must_use]
pub fn verdict(w: u64, active: u64, max_connections: u32, now: u64, panic: bool) -> Verdict {
    if max_connections != 0 && active >= u64::from(max_connections) {
        return Verdict::Full;
    }
    if circuit::is_closed(w) {
        return Verdict::Take;
    }
    if let Some(next) = circuit::probe(w, now) {
        return Verdict::Probe(next);
    }
    if panic { Verdict::Take } else { Verdict::Open }
}

/// Weighted reservoir sampling over a stream of backends: after every eligible backend has been
/// offered, each was chosen with probability `weight / Σ weights` — one pass, O(1) state, which
/// is what a bounded kernel loop over the slots can afford.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reservoir {
    /// Sum of the weights offered so far.
    pub total: u64,
    /// The backend chosen so far (valid when `total > 0`).
    pub chosen: u32,
    /// `Verdict::Probe` word of the chosen one (0: a plain take).
    pub probe_word: u64,
}

impl Reservoir {
    /// Offers backend `id` of `weight` (≥ 1, 0 counts as 1) with its probe word (0: none); `r64`
    /// is a fresh uniform `u64`. Returns whether it replaced the choice.
    pub fn offer(&mut self, id: u32, weight: u32, probe_word: u64, r64: u64) -> bool {
        let w = u64::from(weight.max(1));
        self.total += w;
        if r64 % self.total < w {
            self.chosen = id;
            self.probe_word = probe_word;
            true
        } else {
            false
        }
    }

    /// Whether anything was offered.
    #[must_use]
    pub fn found(&self) -> bool {
        self.total != 0
    }
}
