//! The process's allocator settings. glibc gives freed memory at the top of a heap back to
//! the kernel once more than 128 KiB of it is free there (`M_TRIM_THRESHOLD`). rustls
//! allocates each TLS record's buffer (16 KiB) as it seals it and frees it once sent, so a
//! TLS stream grew and trimmed its heap over and over and took a page fault on every page
//! of every record: 13% of the CPU of a TLS stream on the in-process wire, which moved
//! 9.2 Gbit/s, and 20-22 with the freed memory kept. Plain streams do not change. (TLS
//! records are now sealed and opened in buffers of our own, `transport/src/tls/record.rs`;
//! the setting stays for every other allocation freed and made again at that size.)
//!
//! Setting the trim threshold turns off glibc's adaptive mmap threshold, which would
//! otherwise have moved allocations of up to 32 MiB off mmap after the first was freed;
//! fixing it there keeps that behaviour.

/// Freed memory a heap keeps for reuse before giving it back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEEP_FREED_BYTES: libc::c_int = 32 << 20;
/// Allocations from this size up get their own mapping.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const OWN_MAPPING_BYTES: libc::c_int = 32 << 20;

/// Applies the settings; call before other threads start. Elsewhere than glibc, nothing.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator parameters; it is called before any
    // other thread runs, and a rejected setting (return 0) leaves the default.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREED_BYTES);
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_BYTES);
    }
}
