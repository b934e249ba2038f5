//! What the engine needs from the virtual machine on each side. A VMM implements these
//! two traits over its own memory, dirty log and vCPUs; the synthetic guest implements
//! them for the demo and the tests.

use crate::VmError;
use migration::dirty::DirtyLog;
use migration::memory::{GuestMemory, Region};
use std::sync::Arc;

/// What the source VMM's dirty log has seen. The bulk stage skips the pages the first
/// take leaves out only where the log covers the guest's whole life: a VMM that turns
/// logging on when the migration starts (Cloud Hypervisor does) would otherwise lose every
/// page written before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogCoverage {
    /// Logging ran before the guest's first instruction, and the first `take_dirty` also
    /// holds every page the VMM itself wrote (its firmware, kernel, initial image): pages
    /// it leaves out were never written and are skipped.
    SinceBoot,
    /// Logging started later, or the VMM cannot tell: every page goes in the bulk stage
    /// (zero pages still go as zero runs).
    SinceMigrationStart,
}

/// The source guest as the destination is told of it, before any page moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    pub regions: Vec<Region>,
    /// `SourceVm::requirements`, as the source sent them.
    pub requirements: Vec<u8>,
}

impl GuestLayout {
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.bytes).sum()
    }

    pub fn region_bytes(&self) -> Vec<u64> {
        self.regions.iter().map(|r| r.bytes).collect()
    }

    /// `VmError::Unfit` where the guest is larger than `max_bytes`.
    pub fn check_fits(&self, max_bytes: u64) -> Result<(), VmError> {
        let total = self.total_bytes();
        if total > max_bytes {
            return Err(VmError::Unfit(format!(
                "guest of {total} bytes exceeds this destination's limit of {max_bytes} bytes"
            )));
        }
        Ok(())
    }
}

/// The running guest on the source.
pub trait SourceVm: Send + Sync {
    fn memory(&self) -> &dyn GuestMemory;
    /// Must already be logging when the migration starts; `log_coverage` says since when.
    fn dirty_log(&self) -> &dyn DirtyLog;
    /// Since when the dirty log has run: the VMM states what it knows; the engine never
    /// assumes.
    fn log_coverage(&self) -> LogCoverage;
    /// What the destination's VM must offer to host this guest (a CPU model, hypervisor
    /// capabilities), in the VMM's own encoding (at most 64 KiB): it travels in the
    /// handshake, so a destination that cannot host the guest refuses before the source
    /// pauses it. Nothing by default.
    fn requirements(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Stops the vCPUs. Returns once no guest write is in flight.
    fn pause(&self);
    /// Restarts the vCPUs: after a failed or cancelled migration the guest runs on here.
    fn resume(&self);
    /// The device state to carry in the final round (at most 1 MiB).
    fn device_state(&self) -> Vec<u8>;
    /// Auto-converge: slow the vCPUs down to `(100 - pct)`% of their speed.
    fn set_throttle(&self, _pct: u8) {}
}

/// The guest being built on the destination.
pub trait DestinationVm: Send {
    /// Called once with the source's memory layout and requirements, before any page
    /// moves and before the source pauses. Returns zeroed memory to receive into (its
    /// regions as `layout`'s), or why the session is refused (`VmError::Unfit`,
    /// `VmError::Incompatible`); the source is told why and its guest runs on.
    fn prepare(&mut self, layout: &GuestLayout) -> Result<Arc<dyn GuestMemory>, VmError>;
    /// All state arrived, was checked, and the source let go: start the guest.
    fn resume(&mut self, device_state: &[u8]) -> Result<(), VmError>;
    /// The migration failed before `resume`: free everything received.
    fn discard(&mut self);
}
