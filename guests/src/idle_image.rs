//! The idle workload's memory image: what a freshly booted small Linux guest's RAM looks
//! like to a migration (mostly never touched; some code, data and text; some zeroed pages),
//! so that codecs and zero detection meet realistic pages.

use migration::PAGE_SIZE_BYTES;
use rand::rngs::SmallRng;
use rand::Rng;

/// The shares of an idle guest's pages, as seen in a freshly booted small Linux guest:
/// most memory never touched, a few percent code and data, some text (page cache, logs),
/// and pages the kernel zeroed when it allocated them.
const IDLE_BINARY_SHARE: f64 = 0.03;
const IDLE_TEXT_SHARE: f64 = 0.02;
const IDLE_ZEROED_SHARE: f64 = 0.01;
/// Allocations come in clusters, as a booted OS's memory map does.
const IDLE_CLUSTER_PAGES: u64 = 32;

/// Writes an idle, booted-OS-like image over `pages` pages with `write(page, bytes)`: code,
/// data and text in clusters over mostly untouched memory.
pub(crate) fn write_idle_image(pages: u64, rng: &mut SmallRng, mut write: impl FnMut(u64, &[u8])) {
    let mut page = vec![0u8; PAGE_SIZE_BYTES];
    // A contiguous kernel image at 16 MiB (or as much as fits), like a loaded bzImage.
    let kernel_start = (16u64 << 20) / PAGE_SIZE_BYTES as u64;
    let kernel_pages = (pages / 32).min(2048);
    let kernel =
        if kernel_start + kernel_pages <= pages { kernel_start..kernel_start + kernel_pages } else { 0..kernel_pages };
    for flat in kernel.clone() {
        if flat % 5 == 4 {
            fill_text(rng, &mut page);
        } else {
            fill_binary(rng, &mut page);
        }
        write(flat, &page);
    }
    let mut cluster = 0;
    while cluster * IDLE_CLUSTER_PAGES < pages {
        let first = cluster * IDLE_CLUSTER_PAGES;
        cluster += 1;
        if kernel.contains(&first) {
            continue;
        }
        let roll: f64 = rng.gen();
        let kind = if roll < IDLE_BINARY_SHARE {
            0
        } else if roll < IDLE_BINARY_SHARE + IDLE_TEXT_SHARE {
            1
        } else if roll < IDLE_BINARY_SHARE + IDLE_TEXT_SHARE + IDLE_ZEROED_SHARE {
            2
        } else {
            continue;
        };
        for flat in first..(first + IDLE_CLUSTER_PAGES).min(pages) {
            match kind {
                0 => fill_binary(rng, &mut page),
                1 => fill_text(rng, &mut page),
                _ => page.fill(0),
            }
            write(flat, &page);
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "memory",
    "page",
    "device",
    "driver",
    "irq",
    "cpu",
    "init",
    "module",
    "loaded",
    "using",
    "for",
    "with",
    "and",
    "mapped",
    "virtual",
    "address",
    "network",
    "interface",
    "link",
    "up",
    "down",
    "pci",
    "bus",
    "bridge",
    "acpi",
    "table",
    "found",
    "enabled",
    "disabled",
    "clock",
    "source",
    "tsc",
    "hpet",
    "console",
    "serial",
    "tty",
    "block",
    "disk",
    "partition",
    "mount",
    "filesystem",
    "ext4",
    "journal",
    "started",
    "service",
    "systemd",
    "user",
    "session",
    "error",
    "warning",
    "info",
    "debug",
    "return",
    "struct",
    "static",
    "const",
    "unsigned",
    "long",
    "int",
    "void",
    "if",
    "else",
    "while",
    "buffer",
    "size",
    "offset",
    "len",
    "ptr",
    "null",
    "free",
    "alloc",
    "lock",
    "unlock",
];

fn fill_text(rng: &mut SmallRng, page: &mut [u8]) {
    let mut at = 0;
    while at < page.len() {
        let word = if rng.gen_ratio(1, 12) {
            let n: u32 = rng.gen_range(0..100_000);
            format!("{n}")
        } else {
            WORDS[rng.gen_range(0..WORDS.len())].to_string()
        };
        for &b in word.as_bytes().iter().chain(if rng.gen_ratio(1, 10) { b"\n" } else { b" " }) {
            if at < page.len() {
                page[at] = b;
                at += 1;
            }
        }
    }
}

/// Common x86-64 instruction encodings (prologues, moves, calls, compares, nops).
const CODE: &[&[u8]] = &[
    &[0x55],
    &[0x48, 0x89, 0xe5],
    &[0x48, 0x83, 0xec],
    &[0x48, 0x8b, 0x45],
    &[0x48, 0x89, 0x45],
    &[0x8b, 0x45],
    &[0x89, 0x45],
    &[0xe8],
    &[0xc3],
    &[0x5d],
    &[0x48, 0x85, 0xc0],
    &[0x74],
    &[0x75],
    &[0x0f, 0x84],
    &[0x31, 0xc0],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x90],
    &[0x48, 0x8d, 0x3d],
    &[0x41, 0x54],
    &[0x41, 0x5c],
];

fn fill_binary(rng: &mut SmallRng, page: &mut [u8]) {
    let mut at = 0;
    if rng.gen_bool(0.6) {
        // Code: opcodes with small immediates and 32-bit displacements.
        while at < page.len() {
            let op = CODE[rng.gen_range(0..CODE.len())];
            let imm: [u8; 4] =
                if rng.gen_bool(0.3) { rng.gen::<u32>().to_le_bytes() } else { [rng.gen_range(0..64), 0, 0, 0] };
            let imm_len = if op.len() <= 2 { rng.gen_range(0..=4) } else { rng.gen_range(0..=1) };
            for &b in op.iter().chain(&imm[..imm_len]) {
                if at < page.len() {
                    page[at] = b;
                    at += 1;
                }
            }
        }
    } else {
        // Data: kernel pointers, small counters and flags, padding.
        for word in page.chunks_exact_mut(8) {
            let value: u64 = match rng.gen_range(0..4) {
                0 => 0xffff_ffff_8100_0000 + (rng.gen_range(0..1u64 << 24) & !7),
                1 => rng.gen_range(0..256),
                2 => 0,
                _ => 0xffff_8880_0000_0000 + (rng.gen_range(0..1u64 << 30) & !63),
            };
            word.copy_from_slice(&value.to_le_bytes());
        }
    }
}
