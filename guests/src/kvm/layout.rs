//! Where things live in the KVM guest's physical memory, and what the VMM writes there
//! before the first run: the configuration block the guest program reads, its page tables
//! (every address mapped to itself with 2 MiB pages), its GDT and its code.
//!
//! ```text
//! 0x0000_0500  configuration block (offsets below; asm/kvm_guest.S reads the same)
//! 0x0000_1000  GDT
//! 0x0000_4000  stack (grows down from 0x8000)
//! 0x0010_0000  the guest program
//! 0x0020_0000  PML4          0x0020_1000  PDPT
//! 0x0020_2000  page directories, one per GiB mapped
//! 0x0040_0000  the workload's area, to the end of RAM (skipping the hole below 4 GiB)
//! ```
//!
//! The page tables have a 2 MiB page of their own. Where KVM shadows the guest's page
//! tables (this machine's PVM does), it write-protects them, and a large page that holds
//! one is not mapped writable: every store the guest made to its stack or its counters in
//! the same 2 MiB was emulated, about 10 µs each (76 pages a second for the dirtier).
//!
//! RAM follows the PC's split (as `GuestRam::pc_layout`): up to 2 GiB at address 0, the rest
//! from 4 GiB up, so that the hole below 4 GiB holds the local APIC as on real hardware.

use crate::guest::LOW_MEMORY_BYTES;
use migration::PAGE_SIZE_BYTES;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const CONFIG: u64 = 0x500;
pub const GDT: u64 = 0x1000;
pub const STACK_TOP: u64 = 0x1f_0000;
pub const PROGRAM: u64 = 0x10_0000;
pub const PML4: u64 = 0x20_0000;
pub const PDPT: u64 = 0x20_1000;
pub const PAGE_DIRECTORIES: u64 = 0x20_2000;
/// The first page of the workload's area (4 MiB).
pub const AREA_FIRST_PAGE: u64 = AREA_START / PAGE_SIZE_BYTES as u64;
const AREA_START: u64 = 0x40_0000;
pub use crate::guest::HIGH_MEMORY_START;
/// The page directories fill the rest of their 2 MiB page: 510 of them, 510 GiB mapped.
const MAX_MAPPED_GIB: u64 = (AREA_START - PAGE_DIRECTORIES) / 0x1000;
/// The smallest guest: the program, the tables and one page of area.
pub const MIN_MEMORY_BYTES: u64 = AREA_START + PAGE_SIZE_BYTES as u64;
/// The largest guest the page directories can map (the hole included).
pub const MAX_MEMORY_BYTES: u64 = (MAX_MAPPED_GIB << 30) - (HIGH_MEMORY_START - LOW_MEMORY_BYTES);

/// The configuration block's fields: offsets from `CONFIG`, as in asm/kvm_guest.S.
pub mod config {
    pub const MAGIC: u64 = 0x00;
    pub const KIND: u64 = 0x08;
    pub const AREA_FIRST: u64 = 0x10;
    pub const AREA_PAGES: u64 = 0x18;
    pub const LOW_PAGES: u64 = 0x20;
    pub const HOLE_PAGES: u64 = 0x28;
    pub const TSC_PER_PAGE: u64 = 0x30;
    pub const WORD_MASK: u64 = 0x38;
    pub const SEED: u64 = 0x40;
    pub const CHECK_REQUESTS: u64 = 0x48;
    /// Written by the guest only (the VMM waits for the serial line instead).
    #[allow(dead_code)]
    pub const CHECKS_DONE: u64 = 0x50;
    pub const WRITES: u64 = 0x58;
    pub const TICKS: u64 = 0x60;
    pub const SUM: u64 = 0x68;
    /// "vmigKVM1": lets a destination tell a KVM guest's memory from anything else.
    pub const MAGIC_VALUE: u64 = u64::from_le_bytes(*b"vmigKVM1");
}

/// The code and data segment selectors: kernel (GDT entries 1 and 2) and user (3 and 4,
/// with their privilege level in the low bits).
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const USER_CODE_SELECTOR: u16 = 0x18 | 3;
pub const USER_DATA_SELECTOR: u16 = 0x20 | 3;
/// The task register's selector (only its hidden part is used).
pub const TSS_SELECTOR: u16 = 0x28;
/// Flat 64-bit code and flat data at privilege 0 and 3: what the GDT holds and the vCPU's
/// hidden parts mirror.
const GDT_ENTRIES: [u64; 5] =
    [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff];
/// Where the guest writes its serial output: a page in the hole below 4 GiB that no slot
/// backs, so each store exits to the VMM (asm/kvm_guest.S, SERIAL_MMIO).
pub const SERIAL_MMIO: u64 = 0xd000_0000;

/// RAM's regions: (guest-physical start, bytes).
pub fn regions(total_bytes: u64) -> Vec<(u64, u64)> {
    if total_bytes > LOW_MEMORY_BYTES {
        vec![(0, LOW_MEMORY_BYTES), (HIGH_MEMORY_START, total_bytes - LOW_MEMORY_BYTES)]
    } else {
        vec![(0, total_bytes)]
    }
}

/// Checks that a source's layout, (guest-physical start, bytes) per region, is this
/// VMM's for its size, and returns it.
pub fn regions_for(layout: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, String> {
    let total: u64 = layout.iter().map(|&(_, bytes)| bytes).sum();
    let expected = regions(total);
    if expected != layout {
        let shown: Vec<String> = layout.iter().map(|&(at, bytes)| format!("{bytes} bytes at {at:#x}")).collect();
        return Err(format!(
            "memory layout [{}] is not a KVM guest's (up to {LOW_MEMORY_BYTES} bytes at 0, the rest at 4 GiB)",
            shown.join(", ")
        ));
    }
    check_size(total)?;
    Ok(expected)
}

/// Whether a guest of `total_bytes` fits this layout.
pub fn check_size(total_bytes: u64) -> Result<(), String> {
    if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&total_bytes) {
        return Err(format!(
            "a KVM guest needs {MIN_MEMORY_BYTES} to {MAX_MEMORY_BYTES} bytes of memory, not {total_bytes}"
        ));
    }
    if !total_bytes.is_multiple_of(PAGE_SIZE_BYTES as u64) {
        return Err(format!("guest memory must be whole pages, not {total_bytes} bytes"));
    }
    Ok(())
}

/// The workloads, as `config::KIND` names them.
pub const KIND_IDLE: u64 = 0;
pub const KIND_SWEEP: u64 = 1;
pub const KIND_DIRTY: u64 = 2;

/// What the guest program runs, as the configuration block states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramConfig {
    pub kind: u64,
    pub area_pages: u64,
    pub tsc_per_page: u64,
    pub word_mask: u32,
    pub seed: u64,
}

/// Writes everything the guest needs before its first instruction; returns the pages
/// written, as (region, page) pairs (the VMM's own writes, which KVM's dirty log never sees).
pub fn write_boot_memory(
    memory: &GuestMemoryMmap,
    total_bytes: u64,
    program: &[u8],
    config: ProgramConfig,
) -> Result<Vec<u64>, String> {
    let top = regions(total_bytes).last().map(|&(start, bytes)| start + bytes).unwrap_or(0);
    // The local APIC's page sits below 4 GiB: map at least that far.
    let mapped_gib = top.max(HIGH_MEMORY_START).div_ceil(1 << 30);
    let mut written = Vec::new();
    let mut write = |address: u64, bytes: &[u8]| -> Result<(), String> {
        memory
            .write_slice(bytes, GuestAddress(address))
            .map_err(|e| format!("writing the guest's boot memory at {address:#x}: {e}"))?;
        let first = address / PAGE_SIZE_BYTES as u64;
        let last = (address + bytes.len() as u64 - 1) / PAGE_SIZE_BYTES as u64;
        written.extend(first..=last);
        Ok(())
    };
    // Present, writable, user (the workloads run at CPL 3); 2 MiB pages.
    write(PML4, &(PDPT | 0b111).to_le_bytes())?;
    for gib in 0..mapped_gib {
        let directory = PAGE_DIRECTORIES + gib * 0x1000;
        write(PDPT + gib * 8, &(directory | 0b111).to_le_bytes())?;
        let entries: Vec<u8> =
            (0..512u64).flat_map(|entry| (((gib << 30) + (entry << 21)) | 0x87).to_le_bytes()).collect();
        write(directory, &entries)?;
    }
    let gdt: Vec<u8> = GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect();
    write(GDT, &gdt)?;
    write(PROGRAM, program)?;
    let low_pages = total_bytes.min(LOW_MEMORY_BYTES) / PAGE_SIZE_BYTES as u64;
    let fields = [
        (config::MAGIC, config::MAGIC_VALUE),
        (config::KIND, config.kind),
        (config::AREA_FIRST, AREA_FIRST_PAGE),
        (config::AREA_PAGES, config.area_pages),
        (config::LOW_PAGES, low_pages),
        (config::HOLE_PAGES, (HIGH_MEMORY_START - LOW_MEMORY_BYTES) / PAGE_SIZE_BYTES as u64),
        (config::TSC_PER_PAGE, config.tsc_per_page),
        (config::WORD_MASK, u64::from(config.word_mask)),
        (config::SEED, config.seed),
    ];
    for (offset, value) in fields {
        write(CONFIG + offset, &value.to_le_bytes())?;
    }
    written.sort_unstable();
    written.dedup();
    Ok(written)
}

/// Fills the dirtier's area with random numbers under `word_mask`, each page's word 0
/// the XOR of its other words and the configuration's sum the XOR of those, as the guest
/// program keeps them (asm/kvm_guest.S, "dirty"). Returns the pages written (flat
/// numbers). The VMM does it because it is the guest's initial image: the guest would
/// take seconds where KVM emulates it.
pub fn fill_dirty_area(
    memory: &GuestMemoryMmap,
    total_bytes: u64,
    area_pages: u64,
    word_mask: u32,
    seed: u64,
) -> Result<Vec<u64>, String> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut page = vec![0u8; PAGE_SIZE_BYTES];
    let mut area_sum = 0u32;
    let mut written = Vec::with_capacity(area_pages as usize);
    for index in 0..area_pages {
        let mut page_sum = 0u32;
        for word in page.chunks_exact_mut(4).skip(1) {
            let value = rng.gen::<u32>() & word_mask;
            page_sum ^= value;
            word.copy_from_slice(&value.to_le_bytes());
        }
        page[..4].copy_from_slice(&page_sum.to_le_bytes());
        area_sum ^= page_sum;
        written.push(write_area_page(memory, total_bytes, index, &page)?);
    }
    memory
        .write_obj(u64::from(area_sum), GuestAddress(CONFIG + config::SUM))
        .map_err(|e| format!("writing the area's sum: {e}"))?;
    Ok(written)
}

/// Writes page `index` of the workload's area (a VMM's write, before boot).
pub fn write_area_page(memory: &GuestMemoryMmap, total_bytes: u64, index: u64, bytes: &[u8]) -> Result<u64, String> {
    let low_pages = total_bytes.min(LOW_MEMORY_BYTES) / PAGE_SIZE_BYTES as u64;
    let hole_pages = (HIGH_MEMORY_START - LOW_MEMORY_BYTES) / PAGE_SIZE_BYTES as u64;
    let flat = AREA_FIRST_PAGE + index;
    let physical = if flat < low_pages { flat } else { flat + hole_pages };
    memory
        .write_slice(bytes, GuestAddress(physical * PAGE_SIZE_BYTES as u64))
        .map_err(|e| format!("writing the guest's initial image: {e}"))?;
    Ok(flat)
}

/// The most pages the workload's area can have in a guest of `total_bytes`.
pub fn max_area_pages(total_bytes: u64) -> u64 {
    (total_bytes / PAGE_SIZE_BYTES as u64).saturating_sub(AREA_FIRST_PAGE)
}

/// A configuration field's guest-physical address.
pub fn config_field(offset: u64) -> GuestAddress {
    GuestAddress(CONFIG + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_have_one_region_and_large_ones_skip_the_hole() {
        assert_eq!(regions(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(regions(6 << 30), vec![(0, 2 << 30), (4 << 30, 4 << 30)]);
        assert_eq!(regions_for(&[(0, 2 << 30), (4 << 30, 4 << 30)]).unwrap(), regions(6 << 30));
        assert!(regions_for(&[(0, 1 << 30), (4 << 30, 1 << 30)]).is_err(), "a split other than the PC's");
        assert!(regions_for(&[(0, 2 << 30), (8 << 30, 1 << 30)]).is_err(), "high memory elsewhere");
        assert!(check_size(4 << 20).is_err(), "too small for the program and tables");
        assert!(check_size(MAX_MEMORY_BYTES + (1 << 30)).is_err());
    }

    #[test]
    fn boot_memory_maps_every_address_to_itself() {
        let total = 8 << 20;
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), total as usize)]).unwrap();
        let config = ProgramConfig { kind: 1, area_pages: 16, tsc_per_page: 0, word_mask: !0, seed: 7 };
        let written = write_boot_memory(&memory, total, &[0xf4], config).unwrap();
        assert!(written.contains(&(PROGRAM / 4096)) && written.contains(&0) && written.contains(&(PML4 / 4096)));
        let entry = |address: u64| memory.read_obj::<u64>(GuestAddress(address)).unwrap();
        assert_eq!(entry(PML4), PDPT | 7);
        // Four GiB mapped (the APIC's page), each 2 MiB page onto itself.
        assert_eq!(entry(PDPT + 3 * 8), (PAGE_DIRECTORIES + 3 * 0x1000) | 7);
        assert_eq!(entry(PAGE_DIRECTORIES + 3 * 0x1000 + 511 * 8), ((3 << 30) + (511 << 21)) | 0x87);
        assert_eq!(entry(CONFIG + config::MAGIC), config::MAGIC_VALUE);
        assert_eq!(entry(CONFIG + config::AREA_PAGES), 16);
    }

    #[test]
    fn the_dirty_area_starts_with_its_sums_right() {
        let total = 8 << 20;
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), total as usize)]).unwrap();
        let written = fill_dirty_area(&memory, total, 8, 0xffff, 5).unwrap();
        assert_eq!(written, (AREA_FIRST_PAGE..AREA_FIRST_PAGE + 8).collect::<Vec<_>>());
        let mut area_sum = 0u32;
        for page in written {
            let mut words = [0u32; 1024];
            for (index, word) in words.iter_mut().enumerate() {
                *word = memory.read_obj(GuestAddress(page * 4096 + index as u64 * 4)).unwrap();
            }
            assert_eq!(words[0], words[1..].iter().fold(0, |sum, w| sum ^ w), "page {page}'s own sum");
            assert!(words[1..].iter().all(|&w| w <= 0xffff), "16-bit numbers");
            area_sum ^= words[0];
        }
        assert_eq!(memory.read_obj::<u64>(GuestAddress(CONFIG + config::SUM)).unwrap(), u64::from(area_sum));
    }
}
