//! The dataplane of vmigrate: polling cores that run a userspace TCP stack (smoltcp) on a
//! NIC backend and carry the migration's byte pipes.
//!
//! A dataplane core is one pinned thread that owns one NIC queue pair (a
//! `smoltcp::phy::Device`), one smoltcp `Interface` and the TCP sockets of the
//! connections it serves, and busy-polls them with a bounded amount of work per loop.
//! Application threads (the engine's connection readers and writers) talk to it only
//! through bounded lock-free rings of byte chunks, so nothing is shared between cores but
//! rings. This crate knows nothing of pages or migrations: it provides
//! `transport::pipe::{Connector, Acceptor}` and the engine does the rest.

pub mod af_packet;
mod clock;
mod connection;
pub mod core;
mod core_config;
mod delivery;
#[cfg(feature = "dpdk")]
pub mod dpdk_nic;
#[cfg(feature = "dpdk")]
mod dpdk_steer;
pub mod fanout;
pub mod faults;
pub mod layers;
mod netdev;
pub mod pipe;
pub mod stack;
pub mod stats;
pub mod tap;
pub mod vnet;
pub mod wire;

/// The largest frame a device with segmentation offload takes from our stack (the wire,
/// TAP): the largest IPv4 packet, and its Ethernet header.
pub const SUPER_FRAME_BYTES: usize = u16::MAX as usize + 14;

/// The largest frame our stack hands the kernel to pass on whole (TAP, AF_PACKET): the
/// kernel cuts any GSO packet of its `gso_max_size` (64 KiB) or more in software before a
/// device sees it (`gso_features_check` in net/core/dev.c), so a segment of
/// `SUPER_FRAME_BYTES` would cross a veth as MTU-sized frames.
pub const KERNEL_SEGMENT_FRAME_BYTES: usize = 65535;

/// The smoltcp address types a caller needs to configure a stack.
pub mod wire_types {
    pub use smoltcp::wire::{EthernetAddress, IpCidr};
}
#[cfg(test)]
mod test_frames;
