//! DPDK's errors: a call that failed, with `rte_strerror`'s text for its error number.

#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    #[error("{call} failed: {message} (error {code})")]
    Call { call: &'static str, code: i32, message: String },
    #[error("the DPDK environment (EAL) is already initialised in this process")]
    AlreadyInitialised,
    #[error("bad EAL argument {0:?}: it contains a NUL byte")]
    BadArgument(String),
    #[error("no DPDK port named {0:?} (check the --vdev or PCI address given to the EAL)")]
    NoSuchPort(String),
    #[error(
        "DPDK port {port} has {max} queue pair(s), and {asked} were asked for (one per dataplane core): \
         use fewer --dataplane-cores, or give the device more (net_af_packet: qpairs=N; net_tap: \
         queues=N; net_af_xdp: queue_count=N)"
    )]
    TooManyQueues { port: String, asked: u16, max: u16 },
    #[error(
        "DPDK compression device {device} has {max} queue pair(s), and {asked} were asked for (one per \
         compression worker): use fewer --compress-threads"
    )]
    TooManyCompressQueues { device: String, asked: u16, max: u16 },
    #[error("no DPDK compression device named {0:?} (give the EAL one: --vdev compress_isal0, compress_zlib0)")]
    NoSuchDevice(String),
}

#[cfg(dpdk)]
impl DpdkError {
    /// The error of `call`, from `code` (a negative return value) or, when that is not an
    /// error number, from `rte_errno`.
    pub(crate) fn from_code(call: &'static str, code: i32) -> DpdkError {
        // SAFETY: rte_errno is a per-thread integer the shim reads.
        let code = if code < 0 { -code } else { unsafe { dpdk_sys::vm_rte_errno() } };
        // SAFETY: rte_strerror returns a static or per-thread C string for any number.
        let message = unsafe { std::ffi::CStr::from_ptr(dpdk_sys::rte_strerror(code)) }.to_string_lossy().into_owned();
        DpdkError::Call { call, code, message }
    }

    /// The error of a call that reported it through `rte_errno` alone.
    pub(crate) fn from_errno(call: &'static str) -> DpdkError {
        Self::from_code(call, 0)
    }
}
