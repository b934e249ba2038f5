//! The TAP backend: frames to and from a kernel TAP device (`/dev/net/tun`), which the test
//! harness bridges to a veth pair between network namespaces. Our stack owns an address
//! the kernel does not have on that link.
//!
//! It uses smoltcp's own non-blocking `TunTapInterface` (one queue). Multi-queue TAP
//! (IFF_MULTI_QUEUE, one queue per dataplane core) is still to come.

use smoltcp::phy::{Medium, TunTapInterface};
use std::io;

/// Attaches to the TAP device `name` (created by the harness or by us, as root).
pub fn open_tap(name: &str) -> io::Result<TunTapInterface> {
    TunTapInterface::new(name, Medium::Ethernet)
        .map_err(|e| io::Error::new(e.kind(), format!("TAP device {name}: {e} (it needs root or CAP_NET_ADMIN)")))
}
