//! Per-key request limits: a token bucket per API key id (`[rate_limit]`, off by default).
//!
//! A bucket holds up to `burst` tokens and gains `requests_per_sec` tokens a second; every
//! authenticated request takes one, and a request that finds less than one is refused with the
//! whole seconds until one is available. Buckets are keyed by key id, checked only after the
//! key was verified, so unknown or forged key ids can never create one. They are spread over
//! shards, each behind its own short lock, so that concurrent requests of different keys
//! rarely wait for one another. A bucket that has been idle long enough to be full again is the
//! same as no bucket, so such buckets are dropped when a shard grows, which bounds memory by
//! the number of keys that were busy lately.
//!
//! Limits are per server process: behind a load balancer with N servers a key may make up to N
//! times as many requests.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Instant;

use intake_core::settings::RateLimitSettings;

/// Independent locks; a power of two so that the shard is a mask of the hash.
const SHARDS: usize = 16;
/// A shard is swept for full (idle) buckets when it holds at least this many.
const MIN_SWEEP_LEN: usize = 1024;

/// A request over its key's limit: retry after this many whole seconds (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub u64);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Default)]
struct Shard {
    buckets: HashMap<String, Bucket>,
    /// Sweep when `buckets` reaches this size; doubled after a sweep that freed too little, so
    /// that sweeping stays amortised O(1) per request however many keys are busy.
    sweep_at: usize,
}

/// The per-process limiter, shared by every worker.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<Shard>>,
}

impl RateLimiter {
    /// `None` when rate limiting is off, so that the request path skips it entirely.
    pub fn from_settings(settings: &RateLimitSettings) -> Option<RateLimiter> {
        settings
            .enabled
            .then(|| RateLimiter::new(settings.requests_per_sec, settings.burst))
    }

    /// `rate` tokens a second, buckets of `burst` tokens (both positive; settings check that).
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            rate,
            burst: f64::from(burst.max(1)),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::new(),
                        sweep_at: MIN_SWEEP_LEN,
                    })
                })
                .collect(),
        }
    }

    /// Takes a token from `key_id`'s bucket now.
    pub fn check(&self, key_id: &str) -> Result<(), RetryAfter> {
        self.check_at(key_id, Instant::now())
    }

    /// Takes a token from `key_id`'s bucket as of `now` (the clock is a parameter so that the
    /// arithmetic can be tested without sleeping).
    pub fn check_at(&self, key_id: &str, now: Instant) -> Result<(), RetryAfter> {
        let mut shard = self.shards[shard_of(key_id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = shard.buckets.get_mut(key_id) {
            return self.take(bucket, now);
        }
        if shard.buckets.len() >= shard.sweep_at {
            self.sweep(&mut shard, now);
        }
        let mut bucket = Bucket {
            tokens: self.burst,
            updated: now,
        };
        let outcome = self.take(&mut bucket, now);
        shard.buckets.insert(key_id.to_owned(), bucket);
        outcome
    }

    /// Refills `bucket` up to `now`, then takes a token or says how long until there is one.
    fn take(&self, bucket: &mut Bucket, now: Instant) -> Result<(), RetryAfter> {
        // Requests read the clock before taking the lock, so `now` may be a little older than
        // the bucket's last update; that counts as no time passing, never as negative time.
        let elapsed = now.saturating_duration_since(bucket.updated);
        bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        bucket.updated = bucket.updated.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate;
            Err(RetryAfter((wait.ceil() as u64).max(1)))
        }
    }

    /// Drops the buckets that are full by `now`: forgetting them changes nothing.
    fn sweep(&self, shard: &mut Shard, now: Instant) {
        shard.buckets.retain(|_, bucket| !self.is_full(bucket, now));
        shard.sweep_at = (shard.buckets.len() * 2).max(MIN_SWEEP_LEN);
    }

    fn is_full(&self, bucket: &Bucket, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(bucket.updated);
        bucket.tokens + elapsed.as_secs_f64() * self.rate >= self.burst
    }
}

fn shard_of(key_id: &str) -> usize {
    let mut hasher = DefaultHasher::new();
    key_id.hash(&mut hasher);
    hasher.finish() as usize & (SHARDS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_bucket_allows_a_burst_then_refuses() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(limiter.check_at("k", t0), Ok(()), "request {i}");
        }
        // Empty: one token takes 0.5 s at 2/s, which rounds up to 1 s.
        assert_eq!(limiter.check_at("k", t0), Err(RetryAfter(1)));
    }

    #[test]
    fn tokens_come_back_at_the_configured_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check_at("k", t0).expect("burst");
        }
        assert!(limiter.check_at("k", t0 + ms(499)).is_err());
        // 0.5 s after the burst one token is back (the refused request took none).
        assert_eq!(limiter.check_at("k", t0 + ms(500)), Ok(()));
        assert!(limiter.check_at("k", t0 + ms(500)).is_err());
        // One more second gives two more.
        assert_eq!(limiter.check_at("k", t0 + ms(1500)), Ok(()));
        assert_eq!(limiter.check_at("k", t0 + ms(1500)), Ok(()));
        assert!(limiter.check_at("k", t0 + ms(1500)).is_err());
    }

    #[test]
    fn an_idle_bucket_never_holds_more_than_the_burst() {
        let limiter = RateLimiter::new(10.0, 2);
        let t0 = Instant::now();
        limiter.check_at("k", t0).expect("first");
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(limiter.check_at("k", later), Ok(()));
        assert_eq!(limiter.check_at("k", later), Ok(()));
        assert!(limiter.check_at("k", later).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        let t0 = Instant::now();
        // 0.25 tokens a second: an empty bucket needs 4 s for one token.
        let slow = RateLimiter::new(0.25, 1);
        slow.check_at("k", t0).expect("burst");
        assert_eq!(slow.check_at("k", t0), Err(RetryAfter(4)));
        // 1.5 s later 0.375 tokens are there; 0.625 more take 2.5 s, said as 3.
        assert_eq!(slow.check_at("k", t0 + ms(1500)), Err(RetryAfter(3)));
        // A fast rate still says at least 1.
        let fast = RateLimiter::new(1000.0, 1);
        fast.check_at("k", t0).expect("burst");
        assert_eq!(fast.check_at("k", t0), Err(RetryAfter(1)));
    }

    #[test]
    fn keys_have_separate_buckets() {
        let limiter = RateLimiter::new(1.0, 1);
        let t0 = Instant::now();
        limiter.check_at("a", t0).expect("a's token");
        assert!(limiter.check_at("a", t0).is_err());
        assert_eq!(limiter.check_at("b", t0), Ok(()));
        assert!(limiter.check_at("b", t0).is_err());
    }

    #[test]
    fn a_clock_reading_older_than_the_bucket_counts_as_no_time() {
        let limiter = RateLimiter::new(1.0, 1);
        let t0 = Instant::now();
        limiter.check_at("k", t0 + ms(1000)).expect("burst");
        assert_eq!(limiter.check_at("k", t0), Err(RetryAfter(1)));
        assert!(limiter.check_at("k", t0 + ms(1999)).is_err());
        assert_eq!(limiter.check_at("k", t0 + ms(2000)), Ok(()));
    }

    fn held(limiter: &RateLimiter, prefix: &str) -> usize {
        limiter
            .shards
            .iter()
            .map(|s| {
                let shard = s.lock().unwrap_or_else(|p| p.into_inner());
                shard
                    .buckets
                    .keys()
                    .filter(|k| k.starts_with(prefix))
                    .count()
            })
            .sum()
    }

    #[test]
    fn idle_buckets_are_forgotten_and_busy_ones_kept() {
        let limiter = RateLimiter::new(1.0, 2);
        let t0 = Instant::now();
        let idle = SHARDS * MIN_SWEEP_LEN;
        for i in 0..idle {
            limiter.check_at(&format!("idle{i}"), t0).expect("burst");
        }
        limiter.check_at("busy", t0).expect("burst");
        // Nothing is full yet, so nothing could be dropped.
        assert_eq!(held(&limiter, "idle"), idle);
        // Two seconds refill every bucket. The busy key uses its bucket again, so it is not
        // full; the idle ones are, and go when their shard next grows past its sweep size.
        let later = t0 + Duration::from_secs(2);
        limiter.check_at("busy", later).expect("refilled");
        limiter.check_at("busy", later).expect("refilled");
        for i in 0..3 * idle {
            limiter.check_at(&format!("new{i}"), later).expect("burst");
        }
        assert_eq!(held(&limiter, "idle"), 0, "idle buckets were not swept");
        assert_eq!(held(&limiter, "new"), 3 * idle, "busy buckets are kept");
        assert!(limiter.check_at("busy", later).is_err(), "busy bucket kept");
    }
}
