//! Several dataplane cores on one interface: each core owns one queue of it (a packet
//! socket in a fanout group, or one queue of a multi-queue TAP device) and its own smoltcp
//! `Interface` with the same address and MAC, and the traffic is split between them by
//! flow, so that each core sees only the TCP connections it owns.
//!
//! The flow rule is symmetric and needs no state: a TCP segment belongs to core
//! `(source port + destination port) mod cores`. A core that opens a connection picks a
//! local port that satisfies the rule for itself (`local_port_for`), and the peer's
//! segments come back to it; a connection the peer opens lands on some core, which
//! accepts it there.
//!
//! Frames that are not TCP (ARP above all) are not owned by any one core: a core that
//! receives one passes a copy to every other core of the interface through a ring
//! (`SharedLink`), so that each learns its neighbours and answers requests. Where the
//! device cannot steer by our rule (a multi-queue TAP device steers by the kernel's flow
//! table and hash), `SharedLink` also passes a TCP frame that reached the wrong core to
//! its owner: a core must never see another core's segments, since its stack would answer
//! them with a reset.

use crossbeam_queue::ArrayQueue;
use smoltcp::phy::{self, Device, DeviceCapabilities};
use smoltcp::time::Instant;
use std::io;
use std::sync::{Arc, OnceLock};

/// The core that owns the TCP flow between `local_port` and `remote_port`.
pub fn core_for_ports(local_port: u16, remote_port: u16, cores: usize) -> usize {
    (usize::from(local_port) + usize::from(remote_port)) % cores.max(1)
}

/// The first port at or after `from` (within `[base, u16::MAX]`, wrapping to `base`) that
/// steers the flow to `remote_port` onto core `core` of `cores`.
pub fn local_port_for(core: usize, cores: usize, remote_port: u16, from: u16, base: u16) -> u16 {
    let mut port = from.max(base);
    loop {
        if core_for_ports(port, remote_port, cores) == core {
            return port;
        }
        port = port.checked_add(1).unwrap_or(base);
    }
}

/// Where a core stands among the cores of its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steering {
    pub core: usize,
    pub cores: usize,
}

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD_B_ABS: u16 = 0x30;
const BPF_LD_H_IND: u16 = 0x48;
const BPF_LDX_W_MEM: u16 = 0x61;
const BPF_ST: u16 = 0x02;
const BPF_ALU_AND_K: u16 = 0x54;
const BPF_ALU_LSH_K: u16 = 0x64;
const BPF_ALU_ADD_X: u16 = 0x0c;
const BPF_ALU_MOD_K: u16 = 0x94;
const BPF_MISC_TAX: u16 = 0x07;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_A: u16 = 0x16;
const BPF_RET_K: u16 = 0x06;
/// Loads at this offset address the network (IP) header, wherever the frame starts.
const NET: u32 = libc::SKF_NET_OFF as u32;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The fanout program: the index of the socket (core) that owns a frame. TCP over IPv4
/// goes to `(sport + dport) mod cores`; everything else to core 0, which shares it.
pub fn steering_program(cores: usize) -> Vec<libc::sock_filter> {
    vec![
        insn(BPF_LD_B_ABS, 0, 0, NET + 9),       // A = IP protocol
        insn(BPF_JEQ_K, 0, 11, 6),               // not TCP: to the last instruction
        insn(BPF_LD_B_ABS, 0, 0, NET),           // A = version and IHL
        insn(BPF_ALU_AND_K, 0, 0, 0x0f),         //
        insn(BPF_ALU_LSH_K, 0, 0, 2),            // A = IP header length
        insn(BPF_MISC_TAX, 0, 0, 0),             // X = A
        insn(BPF_LD_H_IND, 0, 0, NET),           // A = source port
        insn(BPF_ST, 0, 0, 0),                   // M[0] = A
        insn(BPF_LD_H_IND, 0, 0, NET + 2),       // A = destination port
        insn(BPF_LDX_W_MEM, 0, 0, 0),            // X = M[0]
        insn(BPF_ALU_ADD_X, 0, 0, 0),            // A = sport + dport
        insn(BPF_ALU_MOD_K, 0, 0, cores as u32), // A = A mod cores
        insn(BPF_RET_A, 0, 0, 0),                //
        insn(BPF_RET_K, 0, 0, 0),                // core 0
    ]
}

/// A PACKET_FANOUT group of packet sockets on one interface, one per core, joined in core
/// order (the kernel numbers members in the order they join). Clones are the same group.
#[derive(Debug, Clone)]
pub struct FanoutGroup {
    /// The group's id, which the kernel picks when the first socket joins: unique in the
    /// network namespace, so no other group (another interface of this process, another
    /// process) can be joined by mistake, which an id of our own making could not promise.
    id: Arc<OnceLock<u16>>,
    cores: usize,
}

impl FanoutGroup {
    /// A group for `cores` sockets on one interface.
    pub fn new(cores: usize) -> FanoutGroup {
        FanoutGroup { id: Arc::new(OnceLock::new()), cores }
    }

    /// The id the kernel gave the group, once a socket has joined.
    pub fn id(&self) -> Option<u16> {
        self.id.get().copied()
    }

    /// Adds the packet socket `fd` (bound to the interface) to the group and sets the
    /// steering program. The first socket creates the group; the rest join it.
    pub fn join(&self, fd: i32) -> io::Result<()> {
        let mode = libc::PACKET_FANOUT_CBPF | libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
        match self.id.get() {
            Some(&id) => {
                let arg = u32::from(id) | (mode << 16);
                crate::netdev::set_packet_option(fd, libc::PACKET_FANOUT, &arg, "PACKET_FANOUT")?;
            }
            None => {
                let arg = (mode | libc::PACKET_FANOUT_FLAG_UNIQUEID) << 16;
                crate::netdev::set_packet_option(fd, libc::PACKET_FANOUT, &arg, "PACKET_FANOUT (a new group)")?;
                let joined = crate::netdev::packet_option::<u32>(fd, libc::PACKET_FANOUT, "PACKET_FANOUT (its id)")?;
                let _ = self.id.set(joined as u16);
            }
        }
        let mut program = steering_program(self.cores);
        let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
        crate::netdev::set_packet_option(fd, libc::PACKET_FANOUT_DATA, &fprog, "PACKET_FANOUT_DATA (steering program)")
    }
}

/// Frames not owned by one core, queued for each core of an interface.
const SHARED_FRAMES: usize = 256;

/// The rings through which the cores of one interface share frames that are not TCP.
pub struct SharedFrames {
    queues: Vec<ArrayQueue<Vec<u8>>>,
}

impl SharedFrames {
    pub fn new(cores: usize) -> Arc<SharedFrames> {
        Arc::new(SharedFrames { queues: (0..cores).map(|_| ArrayQueue::new(SHARED_FRAMES)).collect() })
    }
}

/// Whether an Ethernet frame is TCP over IPv4 (owned by one core's connection).
fn is_tcp(frame: &[u8]) -> bool {
    frame.len() > 23 && frame[12..14] == [0x08, 0x00] && frame[23] == 6
}

/// The core that owns an Ethernet frame, by the same rule as `steering_program`; None for
/// a frame that is not TCP (every core gets it).
pub(crate) fn owner(frame: &[u8], cores: usize) -> Option<usize> {
    if !is_tcp(frame) {
        return None;
    }
    let ports = 14 + usize::from(frame[14] & 0x0f) * 4;
    let port = |at: usize| frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    Some(core_for_ports(port(ports)?, port(ports + 2)?, cores))
}

/// A core's queue of a shared interface: frames the core receives that are not TCP are
/// copied to the other cores, and frames the others passed to it are received first.
pub struct SharedLink<D> {
    inner: D,
    shared: Arc<SharedFrames>,
    core: usize,
    /// The device does not steer by our rule: check each TCP frame's owner (a copy per
    /// frame; devices that steer in the kernel hand their frames over without one).
    redirect_tcp: bool,
}

/// Frames taken from the device per `receive` call while passing others' frames on.
const REDIRECT_BUDGET: usize = 64;

impl<D> SharedLink<D> {
    /// `redirect_tcp`: the device may deliver TCP frames of other cores' flows.
    pub fn new(inner: D, shared: Arc<SharedFrames>, core: usize, redirect_tcp: bool) -> Self {
        SharedLink { inner, shared, core, redirect_tcp }
    }

    fn pass_to_others(shared: &SharedFrames, core: usize, frame: &[u8]) {
        for (index, queue) in shared.queues.iter().enumerate() {
            // A full ring drops the copy, as a full NIC queue would.
            if index != core {
                let _ = queue.push(frame.to_vec());
            }
        }
    }
}

pub enum SharedRx<T> {
    Copied(Vec<u8>),
    Own { token: T, shared: Arc<SharedFrames>, core: usize },
}

impl<T: phy::RxToken> phy::RxToken for SharedRx<T> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        match self {
            SharedRx::Copied(frame) => f(&frame),
            SharedRx::Own { token, shared, core } => token.consume(|frame| {
                if !is_tcp(frame) {
                    SharedLink::<()>::pass_to_others(&shared, core, frame);
                }
                f(frame)
            }),
        }
    }
}

impl<D: Device> Device for SharedLink<D> {
    type RxToken<'a>
        = SharedRx<D::RxToken<'a>>
    where
        Self: 'a;
    type TxToken<'a>
        = D::TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if !self.shared.queues[self.core].is_empty() {
            // Take the transmit token first, so a frame is never popped and then lost.
            let tx = self.inner.transmit(timestamp)?;
            // Only this core pops its ring, so the frame seen above is still there.
            return self.shared.queues[self.core].pop().map(|frame| (SharedRx::Copied(frame), tx));
        }
        if !self.redirect_tcp {
            let (token, tx) = self.inner.receive(timestamp)?;
            return Some((SharedRx::Own { token, shared: self.shared.clone(), core: self.core }, tx));
        }
        let cores = self.shared.queues.len();
        for _ in 0..REDIRECT_BUDGET {
            let frame = {
                let (token, _tx) = self.inner.receive(timestamp)?;
                phy::RxToken::consume(token, |frame| frame.to_vec())
            };
            match owner(&frame, cores) {
                Some(other) if other != self.core => {
                    let _ = self.shared.queues[other].push(frame);
                }
                owner => {
                    if owner.is_none() {
                        Self::pass_to_others(&self.shared, self.core, &frame);
                    }
                    let Some(tx) = self.inner.transmit(timestamp) else {
                        // Keep it for the next call rather than lose it.
                        let _ = self.shared.queues[self.core].push(frame);
                        return None;
                    };
                    return Some((SharedRx::Copied(frame), tx));
                }
            }
        }
        None
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.inner.capabilities()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_steered_the_same_way_in_both_directions() {
        for cores in 1..5 {
            for (a, b) in [(49152, 4444), (50000, 80), (65535, 1)] {
                assert_eq!(core_for_ports(a, b, cores), core_for_ports(b, a, cores));
            }
        }
    }

    #[test]
    fn a_core_picks_a_local_port_that_comes_back_to_it() {
        for cores in 1..5 {
            for core in 0..cores {
                let port = local_port_for(core, cores, 4444, 49152, 49152);
                assert!((49152..49152 + cores as u16).contains(&port));
                assert_eq!(core_for_ports(port, 4444, cores), core);
            }
        }
        // At the top of the range the search wraps to the base.
        let port = local_port_for(1, 2, 4444, u16::MAX, 49152);
        assert_eq!(core_for_ports(port, 4444, 2), 1);
    }

    #[test]
    fn the_program_jumps_land_inside_it() {
        let program = steering_program(2);
        for (index, insn) in program.iter().enumerate() {
            if insn.code == BPF_JEQ_K {
                assert!(index + 1 + usize::from(insn.jt) < program.len());
                let not_tcp = index + 1 + usize::from(insn.jf);
                assert_eq!(program[not_tcp].code, BPF_RET_K, "non-TCP frames go to core 0");
            }
        }
        assert!(matches!(program.last(), Some(last) if last.code == BPF_RET_K && last.k == 0));
    }

    #[test]
    fn a_tcp_frame_belongs_to_the_core_its_ports_steer_to() {
        let mut frame = [0u8; 60];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[23] = 6;
        frame[34..36].copy_from_slice(&49153u16.to_be_bytes());
        frame[36..38].copy_from_slice(&4444u16.to_be_bytes());
        assert_eq!(owner(&frame, 2), Some(core_for_ports(49153, 4444, 2)));
        assert_eq!(owner(&frame, 1), Some(0));
        frame[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(owner(&frame, 2), None, "ARP goes to every core");
    }

    #[test]
    fn only_tcp_over_ipv4_is_owned_by_a_core() {
        let mut frame = [0u8; 60];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[23] = 6;
        assert!(is_tcp(&frame));
        frame[23] = 17;
        assert!(!is_tcp(&frame));
        frame[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(!is_tcp(&frame), "ARP is shared");
    }
}
