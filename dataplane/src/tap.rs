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

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// One queue of a TAP device, read and written without blocking.
pub struct TapQueue {
    file: File,
    mtu: usize,
    rx_buffer: Vec<u8>,
    tx_buffer: Vec<u8>,
    /// Frames the kernel would not take (its queue full): dropped, as a NIC would.
    tx_dropped: u64,
}

/// The tun driver's flags of an existing device (sysfs `tun_flags`), or None when there
/// is no such TUN/TAP device yet.
fn existing_flags(name: &str) -> Option<libc::c_int> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).ok()?;
    libc::c_int::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Attaches a new queue, one of `queues` this process will attach, to the TAP device
/// `name` (made beforehand, or created here, multi-queue, when run as root).
pub fn open_tap(name: &str, queues: usize) -> io::Result<TapQueue> {
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
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | queue_flag) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which lives across the call.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request as *mut libc::ifreq) };
    if result < 0 {
        return Err(context(io::Error::last_os_error()));
    }
    let mtu = crate::netdev::interface_mtu(name);
    Ok(TapQueue { file, mtu, rx_buffer: vec![0; mtu + 14], tx_buffer: Vec::new(), tx_dropped: 0 })
}

pub struct TapRx<'a> {
    frame: &'a [u8],
}

pub struct TapTx<'a> {
    file: &'a mut File,
    buffer: &'a mut Vec<u8>,
    dropped: &'a mut u64,
}

impl phy::RxToken for TapRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

impl phy::TxToken for TapTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.buffer.resize(len, 0);
        let result = f(&mut self.buffer[..len]);
        if self.file.write(&self.buffer[..len]).is_err() {
            *self.dropped += 1;
        }
        result
    }
}

impl Drop for TapQueue {
    fn drop(&mut self) {
        if self.tx_dropped > 0 {
            log::info!("tap: the kernel refused {} frames (its queue was full)", self.tx_dropped);
        }
    }
}

impl Device for TapQueue {
    type RxToken<'a> = TapRx<'a>;
    type TxToken<'a> = TapTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(TapRx<'_>, TapTx<'_>)> {
        match self.file.read(&mut self.rx_buffer) {
            Ok(len) if len > 0 => Some((
                TapRx { frame: &self.rx_buffer[..len] },
                TapTx { file: &mut self.file, buffer: &mut self.tx_buffer, dropped: &mut self.tx_dropped },
            )),
            _ => None,
        }
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TapTx<'_>> {
        Some(TapTx { file: &mut self.file, buffer: &mut self.tx_buffer, dropped: &mut self.tx_dropped })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps
    }
}
