//! First-fit allocator of contiguous ranges of the `SERVICE_SLOTS` array (one range per service
//! configuration), with a quarantine before a freed range is handed out again.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

/// How long a freed range waits before reuse. A configuration's range is freed once the
/// configuration is unpublished (`SERVICES` switched, the `SERVICE_CONF_V2` entry deleted), so
/// only a kernel program that copied the configuration before the switch can still read the
/// range, and a program's copy lives for one run (microseconds; a full scan of the largest
/// service a few milliseconds). Even a reader past the quarantine could not pick a wrong backend:
/// every id read from a slot is checked against the reader's service (`maps::backend`), so it
/// would at worst count `backend_missing` and draw again.
pub const RANGE_QUARANTINE: Duration = Duration::from_secs(1);

/// Free and quarantined ranges of an array of `capacity` elements.
#[derive(Debug)]
pub struct Ranges {
    capacity: u32,
    /// Free ranges, start → length; adjacent ranges are merged.
    free: BTreeMap<u32, u32>,
    /// Freed ranges (start, length, when) in the order they were freed.
    quarantined: VecDeque<(u32, u32, Instant)>,
    /// Elements allocated or quarantined.
    used: u32,
    /// How long a freed range waits: [`RANGE_QUARANTINE`] unless set otherwise.
    quarantine: Duration,
}

impl Ranges {
    /// An allocator with every element free.
    #[must_use]
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self {
            capacity,
            free,
            quarantined: VecDeque::new(),
            used: 0,
            quarantine: RANGE_QUARANTINE,
        }
    }

    /// Changes the quarantine of freed ranges (the ones already freed too). Tests use it to
    /// fill the array deterministically; shortening it below a kernel program's run would let a
    /// late reader see another configuration's ids (still refused by the per-id service check).
    pub fn set_quarantine(&mut self, quarantine: Duration) {
        self.quarantine = quarantine;
    }

    /// Elements allocated or in quarantine.
    #[must_use]
    pub fn used(&self) -> u32 {
        self.used
    }

    /// The first free range of `len` elements (first fit); `None` when none is that long, which
    /// the caller reports as a full map. `len` 0 takes nothing and starts at 0.
    pub fn alloc(&mut self, len: u32, now: Instant) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        self.release_due(now);
        let (&start, &have) = self.free.iter().find(|(_, l)| **l >= len)?;
        self.free.remove(&start);
        if have > len {
            self.free.insert(start + len, have - len);
        }
        self.used += len;
        Some(start)
    }

    /// Marks `start..start + len` allocated (a restarted agent adopting a configuration's range);
    /// false, with nothing changed, when any of it is not free.
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = start.checked_add(len).filter(|e| *e <= self.capacity) else {
            return false;
        };
        let Some((&fs, &fl)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if fs + fl < end {
            return false;
        }
        self.free.remove(&fs);
        if fs < start {
            self.free.insert(fs, start - fs);
        }
        if end < fs + fl {
            self.free.insert(end, fs + fl - end);
        }
        self.used += len;
        true
    }

    /// Frees a range after the quarantine ([`RANGE_QUARANTINE`]) from `now`.
    pub fn free(&mut self, start: u32, len: u32, now: Instant) {
        if len > 0 {
            self.quarantined.push_back((start, len, now));
        }
    }

    /// Returns the ranges whose quarantine is over to the free list.
    fn release_due(&mut self, now: Instant) {
        while let Some(&(start, len, since)) = self.quarantined.front() {
            if now.saturating_duration_since(since) < self.quarantine {
                break;
            }
            self.quarantined.pop_front();
            self.insert_free(start, len);
            self.used -= len;
        }
    }

    fn insert_free(&mut self, mut start: u32, mut len: u32) {
        if let Some((&ps, &pl)) = self.free.range(..start).next_back()
            && ps + pl == start
        {
            self.free.remove(&ps);
            start = ps;
            len += pl;
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_merges_and_waits_out_the_quarantine() {
        let t0 = Instant::now();
        let mut r = Ranges::new(100);
        assert_eq!(r.alloc(40, t0), Some(0));
        assert_eq!(r.alloc(40, t0), Some(40));
        assert_eq!(
            r.alloc(30, t0),
            None,
            "only 20 left: map full, not truncated"
        );
        r.free(0, 40, t0);
        assert_eq!(r.alloc(30, t0), None, "a freed range is quarantined");
        let later = t0 + RANGE_QUARANTINE;
        assert_eq!(r.alloc(30, later), Some(0));
        r.free(40, 40, later);
        let much_later = later + RANGE_QUARANTINE;
        // 30..100 is free again and merged: 70 in one piece.
        assert_eq!(r.alloc(70, much_later), Some(30));
        assert_eq!(r.used(), 100);
    }

    #[test]
    fn reserve_carves_adopted_ranges_and_refuses_overlaps() {
        let t0 = Instant::now();
        let mut r = Ranges::new(100);
        assert!(r.reserve(10, 20));
        assert!(!r.reserve(25, 10), "overlaps 10..30");
        assert!(!r.reserve(95, 10), "past the end");
        assert!(r.reserve(30, 5));
        assert_eq!(r.alloc(10, t0), Some(0));
        assert_eq!(r.alloc(1, t0), Some(35));
        assert_eq!(r.used(), 36);
        assert_eq!(r.alloc(0, t0), Some(0), "an empty range takes nothing");
    }
}
