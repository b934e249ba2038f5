//! An owning packet buffer: allocated from a mempool, freed when dropped unless handed to
//! a transmit queue.

use crate::Mempool;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Transparent: a `Vec<Mbuf>`'s buffer is an array of `rte_mbuf` pointers (`Port::transmit_some`).
#[repr(transparent)]
pub struct Mbuf<'pool> {
    mbuf: NonNull<dpdk_sys::rte_mbuf>,
    _pool: PhantomData<&'pool Mempool>,
}

// SAFETY: an mbuf is a buffer owned by whoever holds the pointer; DPDK lets any thread free
// it or hand it to a queue (a registered lcore frees into its own cache, any other thread
// into the pool's shared ring). `Mbuf` is the only owner, so moving it moves the ownership.
unsafe impl Send for Mbuf<'_> {}

impl<'pool> Mbuf<'pool> {
    /// An empty mbuf, or None when the pool is exhausted.
    pub fn alloc(pool: &'pool Mempool) -> Option<Mbuf<'pool>> {
        // SAFETY: the pool is live for 'pool.
        let mbuf = NonNull::new(unsafe { dpdk_sys::vm_rte_pktmbuf_alloc(pool.as_ptr()) })?;
        Some(Mbuf { mbuf, _pool: PhantomData })
    }

    /// Takes ownership of an mbuf a receive burst returned.
    ///
    /// # Safety
    /// `mbuf` must be a valid mbuf from a pool that lives for 'pool, owned by no one else.
    pub(crate) unsafe fn from_raw(mbuf: NonNull<dpdk_sys::rte_mbuf>) -> Mbuf<'pool> {
        Mbuf { mbuf, _pool: PhantomData }
    }

    pub(crate) fn as_ptr(&self) -> *mut dpdk_sys::rte_mbuf {
        self.mbuf.as_ptr()
    }

    /// Appends `len` bytes at the end of the data and returns them to be filled; None when
    /// the buffer has no room.
    pub fn append(&mut self, len: u16) -> Option<&mut [u8]> {
        // SAFETY: the mbuf is ours; the returned area (if any) lies inside its buffer and is
        // borrowed with `self`.
        let data = unsafe { dpdk_sys::vm_rte_pktmbuf_append(self.mbuf.as_ptr(), len) };
        // SAFETY: a non-null result is `len` bytes inside the mbuf's buffer, ours alone.
        NonNull::new(data.cast::<u8>())
            .map(|data| unsafe { std::slice::from_raw_parts_mut(data.as_ptr(), usize::from(len)) })
    }

    /// The packet's data (its first segment).
    pub fn data(&self) -> &[u8] {
        // SAFETY: mtod points at data_len initialised bytes of the mbuf we own.
        unsafe {
            let start = dpdk_sys::vm_rte_pktmbuf_mtod(self.mbuf.as_ptr()).cast::<u8>();
            std::slice::from_raw_parts(start, usize::from(dpdk_sys::vm_rte_pktmbuf_data_len(self.mbuf.as_ptr())))
        }
    }

    /// Asks the device for offloads (`RTE_MBUF_F_TX_*` flags) and gives the header lengths
    /// they need.
    pub fn request_offload(&mut self, flags: u64, l2_len: u16, l3_len: u16, l4_len: u16) {
        // SAFETY: writing fields of the mbuf we own.
        unsafe { dpdk_sys::vm_rte_mbuf_set_tx_offload(self.mbuf.as_ptr(), flags, l2_len, l3_len, l4_len) };
    }

    /// The mbuf's offload flags (receive checksum results, transmit requests).
    pub fn offload_flags(&self) -> u64 {
        // SAFETY: reading a field of the mbuf we own.
        unsafe { dpdk_sys::vm_rte_mbuf_ol_flags(self.mbuf.as_ptr()) }
    }
}

impl Drop for Mbuf<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the mbuf; it goes back to its pool.
        unsafe { dpdk_sys::vm_rte_pktmbuf_free(self.mbuf.as_ptr()) };
    }
}
