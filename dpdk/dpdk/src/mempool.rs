//! Packet mempools: fixed-size mbufs in hugepage (or `--no-huge`) memory, shared by the
//! queues of a port.

use crate::{DpdkError, Eal};
use std::ffi::CString;
use std::ptr::NonNull;

pub struct Mempool {
    pool: NonNull<dpdk_sys::rte_mempool>,
    size: u32,
}

// SAFETY: a DPDK mempool is designed for use from many lcores at once (its ring is
// multi-producer, multi-consumer); the pointer stays valid until `Drop`.
unsafe impl Send for Mempool {}
// SAFETY: as above.
unsafe impl Sync for Mempool {}

impl Mempool {
    /// A pool of `count` mbufs with DPDK's default data room (2 KiB plus headroom) and a
    /// per-lcore cache of `cache` mbufs.
    pub fn new(eal: &Eal, name: &str, count: u32, cache: u32) -> Result<Mempool, DpdkError> {
        Mempool::with_data_room(eal, name, count, cache, dpdk_sys::consts::RTE_MBUF_DEFAULT_BUF_SIZE as u16)
    }

    /// A pool whose mbufs each hold one whole frame of a link with this MTU in a single
    /// segment (jumbo frames need more than the default 2 KiB): the headroom, the Ethernet
    /// header, a VLAN tag and the CRC some drivers leave in place.
    pub fn for_mtu(eal: &Eal, name: &str, count: u32, cache: u32, mtu: u16) -> Result<Mempool, DpdkError> {
        let needed = dpdk_sys::consts::RTE_PKTMBUF_HEADROOM + u32::from(mtu) + 14 + 4 + 4;
        let room = needed.max(dpdk_sys::consts::RTE_MBUF_DEFAULT_BUF_SIZE);
        let room = u16::try_from(room).map_err(|_| DpdkError::BadArgument(format!("MTU {mtu} is too large")))?;
        Mempool::with_data_room(eal, name, count, cache, room)
    }

    /// A pool of `count` mbufs of `data_room` bytes each (headroom included).
    pub fn with_data_room(
        _eal: &Eal,
        name: &str,
        count: u32,
        cache: u32,
        data_room: u16,
    ) -> Result<Mempool, DpdkError> {
        let c_name = CString::new(name).map_err(|_| DpdkError::BadArgument(name.to_string()))?;
        // SAFETY: the name is a valid C string; the EAL is initialised (`_eal`).
        let pool = unsafe {
            dpdk_sys::rte_pktmbuf_pool_create(
                c_name.as_ptr(),
                count,
                cache,
                0,
                data_room,
                dpdk_sys::consts::SOCKET_ID_ANY,
            )
        };
        let pool = NonNull::new(pool).ok_or_else(|| DpdkError::from_errno("rte_pktmbuf_pool_create"))?;
        Ok(Mempool { pool, size: count })
    }

    /// Mbufs in the pool now (not handed out).
    pub fn available(&self) -> u32 {
        // SAFETY: the pool is live.
        unsafe { dpdk_sys::vm_rte_mempool_avail_count(self.pool.as_ptr()) }
    }

    /// Mbufs the pool was made with.
    pub fn size(&self) -> u32 {
        self.size
    }

    pub(crate) fn as_ptr(&self) -> *mut dpdk_sys::rte_mempool {
        self.pool.as_ptr()
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        // SAFETY: no mbuf of the pool outlives it (`Mbuf` borrows the pool), and the ports
        // whose queues used it are stopped first (`Port` borrows it too).
        unsafe { dpdk_sys::rte_mempool_free(self.pool.as_ptr()) };
    }
}
