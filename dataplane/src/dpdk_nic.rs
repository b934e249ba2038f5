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
//!
//! Large segments (`dpdk::segments`, with offload in use): smoltcp hands the queue TCP
//! segments of up to 64 KiB, built in a large mbuf, and the MSS to cut them to; the device
//! cuts them (TSO) where the port offers it, DPDK's GSO library otherwise, and each frame
//! gets its checksums here or from the device. Received frames are checked, then each
//! burst's consecutive frames of a flow are merged by DPDK's GRO library into one segment,
//! which smoltcp takes whole (copied out of its chain of mbufs into one buffer): a stack
//! that handles one segment where it would have handled forty-five. A port that neither
//! chains mbufs nor offers TSO (net_af_xdp) still merges what it receives, and sends
//! frames of the MTU whose checksums are filled in here too.

pub use crate::dpdk_steer::Inboxes;
use crate::dpdk_steer::Steer;
use crate::fanout::Steering;
use crate::layers::checksums_ok;
use dpdk::segments::{merge_tcp4, HeaderLengths, SegmentPools, LARGE_FRAME_BYTES};
use dpdk::{consts, Mbuf, Mempool, Port};
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;
use smoltcp::wire::{checksum, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket};
use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Packets asked of the queue per receive burst, and gathered per transmit burst.
const BURST: u16 = 32;
/// Frames a full transmit ring leaves waiting before smoltcp is told to stop sending:
/// about a ring's worth (one 64 KiB segment is 45 frames at MTU 1500).
const HELD_FRAMES: usize = 1024;
/// The same for segments sent whole: 4 MiB of them, well within the large pool's mbufs
/// (`SegmentPools`), which would otherwise run dry and drop what smoltcp builds.
const HELD_WHOLE_SEGMENTS: usize = 64;

pub struct DpdkQueue {
    receive: Receive,
    transmit: Transmit,
    mtu: usize,
    /// The polling thread as an lcore, for the mempools' per-lcore caches (None where DPDK
    /// had no lcore id left: it still works, through the pools' shared rings).
    _lcore: Option<dpdk::LcoreRegistration>,
}

/// The receive half: what came in a burst, waiting for smoltcp.
struct Receive {
    port: Arc<Port<'static>>,
    queue: u16,
    /// The device checks received checksums and says so in each mbuf.
    offload: bool,
    /// Check the frames the device did not vouch for (off when the receive side is trusted).
    verify: bool,
    /// Merge each burst's frames of a flow into large segments (GRO).
    merge: bool,
    received: VecDeque<Mbuf<'static>>,
    burst: Vec<Mbuf<'static>>,
    /// A merged segment, copied out of its chain for smoltcp.
    joined: Vec<u8>,
    /// Frames received with a bad checksum (the device's verdict or ours): dropped.
    bad_checksum: u64,
    /// Segments handed to smoltcp that GRO had merged from several frames, and those frames.
    merged: Counted,
    /// With other cores on the port: frames of their flows handed to them.
    steer: Option<Steer>,
}

/// The transmit half: frames smoltcp built, gathered into bursts.
struct Transmit {
    port: Arc<Port<'static>>,
    pool: &'static Mempool,
    /// The largest frame an mbuf of `pool` holds (an Ethernet frame of the MTU).
    frame_room: usize,
    queue: u16,
    /// The device fills in the checksums of frames flagged for it.
    offload: bool,
    /// smoltcp leaves the TCP checksums to the queue (which merges what it receives, so
    /// the stack's checksum settings are off both ways): each frame gets them here or
    /// from the device.
    checksums_here: bool,
    /// Large segments, and how they are cut (None: frames of one MTU at most).
    segments: Option<Segmenting>,
    to_send: Vec<Mbuf<'static>>,
    /// Frames the queue would not take at the last flush (at the front of `to_send`).
    waiting: usize,
    /// Frames smoltcp built that no mbuf could hold (the pool empty), or that GSO could not
    /// cut (its pools empty): dropped.
    no_mbuf: u64,
}

/// Large segments for a queue: the pools they live in, and whether they go whole.
#[derive(Clone, Copy)]
pub struct LargeSegments {
    pub pools: &'static SegmentPools,
    /// Send segments whole, uncut (checksums filled in here): for a link whose other end
    /// is our own stack and whose buffers hold one (a memif between two vmigrate
    /// processes, `bsize` of 64 KiB). A memif chains a frame larger than its buffers over
    /// several descriptors, and 22.11's copying transmit leaves a stale "next" flag on a
    /// packet's first descriptor, which joins it to the packet after it.
    pub whole: bool,
}

struct Segmenting {
    pools: &'static SegmentPools,
    cutter: Cutter,
    /// Segments sent, and the frames they were cut into (as many, sent whole).
    cut: Counted,
}

/// Who cuts a large segment into frames of the MSS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cutter {
    /// The device (TSO).
    Device,
    /// DPDK's GSO library, here.
    Gso,
    /// Nobody: the segment goes whole.
    Uncut,
}

/// How many large things, and how many frames they were (or became).
#[derive(Debug, Default, Clone, Copy)]
struct Counted {
    segments: u64,
    frames: u64,
}

impl DpdkQueue {
    /// Queue pair `queue` of `port`, polled by the calling thread; `verify` checks received
    /// checksums the device did not; with `merge`, received frames are merged (GRO) and,
    /// given `segments` and a port that chains mbufs or offers TSO, large segments sent.
    pub fn new(
        port: Arc<Port<'static>>,
        pool: &'static Mempool,
        queue: u16,
        verify: bool,
        merge: bool,
        segments: Option<LargeSegments>,
        steering: Option<(Steering, Arc<Inboxes>)>,
    ) -> DpdkQueue {
        let offload = port.checksum_offload();
        // A peer that takes whole segments is our own stack across shared memory, which
        // cannot corrupt a frame: what it sends is trusted, as the kernel's loopback trusts
        // its own (the stream's CRC32C still covers every frame of pages).
        let verify = verify && !segments.is_some_and(|large| large.whole);
        let can_cut = port.segment_offload();
        let segments = segments.filter(|_| can_cut.tso || can_cut.multi_segment).map(|large| Segmenting {
            pools: large.pools,
            cutter: match (large.whole, can_cut.tso) {
                (true, _) => Cutter::Uncut,
                (false, true) => Cutter::Device,
                (false, false) => Cutter::Gso,
            },
            cut: Counted::default(),
        });
        let mtu = usize::from(port.mtu());
        let lcore = port
            .register_polling_thread()
            .map_err(|err| log::warn!("dpdk: queue {queue} polls without mempool caches: {err}"))
            .ok();
        DpdkQueue {
            mtu,
            _lcore: lcore,
            receive: Receive {
                port: port.clone(),
                queue,
                offload: offload.receive,
                verify,
                merge,
                received: VecDeque::with_capacity(usize::from(dpdk::MAX_RX_BURST)),
                burst: Vec::with_capacity(usize::from(dpdk::MAX_RX_BURST)),
                joined: Vec::new(),
                bad_checksum: 0,
                merged: Counted::default(),
                steer: steering.map(|(at, inboxes)| Steer { at, inboxes, received: 0, moved: 0 }),
            },
            transmit: Transmit {
                port,
                pool,
                frame_room: mtu + 14,
                queue,
                offload: offload.transmit,
                checksums_here: merge,
                segments,
                to_send: Vec::with_capacity(usize::from(BURST)),
                waiting: 0,
                no_mbuf: 0,
            },
        }
    }
}

impl Receive {
    /// The device's verdict on a received frame's checksums: None where it did not check.
    fn device_verdict(&self, mbuf: &Mbuf<'static>) -> Option<bool> {
        if !self.offload {
            return None;
        }
        let flags = mbuf.offload_flags();
        let ip = flags & consts::RTE_MBUF_F_RX_IP_CKSUM_MASK;
        let tcp = flags & consts::RTE_MBUF_F_RX_L4_CKSUM_MASK;
        if ip == consts::RTE_MBUF_F_RX_IP_CKSUM_BAD || tcp == consts::RTE_MBUF_F_RX_L4_CKSUM_BAD {
            return Some(false);
        }
        (ip == consts::RTE_MBUF_F_RX_IP_CKSUM_GOOD && tcp == consts::RTE_MBUF_F_RX_L4_CKSUM_GOOD).then_some(true)
    }

    /// Whether a frame's checksums hold: by the device's verdict, or checked here (for a
    /// frame the device did not check: not TCP, or a partial checksum from a local sender).
    /// Only asked where smoltcp does not check them itself. `tcp4`: the frame was
    /// classified (`Mbuf::classify_tcp4`) as IPv4 TCP.
    fn checksums_ok(&self, mbuf: &Mbuf<'static>, tcp4: bool) -> bool {
        if let Some(verdict) = self.device_verdict(mbuf) {
            return verdict;
        }
        if !self.verify {
            return true;
        }
        if tcp4 {
            // Over the whole chain (a device may chain one frame over several mbufs).
            return mbuf.tcp4_checksums_ok();
        }
        checksums_ok(mbuf.data())
    }

    /// Takes in a burst (frames other cores handed over first, then the device's, less
    /// those of other cores' flows): checked, and with large segments merged (GRO).
    fn fill(&mut self) {
        let mut burst = std::mem::take(&mut self.burst);
        let max = if self.merge { dpdk::MAX_RX_BURST } else { BURST };
        if let Some(steer) = &self.steer {
            steer.take_inbox(&mut burst, usize::from(max));
        }
        let handed = burst.len();
        if handed < usize::from(max) {
            self.port.receive(self.queue, &mut burst, max - handed as u16);
        }
        if let Some(steer) = &mut self.steer {
            steer.hand_over(&mut burst, handed);
        }
        if !self.merge {
            self.received.extend(burst.drain(..));
            self.burst = burst;
            return;
        }
        let before = burst.len();
        burst.retain_mut(|mbuf| {
            // GRO reads the packet type and header lengths that `classify_tcp4` sets.
            let tcp4 = mbuf.classify_tcp4();
            self.checksums_ok(mbuf, tcp4)
        });
        self.bad_checksum += (before - burst.len()) as u64;
        let frames = burst.len();
        merge_tcp4(&mut burst);
        if burst.len() < frames {
            let merged = burst.iter().filter(|mbuf| mbuf.segments() > 1).count();
            self.merged.segments += merged as u64;
            self.merged.frames += (frames - burst.len() + merged) as u64;
        }
        self.received.extend(burst.drain(..));
        self.burst = burst;
    }

    /// The next received frame, as smoltcp takes it: the mbuf itself, or a merged segment
    /// copied out of its chain.
    fn next(&mut self) -> Option<DpdkRx<'_>> {
        loop {
            if self.received.is_empty() {
                self.fill();
            }
            let mbuf = self.received.pop_front()?;
            if !self.merge && self.offload && !self.checksums_ok(&mbuf, false) {
                self.bad_checksum += 1;
                continue;
            }
            if mbuf.segments() == 1 {
                return Some(DpdkRx::Frame(mbuf));
            }
            // Grown once to the largest segment; later segments overwrite it, unzeroed.
            if self.joined.len() < mbuf.len() {
                self.joined.resize(mbuf.len(), 0);
            }
            let len = mbuf.copy_to(&mut self.joined);
            return Some(DpdkRx::Joined(&self.joined[..len]));
        }
    }
}

impl Transmit {
    /// Hands the queue what it takes of the frames gathered; the rest wait for the next
    /// flush (a full ring is backpressure: `DpdkQueue::transmit` stops smoltcp).
    fn flush(&mut self) {
        self.port.transmit_some(self.queue, &mut self.to_send);
        self.waiting = self.to_send.len();
    }

    /// Frames a full transmit ring leaves waiting before smoltcp is told to stop sending.
    fn held_frames(&self) -> usize {
        match &self.segments {
            Some(segmenting) if segmenting.cutter == Cutter::Uncut => HELD_WHOLE_SEGMENTS,
            _ => HELD_FRAMES,
        }
    }

    fn queue_frame(&mut self, mbuf: Mbuf<'static>) {
        self.to_send.push(mbuf);
        self.flush_a_full_burst();
    }

    /// Flushes once a burst has gathered beyond what already waits.
    fn flush_a_full_burst(&mut self) {
        if self.to_send.len() >= self.waiting + usize::from(BURST) {
            self.flush();
        }
    }

    /// Sends a frame smoltcp left the checksums of: an IPv4 TCP segment longer than one
    /// `mss` is cut (by the device or GSO); every TCP frame gets its checksums.
    fn send_segment(&mut self, mut mbuf: Mbuf<'static>, mss: Option<u16>) {
        let Some(lengths) = tcp4_header_lengths(mbuf.data()) else {
            // ARP, or an IPv4 frame smoltcp completed (its checksums are not declared off).
            return self.queue_frame(mbuf);
        };
        mbuf.set_header_lengths(lengths);
        let payload = mbuf.len() - usize::from(lengths.total());
        let (Some(segmenting), Some(mss)) = (self.segments.as_mut(), mss.filter(|&mss| payload > usize::from(mss)))
        else {
            mbuf.finish_tcp4_checksums(self.offload);
            return self.queue_frame(mbuf);
        };
        if segmenting.cutter == Cutter::Uncut {
            mbuf.finish_tcp4_checksums(self.offload);
            segmenting.cut.segments += 1;
            segmenting.cut.frames += 1;
            return self.queue_frame(mbuf);
        }
        if segmenting.cutter == Cutter::Device {
            mbuf.request_tso(mss);
            segmenting.cut.segments += 1;
            segmenting.cut.frames += payload.div_ceil(usize::from(mss)) as u64;
            return self.queue_frame(mbuf);
        }
        // GSO's frames go straight onto the send queue, then get their checksums.
        let from = self.to_send.len();
        match segmenting.pools.cut_tcp4(mbuf, mss, self.pool, &mut self.to_send) {
            Ok(()) => {
                segmenting.cut.segments += 1;
                segmenting.cut.frames += (self.to_send.len() - from) as u64;
            }
            Err(err) => {
                log::debug!("dpdk: GSO could not cut a segment: {err}");
                self.no_mbuf += 1;
            }
        }
        for frame in &mut self.to_send[from..] {
            frame.finish_tcp4_checksums(self.offload);
        }
        self.flush_a_full_burst();
    }
}

pub enum DpdkRx<'a> {
    Frame(Mbuf<'static>),
    Joined(&'a [u8]),
}

pub struct DpdkTx<'a> {
    transmit: &'a mut Transmit,
    /// The payload size the stack asked segments to be cut to (`PacketMeta`).
    segment: Option<u16>,
}

impl phy::RxToken for DpdkRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        match self {
            DpdkRx::Frame(mbuf) => f(mbuf.data()),
            DpdkRx::Joined(bytes) => f(bytes),
        }
    }
}

impl phy::TxToken for DpdkTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let transmit = self.transmit;
        let pool = match &transmit.segments {
            Some(segmenting) if len > transmit.frame_room => segmenting.pools.large(),
            _ => transmit.pool,
        };
        let mut mbuf = match Mbuf::alloc(pool) {
            Some(mbuf) => mbuf,
            None => {
                transmit.no_mbuf += 1;
                return f(&mut vec![0; len]);
            }
        };
        let Some(data) = u16::try_from(len).ok().and_then(|len| mbuf.append(len)) else {
            transmit.no_mbuf += 1;
            return f(&mut vec![0; len]);
        };
        let result = f(data);
        if transmit.checksums_here {
            transmit.send_segment(mbuf, self.segment);
            return result;
        }
        if transmit.offload {
            if let Some((l3_len, flags)) = prepare_checksum_offload(data) {
                mbuf.request_offload(flags, 14, l3_len, 0);
            }
        }
        transmit.queue_frame(mbuf);
        result
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.segment = meta.segmentation_offload_size.map(u16::from);
    }
}

impl Device for DpdkQueue {
    type RxToken<'a> = DpdkRx<'a>;
    type TxToken<'a> = DpdkTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(DpdkRx<'_>, DpdkTx<'_>)> {
        match self.receive.next() {
            Some(frame) => Some((frame, DpdkTx { transmit: &mut self.transmit, segment: None })),
            None => {
                // Input drained: send what this round of the stack queued, as one burst.
                self.transmit.flush();
                None
            }
        }
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<DpdkTx<'_>> {
        let held = self.transmit.held_frames();
        if self.transmit.waiting >= held {
            // The device is behind: smoltcp keeps its data until a flush makes room.
            self.transmit.flush();
            if self.transmit.waiting >= held {
                return None;
            }
        }
        Some(DpdkTx { transmit: &mut self.transmit, segment: None })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.max_burst_size = Some(usize::from(BURST));
        if self.transmit.checksums_here {
            // TCP checksums are done per frame (here or by the device), after cutting;
            // received frames are checked before merging, which leaves stale sums.
            caps.checksum.ipv4 = Checksum::Tx;
            caps.checksum.tcp = Checksum::None;
            if self.transmit.segments.is_some() {
                caps.segmentation.tcpv4 = NonZeroUsize::new(LARGE_FRAME_BYTES.min(crate::SUPER_FRAME_BYTES));
            }
            return caps;
        }
        let checksum = match (self.receive.offload, self.transmit.offload) {
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
        // The last frames get a few tries; what the device still would not take is freed
        // (and counted by the port).
        let last = std::mem::take(&mut self.transmit.to_send);
        self.transmit.port.transmit(self.transmit.queue, last);
        let queue = self.transmit.queue;
        if self.transmit.no_mbuf > 0 {
            log::info!(queue = queue; "dpdk: {} frames dropped for want of an mbuf", self.transmit.no_mbuf);
        }
        if self.receive.bad_checksum > 0 {
            log::info!(queue = queue; "dpdk: {} frames dropped for a bad checksum", self.receive.bad_checksum);
        }
        if let Some(steer) = &self.receive.steer {
            log::info!(
                queue = queue;
                "dpdk: {} of {} frames received handed to the core that owns their flow (an mbuf, no copy)",
                steer.moved, steer.received
            );
        }
        if let Some(segmenting) = &self.transmit.segments {
            let Counted { segments, frames } = segmenting.cut;
            match segmenting.cutter {
                Cutter::Uncut => log::info!(queue = queue; "dpdk: {segments} large segments sent whole"),
                Cutter::Device | Cutter::Gso => {
                    let by = if segmenting.cutter == Cutter::Device { "the device (TSO)" } else { "GSO" };
                    log::info!(queue = queue; "dpdk: {segments} large segments sent, cut into {frames} frames by {by}");
                }
            }
        }
        if self.receive.merge {
            let Counted { segments, frames } = self.receive.merged;
            log::info!(queue = queue; "dpdk: {segments} large segments received, merged from {frames} frames by GRO");
        }
    }
}

/// The header lengths of an IPv4 TCP frame (None for anything else).
fn tcp4_header_lengths(frame: &[u8]) -> Option<HeaderLengths> {
    let ip = crate::layers::ipv4_carrying_tcp(frame)?;
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some(HeaderLengths { l2: 14, l3: u16::from(ip.header_len()), l4: u16::from(tcp.header_len()) })
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
        assert_eq!(tcp4_header_lengths(&frame), None, "only IPv4 TCP frames are cut or checksummed here");
    }

    #[test]
    fn a_tcp_frame_s_header_lengths_are_read_from_its_headers() {
        let frame = tcp_frame(&[7u8; 100]);
        assert_eq!(tcp4_header_lengths(&frame), Some(HeaderLengths { l2: 14, l3: 20, l4: 20 }));
        // A TCP header with 12 bytes of options (data offset 8 words).
        let mut with_options = frame.clone();
        with_options[14 + 20 + 12] = 8 << 4;
        assert_eq!(tcp4_header_lengths(&with_options).map(|lengths| lengths.l4), Some(32));
    }
}
