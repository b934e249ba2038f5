//! A token bucket shared by a session's connection writers, for `--max-bandwidth`. Like
//! QEMU's `max-bandwidth`, it caps the whole migration, not each connection.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimiter {
    bytes_per_s: f64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Burst allowed above the rate: 10 ms worth keeps writes smooth without letting a
/// shaped migration run ahead of its cap.
const BURST: Duration = Duration::from_millis(10);

impl RateLimiter {
    pub fn new(bytes_per_s: u64) -> Self {
        RateLimiter {
            bytes_per_s: bytes_per_s.max(1) as f64,
            state: Mutex::new(Bucket { tokens: 0.0, last: Instant::now() }),
        }
    }

    /// Waits until `bytes` may be sent.
    pub fn acquire(&self, bytes: usize) {
        let wait = {
            let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let burst = self.bytes_per_s * BURST.as_secs_f64();
            bucket.tokens =
                (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * self.bytes_per_s).min(burst);
            bucket.last = now;
            bucket.tokens -= bytes as f64;
            if bucket.tokens < 0.0 {
                Duration::from_secs_f64(-bucket.tokens / self.bytes_per_s)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}
