//! Huge pages back now, not when khugepaged gets there. A destination receives pages on
//! base pages (a scattered page would otherwise fault in and zero a whole 2 MiB), so the
//! guest it resumes runs on base pages; khugepaged, which merges them in the background,
//! scans 4096 pages every 10 s by default: over 20 minutes for 2 GiB, hours for a large
//! guest, all of it with a TLB miss where the source had none.

use crate::{Backing, MappedRegion, HUGE_PAGE_SIZE_BYTES};

/// Base pages in one 2 MiB extent.
const EXTENT_PAGES: usize = HUGE_PAGE_SIZE_BYTES / 4096;

impl MappedRegion {
    /// Merges into one huge page (`MADV_COLLAPSE`, Linux 6.1) each 2 MiB extent of which
    /// at least `min_resident_pages` base pages are in memory, one extent per call, so a
    /// thread writing the memory meanwhile (the resumed guest) waits for at most one
    /// extent's copy. Emptier extents stay as they are: collapsing would back their
    /// unwritten pages too. Contents do not change. Returns the extents merged (an extent
    /// already huge counts); 0 on hugetlb memory, which is huge anyway, or where the kernel
    /// cannot (before 6.1, THP turned off).
    pub fn collapse_dense(&self, min_resident_pages: usize) -> usize {
        if self.backing != Backing::AnonymousThp {
            return 0;
        }
        // SAFETY: our own private anonymous mapping, live while `self` is.
        unsafe { collapse_dense_in(self.ptr.as_ptr(), self.mapped_len_bytes, min_resident_pages) }
    }
}

/// [`MappedRegion::collapse_dense`] over memory someone else mapped (a VMM's guest RAM,
/// vm-memory's mapping): each whole 2 MiB-aligned extent inside `start..start + len`.
///
/// # Safety
///
/// `start..start + len` must be private anonymous memory mapped in this process for as
/// long as the call runs. Others may read and write it meanwhile.
pub unsafe fn collapse_dense_in(start: *mut u8, len: usize, min_resident_pages: usize) -> usize {
    if crate::base_page_size_bytes() != 4096 {
        return 0;
    }
    let mut resident = [0u8; EXTENT_PAGES];
    let mut merged = 0;
    // Whole extents only: a tail shorter than 2 MiB cannot be a huge page.
    let first = (start as usize).next_multiple_of(HUGE_PAGE_SIZE_BYTES);
    let end = start as usize + len;
    for extent in (first..end.saturating_sub(HUGE_PAGE_SIZE_BYTES - 1)).step_by(HUGE_PAGE_SIZE_BYTES) {
        let extent = extent as *mut u8;
        // SAFETY: a whole, aligned 2 MiB extent inside the caller's mapping; `resident`
        // holds one byte per base page in it, as mincore writes; mincore reads page tables.
        if unsafe { libc::mincore(extent.cast(), HUGE_PAGE_SIZE_BYTES, resident.as_mut_ptr()) } != 0
            || count_resident(&resident) < min_resident_pages
        {
            continue;
        }
        // SAFETY: as above. The kernel copies the base pages into a huge page under its
        // own locks, so contents and concurrent raw-pointer accesses are unaffected.
        match unsafe { libc::madvise(extent.cast(), HUGE_PAGE_SIZE_BYTES, libc::MADV_COLLAPSE) } {
            0 => merged += 1,
            // EINVAL: the kernel has no MADV_COLLAPSE, or THP is off: nothing will merge.
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) => return merged,
            // EAGAIN, ENOMEM: no huge page free now; khugepaged may merge it later.
            _ => {}
        }
    }
    merged
}

/// How many of the base pages `mincore` described are in memory.
pub(crate) fn count_resident(flags: &[u8]) -> usize {
    flags.iter().filter(|&&flags| flags & 1 == 1).count()
}

#[cfg(test)]
mod tests {
    use crate::{HugePolicy, MappedRegion, HUGE_PAGE_SIZE_BYTES};

    /// `AnonHugePages` of the mapping that holds `address`, in KiB (the kernel may have
    /// merged it with a neighbour of the same flags: a lower bound on ours, then).
    fn huge_kib_around(address: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            // A mapping's first line starts with its range, `start-end` in hex.
            let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
            if let Some((Ok(start), Ok(end))) =
                range.map(|(s, e)| (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)))
            {
                inside = (start..end).contains(&address);
                continue;
            }
            if inside && line.starts_with("AnonHugePages:") {
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    #[test]
    fn dense_extents_merge_into_huge_pages_and_keep_their_contents() {
        let region = MappedRegion::allocate(4 * HUGE_PAGE_SIZE_BYTES, HugePolicy::Never).unwrap();
        region.advise_huge(false);
        // Extents 0 and 2 written whole, extent 1 one page, extent 3 not at all.
        for page in (0..512).chain(1024..1536) {
            region.write_from(page * 4096 + 8, &(page as u64).to_le_bytes());
        }
        region.write_from(512 * 4096 + 8, b"sparse!!");
        region.advise_huge(true);
        let merged = region.collapse_dense(256);
        if merged == 0 {
            eprintln!("SKIPPED dense_extents_merge_into_huge_pages: no MADV_COLLAPSE here (Linux 6.1) or THP off");
            return;
        }
        assert_eq!(merged, 2);
        assert!(huge_kib_around(region.ptr.as_ptr() as usize) >= 2 * 2048);
        for page in (0..512).chain(1024..1536) {
            assert_eq!(region.read_u64(page * 4096 + 8), page as u64, "page {page}");
        }
        let mut sparse = [0u8; 8];
        region.read_into(512 * 4096 + 8, &mut sparse);
        assert_eq!(&sparse, b"sparse!!");
    }

    #[test]
    fn hugetlb_memory_is_left_alone() {
        let Ok(region) = MappedRegion::allocate(HUGE_PAGE_SIZE_BYTES, HugePolicy::Require) else {
            eprintln!("SKIPPED hugetlb_memory_is_left_alone: no hugetlb pages reserved");
            return;
        };
        region.write_u64(0, 7);
        assert_eq!(region.collapse_dense(1), 0);
        assert_eq!(region.read_u64(0), 7);
    }
}
