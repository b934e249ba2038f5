//! Small layers around a NIC device, chosen on the command line: checksum handling and a
//! frame tracer (smoltcp's `Tracer`, printing each frame decoded, to stderr); and the
//! receive checks a backend does itself when the kernel tells it per frame whether the
//! checksums are known good.

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, TracerPacket};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket};

/// Checks the IPv4 header and TCP checksums of a received frame. Frames that are not IPv4
/// pass (smoltcp parses and checks what it uses of them).
///
/// A backend calls this for the frames the kernel does not vouch for, and declares no
/// receive checksums to smoltcp: a frame the kernel's own TCP sent over a veth carries only
/// a partial checksum (the NIC was to finish it), which smoltcp would reject.
pub fn checksums_ok(frame: &[u8]) -> bool {
    let Ok(ethernet) = EthernetFrame::new_checked(frame) else { return false };
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return true;
    }
    let Ok(ip) = Ipv4Packet::new_checked(ethernet.payload()) else { return false };
    if !ip.verify_checksum() {
        return false;
    }
    if ip.next_header() != IpProtocol::Tcp {
        return true;
    }
    match TcpPacket::new_checked(ip.payload()) {
        Ok(tcp) => tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()),
        Err(_) => false,
    }
}

/// The IPv4 packet of an Ethernet frame that carries TCP (None for anything else).
pub(crate) fn ipv4_carrying_tcp(frame: &[u8]) -> Option<Ipv4Packet<&[u8]>> {
    let ethernet = EthernetFrame::new_checked(frame).ok()?;
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(ethernet.payload()).ok()?;
    (ip.next_header() == IpProtocol::Tcp).then_some(ip)
}

/// Which IPv4 and TCP checksums our stack computes and checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumPolicy {
    /// Compute on transmit, verify on receive: for any link that can corrupt a frame.
    #[default]
    Full,
    /// Compute on transmit, trust what arrives: for a link that cannot corrupt (the
    /// in-process wire) or whose NIC has verified it. The migration stream's own CRC still
    /// covers every frame of pages.
    TrustReceive,
}

/// A device whose checksum capabilities follow a `ChecksumPolicy`.
pub struct Checksums<D> {
    inner: D,
    policy: ChecksumPolicy,
}

impl<D> Checksums<D> {
    pub fn new(inner: D, policy: ChecksumPolicy) -> Self {
        Checksums { inner, policy }
    }
}

impl<D: Device> Device for Checksums<D> {
    type RxToken<'a>
        = D::RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = D::TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.inner.receive(timestamp)
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = self.inner.capabilities();
        if self.policy == ChecksumPolicy::TrustReceive {
            caps.checksum.ipv4 = only_transmit(caps.checksum.ipv4);
            caps.checksum.tcp = only_transmit(caps.checksum.tcp);
        }
        caps
    }
}

fn only_transmit(checksum: Checksum) -> Checksum {
    match checksum {
        Checksum::Both | Checksum::Tx => Checksum::Tx,
        Checksum::Rx | Checksum::None => Checksum::None,
    }
}

/// The log target of traced frames. `--trace` installs the tracer, and the binary lets
/// this target through at the trace level whatever the verbosity.
pub const FRAME_TRACE_TARGET: &str = "vmigrate::frames";

/// The `Tracer` writer: one line per frame, with its direction and decoded headers.
pub fn trace_frame(timestamp: Instant, packet: TracerPacket) {
    log::trace!(target: FRAME_TRACE_TARGET, "{timestamp} {packet}");
}

/// The lengths of the frames in a capture `--pcap` wrote (smoltcp's writer: the classic
/// pcap format, little-endian), in order: how tests see what crossed a device.
pub fn pcap_frame_lengths(pcap: &[u8]) -> Vec<usize> {
    pcap_frames(pcap).iter().map(|frame| frame.len()).collect()
}

/// The frames of a capture `PcapWriter` wrote (little-endian pcap), as captured.
pub fn pcap_frames(pcap: &[u8]) -> Vec<&[u8]> {
    const FILE_HEADER_BYTES: usize = 24;
    const RECORD_HEADER_BYTES: usize = 16;
    let mut frames = Vec::new();
    let mut at = FILE_HEADER_BYTES;
    while let Some(record) = pcap.get(at..at + RECORD_HEADER_BYTES) {
        let captured = u32::from_le_bytes([record[8], record[9], record[10], record[11]]) as usize;
        let start = at + RECORD_HEADER_BYTES;
        frames.push(&pcap[start..(start + captured).min(pcap.len())]);
        at = start + captured;
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_checksums_are_checked() {
        let mut frame = crate::test_frames::tcp_frame(&[0xa5u8; 100]);
        assert!(checksums_ok(&frame));
        let last = frame.len() - 1;
        frame[last] ^= 0x40;
        assert!(!checksums_ok(&frame), "a corrupted payload is caught");
        frame[last] ^= 0x40;
        frame[14 + 8] ^= 1; // the IPv4 TTL: the header checksum no longer matches
        assert!(!checksums_ok(&frame), "a corrupted IPv4 header is caught");
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(checksums_ok(&arp), "not IPv4: left to smoltcp");
    }

    #[test]
    fn trusting_received_frames_keeps_transmit_checksums() {
        for (given, transmit) in [(Checksum::Both, true), (Checksum::Tx, true), (Checksum::Rx, false)] {
            let kept = only_transmit(given);
            assert!(!kept.rx(), "receive checks are dropped");
            assert_eq!(kept.tx(), transmit, "transmit checksums are kept as they were");
        }
    }
}
