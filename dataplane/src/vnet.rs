//! The virtio-net header that a TAP device opened with `IFF_VNET_HDR` (or a packet socket
//! with `PACKET_VNET_HDR`) puts before every frame: how the kernel and a userspace stack
//! hand each other large TCP segments and partial checksums (`include/uapi/linux/
//! virtio_net.h`, `struct virtio_net_hdr`, the 10-byte legacy form, little-endian on x86).
//!
//! Sending, the stack leaves the TCP checksum to the kernel (`NEEDS_CSUM`, the field
//! holding the pseudo-header's sum) and, for a segment longer than one MSS, asks it to cut
//! the segment (`GSO_TCPV4` and the MSS). Receiving, a frame may be such a segment whole,
//! with a partial checksum (`NEEDS_CSUM`: it never left the host) or one the kernel
//! checked (`DATA_VALID`); any other frame is checked here.

use smoltcp::wire::{checksum, IpProtocol};

/// Bytes of the header as the kernel's TAP default size (`TUNSETVNETHDRSZ` unset).
pub const VNET_HDR_BYTES: usize = 10;

const NEEDS_CSUM: u8 = 1;
const DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const ETHERNET_HEADER_BYTES: usize = 14;
/// Where the checksum sits in a TCP header.
const TCP_CHECKSUM_OFFSET: u16 = 16;

/// The header's fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn encode(&self, out: &mut [u8; VNET_HDR_BYTES]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    pub fn decode(bytes: &[u8; VNET_HDR_BYTES]) -> VnetHdr {
        let le = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        VnetHdr {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    /// Whether the frame's checksums need no check here: the kernel checked them, or the
    /// frame never left the host and carries a partial checksum for a NIC to finish.
    pub fn checksums_vouched_for(&self) -> bool {
        self.flags & (NEEDS_CSUM | DATA_VALID) != 0
    }
}

/// The header for a frame our stack built with its TCP checksum left to the device: for
/// IPv4 TCP, the pseudo-header's sum is put in the checksum field (`frame` is changed) and
/// the kernel asked to finish it, and to cut the segment into `segment_size` payloads when
/// given. Anything else (ARP, a frame too short to parse) goes as it is.
pub fn prepare_transmit(frame: &mut [u8], segment_size: Option<u16>) -> VnetHdr {
    let Some((ip_header, tcp_length, pseudo)) = tcp_over_ipv4(frame) else {
        return VnetHdr::default();
    };
    let tcp_start = ETHERNET_HEADER_BYTES + ip_header;
    let checksum_at = tcp_start + usize::from(TCP_CHECKSUM_OFFSET);
    frame[checksum_at..checksum_at + 2].copy_from_slice(&pseudo.to_be_bytes());
    let tcp_header = usize::from(frame[tcp_start + 12] >> 4) * 4;
    let mut header = VnetHdr {
        flags: NEEDS_CSUM,
        gso_type: GSO_NONE,
        hdr_len: (tcp_start + tcp_header) as u16,
        gso_size: 0,
        csum_start: tcp_start as u16,
        csum_offset: TCP_CHECKSUM_OFFSET,
    };
    if let Some(size) = segment_size.filter(|&size| tcp_length > tcp_header + usize::from(size)) {
        header.gso_type = GSO_TCPV4;
        header.gso_size = size;
    }
    header
}

/// For an IPv4 TCP frame: its IP header length, the TCP length, and the pseudo-header's
/// one's-complement sum folded to 16 bits (not complemented: the kernel adds the segment).
fn tcp_over_ipv4(frame: &[u8]) -> Option<(usize, usize, u16)> {
    let ip = crate::layers::ipv4_carrying_tcp(frame)?;
    let ip_header = usize::from(ip.header_len());
    let tcp_length = usize::from(ip.total_len()).checked_sub(ip_header)?;
    if tcp_length < 20 || ETHERNET_HEADER_BYTES + ip_header + 20 > frame.len() {
        return None;
    }
    let pseudo = checksum::pseudo_header_v4(&ip.src_addr(), &ip.dst_addr(), IpProtocol::Tcp, tcp_length as u32);
    Some((ip_header, tcp_length, pseudo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::checksums_ok;

    /// Finishes a partial checksum as the kernel does: the one's-complement sum of the
    /// bytes from `csum_start`, complemented, stored at `csum_start + csum_offset`.
    fn finish_checksum(frame: &mut [u8], header: &VnetHdr) {
        let start = usize::from(header.csum_start);
        let sum = checksum::data(&frame[start..]);
        let at = start + usize::from(header.csum_offset);
        frame[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
    }

    #[test]
    fn the_header_round_trips_little_endian() {
        let header = VnetHdr { flags: 1, gso_type: 1, hdr_len: 66, gso_size: 1448, csum_start: 34, csum_offset: 16 };
        let mut bytes = [0u8; VNET_HDR_BYTES];
        header.encode(&mut bytes);
        assert_eq!(bytes, [1, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0]);
        assert_eq!(VnetHdr::decode(&bytes), header);
    }

    #[test]
    fn a_partial_checksum_the_kernel_finishes_is_the_right_one() {
        for payload in [&[0xa5u8; 100][..], &[0x5a; 7], &[]] {
            let good = crate::test_frames::tcp_frame(payload);
            let mut frame = good.clone();
            let at = 14 + 20 + 16;
            frame[at..at + 2].copy_from_slice(&[0, 0]);
            let header = prepare_transmit(&mut frame, None);
            assert_eq!((header.flags, header.gso_type, header.csum_start), (NEEDS_CSUM, GSO_NONE, 34));
            finish_checksum(&mut frame, &header);
            assert_eq!(frame, good, "payload of {} bytes", payload.len());
            assert!(checksums_ok(&frame));
        }
    }

    #[test]
    fn only_segments_longer_than_one_mss_ask_for_segmentation() {
        let mut long = crate::test_frames::tcp_frame(&[1u8; 3000]);
        let header = prepare_transmit(&mut long, Some(1448));
        assert_eq!((header.gso_type, header.gso_size, header.hdr_len), (GSO_TCPV4, 1448, 54));
        let mut short = crate::test_frames::tcp_frame(&[1u8; 1000]);
        assert_eq!(prepare_transmit(&mut short, Some(1448)).gso_type, GSO_NONE);
    }

    #[test]
    fn frames_that_are_not_tcp_go_as_they_are() {
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let before = arp.clone();
        assert_eq!(prepare_transmit(&mut arp, Some(1448)), VnetHdr::default());
        assert_eq!(arp, before);
        assert!(!VnetHdr::default().checksums_vouched_for());
    }
}
