//! A token bucket shared by a session's connection writers, for `--max-bandwidth`. Like
//! QEMU's `max-bandwidth`, it caps the whole migration, not each connection.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimiter {
    state: Mutex<Bucket>,
}

struct Bucket {
    /// The cap; infinite: none (an operator may set one later).
    bytes_per_s: f64,
    tokens: f64,
    last: Instant,
}

/// Burst allowed above the rate: 10 ms worth keeps writes smooth without letting a
/// shaped migration run ahead of its cap.
const BURST: Duration = Duration::from_millis(10);

impl RateLimiter {
    pub fn new(bytes_per_s: u64) -> Self {
        Self::with_rate(Some(bytes_per_s))
    }

    /// A limiter with `bytes_per_s` as its cap, or none yet.
    pub fn with_rate(bytes_per_s: Option<u64>) -> Self {
        RateLimiter { state: Mutex::new(Bucket { bytes_per_s: rate(bytes_per_s), tokens: 0.0, last: Instant::now() }) }
    }

    /// A new cap (`None`: none) from now on; what was taken ahead of the old one is
    /// forgiven.
    pub fn set_rate(&self, bytes_per_s: Option<u64>) {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *bucket = Bucket { bytes_per_s: rate(bytes_per_s), tokens: 0.0, last: Instant::now() };
    }

    /// Waits until `bytes` may be sent.
    pub fn acquire(&self, bytes: usize) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Takes `bytes` from the bucket and returns how long the caller must wait before
    /// sending them: for a caller that cannot sleep (a polling core), which holds the
    /// bytes back that long instead.
    pub fn reserve(&self, bytes: usize) -> Duration {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if bucket.bytes_per_s.is_infinite() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let burst = bucket.bytes_per_s * BURST.as_secs_f64();
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * bucket.bytes_per_s).min(burst);
        bucket.last = now;
        bucket.tokens -= bytes as f64;
        if bucket.tokens < 0.0 {
            Duration::from_secs_f64(-bucket.tokens / bucket.bytes_per_s)
        } else {
            Duration::ZERO
        }
    }

    /// Whether writes wait for the cap now: more was taken than the rate has paid back.
    /// The cap is then the link's limit, though the stack under it never fills.
    pub fn holding_back(&self) -> bool {
        let bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        bucket.bytes_per_s.is_finite() && bucket.tokens + bucket.last.elapsed().as_secs_f64() * bucket.bytes_per_s < 0.0
    }
}

/// A cap as the bucket keeps it: at least 1 byte/s, infinite for none.
fn rate(bytes_per_s: Option<u64>) -> f64 {
    bytes_per_s.map_or(f64::INFINITY, |rate| rate.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_cap_applies_at_once_and_none_lifts_it() {
        let limiter = RateLimiter::with_rate(None);
        assert_eq!(limiter.reserve(1 << 30), Duration::ZERO, "no cap: nothing waits");
        assert!(!limiter.holding_back());
        limiter.set_rate(Some(1_000_000));
        // The bucket starts empty under the new cap: 100 KB at 1 MB/s wait 100 ms.
        let wait = limiter.reserve(100_000);
        assert!(wait >= Duration::from_millis(95) && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.holding_back());
        limiter.set_rate(None);
        assert_eq!(limiter.reserve(1 << 30), Duration::ZERO);
        assert!(!limiter.holding_back(), "what was taken under the old cap is forgiven");
    }

    #[test]
    fn the_cap_holds_back_while_more_was_taken_than_it_paid_back() {
        let limiter = RateLimiter::new(1_000_000);
        assert!(!limiter.holding_back(), "nothing taken yet");
        // The bucket starts empty: 60 KB at 1 MB/s wait 60 ms.
        let started = Instant::now();
        limiter.acquire(60_000);
        assert!(started.elapsed() >= Duration::from_millis(60));
        assert!(!limiter.holding_back(), "the wait paid it back");
        {
            // Taken ahead of the rate (as a write that is still waiting has).
            let mut bucket = limiter.state.lock().unwrap();
            bucket.tokens = -20_000.0;
            bucket.last = Instant::now();
        }
        assert!(limiter.holding_back());
        std::thread::sleep(Duration::from_millis(30));
        assert!(!limiter.holding_back(), "20 ms later it has paid back");
    }
}
