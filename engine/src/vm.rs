//! What the engine needs from the virtual machine on each side. A VMM implements these
//! two traits over its own memory, dirty log and vCPUs; the synthetic guest implements
//! them for the demo and the tests.

use crate::VmError;
use migration::dirty::DirtyLog;
use migration::memory::GuestMemory;
use std::sync::Arc;

/// The running guest on the source.
pub trait SourceVm: Send + Sync {
    fn memory(&self) -> &dyn GuestMemory;
    /// Must already be logging when the migration starts (before the guest ran, for the
    /// bulk stage to skip never-touched pages).
    fn dirty_log(&self) -> &dyn DirtyLog;
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
    /// Called once with the source's memory layout. Returns zeroed memory to receive into,
    /// or why the session is refused (it does not fit, say); the source is told why.
    fn prepare(&mut self, region_bytes: &[u64]) -> Result<Arc<dyn GuestMemory>, VmError>;
    /// All state arrived, was checked, and the source let go: start the guest.
    fn resume(&mut self, device_state: &[u8]) -> Result<(), VmError>;
    /// The migration failed before `resume`: free everything received.
    fn discard(&mut self);
}
