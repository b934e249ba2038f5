//! The TAP backend: frames to and from one queue of a kernel TAP device (`/dev/net/tun`),
//! which the test harness bridges to a veth pair between network namespaces. Our stack
//! owns an address the kernel does not have on that link.
//!
//! A device made `multi_queue` (as the harness makes them, and as one created here is)
//! takes a queue per core; a plain one (`ip tuntap add dev tap0 mode tap`) takes one queue,
//! so one core, and more are refused with how to make a device that has them. On a
//! multi-queue device the kernel sends each
//! flow to the queue that last wrote a frame of it (the tun driver's flow table) and a new
//! flow to a queue chosen by its hash; `fanout::SharedLink` takes care of the frames that
//! belong to no one flow.
//!
//! With offload (the default) each queue carries virtio-net headers (`IFF_VNET_HDR`,
//! `vnet.rs`), and the device takes partial checksums and large TCP segments both ways
//! (`TUNSETOFFLOAD`): our stack hands the kernel 64 KiB segments, which cross the bridge
//! and the veth whole and are cut only where a real NIC (or a peer without offload) needs
//! MTU-sized frames; and the kernel hands us its segments whole.

use crate::layers::checksums_ok;
use crate::vnet::{prepare_transmit, VnetHdr, VNET_HDR_BYTES};
use crate::SUPER_FRAME_BYTES;
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Frames with bad checksums skipped in one `receive` before it gives up for this poll.
const BAD_FRAMES_PER_POLL: usize = 16;

/// One queue of a TAP device, read and written without blocking.
pub struct TapQueue {
    file: File,
    mtu: usize,
    rx_buffer: Vec<u8>,
    transmit: Transmit,
    /// Check the checksums the kernel does not vouch for (with offload, smoltcp checks
    /// none itself).
    verify_receive: bool,
    /// Received frames dropped for a bad checksum.
    rx_bad: u64,
}

/// What sending needs, apart from the device: kept in a field of its own so that a
/// transmit token can borrow it beside a received frame.
struct Transmit {
    buffer: Vec<u8>,
    /// Frames the kernel would not take (its queue full): dropped, as a NIC would.
    dropped: u64,
    /// Virtio-net headers, partial checksums and large segments (see the module's comment).
    offload: bool,
}

impl Transmit {
    fn token<'a>(&'a mut self, file: &'a File) -> TapTx<'a> {
        TapTx { file, buffer: &mut self.buffer, dropped: &mut self.dropped, offload: self.offload, segment: None }
    }
}

/// The tun driver's flags of an existing device (sysfs `tun_flags`), or None when there
/// is no such TUN/TAP device yet.
fn existing_flags(name: &str) -> Option<libc::c_int> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).ok()?;
    libc::c_int::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Attaches a new queue, one of `queues` this process will attach, to the TAP device
/// `name` (made beforehand, or created here, multi-queue, when run as root). `offload`:
/// virtio-net headers and large segments; `verify_receive`: check the checksums of frames
/// the kernel does not vouch for (with offload; without, smoltcp checks them).
pub fn open_tap(name: &str, queues: usize, offload: bool, verify_receive: bool) -> io::Result<TapQueue> {
    let context =
        |e: io::Error| io::Error::new(e.kind(), format!("TAP device {name}: {e} (it needs root or CAP_NET_ADMIN)"));
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("TAP device name {name:?} is too long")));
    }
    // The driver refuses a queue whose IFF_MULTI_QUEUE does not match the device's own.
    let multi_queue = existing_flags(name).is_none_or(|flags| flags & libc::IFF_MULTI_QUEUE != 0);
    if !multi_queue && queues > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "TAP device {name} has one queue, and {queues} dataplane cores need one each: use \
                 --dataplane-cores 1, or make the device with queues \
                 (ip tuntap add dev {name} mode tap multi_queue)"
            ),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(context)?;
    // SAFETY: ifreq is plain old data; zero is a valid starting value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    let queue_flag = if multi_queue { libc::IFF_MULTI_QUEUE } else { 0 };
    let vnet_flag = if offload { libc::IFF_VNET_HDR } else { 0 };
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | queue_flag | vnet_flag) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which lives across the call.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request as *mut libc::ifreq) };
    if result < 0 {
        return Err(context(io::Error::last_os_error()));
    }
    if offload {
        let features = libc::TUN_F_CSUM | libc::TUN_F_TSO4;
        // SAFETY: TUNSETOFFLOAD takes the feature bits by value.
        let result = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, features as libc::c_ulong) };
        if result < 0 {
            return Err(context(io::Error::last_os_error()));
        }
    }
    let mtu = crate::netdev::interface_mtu(name);
    let rx_bytes = if offload { VNET_HDR_BYTES + SUPER_FRAME_BYTES } else { mtu + 14 };
    Ok(TapQueue {
        file,
        mtu,
        rx_buffer: vec![0; rx_bytes],
        transmit: Transmit { buffer: Vec::new(), dropped: 0, offload },
        verify_receive,
        rx_bad: 0,
    })
}

pub struct TapRx<'a> {
    frame: &'a [u8],
}

pub struct TapTx<'a> {
    file: &'a File,
    buffer: &'a mut Vec<u8>,
    dropped: &'a mut u64,
    offload: bool,
    /// The payload size the stack asked segments to be cut to (`PacketMeta`).
    segment: Option<u16>,
}

impl phy::RxToken for TapRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

impl phy::TxToken for TapTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        let header = if self.offload { VNET_HDR_BYTES } else { 0 };
        self.buffer.resize(header + len, 0);
        let (vnet, frame) = self.buffer.split_at_mut(header);
        let result = f(frame);
        if let Ok(vnet) = <&mut [u8; VNET_HDR_BYTES]>::try_from(vnet) {
            prepare_transmit(frame, self.segment).encode(vnet);
        }
        if self.file.write(&self.buffer[..header + len]).is_err() {
            *self.dropped += 1;
        }
        result
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.segment = meta.segmentation_offload_size.map(u16::from);
    }
}

impl Drop for TapQueue {
    fn drop(&mut self) {
        if self.transmit.dropped > 0 {
            log::info!("tap: the kernel refused {} frames (its queue was full)", self.transmit.dropped);
        }
        if self.rx_bad > 0 {
            log::info!("tap: {} received frames dropped for a bad checksum", self.rx_bad);
        }
    }
}

impl Device for TapQueue {
    type RxToken<'a> = TapRx<'a>;
    type TxToken<'a> = TapTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(TapRx<'_>, TapTx<'_>)> {
        let mut frame = None;
        for _ in 0..BAD_FRAMES_PER_POLL {
            let len = match self.file.read(&mut self.rx_buffer) {
                Ok(len) if len > 0 => len,
                _ => return None,
            };
            if !self.transmit.offload {
                frame = Some(0..len);
                break;
            }
            let Some(vnet) = self.rx_buffer.first_chunk::<VNET_HDR_BYTES>().filter(|_| len > VNET_HDR_BYTES) else {
                continue;
            };
            let received = VNET_HDR_BYTES..len;
            if !self.verify_receive
                || VnetHdr::decode(vnet).checksums_vouched_for()
                || checksums_ok(&self.rx_buffer[received.clone()])
            {
                frame = Some(received);
                break;
            }
            self.rx_bad += 1;
        }
        let frame = frame?;
        Some((TapRx { frame: &self.rx_buffer[frame] }, self.transmit.token(&self.file)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TapTx<'_>> {
        Some(self.transmit.token(&self.file))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        if self.transmit.offload {
            // The kernel finishes what we send and vouches for (or we check) what we get.
            caps.checksum.tcp = Checksum::None;
            caps.segmentation.tcpv4 = NonZeroUsize::new(crate::KERNEL_SEGMENT_FRAME_BYTES);
        }
        caps
    }
}
