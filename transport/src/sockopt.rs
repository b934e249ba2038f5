//! Socket options the standard library does not set: one call for every layer that needs
//! one (the kernel TCP connections here, the packet sockets of the dataplane).

use std::io;
use std::os::fd::RawFd;

/// Sets option `option` at `level` of socket `fd` to `value` (a plain C integer or struct).
pub fn set_socket_option<T>(fd: RawFd, level: libc::c_int, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed, as setsockopt requires; an
    // fd that is not a socket is refused by the kernel (ENOTSOCK), not misused.
    let result = unsafe {
        libc::setsockopt(fd, level, option, (value as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
