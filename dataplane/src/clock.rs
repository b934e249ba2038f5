//! The stacks' clock. smoltcp's `Instant::now()` reads the wall clock, which NTP or an
//! operator may step during a migration: stepped back, every TCP timer of the core waits
//! out the step (a lost segment is not retransmitted for that long); stepped forward,
//! retransmission and time-wait timers fire at once. A core's clock is the wall time at
//! its start advanced by the monotonic clock: it never steps, and captures (`--pcap`)
//! still carry wall-clock-like times.

use smoltcp::time::{Duration, Instant};

pub(crate) struct StackClock {
    wall_at_start: Instant,
    start: std::time::Instant,
}

impl StackClock {
    pub(crate) fn new() -> StackClock {
        StackClock { wall_at_start: Instant::now(), start: std::time::Instant::now() }
    }

    pub(crate) fn now(&self) -> Instant {
        let elapsed = self.start.elapsed();
        self.wall_at_start + Duration::from_micros(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_wall_time_and_only_moves_forward() {
        let clock = StackClock::new();
        let wall = Instant::now();
        let first = clock.now();
        assert!((wall - first).total_millis() < 1000 && (first - wall).total_millis() < 1000);
        let mut last = first;
        for _ in 0..1000 {
            let now = clock.now();
            assert!(now >= last);
            last = now;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!((clock.now() - first).total_millis() >= 5);
    }
}
