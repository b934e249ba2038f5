//! The KVM guest's RAM: vm-memory's `GuestMemoryMmap`, one KVM memory slot per region with
//! KVM's dirty logging on, seen by the engine through `GuestMemory`.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use migration::memory::{pages_of, GuestMemory};
use migration::PAGE_SIZE_BYTES;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest RAM mapped in this process, regions at their guest-physical addresses.
pub struct KvmMemory {
    memory: GuestMemoryMmap,
    /// Each region's guest-physical start, bytes and host address.
    regions: Vec<(u64, u64, *mut u8)>,
}

// SAFETY: the raw host addresses point into `memory`'s mappings, which live as long as
// `self` and are shared memory by nature (the vCPU writes them while the engine reads);
// nothing here hands out references to them, only copies.
unsafe impl Send for KvmMemory {}
// SAFETY: as above; every access is a copy of whole pages through the raw pointers.
unsafe impl Sync for KvmMemory {}

impl KvmMemory {
    /// Maps zeroed RAM for `regions` (guest-physical start, bytes).
    pub fn map(regions: &[(u64, u64)]) -> Result<Self, String> {
        let ranges: Vec<(GuestAddress, usize)> =
            regions.iter().map(|&(start, bytes)| (GuestAddress(start), bytes as usize)).collect();
        let memory = GuestMemoryMmap::<()>::from_ranges(&ranges)
            .map_err(|e| format!("mapping {} bytes of guest memory: {e}", regions.iter().map(|r| r.1).sum::<u64>()))?;
        let regions = memory
            .iter()
            .map(|region| {
                let host = region
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map_err(|e| format!("host address of guest memory: {e}"))?;
                Ok((region.start_addr().0, region.len(), host))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(KvmMemory { memory, regions })
    }

    /// Transparent huge pages for every region from now on (`MADV_HUGEPAGE`), as for
    /// QEMU's guest RAM: for a running guest. A destination receives on base pages (a page
    /// arriving alone would fault in and zero a whole 2 MiB) and advises at resume.
    pub fn advise_huge(&self) {
        for &(_, bytes, host) in &self.regions {
            // SAFETY: advice on vm-memory's private anonymous mapping of the region (page-
            // aligned, `bytes` long), live while `self` is; it changes no contents. Failure
            // (THP compiled out) only costs performance.
            unsafe { libc::madvise(host.cast(), bytes as usize, libc::MADV_HUGEPAGE) };
        }
    }

    /// Merges into huge pages every 2 MiB extent at least half written
    /// (`hugepages::collapse_dense_in`): a resumed destination's memory arrived on base
    /// pages, and khugepaged would take minutes to hours. Returns the extents merged.
    pub fn collapse_dense(&self) -> usize {
        let minimum = crate::guest::COLLAPSE_MIN_RESIDENT_PAGES;
        self.regions
            .iter()
            // SAFETY: each region is vm-memory's private anonymous mapping, live while
            // `self` is; the vCPU may write it meanwhile, which merging allows.
            .map(|&(_, bytes, host)| unsafe { hugepages::collapse_dense_in(host, bytes as usize, minimum) })
            .sum()
    }

    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }

    /// Hands every region to KVM as a memory slot (slot N = region N), dirty logging on.
    pub fn register_slots(&self, vm: &VmFd) -> Result<(), String> {
        for (slot, &(start, bytes, host)) in self.regions.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: start,
                memory_size: bytes,
                userspace_addr: host as u64,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
            };
            // SAFETY: the mapping behind `host` is `bytes` long and outlives the VM: the
            // VM fd is dropped before this memory (the guest owns both, VM first).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION for slot {slot} at {start:#x}: {e}"))?;
        }
        Ok(())
    }

    /// Maps (region, page) to the page's host address; panics outside guest memory.
    fn page_pointer(&self, region: usize, page: u64) -> *mut u8 {
        let (_, bytes, host) = self.regions[region];
        assert!(page < pages_of(bytes), "page {page} beyond region {region} of {bytes} bytes");
        // SAFETY: in bounds of the region's mapping, checked above.
        unsafe { host.add(page as usize * PAGE_SIZE_BYTES) }
    }

    /// Reads a 64-bit field of the guest's memory (the configuration block).
    pub fn read_u64(&self, address: GuestAddress) -> u64 {
        use vm_memory::Bytes;
        self.memory.read_obj(address).unwrap_or(0)
    }

    pub fn write_u64(&self, address: GuestAddress, value: u64) -> Result<(), String> {
        use vm_memory::Bytes;
        self.memory.write_obj(value, address).map_err(|e| format!("writing guest memory at {:#x}: {e}", address.0))
    }
}

impl GuestMemory for KvmMemory {
    fn region_bytes(&self) -> Vec<u64> {
        self.regions.iter().map(|r| r.1).collect()
    }

    fn region_addresses(&self) -> Vec<u64> {
        self.regions.iter().map(|r| r.0).collect()
    }

    fn read_page(&self, region: usize, page: u64, dst: &mut [u8]) {
        let source = self.page_pointer(region, page);
        // SAFETY: `source` is a whole page inside the mapping; `dst` is a distinct buffer
        // of one page. The vCPU may write the page meanwhile: the dirty log catches that.
        unsafe { std::ptr::copy_nonoverlapping(source, dst.as_mut_ptr(), PAGE_SIZE_BYTES) }
    }

    fn write_page(&self, region: usize, page: u64, src: &[u8]) {
        let target = self.page_pointer(region, page);
        // SAFETY: as in read_page; on the destination no vCPU runs while pages arrive.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), target, PAGE_SIZE_BYTES) }
    }

    fn prepare_write(&self, region: usize, first: u64, count: u64) {
        let (_, bytes, _) = self.regions[region];
        assert!(first.saturating_add(count) <= pages_of(bytes), "pages {first}+{count} beyond region {region}");
        if count == 0 {
            return;
        }
        let start = self.page_pointer(region, first);
        // SAFETY: a page-aligned range inside the region's mapping (checked above).
        // Populating for write only allocates zero-filled pages where none are; a kernel
        // that cannot leaves the stores to fault as before.
        unsafe {
            libc::madvise(start.cast(), count as usize * PAGE_SIZE_BYTES, libc::MADV_POPULATE_WRITE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed destination's memory, received on base pages, goes back to huge pages
    /// where it was written densely; contents stay.
    #[test]
    fn received_memory_merges_into_huge_pages_where_written_densely() {
        let memory = KvmMemory::map(&[(0, 8 << 20)]).expect("map");
        let page = [0x3cu8; PAGE_SIZE_BYTES];
        // Every page of the first 4 MiB (at least one whole aligned extent), one page far
        // beyond.
        for number in (0..1024).chain([1900]) {
            memory.write_page(0, number, &page);
        }
        memory.advise_huge();
        match memory.collapse_dense() {
            0 => eprintln!("SKIPPED the merge itself: no MADV_COLLAPSE here (Linux 6.1) or THP off"),
            merged => assert!((1..=2).contains(&merged), "{merged} extents merged"),
        }
        let mut back = [0u8; PAGE_SIZE_BYTES];
        for number in [0, 1023, 1900] {
            memory.read_page(0, number, &mut back);
            assert_eq!(back, page, "page {number}");
        }
        memory.read_page(0, 1500, &mut back);
        assert!(back.iter().all(|&b| b == 0), "an unwritten page reads zero");
    }
}
