//! Changes an operator makes to a running migration (a control socket's commands): a new
//! downtime limit, a new bandwidth cap, a switchover now. Shared like [`crate::cancel::Cancel`]:
//! the caller keeps a clone and sets; the source's scanner reads it between batches and at
//! each round's end (`qemu-migrate` reads it too, and hands the changes to QEMU).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// No new value asked for.
const UNSET: u64 = u64::MAX;

#[derive(Clone, Debug)]
pub struct Tuning {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    downtime_limit_ms: AtomicU64,
    /// Bytes per second; 0: no cap.
    max_bandwidth: AtomicU64,
    switchover: AtomicBool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            inner: Arc::new(Inner {
                downtime_limit_ms: AtomicU64::new(UNSET),
                max_bandwidth: AtomicU64::new(UNSET),
                switchover: AtomicBool::new(false),
            }),
        }
    }
}

impl Tuning {
    pub fn new() -> Self {
        Self::default()
    }

    /// The downtime the migration may switch over with, from its next decision on.
    pub fn set_downtime_limit(&self, limit: Duration) {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(UNSET - 1).min(UNSET - 1);
        self.inner.downtime_limit_ms.store(ms, Ordering::Release);
    }

    /// The bandwidth cap in bytes per second (`None`: no cap), at once.
    pub fn set_max_bandwidth(&self, bytes_per_s: Option<u64>) {
        self.inner.max_bandwidth.store(bytes_per_s.unwrap_or(0).min(UNSET - 1), Ordering::Release);
    }

    /// Ends pre-copy now: the round under way stops handing out pages, and the migration
    /// switches over with what is left, whatever downtime that takes.
    pub fn switch_over_now(&self) {
        self.inner.switchover.store(true, Ordering::Release);
    }

    /// Whether a switchover was asked for.
    pub fn switchover_asked(&self) -> bool {
        self.inner.switchover.load(Ordering::Acquire)
    }

    /// Whether a switchover was asked for since the last call (for a destination, which
    /// passes it on once).
    pub fn take_switchover(&self) -> bool {
        self.inner.switchover.swap(false, Ordering::AcqRel)
    }

    /// A new downtime limit, once (for whoever applies it: the engine, or a relay's
    /// orchestrator handing it to QEMU).
    pub fn take_downtime_limit(&self) -> Option<Duration> {
        let ms = self.inner.downtime_limit_ms.swap(UNSET, Ordering::AcqRel);
        (ms != UNSET).then(|| Duration::from_millis(ms))
    }

    /// A new bandwidth cap, once: `Some(None)` lifts it.
    pub fn take_max_bandwidth(&self) -> Option<Option<u64>> {
        let rate = self.inner.max_bandwidth.swap(UNSET, Ordering::AcqRel);
        (rate != UNSET).then_some((rate != 0).then_some(rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_is_taken_once_and_the_switchover_stays_asked() {
        let tuning = Tuning::new();
        assert_eq!(tuning.take_downtime_limit(), None);
        assert_eq!(tuning.take_max_bandwidth(), None);
        tuning.set_downtime_limit(Duration::from_millis(500));
        tuning.set_max_bandwidth(Some(10_000_000));
        let shared = tuning.clone();
        assert_eq!(shared.take_downtime_limit(), Some(Duration::from_millis(500)));
        assert_eq!(shared.take_downtime_limit(), None);
        assert_eq!(shared.take_max_bandwidth(), Some(Some(10_000_000)));
        tuning.set_max_bandwidth(None);
        assert_eq!(shared.take_max_bandwidth(), Some(None), "the cap lifted");
        assert!(!shared.switchover_asked());
        tuning.switch_over_now();
        assert!(shared.switchover_asked() && shared.switchover_asked());
    }
}
