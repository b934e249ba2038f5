//! A safe wrapper over `dpdk-sys`: EAL initialisation once per process from DPDK-style
//! arguments, errors from `rte_errno`/`rte_strerror`, packet mempools, an owning `Mbuf`
//! that frees itself, ports with one RX/TX queue pair per dataplane core, and compression
//! devices (`compress`).
//!
//! Built where DPDK is absent, only `AVAILABLE` (false) and the error type exist.

mod error;
pub use error::DpdkError;

/// DPDK's flag and capability bits (offloads, RSS), as the headers define them.
pub use dpdk_sys::consts;

/// Whether this build has DPDK.
pub const AVAILABLE: bool = dpdk_sys::AVAILABLE;

#[cfg(dpdk)]
pub mod compress;
#[cfg(dpdk)]
mod eal;
#[cfg(dpdk)]
mod mbuf;
#[cfg(dpdk)]
mod mempool;
#[cfg(dpdk)]
mod port;
#[cfg(dpdk)]
pub mod segments;

#[cfg(dpdk)]
pub use eal::{Eal, LcoreRegistration};
#[cfg(dpdk)]
pub use mbuf::Mbuf;
#[cfg(dpdk)]
pub use mempool::Mempool;
#[cfg(dpdk)]
pub use port::{ChecksumOffload, LinkStatus, Port, PortStats, SegmentOffload, MAX_RX_BURST};
