//! Large TCP segments on a DPDK port: one segment of up to 64 KiB cut into MTU-sized frames
//! on the way out, by the device (TSO) or by DPDK's GSO library, and consecutive frames of a
//! flow merged back into one segment on the way in by DPDK's GRO library. A segment lives
//! in one large mbuf from a pool of its own; GSO's frames are each a small header mbuf
//! chained to an indirect mbuf over their part of the segment's data, so the data is not
//! copied; GRO's merged segment is a chain of the frames as they came.
//!
//! Neither library computes checksums: a sent frame gets its own here (or from the
//! device), and received frames must be checked before they are merged.

use crate::{DpdkError, Eal, Mbuf, Mempool};

/// The largest frame a large mbuf holds: a data room of 64 KiB less the headroom.
pub const LARGE_FRAME_BYTES: usize = u16::MAX as usize - dpdk_sys::consts::RTE_PKTMBUF_HEADROOM as usize;

/// Where a header's lengths are looked for by the offload calls: Ethernet, IPv4 and TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLengths {
    pub l2: u16,
    pub l3: u16,
    pub l4: u16,
}

/// The pools GSO needs beside the port's own (whose mbufs hold the frames' headers): large
/// mbufs for whole segments, and indirect mbufs (no data room) for the frames' payloads.
pub struct SegmentPools {
    large: Mempool,
    indirect: Mempool,
}

impl SegmentPools {
    /// Pools for `queues` queue pairs: each queue has a burst of segments in flight, and a
    /// transmit ring's worth of frames that point into them.
    pub fn new(eal: &Eal, name: &str, queues: u16) -> Result<SegmentPools, DpdkError> {
        let queues = u32::from(queues.max(1));
        let large = Mempool::with_data_room(eal, &format!("{name}_large"), 128 * queues - 1, 32, u16::MAX)?;
        let indirect = Mempool::with_data_room(eal, &format!("{name}_ind"), 8192 * queues - 1, 256, 0)?;
        Ok(SegmentPools { large, indirect })
    }

    /// The pool of large mbufs, one segment each.
    pub fn large(&self) -> &Mempool {
        &self.large
    }

    /// Whether every mbuf of both pools is back (none leaked); with the counts missing.
    pub fn all_back(&self) -> Result<(), String> {
        let missing = |pool: &Mempool| pool.size() - pool.available();
        match (missing(&self.large), missing(&self.indirect)) {
            (0, 0) => Ok(()),
            (large, indirect) => Err(format!("{large} large and {indirect} indirect mbufs")),
        }
    }

    /// Cuts `segment` (an IPv4 TCP frame whose header lengths are set) into frames of at
    /// most `mss` payload bytes, appended to `frames`, their headers from `headers`. The
    /// frames' checksums are not yet computed (`finish_tcp4_checksums`). A segment that
    /// needs no cutting is appended as it is.
    pub fn cut_tcp4<'pool>(
        &'pool self,
        segment: Mbuf<'pool>,
        mss: u16,
        headers: &'pool Mempool,
        frames: &mut Vec<Mbuf<'pool>>,
    ) -> Result<(), DpdkError> {
        let payload = segment.len().saturating_sub(usize::from(segment.header_lengths().total()));
        let most = payload.div_ceil(usize::from(mss.max(1))) + 1;
        // GSO writes the frames straight into `frames`' spare room: `Mbuf` is a transparent
        // owning pointer, so that room is an array of mbuf pointers.
        frames.reserve(most);
        let at = frames.len();
        // SAFETY: the segment is ours and its header lengths are set; both pools are live
        // for 'pool; `frames` has room for `most` more pointers past `at`, as passed.
        let count = unsafe {
            dpdk_sys::vm_gso_tcp4(
                segment.as_ptr(),
                headers.as_ptr(),
                self.indirect.as_ptr(),
                mss,
                frames.as_mut_ptr().add(at).cast::<*mut dpdk_sys::rte_mbuf>(),
                most.min(usize::from(u16::MAX)) as u16,
            )
        };
        if count < 0 {
            return Err(DpdkError::from_code("rte_gso_segment", count));
        }
        if count == 0 {
            frames.push(segment);
            return Ok(());
        }
        // SAFETY: GSO filled `count` entries past `at` with frames (non-null, from our
        // pools, owned by no one else); they become the Vec's.
        unsafe { frames.set_len(at + count as usize) };
        // The frames hold references to the segment's data; ours goes (GSO leaves it to us).
        drop(segment);
        Ok(())
    }
}

impl HeaderLengths {
    pub fn total(&self) -> u16 {
        self.l2 + self.l3 + self.l4
    }
}

impl Mbuf<'_> {
    /// The packet's length over all its segments.
    pub fn len(&self) -> usize {
        // SAFETY: reading a field of the mbuf we own.
        unsafe { dpdk_sys::vm_rte_pktmbuf_pkt_len(self.as_ptr()) as usize }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many mbufs the packet is chained over.
    pub fn segments(&self) -> u16 {
        // SAFETY: reading a field of the mbuf we own.
        unsafe { dpdk_sys::vm_rte_pktmbuf_nb_segs(self.as_ptr()) }
    }

    /// Copies the whole packet (all segments) into `out`; returns the bytes copied, at most
    /// `out.len()`.
    pub fn copy_to(&self, out: &mut [u8]) -> usize {
        let capacity = u32::try_from(out.len()).unwrap_or(u32::MAX);
        // SAFETY: `out` has room for `capacity` bytes; the mbuf chain is ours.
        unsafe { dpdk_sys::vm_pktmbuf_copy_out(self.as_ptr(), out.as_mut_ptr(), capacity) as usize }
    }

    /// Records the header lengths that GSO, TSO and the checksum calls read.
    pub fn set_header_lengths(&mut self, lengths: HeaderLengths) {
        self.request_offload(0, lengths.l2, lengths.l3, lengths.l4);
    }

    pub fn header_lengths(&self) -> HeaderLengths {
        let mut lengths = HeaderLengths { l2: 0, l3: 0, l4: 0 };
        // SAFETY: reading fields of the mbuf we own into three live u16s.
        unsafe {
            dpdk_sys::vm_rte_mbuf_header_lengths(self.as_ptr(), &mut lengths.l2, &mut lengths.l3, &mut lengths.l4)
        };
        lengths
    }

    /// Asks the device to cut this IPv4 TCP segment (header lengths set) into frames of
    /// `mss` payload bytes and to fill in their checksums: the port must offer TSO.
    pub fn request_tso(&mut self, mss: u16) {
        // SAFETY: the mbuf is ours, its header lengths set and its headers in the first segment.
        unsafe { dpdk_sys::vm_request_tso(self.as_ptr(), mss) };
    }

    /// Fills in this IPv4 TCP frame's header and TCP checksums (header lengths set), over
    /// all its segments; with `device`, readies them for the device's checksum offload.
    pub fn finish_tcp4_checksums(&mut self, device: bool) {
        // SAFETY: as for `request_tso`.
        unsafe { dpdk_sys::vm_tcp4_checksums(self.as_ptr(), i32::from(device)) };
    }

    /// Sets a received frame's packet type and header lengths from its headers; returns
    /// whether it is IPv4 TCP.
    pub fn classify_tcp4(&mut self) -> bool {
        // SAFETY: the mbuf is ours; rte_net_get_ptype reads within its data.
        unsafe { dpdk_sys::vm_classify_tcp4(self.as_ptr()) != 0 }
    }

    /// Whether a classified IPv4 TCP frame's checksums hold.
    pub fn tcp4_checksums_ok(&self) -> bool {
        // SAFETY: as for `classify_tcp4`; the header lengths were set by it.
        unsafe { dpdk_sys::vm_checksums_ok(self.as_ptr()) != 0 }
    }
}

/// Merges consecutive frames of each TCP flow among `frames` (classified, checksums already
/// checked) into large segments, in place, with DPDK's GRO. Frames that cannot merge (other
/// protocols, flags other than ACK) stay as they are, after the merged ones.
pub fn merge_tcp4(frames: &mut Vec<Mbuf<'_>>) {
    let total = frames.len();
    if total < 2 {
        return;
    }
    let raw = frames.as_mut_ptr().cast::<*mut dpdk_sys::rte_mbuf>();
    // SAFETY: the frames pass to GRO as the array of pointers the Vec holds (`Mbuf` is a
    // transparent owning pointer); the Vec owns none of them until the length is set back
    // below to the ones GRO leaves, so none is freed twice.
    unsafe { frames.set_len(0) };
    let mut kept = 0;
    for start in (0..total).step_by(dpdk_sys::consts::RTE_GRO_MAX_BURST_ITEM_NUM) {
        let count = (total - start).min(dpdk_sys::consts::RTE_GRO_MAX_BURST_ITEM_NUM);
        // SAFETY: `count` live mbufs from `start`; GRO frees those it merges into others
        // and leaves the rest at the front of the burst; they move down to `kept`.
        unsafe {
            let left = usize::from(dpdk_sys::vm_gro_tcp4(raw.add(start), count as u16));
            std::ptr::copy(raw.add(start), raw.add(kept), left);
            kept += left;
        }
    }
    // SAFETY: the first `kept` entries are the frames GRO left, each owned by us alone.
    unsafe { frames.set_len(kept) };
}
