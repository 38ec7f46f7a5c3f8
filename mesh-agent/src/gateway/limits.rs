//! Local rate limits (token buckets per route and per client address) and the retry budget.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// `requests` per `per`, with a burst of `requests` (Envoy's local rate limit token bucket:
/// `max_tokens` = `tokens_per_fill`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// One token bucket. A mutex, not atomics: the critical section is a few float operations and
/// a refill needs the token count and the time to change together.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    state: Mutex<Bucket>,
}

impl TokenBucket {
    #[must_use]
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            state: Mutex::new(Bucket {
                tokens: f64::from(limit.requests),
                last: Instant::now(),
            }),
        }
    }

    /// Takes a token now; `Err(wait)` is how long until the next one (for `Retry-After`). The
    /// clock is read here, so a route without a limit reads none.
    pub fn take(&self) -> Result<(), Duration> {
        self.take_at(Instant::now())
    }

    /// [`Self::take`] at `now`.
    pub fn take_at(&self, now: Instant) -> Result<(), Duration> {
        let mut b = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        take(&mut b, self.limit, now)
    }
}

fn take(b: &mut Bucket, limit: RateLimit, now: Instant) -> Result<(), Duration> {
    let rate = f64::from(limit.requests) / limit.per.as_secs_f64();
    let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
    b.tokens = (b.tokens + elapsed * rate).min(f64::from(limit.requests));
    b.last = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        Ok(())
    } else {
        Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
    }
}

/// Most client addresses tracked per rule: past this, buckets that are full again (idle
/// clients) are dropped, so a spray of source addresses cannot grow memory without bound.
pub const MAX_CLIENTS: usize = 65_536;

/// A token bucket per client address.
#[derive(Debug)]
pub struct ClientBuckets {
    limit: RateLimit,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl ClientBuckets {
    #[must_use]
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `client`'s bucket now (the clock is read here, as in
    /// [`TokenBucket::take`]).
    pub fn take(&self, client: IpAddr) -> Result<(), Duration> {
        self.take_at(client, Instant::now())
    }

    /// [`Self::take`] at `now`.
    pub fn take_at(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut map = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_CLIENTS && !map.contains_key(&client) {
            let full = self.limit.per;
            map.retain(|_, b| now.saturating_duration_since(b.last) < full);
            if map.len() >= MAX_CLIENTS {
                // Still full of active clients: refuse newcomers rather than grow.
                return Err(full);
            }
        }
        let b = map.entry(client).or_insert(Bucket {
            tokens: f64::from(self.limit.requests),
            last: now,
        });
        take(b, self.limit, now)
    }
}

/// Envoy's retry budget: retries in flight may be at most `percent` of requests in flight,
/// but at least `MIN_RETRY_CONCURRENCY` (Envoy's `min_retry_concurrency`, 3).
#[derive(Debug, Default)]
pub struct RetryBudget {
    active: AtomicU64,
    retrying: AtomicU64,
}

/// Envoy's `min_retry_concurrency`.
pub const MIN_RETRY_CONCURRENCY: u64 = 3;

/// A request in flight; dropping it ends it.
pub struct Active<'a>(&'a RetryBudget);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry in flight; dropping it ends it.
pub struct Retrying<'a>(&'a RetryBudget);

impl Drop for Retrying<'_> {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    /// Counts a request in flight.
    pub fn start(&self) -> Active<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        Active(self)
    }

    /// A retry, if the budget allows one now.
    pub fn try_retry(&self, percent: u32) -> Option<Retrying<'_>> {
        let allowed = (self.active.load(Ordering::Relaxed) * u64::from(percent) / 100)
            .max(MIN_RETRY_CONCURRENCY);
        let now = self.retrying.fetch_add(1, Ordering::Relaxed);
        if now < allowed {
            Some(Retrying(self))
        } else {
            self.retrying.fetch_sub(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let b = TokenBucket::new(RateLimit {
            requests: 10,
            per: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        for _ in 0..10 {
            b.take_at(t0).unwrap();
        }
        let wait = b.take_at(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        b.take_at(t0 + Duration::from_millis(100)).unwrap();
        assert!(b.take_at(t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn the_retry_budget_is_a_share_of_active_requests_with_a_floor() {
        let budget = RetryBudget::default();
        let active: Vec<_> = (0..50).map(|_| budget.start()).collect();
        let retries: Vec<_> = (0..20).filter_map(|_| budget.try_retry(20)).collect();
        assert_eq!(retries.len(), 10);
        drop(retries);
        drop(active);
        let floor: Vec<_> = (0..5).filter_map(|_| budget.try_retry(20)).collect();
        assert_eq!(floor.len(), 3);
    }
}
