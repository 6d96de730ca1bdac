//! Per-credential publish rate limits: one token bucket per publisher id.
//!
//! A bucket holds up to `rate` tokens and refills at `rate` per second; each
//! publish takes one. An empty bucket answers how long until the next token,
//! which becomes the `Retry-After` of the 429. Buckets of publishers that have
//! been idle long enough to be full are dropped when the table grows past
//! `MAX_BUCKETS`, so memory stays bounded however many credentials exist.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Buckets kept before idle ones are pruned.
const MAX_BUCKETS: usize = 10_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets by publisher id.
#[derive(Debug)]
pub(crate) struct Throttle {
    rate: f64,
    buckets: DashMap<String, Mutex<Bucket>>,
}

impl Throttle {
    /// A throttle allowing `rate_per_sec` publishes per second per publisher.
    pub(crate) fn new(rate_per_sec: u32) -> Self {
        Throttle {
            rate: f64::from(rate_per_sec.max(1)),
            buckets: DashMap::new(),
        }
    }

    /// Takes one publish for `publisher`, or says how long to wait.
    pub(crate) fn take(&self, publisher: &str) -> Result<(), Duration> {
        self.take_at(publisher, Instant::now())
    }

    fn take_at(&self, publisher: &str, now: Instant) -> Result<(), Duration> {
        if self.buckets.len() > MAX_BUCKETS {
            self.prune(now);
        }
        // A known publisher's bucket is found by reference; only a new one
        // copies its id into the table.
        let bucket = match self.buckets.get(publisher) {
            Some(bucket) => bucket,
            None => self
                .buckets
                .entry(publisher.to_owned())
                .or_insert_with(|| {
                    Mutex::new(Bucket {
                        tokens: self.rate,
                        updated: now,
                    })
                })
                .downgrade(),
        };
        let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.rate);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    /// Drops buckets that would be full by now (their publishers are idle).
    fn prune(&self, now: Instant) {
        let refill = Duration::from_secs_f64(1.0);
        self.buckets.retain(|_, bucket| {
            let bucket = bucket.get_mut().unwrap_or_else(|p| p.into_inner());
            now.saturating_duration_since(bucket.updated) < refill
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_up_to_the_rate_passes_then_the_next_waits_for_a_refill() {
        let throttle = Throttle::new(10);
        let start = Instant::now();
        for _ in 0..10 {
            assert!(throttle.take_at("svc", start).is_ok());
        }
        let wait = throttle.take_at("svc", start).expect_err("bucket empty");
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(
            throttle
                .take_at("svc", start + Duration::from_millis(100))
                .is_ok()
        );
    }

    #[test]
    fn publishers_have_separate_buckets() {
        let throttle = Throttle::new(1);
        let now = Instant::now();
        assert!(throttle.take_at("a", now).is_ok());
        assert!(throttle.take_at("a", now).is_err());
        assert!(throttle.take_at("b", now).is_ok());
    }

    #[test]
    fn idle_buckets_are_pruned_when_the_table_is_full() {
        let throttle = Throttle::new(5);
        let start = Instant::now();
        for i in 0..=MAX_BUCKETS {
            let _ = throttle.take_at(&format!("p{i}"), start);
        }
        let _ = throttle.take_at("late", start + Duration::from_secs(2));
        assert!(throttle.buckets.len() <= 2, "{}", throttle.buckets.len());
    }
}
