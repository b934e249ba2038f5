//! What a running destination tells its caller (`recv`'s control socket and events), and
//! what the caller may ask of it: cancel the incoming migration, or change it (carried to
//! the source as a `Tune`, since only the source can apply it).

use crate::cancel::Cancel;
use crate::tuning::Tuning;
use migration::control::Tune;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How often the session thread reports progress and looks at the caller's requests.
pub const WATCH_EVERY: Duration = Duration::from_millis(100);

/// How the incoming migration stands.
#[derive(Debug, Clone, Copy, Default)]
pub struct DestinationProgress {
    /// The guest's memory, as the source announced it.
    pub ram_total: u64,
    /// Frame bytes received on every connection.
    pub received_bytes: u64,
    /// Rounds whose every page is applied.
    pub rounds: u32,
    pub elapsed: Duration,
}

/// Called with the progress (on the session thread: it must return at once).
pub type ProgressSink = Arc<dyn Fn(&DestinationProgress) + Send + Sync>;

/// A caller's hold on a running destination.
#[derive(Clone, Default)]
pub struct DestinationControls {
    /// Cancels the migration before the destination has said it is ready (after that the
    /// source may have let go of the guest, and a cancel is refused with a warning).
    pub cancel: Cancel,
    /// Changes for the source (downtime limit, bandwidth cap, switchover).
    pub tuning: Tuning,
    /// Told the progress every [`WATCH_EVERY`].
    pub progress: Option<ProgressSink>,
}

impl DestinationControls {
    /// The changes asked for since the last call, as the source takes them.
    pub(crate) fn take_tune(&self) -> Tune {
        Tune {
            downtime_limit_ms: self.tuning.take_downtime_limit().map(|limit| limit.as_millis() as u64),
            max_bandwidth: self.tuning.take_max_bandwidth().map(|cap| cap.unwrap_or(0)),
            switchover: self.tuning.take_switchover(),
        }
    }
}

impl fmt::Debug for DestinationControls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DestinationControls").field("cancel", &self.cancel).finish_non_exhaustive()
    }
}
