//! How the engine reads and writes guest memory: a small consumer trait in the shape of
//! rust-vmm's vm-memory, so the synthetic guest, a VMM's own memory and QEMU-stream pages
//! all fit. The engine never assumes how memory is provided.

use crate::PAGE_SIZE_BYTES;

/// Guest memory as a list of regions of 4 KiB pages.
///
/// Reads may race with a running guest's writes (as KVM guest RAM does with a VMM's
/// reads): a torn copy is harmless because the dirty log marks the page again and a later
/// round re-sends it. Implementations must never hand out references into guest memory
/// that outlive a call.
pub trait GuestMemory: Send + Sync {
    /// Size of each region in bytes (each a multiple of the page size).
    fn region_bytes(&self) -> Vec<u64>;

    /// Where each region starts in guest-physical address space (page aligned, no two
    /// overlapping). A destination lays its memory out the same way.
    fn region_addresses(&self) -> Vec<u64>;

    /// Copies page `page` of `region` into `dst` (one page long).
    fn read_page(&self, region: usize, page: u64, dst: &mut [u8]);

    /// Overwrites page `page` of `region` with `src` (one page long).
    fn write_page(&self, region: usize, page: u64, src: &[u8]);

    /// A hint: pages `first..first + count` of `region` are about to be written for the
    /// first time. Memory that is faulted in at its first store may fault them in together
    /// (one system call instead of a fault per page); the default does nothing.
    fn prepare_write(&self, _region: usize, _first: u64, _count: u64) {}

    /// Sets `count` pages from `first` to zero.
    fn zero_pages(&self, region: usize, first: u64, count: u64) {
        let zero = [0u8; PAGE_SIZE_BYTES];
        for page in first..first + count {
            self.write_page(region, page, &zero);
        }
    }
}

/// One region of guest memory as the guest sees it: where it sits in guest-physical
/// address space and how large it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub guest_address: u64,
    pub bytes: u64,
}

/// Addresses for regions laid end to end from 0: for memories with no guest-physical
/// layout of their own (test memories, a flat buffer).
pub fn contiguous_addresses(region_bytes: &[u64]) -> Vec<u64> {
    region_bytes
        .iter()
        .scan(0u64, |next, &bytes| {
            let address = *next;
            *next += bytes;
            Some(address)
        })
        .collect()
}

/// Pages in a region of `bytes` bytes.
pub fn pages_of(bytes: u64) -> u64 {
    bytes / PAGE_SIZE_BYTES as u64
}
