//! The AF_PACKET backend: a raw socket on an existing interface with mapped rings, so that
//! frames move between the NIC driver and our stack without a copy through `read`/`write`:
//! a TPACKET_V3 receive ring (blocks of variable-size frames, handed over a block at a
//! time) and a TPACKET_V3 transmit ring (fixed slots, flushed with one `send` per batch).
//! Optionally the transmit path bypasses the qdisc layer.
//!
//! The ring memory is shared with the kernel: every status word is read with acquire and
//! written with release ordering through atomics, and no Rust reference into the ring
//! outlives the call that made it.

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// Receive blocks: small ones (16 KiB holds one jumbo frame or ten full-size ones) are
/// handed over as soon as they fill, so ACKs are not held for the block timeout; 1024 of
/// them (16 MiB) absorb a few milliseconds at 40 Gbit/s.
const RX_BLOCK_BYTES: usize = 16 << 10;
const RX_BLOCKS: usize = 1024;
/// A block is handed to us when full or after this many milliseconds, so a trickle of
/// frames (ACKs, the handshake) is not held back.
const RX_BLOCK_TIMEOUT_MS: u32 = 1;
/// Transmit slots: 16 KiB holds a 9000-byte jumbo frame and its header.
const TX_FRAME_BYTES: usize = 16 << 10;
const TX_BLOCK_BYTES: usize = 1 << 20;
const TX_BLOCKS: usize = 4;
/// Frames queued in the transmit ring before we ask the kernel to send them.
const TX_BATCH: usize = 32;
/// Where frame data starts in a transmit slot: the header, aligned (the kernel's
/// `tp_hdrlen - sizeof(sockaddr_ll)` for TPACKET_V3).
const TX_DATA_OFFSET: usize = libc::TPACKET3_HDRLEN - std::mem::size_of::<libc::sockaddr_ll>();

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

struct RxRing {
    base: *mut u8,
    block: usize,
    /// Packets left in the block we are reading, and the offset of the next one.
    packets_left: u32,
    next_offset: usize,
    block_open: bool,
}

struct TxRing {
    base: *mut u8,
    fd: i32,
    slot: usize,
    pending: usize,
}

pub struct AfPacket {
    rx: RxRing,
    tx: TxRing,
    mtu: usize,
    _mapping: Mapping,
    /// Owns the descriptor the rings and `tx.fd` belong to; closed after the unmapping.
    _socket: OwnedFd,
}

fn check(result: libc::c_int, what: &str) -> io::Result<()> {
    if result < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
    }
    Ok(())
}

fn set_option<T>(fd: i32, option: libc::c_int, value: &T, what: &str) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed, as setsockopt requires.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(result, what)
}

/// The status word at `ptr` (a `u32` the kernel shares with us).
///
/// # Safety
/// `ptr` must point into the live ring mapping, 4-byte aligned.
unsafe fn status(ptr: *mut u8) -> &'static AtomicU32 {
    // SAFETY: guaranteed by the caller; AtomicU32 has the layout of u32.
    unsafe { &*(ptr.cast::<AtomicU32>()) }
}

impl AfPacket {
    /// Opens a packet socket on `iface` with mapped rings. `qdisc_bypass` sends frames
    /// straight to the driver (no traffic shaping on that interface applies to them).
    pub fn open(iface: &str, qdisc_bypass: bool) -> io::Result<AfPacket> {
        let name =
            CString::new(iface).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"))?;
        // SAFETY: a C string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface named {iface}")));
        }
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, i32::from(protocol)) };
        check(fd, &format!("AF_PACKET socket on {iface} (needs root or CAP_NET_RAW)"))?;
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };

        set_option(fd, libc::PACKET_VERSION, &(libc::tpacket_versions::TPACKET_V3 as libc::c_int), "PACKET_VERSION")?;
        // Our own transmissions and the kernel's are not frames for our stack.
        let _ = set_option(fd, libc::PACKET_IGNORE_OUTGOING, &(1 as libc::c_int), "PACKET_IGNORE_OUTGOING");
        if qdisc_bypass {
            set_option(fd, libc::PACKET_QDISC_BYPASS, &(1 as libc::c_int), "PACKET_QDISC_BYPASS")?;
        }
        let rx_req = libc::tpacket_req3 {
            tp_block_size: RX_BLOCK_BYTES as u32,
            tp_block_nr: RX_BLOCKS as u32,
            tp_frame_size: 2048,
            tp_frame_nr: (RX_BLOCK_BYTES * RX_BLOCKS / 2048) as u32,
            tp_retire_blk_tov: RX_BLOCK_TIMEOUT_MS,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        set_option(fd, libc::PACKET_RX_RING, &rx_req, "PACKET_RX_RING")?;
        let tx_req = libc::tpacket_req3 {
            tp_block_size: TX_BLOCK_BYTES as u32,
            tp_block_nr: TX_BLOCKS as u32,
            tp_frame_size: TX_FRAME_BYTES as u32,
            tp_frame_nr: (TX_BLOCK_BYTES * TX_BLOCKS / TX_FRAME_BYTES) as u32,
            tp_retire_blk_tov: 0,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        set_option(fd, libc::PACKET_TX_RING, &tx_req, "PACKET_TX_RING")?;

        let rx_len = RX_BLOCK_BYTES * RX_BLOCKS;
        let len = rx_len + TX_BLOCK_BYTES * TX_BLOCKS;
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

        let mtu = interface_mtu(iface).unwrap_or(1500);
        let rx = RxRing { base: mapping.base, block: 0, packets_left: 0, next_offset: 0, block_open: false };
        // SAFETY: the TX ring starts right after the RX ring inside the mapping.
        let tx_base = unsafe { mapping.base.add(rx_len) };
        let tx = TxRing { base: tx_base, fd: socket.as_raw_fd(), slot: 0, pending: 0 };
        Ok(AfPacket { rx, tx, mtu, _mapping: mapping, _socket: socket })
    }
}

fn interface_mtu(iface: &str) -> Option<usize> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu")).ok()?.trim().parse().ok()
}

impl RxRing {
    fn block_ptr(&self) -> *mut u8 {
        // SAFETY: `block < RX_BLOCKS`, so the offset stays inside the RX ring.
        unsafe { self.base.add(self.block * RX_BLOCK_BYTES) }
    }

    fn block_status(&self) -> &AtomicU32 {
        let desc = self.block_ptr().cast::<libc::tpacket_block_desc>();
        // SAFETY: the block descriptor heads every block; `hdr.bh1.block_status` is an
        // aligned u32 inside it.
        unsafe { status(std::ptr::addr_of_mut!((*desc).hdr.bh1.block_status).cast()) }
    }

    /// The next received frame, if the kernel has handed us one.
    fn next(&mut self) -> Option<(*const u8, usize)> {
        loop {
            if self.block_open && self.packets_left > 0 {
                // SAFETY: offsets inside an open block come from the kernel's own headers
                // and stay inside the block.
                let packet = unsafe { self.block_ptr().add(self.next_offset) };
                let header = packet.cast::<libc::tpacket3_hdr>();
                // SAFETY: a tpacket3_hdr heads every packet of a block we own.
                let (next, mac, snaplen) =
                    unsafe { ((*header).tp_next_offset, (*header).tp_mac, (*header).tp_snaplen) };
                self.packets_left -= 1;
                self.next_offset += next as usize;
                // SAFETY: the frame lies inside the block, at `tp_mac` from its header.
                let data = unsafe { packet.add(usize::from(mac)) };
                return Some((data.cast_const(), snaplen as usize));
            }
            if self.block_open {
                // Every packet of the block is consumed: give it back.
                self.block_status().store(libc::TP_STATUS_KERNEL, Ordering::Release);
                self.block_open = false;
                self.block = (self.block + 1) % RX_BLOCKS;
            }
            if self.block_status().load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                return None;
            }
            let desc = self.block_ptr().cast::<libc::tpacket_block_desc>();
            // SAFETY: the block is ours (TP_STATUS_USER); its descriptor is initialised.
            let (packets, first) = unsafe { ((*desc).hdr.bh1.num_pkts, (*desc).hdr.bh1.offset_to_first_pkt) };
            self.block_open = true;
            self.packets_left = packets;
            self.next_offset = first as usize;
        }
    }
}

impl TxRing {
    fn slot_ptr(&self) -> *mut u8 {
        // SAFETY: `slot` is below the slot count, so this stays inside the TX ring.
        unsafe { self.base.add(self.slot * TX_FRAME_BYTES) }
    }

    fn slot_free(&self) -> bool {
        let header = self.slot_ptr().cast::<libc::tpacket3_hdr>();
        // SAFETY: every slot starts with a tpacket3_hdr whose tp_status is an aligned u32.
        let status = unsafe { status(std::ptr::addr_of_mut!((*header).tp_status).cast()) };
        status.load(Ordering::Acquire) == libc::TP_STATUS_AVAILABLE
    }

    /// Asks the kernel to send the frames queued in the ring.
    fn flush(&mut self) {
        if self.pending > 0 {
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
        let slot = ring.slot_ptr();
        let len = len.min(TX_FRAME_BYTES - TX_DATA_OFFSET);
        // SAFETY: the slot is free (checked by `transmit`), so the kernel does not touch it
        // until we set SEND_REQUEST; the data area lies inside the slot.
        let result = f(unsafe { std::slice::from_raw_parts_mut(slot.add(TX_DATA_OFFSET), len) });
        let header = slot.cast::<libc::tpacket3_hdr>();
        // SAFETY: as above; the header fields are plain u32s in our slot.
        unsafe {
            (*header).tp_len = len as u32;
            (*header).tp_snaplen = len as u32;
            (*header).tp_next_offset = 0;
            status(std::ptr::addr_of_mut!((*header).tp_status).cast())
                .store(libc::TP_STATUS_SEND_REQUEST, Ordering::Release);
        }
        ring.slot = (ring.slot + 1) % (TX_BLOCK_BYTES * TX_BLOCKS / TX_FRAME_BYTES);
        ring.pending += 1;
        if ring.pending >= TX_BATCH {
            ring.flush();
        }
        result
    }
}

impl Device for AfPacket {
    type RxToken<'a> = AfRx;
    type TxToken<'a> = AfTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(AfRx, AfTx<'_>)> {
        if !self.tx.slot_free() {
            self.tx.flush();
            return None;
        }
        match self.rx.next() {
            Some((data, len)) => Some((AfRx { data, len }, AfTx { ring: &mut self.tx })),
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
        Some(AfTx { ring: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.max_burst_size = Some(TX_BATCH);
        caps
    }
}

impl Drop for AfPacket {
    fn drop(&mut self) {
        // Frames still queued go out before the socket closes (fields drop after this).
        self.tx.flush();
    }
}
