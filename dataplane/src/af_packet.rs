//! The AF_PACKET backend: a raw socket on an existing interface with mapped rings, so that
//! frames move between the NIC driver and our stack without a copy through `read`/`write`:
//! a TPACKET_V2 receive ring and a TPACKET_V2 transmit ring (fixed slots, flushed with one
//! `send` per batch). Optionally the transmit path bypasses the qdisc layer, and several
//! sockets on one interface share its traffic through a fanout group (one per dataplane
//! core, steered by TCP ports: see `fanout`).
//!
//! TPACKET_V2 rather than V3 for receive: V3 hands frames over a block at a time, and a
//! block that does not fill is only retired after a timeout of at least a millisecond, so
//! every ACK and every small burst waited that long; with V2 each frame is ours as soon as
//! the kernel wrote it, and the round trip is microseconds.
//!
//! With offload each slot carries a virtio-net header before its frame
//! (`PACKET_VNET_HDR`, `vnet.rs`): our stack hands the kernel 64 KiB TCP segments with a
//! partial checksum, which cross a veth whole (the kernel cuts them only where a NIC needs
//! MTU-sized frames), and receives the kernel's segments, or GRO's aggregates, whole. The
//! slots are then sized for such frames, not the MTU; the kernel sends a large frame
//! straight from its slot (the slot's pages become the packet's fragments).
//!
//! The ring memory is shared with the kernel: every status word is read with acquire and
//! written with release ordering through atomics, and no Rust reference into the ring
//! outlives the call that made it.

use crate::fanout::FanoutGroup;
use crate::netdev::{check, set_packet_option, set_socket_option};
use crate::vnet::{prepare_transmit, VNET_HDR_BYTES};
use crate::SUPER_FRAME_BYTES;
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// Receive ring: 16 MiB of frame slots absorb a few milliseconds at 40 Gbit/s.
const RX_RING_BYTES: usize = 16 << 20;
/// Transmit ring: 4 MiB of frame slots.
const TX_RING_BYTES: usize = 4 << 20;
/// With offload, slots hold 64 KiB frames: rings twice as large keep a few hundred slots
/// (a window of ACKs, or of large segments, in flight).
const OFFLOAD_RING_SCALE: usize = 2;
/// Blocks hold whole slots; 64 KiB keeps each kernel allocation small.
const BLOCK_BYTES: usize = 64 << 10;
/// Blocks of large slots: 1 MiB holds 15 of them, wasting 6% (a block must be whole
/// pages, and the kernel allocates it as a power of two of them).
const LARGE_BLOCK_BYTES: usize = 1 << 20;
/// Slot sizes are multiples of this (`TPACKET_ALIGNMENT`).
const SLOT_ALIGNMENT: usize = 16;
/// Frames queued in the transmit ring before we ask the kernel to send them.
const TX_BATCH: usize = 32;
/// Where frame data starts in a transmit slot: the header, aligned (the kernel's
/// `tp_hdrlen - sizeof(sockaddr_ll)` for TPACKET_V2).
const TX_DATA_OFFSET: usize = libc::TPACKET2_HDRLEN - std::mem::size_of::<libc::sockaddr_ll>();
/// Room the kernel keeps in a receive slot before the frame: the header and sockaddr_ll,
/// aligned, plus 16 bytes for the MAC header (tpacket_rcv's `netoff`).
const RX_FRAME_HEADROOM: usize = 96;

/// The mapped rings of one socket.
struct Mapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by the device that owns the socket; it is only touched by
// the thread that owns the device (one dataplane core), and moving it between threads
// before that is sound because it is plain memory.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned, and no reference into the
        // mapping survives the device.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

/// A ring of fixed-size slots, each headed by a `tpacket2_hdr`, in blocks that each hold
/// a whole number of slots (and may end in a gap).
struct SlotRing {
    base: *mut u8,
    slot_bytes: usize,
    block_bytes: usize,
    slots_per_block: usize,
    slots: usize,
    next: usize,
}

impl SlotRing {
    /// The ring the kernel made for `request`, mapped at `base`.
    fn new(base: *mut u8, request: &libc::tpacket_req) -> SlotRing {
        SlotRing {
            base,
            slot_bytes: request.tp_frame_size as usize,
            block_bytes: request.tp_block_size as usize,
            slots_per_block: (request.tp_block_size / request.tp_frame_size) as usize,
            slots: request.tp_frame_nr as usize,
            next: 0,
        }
    }

    fn slot(&self, index: usize) -> *mut u8 {
        let offset = index / self.slots_per_block * self.block_bytes + index % self.slots_per_block * self.slot_bytes;
        // SAFETY: `index < slots`, and slot `index` lies in block `index / slots_per_block`
        // at that place, so the offset stays inside the ring.
        unsafe { self.base.add(offset) }
    }

    fn header(&self, index: usize) -> *mut libc::tpacket2_hdr {
        self.slot(index).cast()
    }

    fn status(&self, index: usize) -> &AtomicU32 {
        // SAFETY: every slot starts with a tpacket2_hdr whose tp_status is an aligned u32.
        unsafe { status(std::ptr::addr_of_mut!((*self.header(index)).tp_status).cast()) }
    }

    fn advance(&mut self) {
        self.next = (self.next + 1) % self.slots;
    }
}

struct RxRing {
    ring: SlotRing,
    verify: bool,
    /// Frames dropped: a bad checksum, or larger than a slot.
    bad_checksum: u64,
    truncated: u64,
    /// The slot whose frame was last handed out: given back on the next call.
    held: Option<usize>,
}

struct TxRing {
    ring: SlotRing,
    fd: i32,
    pending: usize,
    /// Frames dropped because they did not fit a slot (never expected: slots are sized
    /// from the MTU, or for 64 KiB segments).
    oversize: u64,
    /// Each frame goes after a virtio-net header (see the module's comment).
    offload: bool,
}

/// How a packet socket is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfPacketOptions {
    /// Send frames straight to the driver (no traffic shaping on that interface applies
    /// to them).
    pub qdisc_bypass: bool,
    /// Virtio-net headers, large segments and partial checksums (see the module's comment).
    pub offload: bool,
    /// Check the IPv4/TCP checksums of frames the kernel does not vouch for (off under
    /// `ChecksumPolicy::TrustReceive`).
    pub verify_receive: bool,
}

pub struct AfPacket {
    rx: RxRing,
    tx: TxRing,
    mtu: usize,
    iface: String,
    /// Whether the warning about frames larger than a slot was given.
    warned_truncated: bool,
    _mapping: Mapping,
    /// Owns the descriptor the rings and `tx.fd` belong to; closed after the unmapping.
    _socket: OwnedFd,
}

/// The status word at `ptr` (a `u32` the kernel shares with us).
///
/// # Safety
/// `ptr` must point into the live ring mapping, 4-byte aligned.
unsafe fn status(ptr: *mut u8) -> &'static AtomicU32 {
    // SAFETY: guaranteed by the caller; AtomicU32 has the layout of u32.
    unsafe { &*(ptr.cast::<AtomicU32>()) }
}

/// Raises the socket's send buffer to the transmit ring's size. Frames sent from the ring
/// count against it until the kernel lets go of them (a qdisc or a peer may hold them), and
/// the default (`wmem_default`, about 200 KiB: three 64 KiB segments) would stop the
/// kernel taking frames from a ring that has room for many more. Best effort: without
/// CAP_NET_ADMIN the kernel caps the size at `wmem_max`.
fn allow_whole_ring_in_flight(fd: i32, ring_bytes: usize) {
    let bytes = libc::c_int::try_from(ring_bytes).unwrap_or(libc::c_int::MAX);
    let _ = set_socket_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &bytes, "SO_SNDBUFFORCE")
        .or_else(|_| set_socket_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &bytes, "SO_SNDBUF"));
}

/// The geometry of a ring of `ring_bytes`: without offload, power-of-two slots that hold
/// a frame of `mtu` and its headers; with it, slots that hold a 64 KiB segment and its
/// virtio-net header, in large blocks.
fn ring_request(mtu: usize, offload: bool, ring_bytes: usize) -> libc::tpacket_req {
    let (slot, block, ring_bytes) = if offload {
        let slot = (RX_FRAME_HEADROOM + VNET_HDR_BYTES + SUPER_FRAME_BYTES).next_multiple_of(SLOT_ALIGNMENT);
        (slot, LARGE_BLOCK_BYTES, ring_bytes * OFFLOAD_RING_SCALE)
    } else {
        let slot = (mtu + 14 + RX_FRAME_HEADROOM).next_power_of_two().max(2048);
        (slot, BLOCK_BYTES.max(slot), ring_bytes)
    };
    let blocks = (ring_bytes / block).max(1);
    libc::tpacket_req {
        tp_block_size: block as u32,
        tp_block_nr: blocks as u32,
        tp_frame_size: slot as u32,
        tp_frame_nr: (block / slot * blocks) as u32,
    }
}

impl AfPacket {
    /// Opens a packet socket on `iface` with mapped rings. With `fanout`, the socket joins
    /// that group as its next member, and receives only the frames the group's program
    /// steers to it.
    pub fn open(iface: &str, options: AfPacketOptions, fanout: Option<&FanoutGroup>) -> io::Result<AfPacket> {
        let ifindex = crate::netdev::interface_index(iface)?;
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, i32::from(protocol)) };
        check(fd, &format!("AF_PACKET socket on {iface} (needs root or CAP_NET_RAW)"))?;
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };

        set_packet_option(
            fd,
            libc::PACKET_VERSION,
            &(libc::tpacket_versions::TPACKET_V2 as libc::c_int),
            "PACKET_VERSION",
        )?;
        // Our own transmissions and the kernel's are not frames for our stack.
        let _ = set_packet_option(fd, libc::PACKET_IGNORE_OUTGOING, &(1 as libc::c_int), "PACKET_IGNORE_OUTGOING");
        if options.qdisc_bypass {
            set_packet_option(fd, libc::PACKET_QDISC_BYPASS, &(1 as libc::c_int), "PACKET_QDISC_BYPASS")?;
        }
        if options.offload {
            // Before the rings: the kernel lays out their slots with the header in mind.
            set_packet_option(fd, libc::PACKET_VNET_HDR, &(1 as libc::c_int), "PACKET_VNET_HDR")?;
        }
        let mtu = crate::netdev::interface_mtu(iface);
        let rx_req = ring_request(mtu, options.offload, RX_RING_BYTES);
        set_packet_option(fd, libc::PACKET_RX_RING, &rx_req, "PACKET_RX_RING")?;
        let tx_req = ring_request(mtu, options.offload, TX_RING_BYTES);
        set_packet_option(fd, libc::PACKET_TX_RING, &tx_req, "PACKET_TX_RING")?;
        allow_whole_ring_in_flight(fd, (tx_req.tp_block_size * tx_req.tp_block_nr) as usize);

        let rx_len = (rx_req.tp_block_size * rx_req.tp_block_nr) as usize;
        let len = rx_len + (tx_req.tp_block_size * tx_req.tp_block_nr) as usize;
        // SAFETY: maps the rings the kernel just set up for this socket (RX then TX, as
        // packet_mmap requires); the result is checked for MAP_FAILED.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::new(io::Error::last_os_error().kind(), "mmap of the packet rings failed"));
        }
        let mapping = Mapping { base: base.cast(), len };

        // SAFETY: sockaddr_ll is plain old data; zero is a valid starting value.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = ifindex as i32;
        // SAFETY: `address` is a live sockaddr_ll of the size passed.
        let result = unsafe {
            libc::bind(
                fd,
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(result, &format!("bind to {iface}"))?;
        if let Some(group) = fanout {
            group.join(fd)?;
        }

        let rx = RxRing {
            ring: SlotRing::new(mapping.base, &rx_req),
            held: None,
            verify: options.verify_receive,
            bad_checksum: 0,
            truncated: 0,
        };
        // SAFETY: the TX ring starts right after the RX ring inside the mapping.
        let tx_base = unsafe { mapping.base.add(rx_len) };
        let tx = TxRing {
            ring: SlotRing::new(tx_base, &tx_req),
            fd: socket.as_raw_fd(),
            pending: 0,
            oversize: 0,
            offload: options.offload,
        };
        Ok(AfPacket {
            rx,
            tx,
            mtu,
            iface: iface.to_string(),
            warned_truncated: false,
            _mapping: mapping,
            _socket: socket,
        })
    }
}

impl RxRing {
    /// The next received frame, if the kernel has handed us one. The frame handed out
    /// before is given back to the kernel first.
    fn next(&mut self) -> Option<(*const u8, usize)> {
        if let Some(held) = self.held.take() {
            self.ring.status(held).store(libc::TP_STATUS_KERNEL, Ordering::Release);
        }
        loop {
            let index = self.ring.next;
            if self.ring.status(index).load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                return None;
            }
            self.ring.advance();
            let header = self.ring.header(index);
            // SAFETY: the slot is ours (TP_STATUS_USER), so its header is initialised.
            let (mac, snaplen, len, status) =
                unsafe { ((*header).tp_mac, (*header).tp_snaplen, (*header).tp_len, (*header).tp_status) };
            // SAFETY: the frame lies inside the slot, at `tp_mac` from its header.
            let frame = unsafe {
                std::slice::from_raw_parts(self.ring.slot(index).add(usize::from(mac)).cast_const(), snaplen as usize)
            };
            // The kernel vouches for frames made on this host (a partial checksum, which the
            // NIC was to finish) and for frames a NIC verified; the rest are checked here.
            let vouched = status & (libc::TP_STATUS_CSUMNOTREADY | libc::TP_STATUS_CSUM_VALID) != 0;
            let whole = snaplen >= len;
            if !whole || !(vouched || !self.verify || crate::layers::checksums_ok(frame)) {
                // Cut short to fit the slot (a large GSO frame), or corrupted on the way.
                if whole {
                    self.bad_checksum += 1;
                } else {
                    self.truncated += 1;
                }
                self.ring.status(index).store(libc::TP_STATUS_KERNEL, Ordering::Release);
                continue;
            }
            self.held = Some(index);
            return Some((frame.as_ptr(), frame.len()));
        }
    }
}

impl TxRing {
    fn slot_free(&self) -> bool {
        self.ring.status(self.ring.next).load(Ordering::Acquire) == libc::TP_STATUS_AVAILABLE
    }

    /// Whether the kernel left frames of an earlier kick in the ring: it takes them in
    /// order and stops, leaving the rest requested, when the socket's send buffer is full
    /// (a shaping qdisc, or a slow peer, holds the frames it sent). The last frame queued is
    /// then among them.
    fn unsent(&self) -> bool {
        let last = (self.ring.next + self.ring.slots - 1) % self.ring.slots;
        self.ring.status(last).load(Ordering::Acquire) == libc::TP_STATUS_SEND_REQUEST
    }

    /// Asks the kernel to send the frames queued in the ring, including any it left there
    /// at an earlier kick (see `unsent`; without this retry a full ring would wait forever
    /// for frames no one asks the kernel to send).
    fn flush(&mut self) {
        if self.pending > 0 || self.unsent() {
            // SAFETY: a zero-length send on our packet socket only kicks the TX ring.
            unsafe {
                libc::send(self.fd, std::ptr::null(), 0, libc::MSG_DONTWAIT);
            }
            self.pending = 0;
        }
    }
}

pub struct AfRx {
    data: *const u8,
    len: usize,
}

pub struct AfTx<'a> {
    ring: &'a mut TxRing,
    /// The payload size the stack asked segments to be cut to (`PacketMeta`).
    segment: Option<u16>,
}

impl<'a> AfTx<'a> {
    fn new(ring: &'a mut TxRing) -> AfTx<'a> {
        AfTx { ring, segment: None }
    }
}

impl phy::RxToken for AfRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the frame stays valid until the next call into the ring, which cannot
        // happen before this token is consumed (the device is borrowed meanwhile).
        f(unsafe { std::slice::from_raw_parts(self.data, self.len) })
    }
}

impl phy::TxToken for AfTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let ring = self.ring;
        let index = ring.ring.next;
        let slot = ring.ring.slot(index);
        let vnet = if ring.offload { VNET_HDR_BYTES } else { 0 };
        if vnet + len > ring.ring.slot_bytes - TX_DATA_OFFSET {
            // Larger than we declared: smoltcp never asks this; build and drop it.
            ring.oversize += 1;
            return f(&mut vec![0; len]);
        }
        // SAFETY: the slot is free (checked by `transmit`/`receive`), so the kernel does
        // not touch it until we set SEND_REQUEST; the data area lies inside the slot.
        let data = unsafe { std::slice::from_raw_parts_mut(slot.add(TX_DATA_OFFSET), vnet + len) };
        let (header_bytes, frame) = data.split_at_mut(vnet);
        let result = f(frame);
        if let Ok(header_bytes) = <&mut [u8; VNET_HDR_BYTES]>::try_from(header_bytes) {
            prepare_transmit(frame, self.segment).encode(header_bytes);
        }
        let header = ring.ring.header(index);
        // SAFETY: as above; the header fields are plain integers in our slot.
        unsafe {
            (*header).tp_len = (vnet + len) as u32;
            (*header).tp_snaplen = (vnet + len) as u32;
        }
        ring.ring.status(index).store(libc::TP_STATUS_SEND_REQUEST, Ordering::Release);
        ring.ring.advance();
        ring.pending += 1;
        if ring.pending >= TX_BATCH {
            ring.flush();
        }
        result
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.segment = meta.segmentation_offload_size.map(u16::from);
    }
}

impl Device for AfPacket {
    type RxToken<'a> = AfRx;
    type TxToken<'a> = AfTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(AfRx, AfTx<'_>)> {
        if self.rx.truncated > 0 && !self.warned_truncated {
            self.warned_truncated = true;
            if self.tx.offload {
                log::warn!(
                    "frames larger than 64 KiB arrive on {}: they are dropped. Cap the kernel's \
                     aggregates (ip link set {} gro_max_size 65536 gso_max_size 65536)",
                    self.iface,
                    self.iface
                );
            } else {
                log::warn!(
                    "frames larger than the MTU ({}) arrive on {}: they are dropped. Leave offload \
                     on (no --no-offload), or turn off receive aggregation (ethtool -K {} gro off \
                     lro off) and, on a veth pair, the peer's segmentation offload (ip link set \
                     PEER gso_max_size {})",
                    self.mtu,
                    self.iface,
                    self.iface,
                    self.mtu
                );
            }
        }
        if !self.tx.slot_free() {
            self.tx.flush();
            return None;
        }
        match self.rx.next() {
            Some((data, len)) => Some((AfRx { data, len }, AfTx::new(&mut self.tx))),
            None => {
                // Input is drained: send what egress and the ACKs of this burst queued, in
                // one system call rather than one per frame.
                self.tx.flush();
                None
            }
        }
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<AfTx<'_>> {
        if !self.tx.slot_free() {
            self.tx.flush();
            return None;
        }
        Some(AfTx::new(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // Received checksums are checked by `RxRing::next` unless the kernel vouches for
        // them; with offload the kernel finishes the TCP checksums we send.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = if self.tx.offload { Checksum::None } else { Checksum::Tx };
        caps.max_transmission_unit = self.mtu + 14;
        if self.tx.offload {
            caps.segmentation.tcpv4 = NonZeroUsize::new(crate::KERNEL_SEGMENT_FRAME_BYTES);
        }
        caps.max_burst_size = Some(TX_BATCH);
        caps
    }
}

impl Drop for AfPacket {
    fn drop(&mut self) {
        // Frames still queued go out before the socket closes (fields drop after this).
        self.tx.flush();
        let (bad, truncated, oversize) = (self.rx.bad_checksum, self.rx.truncated, self.tx.oversize);
        // Frames the kernel had for us while the receive ring was full (read once: reading
        // resets the counters).
        let ring_full = crate::netdev::packet_option::<crate::netdev::PacketStats>(
            self._socket.as_raw_fd(),
            libc::PACKET_STATISTICS,
            "PACKET_STATISTICS",
        )
        .map_or(0, |stats| stats.drops);
        if bad + truncated + oversize + u64::from(ring_full) > 0 {
            log::info!(
                iface = self.iface.as_str();
                "af-packet: dropped {bad} frames with bad checksums, {truncated} larger than a slot \
                 received, {oversize} too large to send; the kernel dropped {ring_full} for a full \
                 receive ring"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two groups of one process on one interface (or on two) are two groups: each gets an
    /// id of its own from the kernel. (The id was once the process id for every interface.)
    #[test]
    fn groups_of_one_process_get_ids_of_their_own() {
        let (first, second) = (FanoutGroup::new(2), FanoutGroup::new(2));
        let mut sockets = Vec::new();
        for group in [&first, &second, &first, &second] {
            let options = AfPacketOptions { qdisc_bypass: false, offload: false, verify_receive: true };
            match AfPacket::open("lo", options, Some(group)) {
                Ok(socket) => sockets.push(socket),
                Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                    eprintln!("SKIPPED groups_of_one_process_get_ids_of_their_own: {err}");
                    return;
                }
                Err(err) => panic!("{err}"),
            }
        }
        let (a, b) = (first.id(), second.id());
        assert!(a.is_some() && b.is_some() && a != b, "ids {a:?} and {b:?}");
    }
}
