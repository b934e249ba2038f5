//! Guest RAM allocation: the one layer of vmigrate that maps memory. It backs guest memory
//! with 2 MiB hugetlbfs pages when the host has them reserved and otherwise falls back to
//! anonymous memory advised for transparent hugepages, and it always reports which backing it
//! got so a benchmark never silently measures the slower one. It knows nothing about pages
//! in the migration sense, dirty logs or the wire; it must not grow policy beyond "which
//! kernel memory, and how to touch it". Linux only.
//!
//! Guest memory is shared with the threads that run the guest, exactly like KVM guest RAM is
//! shared between vCPUs and the VMM. [`MappedRegion`] therefore never hands out Rust
//! references into the mapping: every access is a raw-pointer copy or an atomic word access
//! through `&self`, and a copy racing with a guest write may be torn. The migration layer
//! tolerates that because the dirty log makes it send the page again.

use std::fmt;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

mod collapse;
pub use collapse::collapse_dense_in;

/// Size of the hugetlbfs pages we ask for. 2 MiB rather than 1 GiB because 2 MiB pages can be
/// reserved at runtime on a running host, while 1 GiB pages usually need a boot parameter.
pub const HUGE_PAGE_SIZE_BYTES: usize = 2 << 20;

const NR_HUGEPAGES_PATH: &str = "/proc/sys/vm/nr_hugepages";
const MEMINFO_PATH: &str = "/proc/meminfo";

/// Which kernel memory [`MappedRegion::allocate`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePolicy {
    /// hugetlbfs pages when the kernel can reserve them, else anonymous memory with THP advice.
    Auto,
    /// hugetlbfs pages or an error: for benchmarks that must not measure the fallback.
    Require,
    /// Anonymous memory with THP advice, never hugetlbfs.
    Never,
}

/// The memory a [`MappedRegion`] actually got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `MAP_HUGETLB | MAP_HUGE_2MB`: pinned 2 MiB pages, reserved when the region was mapped.
    HugeTlb2M,
    /// Anonymous memory advised with `MADV_HUGEPAGE`; whether the kernel actually uses huge
    /// pages depends on `/sys/kernel/mm/transparent_hugepage` and fragmentation.
    AnonymousThp,
}

impl Backing {
    /// The name used in logs and benchmark reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Backing::HugeTlb2M => "hugetlb-2M",
            Backing::AnonymousThp => "anonymous-thp",
        }
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why memory could not be allocated or hugepages could not be reserved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("a memory region must not be empty")]
    ZeroLength,
    #[error("a region of {len_bytes} bytes cannot be rounded up to whole 2 MiB pages")]
    LengthOverflow { len_bytes: usize },
    #[error("could not map {len_bytes} bytes of {backing} memory")]
    MapFailed {
        len_bytes: usize,
        backing: Backing,
        #[source]
        source: io::Error,
    },
    #[error(
        "{needed} free 2 MiB hugepages are needed but only {free} are free \
         (reserve more with reserve_hugepages or /proc/sys/vm/nr_hugepages)"
    )]
    HugePagesUnavailable { needed: u64, free: u64 },
    #[error("could not set the hugepage pool to {requested} pages (writing /proc/sys/vm/nr_hugepages needs root)")]
    Reserve {
        requested: u64,
        #[source]
        source: io::Error,
    },
    #[error("could not read the hugepage counters from /proc/meminfo")]
    Status {
        #[source]
        source: io::Error,
    },
    #[error(
        "the default hugepage size is {size_bytes} bytes, not 2 MiB, so nr_hugepages would \
         reserve pages of the wrong size"
    )]
    DefaultSizeMismatch { size_bytes: u64 },
}

/// A private anonymous mapping holding guest memory. Unmapped on drop.
#[derive(Debug)]
pub struct MappedRegion {
    ptr: NonNull<u8>,
    /// What the caller asked for; every access is bounds-checked against this.
    len_bytes: usize,
    /// What was mapped: `len_bytes` rounded up to whole 2 MiB pages, so `munmap` of a hugetlb
    /// mapping gets the aligned length it requires and THP can back the tail too.
    mapped_len_bytes: usize,
    backing: Backing,
}

// SAFETY: the region exclusively owns its mapping until Drop, and it never creates Rust
// references into the mapped memory. All access through `&self` is by raw-pointer copies and
// atomic word operations whose bounds are checked, so moving the owner to another thread or
// sharing it between threads cannot create aliasing `&mut`. Concurrent byte copies may be
// torn; that is the documented contract of guest memory (see the crate docs).
unsafe impl Send for MappedRegion {}
// SAFETY: see `Send` above: shared access never goes through Rust references to the memory.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Maps `len_bytes` of zeroed memory according to `policy`.
    ///
    /// `Auto` first asks for `MAP_HUGETLB` 2 MiB pages (the length rounded up to whole pages)
    /// and falls back to anonymous memory with `madvise(MADV_HUGEPAGE)`. It tries the mapping
    /// instead of reading the free count first because the kernel reserves hugetlb pages at
    /// `mmap` time: a shortage fails there, immediately, and without the race between reading
    /// `/proc/meminfo` and mapping. `Require` returns
    /// [`Error::HugePagesUnavailable`] when the pool is too small. `Never` always uses
    /// anonymous memory.
    pub fn allocate(len_bytes: usize, policy: HugePolicy) -> Result<Self, Error> {
        if len_bytes == 0 {
            return Err(Error::ZeroLength);
        }
        let mapped_len_bytes =
            len_bytes.checked_next_multiple_of(HUGE_PAGE_SIZE_BYTES).ok_or(Error::LengthOverflow { len_bytes })?;
        match policy {
            HugePolicy::Never => Self::map_anonymous(len_bytes, mapped_len_bytes),
            HugePolicy::Auto => match Self::map_hugetlb(len_bytes, mapped_len_bytes) {
                Ok(region) => Ok(region),
                Err(_) => Self::map_anonymous(len_bytes, mapped_len_bytes),
            },
            HugePolicy::Require => Self::map_hugetlb(len_bytes, mapped_len_bytes).map_err(|source| {
                if source.raw_os_error() != Some(libc::ENOMEM) {
                    return Error::MapFailed { len_bytes, backing: Backing::HugeTlb2M, source };
                }
                match hugepage_status() {
                    Ok(status) => Error::HugePagesUnavailable {
                        needed: (mapped_len_bytes / HUGE_PAGE_SIZE_BYTES) as u64,
                        free: status.free,
                    },
                    Err(_) => Error::MapFailed { len_bytes, backing: Backing::HugeTlb2M, source },
                }
            }),
        }
    }

    fn map_hugetlb(len_bytes: usize, mapped_len_bytes: usize) -> io::Result<Self> {
        // No MAP_NORESERVE: we want the kernel to reserve every page now, so a short pool
        // fails here rather than with SIGBUS when the guest first touches a page.
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing cannot
        // overlap memory Rust already owns; the result is checked for MAP_FAILED below.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), mapped_len_bytes, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0)
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(addr.cast()).expect("mmap returned NULL without MAP_FIXED"),
            len_bytes,
            mapped_len_bytes,
            backing: Backing::HugeTlb2M,
        })
    }

    fn map_anonymous(len_bytes: usize, mapped_len_bytes: usize) -> Result<Self, Error> {
        let map_failed = |source| Error::MapFailed { len_bytes, backing: Backing::AnonymousThp, source };
        // THP can only back 2 MiB-aligned virtual ranges, and mmap only promises 4 KiB
        // alignment, so map one extra huge page and trim the unaligned ends.
        let padded_len_bytes =
            mapped_len_bytes.checked_add(HUGE_PAGE_SIZE_BYTES).ok_or(Error::LengthOverflow { len_bytes })?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing cannot
        // overlap memory Rust already owns; the result is checked for MAP_FAILED below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded_len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(map_failed(io::Error::last_os_error()));
        }
        let start = addr as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE_SIZE_BYTES);
        let head_bytes = aligned - start;
        let tail_bytes = padded_len_bytes - head_bytes - mapped_len_bytes;
        // SAFETY: both ranges lie inside the mapping created above (head_bytes and tail_bytes
        // are page multiples that together equal the padding), nothing references them, and
        // unmapping an empty range is skipped because munmap rejects length 0.
        unsafe {
            if head_bytes != 0 {
                libc::munmap(addr, head_bytes);
            }
            if tail_bytes != 0 {
                libc::munmap((aligned + mapped_len_bytes) as *mut libc::c_void, tail_bytes);
            }
        }
        let aligned_ptr = aligned as *mut libc::c_void;
        // SAFETY: advice on our own mapping. Failure (THP compiled out: EINVAL) only costs
        // performance, and the backing is reported either way, so the result is ignored.
        unsafe {
            libc::madvise(aligned_ptr, mapped_len_bytes, libc::MADV_HUGEPAGE);
        }
        Ok(Self {
            ptr: NonNull::new(aligned_ptr.cast()).expect("mmap returned NULL without MAP_FIXED"),
            len_bytes,
            mapped_len_bytes,
            backing: Backing::AnonymousThp,
        })
    }

    /// Asks the kernel for transparent huge pages on this mapping, or not (anonymous
    /// memory only; hugetlb pages are huge regardless). Memory written sparsely is cheaper
    /// without them: each first touch of a 2 MiB huge page zeroes all of it, so a few
    /// scattered pages cost a full huge page each. Turned back on, khugepaged merges the
    /// mapping into huge pages in the background.
    pub fn advise_huge(&self, huge: bool) {
        if self.backing != Backing::AnonymousThp {
            return;
        }
        let advice = if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
        // SAFETY: advice on our own whole mapping (page-aligned start, its mapped length);
        // it changes no contents. Failure (THP compiled out) only costs performance.
        unsafe {
            libc::madvise(self.ptr.as_ptr().cast(), self.mapped_len_bytes, advice);
        }
    }

    /// Length in bytes as requested, not rounded up to whole huge pages.
    pub fn len(&self) -> usize {
        self.len_bytes
    }

    /// Always false: [`MappedRegion::allocate`] refuses empty regions. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Panics with the offending range unless `[offset, offset + len)` lies in the region.
    #[track_caller]
    fn check_range(&self, offset: usize, len: usize) {
        let in_bounds = offset.checked_add(len).is_some_and(|end| end <= self.len_bytes);
        assert!(in_bounds, "range {offset}+{len} is outside the {}-byte region", self.len_bytes);
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`.
    ///
    /// The memory may be written concurrently by guest threads (like KVM guest RAM read by a
    /// VMM): the copy may be torn, and callers rely on the dirty log to re-send. Panics if the
    /// range is out of bounds.
    #[track_caller]
    pub fn read_into(&self, offset: usize, dst: &mut [u8]) {
        self.check_range(offset, dst.len());
        // SAFETY: the source range was bounds-checked against the live mapping, and `dst` is
        // a distinct Rust buffer, so the ranges cannot overlap. A concurrent guest write can
        // tear the copy; that is the documented contract, as for KVM guest RAM.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), dst.as_mut_ptr(), dst.len());
        }
    }

    /// Copies `src` into the region at `offset`. Panics if the range is out of bounds.
    #[track_caller]
    pub fn write_from(&self, offset: usize, src: &[u8]) {
        self.check_range(offset, src.len());
        // SAFETY: the destination range was bounds-checked against the live, writable
        // mapping, and `src` is a Rust buffer outside it. No Rust reference into the mapping
        // exists that this write could invalidate.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len());
        }
    }

    #[track_caller]
    fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4), "u32 offset {offset} is not 4-byte aligned");
        self.check_range(offset, 4);
        // SAFETY: in bounds (checked), 4-byte aligned because the mapping is page-aligned and
        // the offset is a multiple of 4, and valid for the lifetime of `&self`. All other
        // access is by raw-pointer copies, never through a non-atomic Rust reference.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    #[track_caller]
    fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8), "u64 offset {offset} is not 8-byte aligned");
        self.check_range(offset, 8);
        // SAFETY: as in `atomic_u32`, with 8-byte alignment from the page-aligned base.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    /// Reads a native-endian u32 at a 4-aligned `offset` without tearing.
    #[track_caller]
    pub fn read_u32(&self, offset: usize) -> u32 {
        // Relaxed: guest words carry no ordering with other memory; only atomicity matters.
        self.atomic_u32(offset).load(Ordering::Relaxed)
    }

    /// Writes a native-endian u32 at a 4-aligned `offset` without tearing.
    #[track_caller]
    pub fn write_u32(&self, offset: usize, v: u32) {
        self.atomic_u32(offset).store(v, Ordering::Relaxed)
    }

    /// Reads a native-endian u64 at an 8-aligned `offset` without tearing.
    #[track_caller]
    pub fn read_u64(&self, offset: usize) -> u64 {
        self.atomic_u64(offset).load(Ordering::Relaxed)
    }

    /// Writes a native-endian u64 at an 8-aligned `offset` without tearing.
    #[track_caller]
    pub fn write_u64(&self, offset: usize, v: u64) {
        self.atomic_u64(offset).store(v, Ordering::Relaxed)
    }

    /// Returns the range to the kernel (`MADV_DONTNEED`): it reads back as zero. Used to free
    /// received memory after a failed migration and to reset. Panics if out of bounds.
    ///
    /// `madvise` works on whole pages (4 KiB, or 2 MiB for hugetlb) and would zero the
    /// neighbours of a partial page, so only the whole pages inside the range are returned to
    /// the kernel; the partial ends are overwritten with zeros and stay resident.
    #[track_caller]
    pub fn discard(&self, offset: usize, len: usize) {
        self.check_range(offset, len);
        if len == 0 {
            return;
        }
        let page_bytes = match self.backing {
            Backing::HugeTlb2M => HUGE_PAGE_SIZE_BYTES,
            Backing::AnonymousThp => base_page_size_bytes(),
        };
        let end = offset + len;
        // Offsets are relative to a base aligned to at least `page_bytes`, so aligning the
        // offsets aligns the addresses.
        let whole_start = offset.next_multiple_of(page_bytes);
        let whole_end = end / page_bytes * page_bytes;
        if whole_start >= whole_end {
            self.zero(offset, len);
            return;
        }
        // SAFETY: [whole_start, whole_end) is page-aligned and inside our private anonymous
        // mapping (bounds-checked above). MADV_DONTNEED on private anonymous memory makes the
        // pages read back as zero-fill; no Rust reference into them exists.
        let rc = unsafe {
            libc::madvise(self.ptr.as_ptr().add(whole_start).cast(), whole_end - whole_start, libc::MADV_DONTNEED)
        };
        if rc != 0 {
            // Kernels before 5.18 reject MADV_DONTNEED on hugetlb; zeroing keeps the contract
            // at the cost of not freeing the pages.
            self.zero(whole_start, whole_end - whole_start);
        }
        self.zero(offset, whole_start - offset);
        self.zero(whole_end, end - whole_end);
    }

    /// Faults `[offset, offset + len)` in for writing in one call (`MADV_POPULATE_WRITE`,
    /// widened to whole pages) instead of a fault per page at its first store: on this
    /// project's VMs a fault taken from user space costs about as much again as the kernel's
    /// work for the page. Contents do not change (unwritten memory stays zero). Returns
    /// false where the kernel cannot (before 5.14): the stores then fault as before.
    /// Panics if out of bounds.
    #[track_caller]
    pub fn populate_for_write(&self, offset: usize, len: usize) -> bool {
        self.check_range(offset, len);
        if len == 0 {
            return true;
        }
        let page_bytes = match self.backing {
            Backing::HugeTlb2M => HUGE_PAGE_SIZE_BYTES,
            Backing::AnonymousThp => base_page_size_bytes(),
        };
        // Offsets are relative to a base aligned to at least `page_bytes`; the mapping
        // covers whole pages of that size (`mapped_len_bytes`), so widening stays inside it.
        let start = offset / page_bytes * page_bytes;
        let end = (offset + len).next_multiple_of(page_bytes).min(self.mapped_len_bytes);
        // SAFETY: [start, end) is page-aligned and inside our private anonymous mapping;
        // populating it only allocates zero-filled pages where none are, so no contents
        // change under any reader.
        unsafe { libc::madvise(self.ptr.as_ptr().add(start).cast(), end - start, libc::MADV_POPULATE_WRITE) == 0 }
    }

    /// Overwrites an already bounds-checked range with zeros.
    fn zero(&self, offset: usize, len: usize) {
        debug_assert!(offset + len <= self.len_bytes);
        // SAFETY: the callers bounds-checked the range against the live, writable mapping,
        // and no Rust reference into the mapping exists.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), 0, len) }
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: ptr and mapped_len_bytes describe exactly the mapping this value owns
        // (hugepage-aligned for hugetlb, as munmap requires), and `&mut self` proves no other
        // access is in flight.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped_len_bytes) };
        debug_assert_eq!(rc, 0, "munmap failed: {}", io::Error::last_os_error());
    }
}

fn base_page_size_bytes() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// The kernel's pool of default-size hugepages, from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugePageStatus {
    /// Pages in the pool (`HugePages_Total`).
    pub total: u64,
    /// Pages neither mapped nor reserved by a mapping (`HugePages_Free`).
    pub free: u64,
    /// Size of one pool page (`Hugepagesize`).
    pub size_bytes: u64,
}

/// Reads the hugepage pool counters from `/proc/meminfo`.
pub fn hugepage_status() -> io::Result<HugePageStatus> {
    parse_meminfo(&std::fs::read_to_string(MEMINFO_PATH)?)
}

fn parse_meminfo(text: &str) -> io::Result<HugePageStatus> {
    let (mut total, mut free, mut size_bytes) = (None, None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let mut words = value.split_whitespace();
        let number = words.next().and_then(|w| w.parse::<u64>().ok());
        match key.trim() {
            "HugePages_Total" => total = number,
            "HugePages_Free" => free = number,
            "Hugepagesize" => {
                let unit = match words.next() {
                    Some("kB") => 1024,
                    Some("MB") => 1024 * 1024,
                    None => 1,
                    Some(_) => 0,
                };
                size_bytes = number.and_then(|n| n.checked_mul(unit)).filter(|&b| b != 0);
            }
            _ => {}
        }
    }
    match (total, free, size_bytes) {
        (Some(total), Some(free), Some(size_bytes)) => Ok(HugePageStatus { total, free, size_bytes }),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "meminfo lacks HugePages_Total, HugePages_Free or Hugepagesize",
        )),
    }
}

/// Sets the hugepage pool to `count` pages by writing `/proc/sys/vm/nr_hugepages` (needs
/// root) and returns what the kernel actually gave: it grants fewer pages than asked when
/// physical memory is too fragmented, so callers compare `total` with `count`.
pub fn reserve_hugepages(count: u64) -> Result<HugePageStatus, Error> {
    let before = hugepage_status().map_err(|source| Error::Status { source })?;
    // nr_hugepages sizes the default-size pool, while allocate maps 2 MiB pages explicitly.
    if before.size_bytes != HUGE_PAGE_SIZE_BYTES as u64 {
        return Err(Error::DefaultSizeMismatch { size_bytes: before.size_bytes });
    }
    std::fs::write(NR_HUGEPAGES_PATH, count.to_string())
        .map_err(|source| Error::Reserve { requested: count, source })?;
    hugepage_status().map_err(|source| Error::Status { source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const TEST_LEN_BYTES: usize = 3 * HUGE_PAGE_SIZE_BYTES + 12345;

    fn assert_all_zero(region: &MappedRegion, offset: usize, len: usize) {
        let mut buf = vec![0xffu8; len];
        region.read_into(offset, &mut buf);
        if let Some(i) = buf.iter().position(|&b| b != 0) {
            panic!("byte {} is {:#x}, expected 0", offset + i, buf[i]);
        }
    }

    #[test]
    fn backing_names() {
        assert_eq!(Backing::HugeTlb2M.to_string(), "hugetlb-2M");
        assert_eq!(Backing::AnonymousThp.as_str(), "anonymous-thp");
    }

    #[test]
    fn zero_length_is_rejected() {
        assert!(matches!(MappedRegion::allocate(0, HugePolicy::Auto), Err(Error::ZeroLength)));
    }

    #[test]
    fn length_overflow_is_rejected() {
        assert!(matches!(MappedRegion::allocate(usize::MAX - 5, HugePolicy::Never), Err(Error::LengthOverflow { .. })));
    }

    #[test]
    fn never_is_anonymous_zeroed_and_thp_aligned() {
        let region = MappedRegion::allocate(TEST_LEN_BYTES, HugePolicy::Never).unwrap();
        assert_eq!(region.backing(), Backing::AnonymousThp);
        assert_eq!(region.len(), TEST_LEN_BYTES);
        assert!(!region.is_empty());
        assert_eq!(region.ptr.as_ptr() as usize % HUGE_PAGE_SIZE_BYTES, 0);
        assert_all_zero(&region, 0, TEST_LEN_BYTES);
    }

    #[test]
    fn auto_is_zeroed_and_usable() {
        let region = MappedRegion::allocate(1 << 20, HugePolicy::Auto).unwrap();
        println!("auto backing: {}", region.backing());
        assert_all_zero(&region, 0, 1 << 20);
        region.write_u64(8, 0x0123_4567_89ab_cdef);
        assert_eq!(region.read_u64(8), 0x0123_4567_89ab_cdef);
    }

    #[test]
    fn bytes_round_trip_across_page_boundaries() {
        let region = MappedRegion::allocate(TEST_LEN_BYTES, HugePolicy::Never).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        // Unaligned, straddling a 4 KiB and a 2 MiB boundary, and flush with the end.
        for offset in [1, 4090, HUGE_PAGE_SIZE_BYTES - 5000, TEST_LEN_BYTES - data.len()] {
            region.write_from(offset, &data);
            let mut back = vec![0u8; data.len()];
            region.read_into(offset, &mut back);
            assert_eq!(back, data, "offset {offset}");
        }
        region.read_into(TEST_LEN_BYTES, &mut []);
    }

    /// Which of the first `pages` base pages of `region` are resident (`mincore`).
    fn resident(region: &MappedRegion, pages: usize) -> Vec<bool> {
        let mut flags = vec![0u8; pages];
        let len = pages * base_page_size_bytes();
        assert!(len <= region.mapped_len_bytes, "{pages} pages outside the mapping");
        // SAFETY: the first `len` bytes of the region's live mapping (checked above), and
        // `flags` holds one byte per page in them, as mincore writes; it only reads page tables.
        let rc = unsafe { libc::mincore(region.ptr.as_ptr().cast(), len, flags.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        flags.iter().map(|f| f & 1 == 1).collect()
    }

    #[test]
    fn populating_faults_whole_pages_in_and_changes_no_contents() {
        let region = MappedRegion::allocate(64 * 4096, HugePolicy::Never).unwrap();
        region.advise_huge(false);
        region.write_from(9 * 4096 + 7, b"kept");
        // Pages 8 to 11, the range widened to whole pages at both ends.
        if !region.populate_for_write(8 * 4096 + 100, 4 * 4096 - 200) {
            eprintln!("SKIPPED populating_faults_whole_pages_in: no MADV_POPULATE_WRITE here (before 5.14)");
            return;
        }
        let resident = resident(&region, 64);
        assert!(resident[8..12].iter().all(|&r| r), "{resident:?}");
        assert!(!resident[12] && !resident[20] && !resident[7], "{resident:?}");
        let mut back = vec![0u8; 4 * 4096];
        region.read_into(8 * 4096, &mut back);
        assert_eq!(&back[4096 + 7..4096 + 11], b"kept");
        back[4096 + 7..4096 + 11].fill(0);
        assert!(back.iter().all(|&b| b == 0));
        // Flush with the end, and nothing at all.
        assert!(region.populate_for_write(63 * 4096, 4096));
        assert!(region.populate_for_write(5, 0));
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn populating_past_end_panics() {
        let region = MappedRegion::allocate(4096, HugePolicy::Never).unwrap();
        region.populate_for_write(4000, 200);
    }

    #[test]
    fn words_round_trip() {
        let region = MappedRegion::allocate(8192, HugePolicy::Never).unwrap();
        region.write_u32(4, 0xdead_beef);
        region.write_u64(8184, u64::MAX - 1);
        assert_eq!(region.read_u32(4), 0xdead_beef);
        assert_eq!(region.read_u64(8184), u64::MAX - 1);
        assert_eq!(region.read_u32(0), 0);
        let mut bytes = [0u8; 4];
        region.read_into(4, &mut bytes);
        assert_eq!(u32::from_ne_bytes(bytes), 0xdead_beef);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn read_past_end_panics() {
        let region = MappedRegion::allocate(4096, HugePolicy::Never).unwrap();
        region.read_into(4000, &mut [0u8; 97]);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn write_past_end_panics() {
        let region = MappedRegion::allocate(4096, HugePolicy::Never).unwrap();
        region.write_from(4096, &[1]);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn offset_overflow_panics() {
        let region = MappedRegion::allocate(4096, HugePolicy::Never).unwrap();
        region.read_into(usize::MAX, &mut [0u8; 2]);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn word_past_end_panics() {
        let region = MappedRegion::allocate(4096, HugePolicy::Never).unwrap();
        region.read_u64(4096);
    }

    #[test]
    #[should_panic(expected = "aligned")]
    fn misaligned_word_panics() {
        let region = MappedRegion::allocate(4096, HugePolicy::Never).unwrap();
        region.write_u32(2, 1);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn discard_past_end_panics() {
        let region = MappedRegion::allocate(4096, HugePolicy::Never).unwrap();
        region.discard(1, 4096);
    }

    /// Fills the region, discards `[offset, offset + len)`, and checks that exactly that range
    /// reads back as zero: a partial page at either end must not take its neighbours with it.
    fn check_discard(region: &MappedRegion, offset: usize, len: usize) {
        let fill = vec![0xabu8; region.len()];
        region.write_from(0, &fill);
        region.discard(offset, len);
        let mut back = vec![0u8; region.len()];
        region.read_into(0, &mut back);
        for (i, &b) in back.iter().enumerate() {
            let expected = if (offset..offset + len).contains(&i) { 0 } else { 0xab };
            assert_eq!(b, expected, "byte {i} after discard({offset}, {len})");
        }
    }

    #[test]
    fn discard_zeroes_exactly_the_range() {
        let region = MappedRegion::allocate(TEST_LEN_BYTES, HugePolicy::Never).unwrap();
        let page = base_page_size_bytes();
        check_discard(&region, 0, TEST_LEN_BYTES);
        check_discard(&region, 100, 3 * page + 17);
        check_discard(&region, page, 2 * page);
        check_discard(&region, 5, 10);
        check_discard(&region, 0, 0);
        check_discard(&region, TEST_LEN_BYTES - 1, 1);
    }

    #[test]
    fn shared_between_threads() {
        let region = Arc::new(MappedRegion::allocate(1 << 16, HugePolicy::Never).unwrap());
        let writer = {
            let region = Arc::clone(&region);
            std::thread::spawn(move || {
                for i in 0..1000u64 {
                    region.write_u64(((i % 64) * 8) as usize, i);
                }
            })
        };
        let mut buf = [0u8; 512];
        for _ in 0..100 {
            region.read_into(0, &mut buf);
        }
        writer.join().unwrap();
        assert_eq!(region.read_u64((999 % 64) * 8), 999);
    }

    #[test]
    fn meminfo_parses() {
        let text = "MemTotal:       16318596 kB\n\
                    HugePages_Total:      16\n\
                    HugePages_Free:        9\n\
                    HugePages_Rsvd:        0\n\
                    Hugepagesize:       2048 kB\n";
        assert_eq!(parse_meminfo(text).unwrap(), HugePageStatus { total: 16, free: 9, size_bytes: 2 << 20 });
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert!(parse_meminfo("HugePages_Total: x\nHugePages_Free: 0\nHugepagesize: 2048 kB").is_err());
    }

    #[test]
    fn live_status_is_consistent() {
        let status = hugepage_status().unwrap();
        assert!(status.free <= status.total, "{status:?}");
        assert!(status.size_bytes >= 4096, "{status:?}");
    }

    /// Puts the pool back to its size before the test, even if the test panics.
    struct RestorePool(u64);

    impl Drop for RestorePool {
        fn drop(&mut self) {
            if let Err(e) = reserve_hugepages(self.0) {
                eprintln!("could not restore nr_hugepages to {}: {e}", self.0);
            }
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn require_gets_hugetlb() {
        const NEEDED_PAGES: u64 = 3;
        const RESERVE_PAGES: u64 = 8;
        let status = hugepage_status().unwrap();
        let _restore = if status.free >= NEEDED_PAGES && status.size_bytes == HUGE_PAGE_SIZE_BYTES as u64 {
            None
        } else if !is_root() || status.size_bytes != HUGE_PAGE_SIZE_BYTES as u64 {
            println!("SKIPPED: needs root to reserve hugepages");
            return;
        } else {
            let previous = std::fs::read_to_string(NR_HUGEPAGES_PATH).unwrap();
            let restore = RestorePool(previous.trim().parse().unwrap());
            let got = reserve_hugepages(status.total + RESERVE_PAGES).unwrap();
            if got.free < NEEDED_PAGES {
                println!("SKIPPED: the kernel granted only {got:?}");
                return;
            }
            Some(restore)
        };

        // 2.5 pages, so the mapping is rounded up to 3.
        let len_bytes = 2 * HUGE_PAGE_SIZE_BYTES + HUGE_PAGE_SIZE_BYTES / 2;
        let region = MappedRegion::allocate(len_bytes, HugePolicy::Require).unwrap();
        assert_eq!(region.backing(), Backing::HugeTlb2M);
        assert_all_zero(&region, 0, len_bytes);
        region.write_u32(len_bytes - 4, 7);
        assert_eq!(region.read_u32(len_bytes - 4), 7);
        // Partial huge pages at both ends, one whole huge page in the middle.
        check_discard(&region, 4096, HUGE_PAGE_SIZE_BYTES * 2);
        check_discard(&region, 0, len_bytes);

        // Surplus pages would let an oversized mapping succeed.
        let no_overcommit =
            std::fs::read_to_string("/proc/sys/vm/nr_overcommit_hugepages").map(|s| s.trim() == "0").unwrap_or(false);
        if no_overcommit {
            let too_big = (hugepage_status().unwrap().total as usize + 1) * HUGE_PAGE_SIZE_BYTES;
            match MappedRegion::allocate(too_big, HugePolicy::Require) {
                Err(Error::HugePagesUnavailable { needed, free }) => assert!(needed > free),
                other => panic!("expected HugePagesUnavailable, got {other:?}"),
            }
        }
        drop(region);
    }
}
