//! The bench's model for faster links: each stage's rate on one core, measured here on
//! pages of the guest being benchmarked, and the cores each side would need to keep a 10
//! and a 40 Gbit/s link full at the compression ratio those pages give.

use anyhow::{Context, Result};
use guests::guest::GuestRam;
use guests::synthetic::{SyntheticGuest, WorkloadSpec};
use migration::codec::{Codec, Compressed, PageCompressor, PageDecompressor};
use migration::PAGE_SIZE_BYTES;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pages sampled from the guest.
const SAMPLE_PAGES: usize = 4096;
/// Each stage runs at least this long, for a steady figure.
const MIN_RUN: Duration = Duration::from_millis(300);

#[derive(Serialize, Clone)]
#[serde(rename_all = "kebab-case")]
pub struct StageRate {
    pub stage: String,
    pub side: &'static str,
    /// Bytes of guest memory (page contents) a core gets through per second.
    pub bytes_per_s: f64,
    /// Guest bytes per byte on the wire (1 for stages that do not compress).
    pub ratio: f64,
}

impl StageRate {
    /// Cores this stage needs so a link of `bits_per_s` stays full: the guest bytes it
    /// must handle each second (the link's bytes times the ratio) over one core's rate.
    pub fn cores_for(&self, bits_per_s: f64) -> f64 {
        bits_per_s / 8.0 * self.ratio / self.bytes_per_s
    }
}

/// Non-zero pages of the guest the bench migrates, made the same way at a smaller size.
pub fn sample_pages(workload: &str, image: Option<&std::path::Path>) -> Result<Vec<Vec<u8>>> {
    let zero = vec![0u8; PAGE_SIZE_BYTES];
    if let Some(path) = image {
        // Every non-zero page, then an even spread of them: memory differs along the
        // address space (firmware, kernel text, page cache).
        use std::io::Read;
        let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).context("the idle image")?);
        let mut all = Vec::new();
        let mut page = vec![0u8; PAGE_SIZE_BYTES];
        while file.read_exact(&mut page).is_ok() {
            if page != zero {
                all.push(page.clone());
            }
        }
        let step = (all.len() / SAMPLE_PAGES).max(1);
        return Ok(all.into_iter().step_by(step).take(SAMPLE_PAGES).collect());
    }
    let spec: WorkloadSpec = match workload {
        "idle" => WorkloadSpec::Idle,
        _ => "dirty:32MiB:0:16".parse().map_err(anyhow::Error::msg)?,
    };
    let ram = Arc::new(GuestRam::allocate(&GuestRam::pc_layout(256 << 20), hugepages::HugePolicy::Never)?);
    let mut guest = SyntheticGuest::boot(ram.clone(), spec, 7).map_err(anyhow::Error::msg)?;
    guest.shutdown();
    let mut pages = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE_BYTES];
    for flat in 0..ram.total_pages() {
        let (region, index) = ram.locate(flat);
        use migration::memory::GuestMemory;
        ram.read_page(region, index, &mut page);
        if page != zero {
            pages.push(page.clone());
            if pages.len() == SAMPLE_PAGES {
                break;
            }
        }
    }
    Ok(pages)
}

/// Runs `pass` over the sample until `MIN_RUN` has passed; guest bytes per second.
fn rate(pages: &[Vec<u8>], mut pass: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut passes = 0u64;
    while start.elapsed() < MIN_RUN || passes == 0 {
        pass();
        passes += 1;
    }
    (passes * (pages.len() * PAGE_SIZE_BYTES) as u64) as f64 / start.elapsed().as_secs_f64()
}

/// One core's rate for every stage a page goes through, on `pages`.
pub fn calibrate(pages: &[Vec<u8>]) -> Vec<StageRate> {
    let mut rates = Vec::new();
    let stage = |stage: &str, side, bytes_per_s, ratio| StageRate { stage: stage.into(), side, bytes_per_s, ratio };
    // The scan reads a zero page whole (its worst case) from memory, not cache: 256 MiB of
    // pages, zero but for a number in their last bytes (so none is alike, and a host that
    // merges identical pages cannot serve them all from one).
    let mut memory = vec![0u8; 256 << 20];
    for (index, page) in memory.chunks_exact_mut(PAGE_SIZE_BYTES).enumerate() {
        page[PAGE_SIZE_BYTES - 8..].copy_from_slice(&(index as u64 + 1).to_le_bytes());
    }
    let scan_start = Instant::now();
    let mut scanned = 0usize;
    while scan_start.elapsed() < MIN_RUN || scanned == 0 {
        scanned += memory.chunks_exact(PAGE_SIZE_BYTES).filter(|p| !migration::zero::is_zero(p)).count();
    }
    let scan_rate = (scanned * PAGE_SIZE_BYTES) as f64 / scan_start.elapsed().as_secs_f64();
    drop(memory);
    rates.push(stage("zero-page scan", "source", scan_rate, 1.0));
    let codecs = [
        Codec::Lz4,
        Codec::ShuffleLz4,
        Codec::BitShuffleLz4,
        Codec::Zstd { level: 1 },
        Codec::ShuffleZstd { level: 1 },
        Codec::Zlib { level: 1 },
    ];
    for codec in codecs {
        let mut compressor = PageCompressor::new(codec);
        let packed: Vec<Option<Vec<u8>>> = pages
            .iter()
            .map(|p| match compressor.compress(p) {
                Compressed::Packed { len } => Some(compressor.output()[..len].to_vec()),
                Compressed::Raw => None,
            })
            .collect();
        let wire: usize = packed.iter().map(|p| p.as_ref().map_or(PAGE_SIZE_BYTES, Vec::len)).sum();
        let ratio = (pages.len() * PAGE_SIZE_BYTES) as f64 / wire as f64;
        let compress = rate(pages, || {
            for page in pages {
                std::hint::black_box(compressor.compress(page));
            }
        });
        rates.push(stage(&format!("{codec} compress"), "source", compress, ratio));
        let mut decompressor = PageDecompressor::default();
        let mut page = vec![0u8; PAGE_SIZE_BYTES];
        let decompress = rate(pages, || {
            for (data, original) in packed.iter().zip(pages) {
                match data {
                    Some(data) => decompressor.decompress(codec, data, &mut page).expect("own output decodes"),
                    None => page.copy_from_slice(original),
                }
            }
        });
        rates.push(stage(&format!("{codec} decompress"), "destination", decompress, ratio));
    }
    // XBZRLE against the page's previous version with a few words changed.
    let newer: Vec<Vec<u8>> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut n = p.clone();
            let at = (i * 97) % (PAGE_SIZE_BYTES - 8);
            n[at..at + 8].copy_from_slice(&(i as u64).to_le_bytes());
            n
        })
        .collect();
    let mut delta = vec![0u8; PAGE_SIZE_BYTES - 1];
    rates.push(stage(
        "XBZRLE encode",
        "source",
        rate(pages, || {
            for (old, new) in pages.iter().zip(&newer) {
                std::hint::black_box(migration::xbzrle::encode(old, new, &mut delta).ok());
            }
        }),
        1.0,
    ));
    // Frames are sealed (CRC32C) on the source and checked on the destination.
    let payload: Vec<u8> = pages.iter().take(64).flatten().copied().collect();
    let sealed = rate(&pages[..64.min(pages.len())], || {
        std::hint::black_box(migration::frame::FrameHeader::emit(migration::frame::FrameKind::Pages, 1, 0, &payload));
    });
    rates.push(stage("frame CRC32C", "both", sealed, 1.0));
    rates
}

/// The model's table.
pub fn table(guest: &str, rates: &[StageRate]) -> String {
    // As wide as the longest stage's name ("shuffle-zstd:1 decompress"), so columns line up.
    let width = rates.iter().map(|r| r.stage.len()).max().unwrap_or(0).max("stage".len());
    let mut out = format!(
        "{guest} guest, one core per stage:\n{:<width$} {:<12} {:>12} {:>7} {:>12} {:>12}\n",
        "stage", "side", "GB/s/core", "ratio", "cores 10G", "cores 40G"
    );
    for r in rates {
        out += &format!(
            "{:<width$} {:<12} {:>12.2} {:>7.2} {:>12.2} {:>12.2}\n",
            r.stage,
            r.side,
            r.bytes_per_s / 1e9,
            r.ratio,
            r.cores_for(10e9),
            r.cores_for(40e9)
        );
    }
    out
}
