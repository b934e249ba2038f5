//! The source's pre-copy controller: after each round it decides whether to run another
//! round, switch over (stop the guest and copy the rest), or give up.
//!
//! Expected downtime is estimated as QEMU does: the bytes the next round would put on the
//! wire (dirty pages times the bytes per page the last round measured) divided by the
//! bandwidth the last round measured. Auto-converge follows QEMU's rule: when the guest
//! dirties more than half as many bytes as a round sent, twice, throttle its vCPUs,
//! starting at 20% and adding 10% each time.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitAction {
    /// Stop the guest and copy what remains, accepting a longer downtime.
    Switchover,
    /// Abandon the migration; the source guest keeps running.
    Cancel,
}

#[derive(Debug, Clone)]
pub struct PrecopyConfig {
    /// QEMU's `downtime-limit` (default 300 ms).
    pub downtime_limit: Duration,
    /// Rounds after the bulk round before the limit action applies.
    pub max_rounds: u32,
    /// Time spent in pre-copy before the limit action applies.
    pub timeout: Option<Duration>,
    pub on_limit: LimitAction,
    pub auto_converge: bool,
    pub throttle_initial_pct: u8,
    pub throttle_increment_pct: u8,
    pub throttle_max_pct: u8,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            timeout: None,
            on_limit: LimitAction::Switchover,
            auto_converge: false,
            // QEMU's cpu-throttle-initial and cpu-throttle-increment defaults.
            throttle_initial_pct: 20,
            throttle_increment_pct: 10,
            throttle_max_pct: 99,
        }
    }
}

/// What the engine measured over one pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundReport {
    /// Time the round took on the source (scan, encode, send).
    pub duration: Duration,
    /// Bytes the connections actually wrote during the round: with the round's duration,
    /// the link's measured bandwidth.
    pub bytes_sent: u64,
    /// Pages the round covered (zero pages included).
    pub pages_sent: u64,
    /// Bytes those pages were encoded into: with `pages_sent`, bytes per page.
    pub bytes_encoded: u64,
    /// Pages found dirty by the sync that ended the round: the next round's work.
    pub dirty_pages: u64,
    /// Bytes encoded but still queued for the wire when the round ended.
    pub backlog_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverReason {
    /// The expected downtime fell under the limit.
    Converged,
    /// The round limit or the timeout was reached with `LimitAction::Switchover`.
    LimitReached,
    /// The operator asked for it (a control command), whatever the downtime.
    Requested,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    NextRound { throttle_pct: u8 },
    StopAndCopy { reason: SwitchoverReason },
    Cancel { rounds: u32 },
}

#[derive(Debug, Clone)]
pub struct Precopy {
    config: PrecopyConfig,
    /// The operator asked to switch over at the next decision.
    switchover_requested: bool,
    started: Duration,
    rounds: u32,
    throttle_pct: u8,
    dirty_rate_high_count: u32,
    expected_downtime: Duration,
    bandwidth_bytes_per_s: f64,
}

impl Precopy {
    /// `now` is any monotonic clock reading; only differences matter.
    pub fn new(config: PrecopyConfig, now: Duration) -> Self {
        Precopy {
            config,
            switchover_requested: false,
            started: now,
            rounds: 0,
            throttle_pct: 0,
            dirty_rate_high_count: 0,
            expected_downtime: Duration::ZERO,
            bandwidth_bytes_per_s: 0.0,
        }
    }

    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    pub fn expected_downtime(&self) -> Duration {
        self.expected_downtime
    }

    pub fn bandwidth_bytes_per_s(&self) -> f64 {
        self.bandwidth_bytes_per_s
    }

    pub fn downtime_limit(&self) -> Duration {
        self.config.downtime_limit
    }

    /// A new downtime limit (an operator's), from the next decision on.
    pub fn set_downtime_limit(&mut self, limit: Duration) {
        self.config.downtime_limit = limit;
    }

    /// Switch over at the next decision, whatever the downtime.
    pub fn request_switchover(&mut self) {
        self.switchover_requested = true;
    }

    pub fn throttle_pct(&self) -> u8 {
        self.throttle_pct
    }

    /// Feeds the measurements of the round that just ended; returns what to do next.
    pub fn round_finished(&mut self, now: Duration, report: RoundReport) -> Decision {
        self.rounds += 1;
        let seconds = report.duration.as_secs_f64();
        // A round too short to measure keeps the previous estimate.
        if seconds > 0.0 && report.bytes_sent > 0 {
            self.bandwidth_bytes_per_s = report.bytes_sent as f64 / seconds;
        }
        let bytes_per_page = if report.pages_sent > 0 && report.bytes_encoded > 0 {
            report.bytes_encoded as f64 / report.pages_sent as f64
        } else {
            crate::PAGE_SIZE_BYTES as f64
        };
        let remaining_bytes = report.dirty_pages as f64 * bytes_per_page + report.backlog_bytes as f64;
        self.expected_downtime = if remaining_bytes == 0.0 {
            Duration::ZERO
        } else if self.bandwidth_bytes_per_s > 0.0 {
            Duration::from_secs_f64(remaining_bytes / self.bandwidth_bytes_per_s)
        } else {
            Duration::MAX
        };
        if self.switchover_requested {
            return Decision::StopAndCopy { reason: SwitchoverReason::Requested };
        }
        if self.expected_downtime <= self.config.downtime_limit {
            return Decision::StopAndCopy { reason: SwitchoverReason::Converged };
        }
        let timed_out = self.config.timeout.is_some_and(|limit| now.saturating_sub(self.started) >= limit);
        // The bulk round does not count against the round limit.
        if self.rounds > self.config.max_rounds || timed_out {
            return match self.config.on_limit {
                LimitAction::Switchover => Decision::StopAndCopy { reason: SwitchoverReason::LimitReached },
                LimitAction::Cancel => Decision::Cancel { rounds: self.rounds },
            };
        }
        if self.config.auto_converge && self.rounds > 1 {
            self.update_throttle(report.dirty_pages as f64 * bytes_per_page, report.bytes_sent);
        }
        Decision::NextRound { throttle_pct: self.throttle_pct }
    }

    fn update_throttle(&mut self, dirtied_bytes: f64, sent_bytes: u64) {
        if dirtied_bytes > sent_bytes as f64 / 2.0 {
            self.dirty_rate_high_count += 1;
        }
        if self.dirty_rate_high_count >= 2 {
            self.dirty_rate_high_count = 0;
            self.throttle_pct = if self.throttle_pct == 0 {
                self.config.throttle_initial_pct
            } else {
                self.throttle_pct.saturating_add(self.config.throttle_increment_pct)
            }
            .min(self.config.throttle_max_pct);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn report(ms: u64, bytes: u64, pages: u64, dirty: u64) -> RoundReport {
        RoundReport {
            duration: MS * ms as u32,
            bytes_sent: bytes,
            pages_sent: pages,
            bytes_encoded: bytes,
            dirty_pages: dirty,
            backlog_bytes: 0,
        }
    }

    #[test]
    fn queued_bytes_count_as_remaining() {
        let mut precopy = Precopy::new(PrecopyConfig::default(), Duration::ZERO);
        // Nothing dirty, but 100 MB still queued on a 100 MB/s link: 1 s to go.
        let mut busy = report(1000, 100_000_000, 24_414, 0);
        busy.backlog_bytes = 100_000_000;
        assert!(matches!(precopy.round_finished(MS * 1000, busy), Decision::NextRound { .. }));
        assert!(precopy.expected_downtime() > Duration::from_millis(900));
    }

    #[test]
    fn converges_when_remaining_fits_the_limit() {
        let mut precopy = Precopy::new(PrecopyConfig::default(), Duration::ZERO);
        // 1 GB/s measured; 1000 pages of 4 KiB remain: ~4 ms expected downtime.
        let decision = precopy.round_finished(MS * 1000, report(1000, 1_000_000_000, 244_140, 1000));
        assert_eq!(decision, Decision::StopAndCopy { reason: SwitchoverReason::Converged });
        assert!(precopy.expected_downtime() < MS * 5);
    }

    #[test]
    fn keeps_going_while_too_much_is_dirty() {
        let mut precopy = Precopy::new(PrecopyConfig::default(), Duration::ZERO);
        // 100 MB/s; 100k dirty pages of 4 KiB = 4 s expected.
        let decision = precopy.round_finished(MS * 1000, report(1000, 100_000_000, 24_414, 100_000));
        assert_eq!(decision, Decision::NextRound { throttle_pct: 0 });
        assert!(precopy.expected_downtime() > Duration::from_secs(3));
    }

    #[test]
    fn round_limit_switches_over_or_cancels() {
        for (action, expected) in [
            (LimitAction::Switchover, Decision::StopAndCopy { reason: SwitchoverReason::LimitReached }),
            (LimitAction::Cancel, Decision::Cancel { rounds: 4 }),
        ] {
            let config = PrecopyConfig { max_rounds: 3, on_limit: action, ..Default::default() };
            let mut precopy = Precopy::new(config, Duration::ZERO);
            let mut last = None;
            for round in 1..=4u64 {
                last = Some(precopy.round_finished(MS * (round * 100) as u32, report(100, 1_000_000, 244, 100_000)));
            }
            assert_eq!(last, Some(expected));
        }
    }

    #[test]
    fn timeout_applies_on_the_virtual_clock() {
        let config = PrecopyConfig { timeout: Some(Duration::from_secs(2)), ..Default::default() };
        let mut precopy = Precopy::new(config, Duration::from_secs(10));
        let busy = report(1000, 1_000_000, 244, 100_000);
        assert!(matches!(precopy.round_finished(Duration::from_secs(11), busy), Decision::NextRound { .. }));
        assert_eq!(
            precopy.round_finished(Duration::from_secs(12), busy),
            Decision::StopAndCopy { reason: SwitchoverReason::LimitReached }
        );
    }

    #[test]
    fn auto_converge_throttles_in_steps() {
        let config = PrecopyConfig { auto_converge: true, max_rounds: 100, ..Default::default() };
        let mut precopy = Precopy::new(config, Duration::ZERO);
        let busy = report(1000, 1_000_000, 244, 100_000);
        let throttles: Vec<u8> = (1..=7)
            .map(|round| match precopy.round_finished(MS * (round * 1000), busy) {
                Decision::NextRound { throttle_pct } => throttle_pct,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        // Bulk round never counts; then every second high-dirty round steps the throttle.
        assert_eq!(throttles, vec![0, 0, 20, 20, 30, 30, 40]);
    }
}
