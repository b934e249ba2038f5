//! The in-process wire: two NIC ends joined by lock-free frame queues, so that two
//! smoltcp stacks in one process exchange Ethernet frames with no kernel and no root. It
//! is the default stack of `vmigrate demo` and the baseline of the dataplane's own
//! benchmarks.
//!
//! With offload (the default when no faults are injected) the wire behaves as the kernel's
//! loopback does: frames pass whole, up to a 64 KiB TCP segment, and carry no checksums,
//! since nothing between the two stacks can corrupt them. The sending stack hands it one
//! large segment where it would have cut MTU-sized ones, and the receiving stack takes it
//! as it is: the MTU is still what each end advertises as its MSS.

use crossbeam_queue::ArrayQueue;
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Frames in flight per direction. Enough for a megabyte TCP window of 1500-byte frames;
/// a full queue drops the frame, as a NIC ring would, and TCP recovers.
pub const WIRE_QUEUE_FRAMES: usize = 1024;

/// A frame on the wire: its bytes are the first `len` of `buf`. The buffer is never cut
/// back, so a recycled one keeps every byte it ever held initialized: an ACK sent in a
/// buffer that carried a 64 KiB segment costs no zeroing when it carries one again (the
/// zeroing was 8% of a one-stream run's CPU while buffers were truncated to each frame).
#[derive(Default)]
struct Frame {
    buf: Vec<u8>,
    len: usize,
}

type FrameQueue = Arc<ArrayQueue<Frame>>;

/// One end of the wire.
pub struct WireEnd {
    tx: FrameQueue,
    rx: FrameQueue,
    /// Spent frame buffers, shared by both ends, so steady state allocates nothing.
    free: FrameQueue,
    mtu: usize,
    offload: bool,
}

/// Two ends of one wire: what one transmits, the other receives. `offload`: large frames
/// and no checksums (see the module's comment); without it, MTU-sized frames, each
/// checksummed by the stacks, as a link that can corrupt needs.
pub fn wire_pair(mtu: usize, offload: bool) -> (WireEnd, WireEnd) {
    let a_to_b = Arc::new(ArrayQueue::new(WIRE_QUEUE_FRAMES));
    let b_to_a = Arc::new(ArrayQueue::new(WIRE_QUEUE_FRAMES));
    let free = Arc::new(ArrayQueue::new(4 * WIRE_QUEUE_FRAMES));
    (
        WireEnd { tx: a_to_b.clone(), rx: b_to_a.clone(), free: free.clone(), mtu, offload },
        WireEnd { tx: b_to_a, rx: a_to_b, free, mtu, offload },
    )
}

pub struct WireRx {
    frame: Frame,
    free: FrameQueue,
}

pub struct WireTx {
    tx: FrameQueue,
    free: FrameQueue,
}

impl phy::RxToken for WireRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let result = f(&self.frame.buf[..self.frame.len]);
        let _ = self.free.push(self.frame);
        result
    }
}

impl phy::TxToken for WireTx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = self.free.pop().unwrap_or_default();
        // The stack writes every byte of the frame; only what the buffer grows by is zeroed.
        if frame.buf.len() < len {
            frame.buf.resize(len, 0);
        }
        frame.len = len;
        let result = f(&mut frame.buf[..len]);
        // Only this end pushes to `tx` and `transmit` checked for room, so this succeeds;
        // if it ever did not, dropping the frame is what a full NIC ring does.
        let _ = self.tx.push(frame);
        result
    }
}

impl Device for WireEnd {
    type RxToken<'a> = WireRx;
    type TxToken<'a> = WireTx;

    fn receive(&mut self, _timestamp: Instant) -> Option<(WireRx, WireTx)> {
        if self.tx.is_full() {
            return None;
        }
        let frame = self.rx.pop()?;
        Some((WireRx { frame, free: self.free.clone() }, WireTx { tx: self.tx.clone(), free: self.free.clone() }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<WireTx> {
        if self.tx.is_full() {
            return None;
        }
        Some(WireTx { tx: self.tx.clone(), free: self.free.clone() })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // Ethernet header on top of the IP MTU.
        caps.max_transmission_unit = self.mtu + 14;
        // A burst per poll keeps one core from starving the other end.
        caps.max_burst_size = Some(64);
        if self.offload {
            caps.checksum.ipv4 = Checksum::None;
            caps.checksum.tcp = Checksum::None;
            caps.segmentation.tcpv4 = NonZeroUsize::new(crate::SUPER_FRAME_BYTES);
        }
        caps
    }
}
