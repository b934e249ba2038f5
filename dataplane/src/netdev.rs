//! Small helpers over the kernel's view of a network interface and its packet sockets,
//! shared by the backends that open one (AF_PACKET, TAP) and the fanout group.

use std::io;

/// The kernel's index of the interface named `iface`.
pub(crate) fn interface_index(iface: &str) -> io::Result<u32> {
    let name =
        std::ffi::CString::new(iface).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"))?;
    // SAFETY: a C string that outlives the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface named {iface}"))),
        index => Ok(index),
    }
}

/// The MTU of the interface `iface` (1500 when it cannot be read).
pub(crate) fn interface_mtu(iface: &str) -> usize {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1500)
}

/// Sets a `SOL_PACKET` option on a packet socket; `what` names it in the error.
pub(crate) fn set_packet_option<T>(fd: i32, option: libc::c_int, value: &T, what: &str) -> io::Result<()> {
    set_socket_option(fd, libc::SOL_PACKET, option, value, what)
}

/// Sets a socket option at `level`; `what` names it in the error.
pub(crate) fn set_socket_option<T>(
    fd: i32,
    level: libc::c_int,
    option: libc::c_int,
    value: &T,
    what: &str,
) -> io::Result<()> {
    transport::sockopt::set_socket_option(fd, level, option, value)
        .map_err(|err| io::Error::new(err.kind(), format!("{what}: {err}")))
}

/// Reads a `SOL_PACKET` option of a packet socket (a plain C struct or integer);
/// `what` names it in the error.
pub(crate) fn packet_option<T: Copy + Default>(fd: i32, option: libc::c_int, what: &str) -> io::Result<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live for the call and `len` holds `value`'s size; the
    // kernel writes at most `len` bytes of plain data.
    let result = unsafe { libc::getsockopt(fd, libc::SOL_PACKET, option, (&mut value as *mut T).cast(), &mut len) };
    check(result, what)?;
    Ok(value)
}

/// A packet socket's counters since they were last read (`struct tpacket_stats`, what
/// `PACKET_STATISTICS` returns for TPACKET_V2 rings).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PacketStats {
    pub packets: u32,
    /// Frames the kernel dropped because the receive ring was full.
    pub drops: u32,
}

/// A libc result as an `io::Result`, the OS error prefixed with `what` failed.
pub(crate) fn check(result: libc::c_int, what: &str) -> io::Result<()> {
    if result < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
    }
    Ok(())
}
