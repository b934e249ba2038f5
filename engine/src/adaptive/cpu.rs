//! The CPU measurements adaptive compression needs: how much CPU a worker thread has used
//! (to price each codec per core-second, whatever else runs on the machine) and how many of
//! the machine's CPUs sit idle. How many polling dataplane cores this process runs (they
//! look busy to the kernel whether or not they have work) is `transport::pin::pollers`.

use std::time::Duration;

/// CPU time the calling thread has used so far.
pub fn thread_time() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec for the call's duration, and
    // CLOCK_THREAD_CPUTIME_ID is supported by every Linux kernel we run on.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if status != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// USER_HZ ticks in /proc/stat: 100 on every Linux architecture we run on.
const TICKS_PER_SECOND: f64 = 100.0;

/// Idle time of all CPUs together (idle and iowait, in seconds), from /proc/stat's first
/// line; `None` where it cannot be read (the policy then assumes the workers have cores).
pub fn idle_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_idle(stat.lines().next()?)
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: idle + iowait, in seconds.
fn parse_idle(line: &str) -> Option<f64> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.take(5).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    Some((ticks.get(3)? + ticks.get(4)?) as f64 / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_idle_plus_iowait() {
        assert_eq!(parse_idle("cpu  4705 150 1120 16250 520 0 35 0 0 0"), Some(167.7));
        assert_eq!(parse_idle("cpu0 4705 150 1120 16250 520"), None);
        assert_eq!(parse_idle("cpu  1 2"), None);
        assert!(idle_seconds().is_some_and(|s| s > 0.0));
    }

    #[test]
    fn a_busy_thread_sees_its_cpu_time_grow() {
        let start = thread_time();
        let mut x = 0u64;
        while thread_time() - start < Duration::from_millis(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(thread_time() > start);
    }
}
