//! The DPDK backend: one RX/TX queue pair of a DPDK port as a `smoltcp::phy::Device`, with
//! burst receive and batched transmit. A received frame is handed to smoltcp straight from
//! its mbuf; a sent frame is built by smoltcp straight into a fresh mbuf: no copies beyond
//! smoltcp's socket buffers.
//!
//! Checksums follow the port's capabilities (`Port::checksum_offload`). With receive
//! offload the device's verdict in each mbuf's flags is taken: good passes, bad is dropped
//! (counted), and a frame the device did not check is checked here. With transmit offload
//! smoltcp leaves the IPv4 and TCP checksums to the device: each IPv4 mbuf is flagged for
//! it, with the TCP pseudo-header sum in the checksum field as DPDK asks.

use crate::layers::checksums_ok;
use dpdk::{consts, ChecksumOffload, Mbuf, Mempool, Port};
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{checksum, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet};
use std::collections::VecDeque;
use std::sync::Arc;

/// Packets asked of the queue per receive burst, and gathered per transmit burst.
const BURST: u16 = 32;

pub struct DpdkQueue {
    port: Arc<Port<'static>>,
    pool: &'static Mempool,
    queue: u16,
    offload: ChecksumOffload,
    /// Check the frames the device did not vouch for (off when the receive side is trusted).
    verify: bool,
    received: VecDeque<Mbuf<'static>>,
    to_send: Vec<Mbuf<'static>>,
    mtu: usize,
    /// Frames smoltcp built that no mbuf could hold (the pool empty): dropped.
    no_mbuf: u64,
    /// Frames received with a bad checksum (the device's verdict or ours): dropped.
    bad_checksum: u64,
}

impl DpdkQueue {
    /// Queue pair `queue` of `port`; `verify` checks received checksums the device did not.
    pub fn new(port: Arc<Port<'static>>, pool: &'static Mempool, queue: u16, verify: bool) -> DpdkQueue {
        DpdkQueue {
            offload: port.checksum_offload(),
            mtu: usize::from(port.mtu()),
            port,
            pool,
            queue,
            verify,
            received: VecDeque::with_capacity(usize::from(BURST)),
            to_send: Vec::with_capacity(usize::from(BURST)),
            no_mbuf: 0,
            bad_checksum: 0,
        }
    }

    /// Whether a received frame's checksums hold, by the device's flags where it checked
    /// them (only asked with receive offload on).
    fn received_checksums_ok(&self, mbuf: &Mbuf<'static>) -> bool {
        let flags = mbuf.offload_flags();
        let ip = flags & consts::RTE_MBUF_F_RX_IP_CKSUM_MASK;
        let tcp = flags & consts::RTE_MBUF_F_RX_L4_CKSUM_MASK;
        if ip == consts::RTE_MBUF_F_RX_IP_CKSUM_BAD || tcp == consts::RTE_MBUF_F_RX_L4_CKSUM_BAD {
            return false;
        }
        if ip == consts::RTE_MBUF_F_RX_IP_CKSUM_GOOD && tcp == consts::RTE_MBUF_F_RX_L4_CKSUM_GOOD {
            return true;
        }
        // Not checked by the device (not TCP, say, or a partial checksum from a local
        // sender): ours to check.
        !self.verify || checksums_ok(mbuf.data())
    }

    fn flush(&mut self) {
        if !self.to_send.is_empty() {
            let batch = std::mem::replace(&mut self.to_send, Vec::with_capacity(usize::from(BURST)));
            self.port.transmit(self.queue, batch);
        }
    }
}

pub struct DpdkRx {
    mbuf: Mbuf<'static>,
}

pub struct DpdkTx<'a> {
    queue: &'a mut DpdkQueue,
}

impl phy::RxToken for DpdkRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.mbuf.data())
    }
}

impl phy::TxToken for DpdkTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let queue = self.queue;
        let mut mbuf = match Mbuf::alloc(queue.pool) {
            Some(mbuf) => mbuf,
            None => {
                queue.no_mbuf += 1;
                return f(&mut vec![0; len]);
            }
        };
        let Some(data) = mbuf.append(len as u16) else {
            queue.no_mbuf += 1;
            return f(&mut vec![0; len]);
        };
        let result = f(data);
        if queue.offload.transmit {
            if let Some((l3_len, flags)) = prepare_checksum_offload(data) {
                mbuf.request_offload(flags, 14, l3_len, 0);
            }
        }
        queue.to_send.push(mbuf);
        if queue.to_send.len() >= usize::from(BURST) {
            queue.flush();
        }
        result
    }
}

impl Device for DpdkQueue {
    type RxToken<'a> = DpdkRx;
    type TxToken<'a> = DpdkTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(DpdkRx, DpdkTx<'_>)> {
        loop {
            if self.received.is_empty() {
                self.port.receive(self.queue, &mut self.received, BURST);
            }
            let Some(mbuf) = self.received.pop_front() else {
                // Input drained: send what this round of the stack queued, as one burst.
                self.flush();
                return None;
            };
            if self.offload.receive && !self.received_checksums_ok(&mbuf) {
                self.bad_checksum += 1;
                continue;
            }
            return Some((DpdkRx { mbuf }, DpdkTx { queue: self }));
        }
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<DpdkTx<'_>> {
        Some(DpdkTx { queue: self })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.max_burst_size = Some(usize::from(BURST));
        let checksum = match (self.offload.receive, self.offload.transmit) {
            (false, false) => Checksum::Both,
            (true, false) => Checksum::Tx,
            (false, true) => Checksum::Rx,
            (true, true) => Checksum::None,
        };
        caps.checksum.ipv4 = checksum;
        caps.checksum.tcp = checksum;
        caps
    }
}

impl Drop for DpdkQueue {
    fn drop(&mut self) {
        self.flush();
        if self.no_mbuf > 0 {
            log::info!(queue = self.queue; "dpdk: {} frames dropped for want of an mbuf", self.no_mbuf);
        }
        if self.bad_checksum > 0 {
            log::info!(queue = self.queue; "dpdk: {} frames dropped for a bad checksum", self.bad_checksum);
        }
    }
}

/// Readies an outgoing frame for the device's checksum offload: an IPv4 packet gets a zero
/// header checksum and, when it carries TCP, the pseudo-header sum in the TCP checksum
/// field. Returns the IPv4 header length and the mbuf flags to set; None for anything that
/// is not IPv4 (ARP), which carries no checksum.
fn prepare_checksum_offload(frame: &mut [u8]) -> Option<(u16, u64)> {
    let ethernet = EthernetFrame::new_checked(&*frame).ok()?;
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let mut ip = Ipv4Packet::new_checked(&mut frame[EthernetFrame::<&[u8]>::header_len()..]).ok()?;
    let header_len = ip.header_len();
    ip.set_checksum(0);
    let mut flags = consts::RTE_MBUF_F_TX_IPV4 | consts::RTE_MBUF_F_TX_IP_CKSUM;
    if ip.next_header() == IpProtocol::Tcp {
        let (source, destination) = (ip.src_addr(), ip.dst_addr());
        let tcp_len = usize::from(ip.total_len()) - usize::from(header_len);
        let partial = checksum::pseudo_header_v4(&source, &destination, IpProtocol::Tcp, tcp_len as u32);
        let tcp = ip.payload_mut();
        if tcp.len() < 18 {
            return None;
        }
        tcp[16..18].copy_from_slice(&partial.to_be_bytes());
        flags |= consts::RTE_MBUF_F_TX_TCP_CKSUM;
    }
    Some((u16::from(header_len), flags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_frames::tcp_frame;

    #[test]
    fn a_device_finishing_the_offloaded_checksums_gets_the_right_ones() {
        let frame = tcp_frame(b"a page of guest memory, or the start of one");
        assert!(checksums_ok(&frame));
        let mut offloaded = frame.clone();
        let (l3_len, flags) = prepare_checksum_offload(&mut offloaded).expect("an IPv4 TCP frame");
        assert_eq!(l3_len, 20);
        let wanted = consts::RTE_MBUF_F_TX_IPV4 | consts::RTE_MBUF_F_TX_IP_CKSUM | consts::RTE_MBUF_F_TX_TCP_CKSUM;
        assert_eq!(flags, wanted);
        assert!(!checksums_ok(&offloaded), "left for the device, the checksums are not yet valid");

        // What the device does: the IPv4 header checksum over the header, and the TCP
        // checksum over the segment, whose checksum field starts with the pseudo-header sum.
        let mut ip = Ipv4Packet::new_unchecked(&mut offloaded[14..]);
        ip.fill_checksum();
        let tcp = &mut ip.payload_mut()[..];
        let sum = !checksum::data(tcp);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(offloaded, frame, "the device's checksums equal smoltcp's own");
    }

    #[test]
    fn frames_other_than_ipv4_are_left_alone() {
        let mut frame = tcp_frame(b"");
        frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
        let before = frame.clone();
        assert_eq!(prepare_checksum_offload(&mut frame), None);
        assert_eq!(frame, before);
    }
}
