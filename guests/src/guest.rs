//! Guest RAM for the synthetic guest (and any embedder that wants it): regions of
//! hugepage-backed or THP-advised memory with one atomic dirty bitmap each.

use hugepages::{Backing, HugePolicy, MappedRegion};
use migration::dirty::{AtomicBitmap, DirtyLog};
use migration::memory::{pages_of, GuestMemory, Region};
use migration::PAGE_SIZE_BYTES;

/// An extent is merged into a huge page when at least half its base pages were written:
/// emptier ones would have their unwritten half backed too.
pub(crate) const COLLAPSE_MIN_RESIDENT_PAGES: usize = 256;

/// A PC guest's RAM is split around the PCI hole below 4 GiB; QEMU's q35 keeps at most
/// 2 GiB below it by default and puts the rest above 4 GiB. We mirror that split so that
/// multi-region migration is exercised by every guest over 2 GiB.
pub const LOW_MEMORY_BYTES: u64 = 2 << 30;
/// Where RAM above the hole starts.
pub const HIGH_MEMORY_START: u64 = 4 << 30;

pub struct GuestRam {
    regions: Vec<MappedRegion>,
    addresses: Vec<u64>,
    dirty: Vec<AtomicBitmap>,
}

impl GuestRam {
    /// The region layout of a guest of `total_bytes`.
    pub fn pc_layout(total_bytes: u64) -> Vec<u64> {
        if total_bytes > LOW_MEMORY_BYTES {
            vec![LOW_MEMORY_BYTES, total_bytes - LOW_MEMORY_BYTES]
        } else {
            vec![total_bytes]
        }
    }

    /// Where a PC puts regions of these sizes: the first at 0, the rest from 4 GiB up.
    pub fn pc_addresses(region_bytes: &[u64]) -> Vec<u64> {
        let mut next_high = HIGH_MEMORY_START;
        region_bytes
            .iter()
            .enumerate()
            .map(|(index, &bytes)| {
                if index == 0 {
                    return 0;
                }
                let address = next_high;
                next_high += bytes;
                address
            })
            .collect()
    }

    /// Allocates zeroed regions laid out as a PC's, dirty logging on from the start.
    pub fn allocate(region_bytes: &[u64], policy: HugePolicy) -> Result<Self, hugepages::Error> {
        let regions: Vec<Region> = Self::pc_addresses(region_bytes)
            .into_iter()
            .zip(region_bytes)
            .map(|(guest_address, &bytes)| Region { guest_address, bytes })
            .collect();
        Self::allocate_at(&regions, policy)
    }

    /// Allocates zeroed regions at these guest-physical addresses (a source's layout).
    pub fn allocate_at(layout: &[Region], policy: HugePolicy) -> Result<Self, hugepages::Error> {
        let mut regions = Vec::with_capacity(layout.len());
        for region in layout {
            regions.push(MappedRegion::allocate(region.bytes as usize, policy)?);
        }
        let dirty = layout.iter().map(|r| AtomicBitmap::new(pages_of(r.bytes))).collect();
        Ok(GuestRam { regions, addresses: layout.iter().map(|r| r.guest_address).collect(), dirty })
    }

    pub fn total_bytes(&self) -> u64 {
        self.region_bytes().iter().sum()
    }

    pub fn total_pages(&self) -> u64 {
        pages_of(self.total_bytes())
    }

    /// How the memory is backed: hugetlb only if every region got hugepages.
    pub fn backing(&self) -> Backing {
        if self.regions.iter().all(|r| r.backing() == Backing::HugeTlb2M) {
            Backing::HugeTlb2M
        } else {
            Backing::AnonymousThp
        }
    }

    /// Maps a page number of the flat guest address space to (region, page in region).
    pub fn locate(&self, flat_page: u64) -> (usize, u64) {
        let mut page = flat_page;
        for (index, bitmap) in self.dirty.iter().enumerate() {
            if page < bitmap.pages() {
                return (index, page);
            }
            page -= bitmap.pages();
        }
        panic!("page {flat_page} beyond guest memory of {} pages", self.total_pages());
    }

    /// A guest store of one 32-bit word, marked in the dirty log after the store.
    pub fn write_u32(&self, flat_page: u64, word: usize, value: u32) {
        let (region, page) = self.locate(flat_page);
        self.regions[region].write_u32(page as usize * PAGE_SIZE_BYTES + word * 4, value);
        self.dirty[region].mark(page);
    }

    pub fn write_u64(&self, flat_page: u64, offset: usize, value: u64) {
        let (region, page) = self.locate(flat_page);
        self.regions[region].write_u64(page as usize * PAGE_SIZE_BYTES + offset, value);
        self.dirty[region].mark(page);
    }

    pub fn read_u64(&self, flat_page: u64, offset: usize) -> u64 {
        let (region, page) = self.locate(flat_page);
        self.regions[region].read_u64(page as usize * PAGE_SIZE_BYTES + offset)
    }

    pub fn read_flat_page(&self, flat_page: u64, dst: &mut [u8]) {
        let (region, page) = self.locate(flat_page);
        self.regions[region].read_into(page as usize * PAGE_SIZE_BYTES, dst);
    }

    /// A guest store of a whole page.
    pub fn write_flat_page(&self, flat_page: u64, data: &[u8]) {
        let (region, page) = self.locate(flat_page);
        self.regions[region].write_from(page as usize * PAGE_SIZE_BYTES, data);
        self.dirty[region].mark(page);
    }

    /// Clears every dirty bit (used on the destination, where received pages are not guest
    /// writes).
    pub fn clear_dirty(&self) {
        for bitmap in &self.dirty {
            let mut scratch = vec![0u64; migration::dirty::bitmap_words(bitmap.pages())];
            bitmap.take_into(&mut scratch);
        }
    }

    /// Transparent huge pages on or off for every anonymous region (see
    /// `hugepages::MappedRegion::advise_huge`).
    pub fn advise_huge(&self, huge: bool) {
        for region in &self.regions {
            region.advise_huge(huge);
        }
    }

    /// Merges every 2 MiB extent at least half written back into a huge page now
    /// (`hugepages::MappedRegion::collapse_dense`): a destination receives on base pages,
    /// and khugepaged would take minutes to hours to merge them. Returns the extents merged.
    pub fn collapse_dense(&self) -> usize {
        self.regions.iter().map(|region| region.collapse_dense(COLLAPSE_MIN_RESIDENT_PAGES)).sum()
    }

    /// Returns all memory to the kernel (it reads back as zero).
    pub fn discard_all(&self) {
        for region in &self.regions {
            region.discard(0, region.len());
        }
    }
}

impl GuestMemory for GuestRam {
    fn region_bytes(&self) -> Vec<u64> {
        self.dirty.iter().map(|b| b.pages() * PAGE_SIZE_BYTES as u64).collect()
    }

    fn region_addresses(&self) -> Vec<u64> {
        self.addresses.clone()
    }

    fn read_page(&self, region: usize, page: u64, dst: &mut [u8]) {
        self.regions[region].read_into(page as usize * PAGE_SIZE_BYTES, dst);
    }

    fn write_page(&self, region: usize, page: u64, src: &[u8]) {
        self.regions[region].write_from(page as usize * PAGE_SIZE_BYTES, src);
    }

    fn prepare_write(&self, region: usize, first: u64, count: u64) {
        self.regions[region].populate_for_write(first as usize * PAGE_SIZE_BYTES, count as usize * PAGE_SIZE_BYTES);
    }
}

impl DirtyLog for GuestRam {
    fn take_dirty(&self, region: usize, out: &mut [u64]) -> u64 {
        self.dirty[region].take_into(out)
    }
}

/// Which of `HugePolicy`'s choices a CLI name means.
pub fn parse_huge_policy(text: &str) -> Result<HugePolicy, String> {
    match text {
        "auto" => Ok(HugePolicy::Auto),
        "require" | "on" => Ok(HugePolicy::Require),
        "never" | "off" => Ok(HugePolicy::Never),
        other => Err(format!("hugepages must be auto, on or off, got {other:?}")),
    }
}

/// Merging a resumed guest's memory into huge pages (`GuestRam::collapse_dense`,
/// `KvmMemory::collapse_dense`: `collapse` returns the extents merged) on a thread of its
/// own at the lowest priority, as khugepaged runs, so that the resumed guest keeps the CPUs
/// it needs and the switchover waits for none of it.
pub fn collapse_in_background(collapse: impl FnOnce() -> usize + Send + 'static) {
    let spawned = std::thread::Builder::new().name("thp-collapse".into()).spawn(move || {
        // SAFETY: plain system calls on the calling thread; on Linux a thread id names the
        // thread alone for PRIO_PROCESS. Failure leaves the thread at normal priority.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        let started = std::time::Instant::now();
        let merged = collapse();
        log::info!("guest memory: {merged} extents of 2 MiB merged into huge pages in {:?}", started.elapsed());
    });
    if let Err(err) = spawned {
        log::warn!("guest memory stays on base pages until khugepaged merges it: no thread ({err})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_written_densely_merge_into_huge_pages_and_sparse_ones_stay() {
        // Three 2 MiB extents received on base pages: the first written whole, the second
        // one page, the third not at all.
        let ram = GuestRam::allocate(&[6 << 20], HugePolicy::Never).unwrap();
        ram.advise_huge(false);
        let page = [0xa5u8; PAGE_SIZE_BYTES];
        for number in (0..512).chain([700]) {
            ram.write_page(0, number, &page);
        }
        ram.advise_huge(true);
        match ram.collapse_dense() {
            0 => eprintln!("SKIPPED the merge itself: no MADV_COLLAPSE here (Linux 6.1) or THP off"),
            merged => assert_eq!(merged, 1),
        }
        let mut back = [0u8; PAGE_SIZE_BYTES];
        for number in [0, 511, 700] {
            ram.read_page(0, number, &mut back);
            assert_eq!(back, page, "page {number}");
        }
        ram.read_page(0, 1024, &mut back);
        assert!(back.iter().all(|&b| b == 0));
    }
}
