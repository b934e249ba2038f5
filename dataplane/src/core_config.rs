//! What a dataplane core is started with: its address and link, the wrappers around its
//! device, its TCP settings and what it does when idle.

use crate::fanout::Steering;
use crate::faults::Faults;
use crate::layers::ChecksumPolicy;
use smoltcp::wire::{EthernetAddress, IpCidr, Ipv4Address};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub name: String,
    pub mac: EthernetAddress,
    pub ip: IpCidr,
    pub gateway: Option<Ipv4Address>,
    /// Send and receive buffer of each TCP socket; window scaling follows from it.
    pub socket_buffer_bytes: usize,
    /// Core to pin the thread to (index into the available cores), or the next free one
    /// below it if another polling core on the host holds it (`transport::pin::claim_cpu`).
    pub pin_core: Option<usize>,
    /// Wrappers around the NIC device, chosen on the command line.
    pub wrappers: DeviceWrappers,
    pub congestion: Congestion,
    pub idle: IdlePolicy,
    /// Floor of each socket's retransmission timeout (RFC 6298's 1 s is for the Internet;
    /// see `DEFAULT_MIN_RTO`).
    pub min_rto: Duration,
    /// This core's place among the cores sharing one interface (None: it has it alone).
    pub steering: Option<Steering>,
    /// Large segments and checksums handed to the device where it takes them (TAP's
    /// virtio-net headers); see `offload_in_use`.
    pub offload: bool,
}

impl CoreConfig {
    /// Whether the device is to be opened with offload: asked for, and the wrappers allow
    /// it.
    pub fn offload_in_use(&self) -> bool {
        self.offload && self.wrappers.allow_offload()
    }
}

impl DeviceWrappers {
    /// Whether a device under these wrappers may offload checksums and segmentation: not
    /// while faults are injected, whose corruption only checksums our stack computes and
    /// checks can catch.
    pub fn allow_offload(&self) -> bool {
        !self.faults.any()
    }
}

/// The retransmission timeout floor of a migration link: well above the scheduling delays
/// of a shared machine (a spurious timeout resends the window and collapses it), and far
/// below RFC 6298's one second, which would stall a stream on every loss that fast
/// retransmit cannot repair. Linux's own floor is 200 ms; its SACK and tail-loss probes
/// repair most losses before that, smoltcp's fast retransmit does not.
pub const DEFAULT_MIN_RTO: Duration = Duration::from_millis(20);

/// What a core does when a loop found no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdlePolicy {
    /// Keep polling: the lowest latency, for a core that has a CPU to itself.
    Spin,
    /// Yield the CPU for `IDLE_YIELDS` loops, then nap `IDLE_NAP` between polls: for
    /// shared machines, where a spinning core would take the CPU from the workers feeding
    /// it. A yield hands the CPU to a thread waiting for it at once and costs a system
    /// call where none waits; spinning instead kept a worker that shared the core's CPU
    /// waiting for the scheduler's next turn (with both ends of a migration on two CPUs,
    /// 5.9-6.3 Gbit/s where yielding moved 7.0-9.3, the kernel's TCP 8.3-8.8).
    #[default]
    YieldThenNap,
}

/// TCP congestion control of a core's sockets (smoltcp's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    None,
    Reno,
    #[default]
    Cubic,
}

/// Debug layers around any NIC backend, in the style of smoltcp's own: seeded fault
/// injection (drop and corrupt chances, deterministic for a seed) and pcap capture.
#[derive(Debug, Clone, Default)]
pub struct DeviceWrappers {
    /// Faults on what each end receives (so both ways when both ends are ours).
    pub faults: Faults,
    pub seed: u32,
    /// Write every frame, both ways, to this pcap file.
    pub pcap: Option<std::path::PathBuf>,
    /// Print every frame, decoded, to stderr (smoltcp's `Tracer`).
    pub trace: bool,
    pub checksum: ChecksumPolicy,
}
