//! Micro-benchmarks of the hot paths, each beside its baseline in the same run (the
//! machines are shared and noisy, so only ratios within one run mean much). Groups, and
//! the ratio `scripts/micro-bench` takes from each:
//!
//! - `zero_scan`: our SIMD zero-page check against a plain read of the same zero pages
//!   (memory bandwidth), page by page as the scanner calls it;
//! - `lz4_compress`, `lz4_decompress`: lz4_flex (ours) against the reference C LZ4;
//! - `deflate_level1`: the two Rust deflate engines flate2 can sit on, miniz_oxide (our
//!   build's) and zlib-rs, and our `PageCompressor` over flate2;
//! - `page_codecs`: lz4, zstd:1, zlib:1, shuffle-zstd:1 on the CPU and deflate on DPDK's
//!   ISA-L device, over the same idle and dirty pages: rate per core, and ratio;
//! - `xbzrle`: encoding and decoding a page against its previous version;
//! - `ring_handoff`: one item through a bounded ring between two threads;
//! - `compression_workers`: lz4 over the same pages with 1 and 2 worker threads;
//! - `frame_building`: batches of raw and of lz4 pages put into a frame through a scratch
//!   buffer (the copy the source used to make) and in place;
//! - `loopback_wire`: one TCP stream through two dataplane cores (one per side) joined by
//!   the in-process wire.
//!
//! Guest-like pages: the non-zero pages of the synthetic `idle` guest (text, binaries and
//! tables, as a booted OS holds them).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use migration::codec::{Codec, PageCompressor};
use migration::memory::GuestMemory;
use migration::PAGE_SIZE_BYTES;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Non-zero pages of a booted synthetic idle guest.
fn guest_pages(count: usize) -> Vec<Vec<u8>> {
    workload_pages(guests::synthetic::WorkloadSpec::Idle, count)
}

/// Non-zero pages of a synthetic guest booted with `workload`.
fn workload_pages(workload: guests::synthetic::WorkloadSpec, count: usize) -> Vec<Vec<u8>> {
    use guests::guest::GuestRam;
    use guests::synthetic::SyntheticGuest;
    let ram = Arc::new(GuestRam::allocate(&GuestRam::pc_layout(256 << 20), hugepages::HugePolicy::Never).unwrap());
    let mut guest = SyntheticGuest::boot(ram.clone(), workload, 7).unwrap();
    let mut pages = Vec::with_capacity(count);
    let mut page = vec![0u8; PAGE_SIZE_BYTES];
    'regions: for (region, bytes) in ram.region_bytes().into_iter().enumerate() {
        for index in 0..bytes / PAGE_SIZE_BYTES as u64 {
            ram.read_page(region, index, &mut page);
            if !migration::zero::is_zero(&page) {
                pages.push(page.clone());
                if pages.len() == count {
                    break 'regions;
                }
            }
        }
    }
    guest.shutdown();
    assert!(pages.len() == count, "the idle guest has only {} non-zero pages", pages.len());
    pages
}

const PAGES: usize = 2048;

fn zero_scan(c: &mut Criterion) {
    // 512 MiB, past the caches, so both read from memory. Every page is zero but for its
    // last 8 bytes, which number it: the check must read it all, and no two pages are
    // alike (a hypervisor that merges identical pages would serve them all from one page
    // in cache: all-zero pages read at 98 GB/s here).
    let mut memory = vec![0u8; 512 << 20];
    for (index, page) in memory.chunks_exact_mut(PAGE_SIZE_BYTES).enumerate() {
        page[PAGE_SIZE_BYTES - 8..].copy_from_slice(&(index as u64 + 1).to_le_bytes());
    }
    let mut group = c.benchmark_group("zero_scan");
    group.throughput(Throughput::Bytes(memory.len() as u64));
    group.bench_function("read", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for page in memory.chunks_exact(PAGE_SIZE_BYTES) {
                for word in page.chunks_exact(8) {
                    acc |= u64::from_ne_bytes(word.try_into().unwrap());
                }
            }
            black_box(acc)
        })
    });
    group.bench_function("is_zero", |b| {
        b.iter(|| memory.chunks_exact(PAGE_SIZE_BYTES).filter(|p| migration::zero::is_zero(black_box(p))).count())
    });
    group.finish();
}

fn lz4(c: &mut Criterion) {
    let pages = guest_pages(PAGES);
    let bytes = (PAGES * PAGE_SIZE_BYTES) as u64;
    let bound = lz4_flex::block::get_maximum_output_size(PAGE_SIZE_BYTES);
    let mut out = vec![0u8; bound];
    let mut group = c.benchmark_group("lz4_compress");
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("c_lz4", |b| {
        b.iter(|| {
            let mut total = 0;
            for page in &pages {
                total += lz4::block::compress_to_buffer(page, None, false, &mut out).unwrap();
            }
            total
        })
    });
    group.bench_function("lz4_flex", |b| {
        b.iter(|| pages.iter().map(|page| lz4_flex::block::compress_into(page, &mut out).unwrap()).sum::<usize>())
    });
    group.finish();

    let packed: Vec<Vec<u8>> = pages.iter().map(|p| lz4_flex::block::compress(p)).collect();
    let mut page = vec![0u8; PAGE_SIZE_BYTES];
    let mut group = c.benchmark_group("lz4_decompress");
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("c_lz4", |b| {
        b.iter(|| {
            for p in &packed {
                lz4::block::decompress_to_buffer(p, Some(PAGE_SIZE_BYTES as i32), &mut page).unwrap();
            }
        })
    });
    group.bench_function("lz4_flex", |b| {
        b.iter(|| {
            for p in &packed {
                lz4_flex::block::decompress_into(p, &mut page).unwrap();
            }
        })
    });
    group.finish();
}

fn deflate(c: &mut Criterion) {
    let pages = guest_pages(PAGES);
    let mut group = c.benchmark_group("deflate_level1");
    group.throughput(Throughput::Bytes((PAGES * PAGE_SIZE_BYTES) as u64));
    let mut out = vec![0u8; 2 * PAGE_SIZE_BYTES];
    group.bench_function("miniz_oxide", |b| {
        use miniz_oxide::deflate::core::{compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush};
        // Raw deflate (no zlib header), level 1, as our codec sends it.
        let mut state = CompressorOxide::new(create_comp_flags_from_zip_params(1, -15, 0));
        b.iter(|| {
            let mut total = 0;
            for page in &pages {
                state.reset();
                let (_, _, written) = compress(&mut state, page, &mut out, TDEFLFlush::Finish);
                total += written;
            }
            total
        })
    });
    group.bench_function("zlib_rs", |b| {
        let mut state = zlib_rs::Deflate::new(1, false, 15);
        b.iter(|| {
            let mut total = 0;
            for page in &pages {
                state.reset();
                let before = state.total_out();
                state.compress(page, &mut out, zlib_rs::DeflateFlush::Finish).unwrap();
                total += state.total_out() - before;
            }
            total
        })
    });
    group.bench_function("page_compressor", |b| {
        let mut compressor = PageCompressor::new(Codec::Zlib { level: 1 });
        b.iter(|| {
            pages
                .iter()
                .map(|page| compressor.compress(page))
                .filter(|c| !matches!(c, migration::codec::Compressed::Raw))
                .count()
        })
    });
    group.finish();
}

/// Each codec's compression over the same pages, one page at a time on one core as a
/// worker runs it, on three page sets: the idle guest's, and the dirty guest's numbers (16
/// random bits in each 32-bit word: at most 2x; and 12 bits: at most 2.67x). `deflate` runs on DPDK's ISA-L device
/// (where the bench is built with `--features dpdk` and the EAL starts: root), its pages
/// handed over 64 at a time as a worker's batch is, in blocks of the device's pages per
/// operation. Each codec's ratio on each set goes to
/// `target/criterion/page_codecs/ratios.json` for `scripts/micro-bench`.
fn page_codecs(c: &mut Criterion) {
    use guests::synthetic::WorkloadSpec;
    let sets = [
        ("idle", guest_pages(PAGES)),
        ("dirty", workload_pages(WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 1, bits: 16 }, PAGES)),
        ("dirty12", workload_pages(WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 1, bits: 12 }, PAGES)),
    ];
    let mut ratios = serde_json::Map::new();
    let mut group = c.benchmark_group("page_codecs");
    group.throughput(Throughput::Bytes((PAGES * PAGE_SIZE_BYTES) as u64));
    for (set, pages) in &sets {
        let codecs = [
            Codec::Lz4,
            Codec::Zstd { level: 1 },
            Codec::Zlib { level: 1 },
            Codec::ShuffleLz4,
            Codec::ShuffleZstd { level: 1 },
            Codec::BitShuffleLz4,
        ];
        for codec in codecs {
            let mut compressor = PageCompressor::new(codec);
            let wire = |compressor: &mut PageCompressor| -> usize {
                pages
                    .iter()
                    .map(|page| match compressor.compress(page) {
                        migration::codec::Compressed::Packed { len } => len,
                        migration::codec::Compressed::Raw => PAGE_SIZE_BYTES,
                    })
                    .sum()
            };
            let ratio = (PAGES * PAGE_SIZE_BYTES) as f64 / wire(&mut compressor) as f64;
            ratios.insert(format!("{set}/{}", codec.name()), ratio.into());
            group.bench_function(format!("{set}/{}", codec.name()), |b| b.iter(|| wire(&mut compressor)));
        }
        // The same codecs over blocks of pages that travel together (a batch's pages in
        // groups of BLOCK), as the engine sends zstd's: matches and entropy tables carry
        // across pages.
        const BLOCK: usize = migration::page_batch::MAX_BLOCK_PAGES;
        let contents: Vec<u8> = pages.concat();
        for codec in [Codec::Lz4, Codec::Zstd { level: 1 }, Codec::ShuffleZstd { level: 1 }] {
            let mut block = migration::codec::BlockCompressor::new(codec);
            let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(BLOCK * PAGE_SIZE_BYTES)];
            let mut wire = || -> usize {
                contents
                    .chunks(BLOCK * PAGE_SIZE_BYTES)
                    .map(|input| block.compress_into(input, &mut out).unwrap_or(input.len()).min(input.len()))
                    .sum()
            };
            let ratio = (PAGES * PAGE_SIZE_BYTES) as f64 / wire() as f64;
            let name = format!("{set}/{}/block{BLOCK}", codec.name());
            ratios.insert(name.clone(), ratio.into());
            group.bench_function(name, |b| b.iter(&mut wire));
        }
        if let Some(mut device) = offload::isal_queue() {
            // A worker's batch of 64 pages, in blocks of the device's pages per operation.
            let per_block = device.pages_per_operation();
            let contents: Vec<u8> = pages.concat();
            let blocks: Vec<(&[u8], usize)> = contents
                .chunks(per_block * PAGE_SIZE_BYTES)
                .map(|block| (block, migration::page_batch::block_room(block.len() / PAGE_SIZE_BYTES)))
                .collect();
            let wire = |device: &mut Box<dyn engine::offload::OffloadQueue>| -> usize {
                let mut total = 0;
                for batch in blocks.chunks(64 / per_block) {
                    device.compress_pages(batch, &mut |index, outcome| {
                        total += match outcome {
                            engine::offload::Offloaded::Packed(bytes) => bytes.len(),
                            _ => batch[index].0.len(),
                        }
                    });
                }
                total
            };
            let ratio = (PAGES * PAGE_SIZE_BYTES) as f64 / wire(&mut device) as f64;
            ratios.insert(format!("{set}/deflate"), ratio.into());
            group.bench_function(format!("{set}/deflate"), |b| b.iter(|| wire(&mut device)));
        }
    }
    group.finish();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../criterion/page_codecs");
    std::fs::create_dir_all(&path).expect("criterion's directory");
    std::fs::write(path.join("ratios.json"), serde_json::Value::Object(ratios).to_string()).expect("ratios.json");
}

/// DPDK's ISA-L compression device, for the `deflate` rows.
mod offload {
    use engine::offload::OffloadQueue;

    #[cfg(feature = "dpdk")]
    pub fn isal_queue() -> Option<Box<dyn OffloadQueue>> {
        use engine::offload::OffloadDevice;
        let prefix = format!("--file-prefix=vmigrate-bench-{}", std::process::id());
        let args = ["--no-huge", "-m", "256", "--no-pci", "--no-shconf", "-l", "0", "--log-level=error", &prefix];
        let args: Vec<&str> = args.into_iter().chain(["--vdev", "compress_isal0"]).collect();
        static EAL: std::sync::OnceLock<Option<dpdk::Eal>> = std::sync::OnceLock::new();
        let Some(eal) = EAL.get_or_init(|| dpdk::Eal::init(&args).map_err(|e| eprintln!("no deflate rows: {e}")).ok())
        else {
            return None;
        };
        let device = engine::offload::dpdk::DpdkDevice::new(eal, "compress_isal0").ok()?;
        device.open(1).ok()?.pop()
    }

    #[cfg(not(feature = "dpdk"))]
    pub fn isal_queue() -> Option<Box<dyn OffloadQueue>> {
        eprintln!("no deflate rows: the bench was built without --features dpdk");
        None
    }
}

fn xbzrle(c: &mut Criterion) {
    let pages = guest_pages(256);
    // Each page's next version: a few words changed, as a running guest rewrites counters.
    let newer: Vec<Vec<u8>> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut n = p.clone();
            for k in 0..8 {
                let at = (i * 97 + k * 509) % (PAGE_SIZE_BYTES - 8);
                n[at..at + 8].copy_from_slice(&(i as u64 * 31 + k as u64).to_le_bytes());
            }
            n
        })
        .collect();
    let mut delta = vec![0u8; PAGE_SIZE_BYTES];
    let deltas: Vec<Vec<u8>> = pages
        .iter()
        .zip(&newer)
        .map(|(old, new)| {
            let len = migration::xbzrle::encode(old, new, &mut delta).unwrap();
            delta[..len].to_vec()
        })
        .collect();
    let mut group = c.benchmark_group("xbzrle");
    group.throughput(Throughput::Bytes((pages.len() * PAGE_SIZE_BYTES) as u64));
    group.bench_function("encode", |b| {
        b.iter(|| {
            pages
                .iter()
                .zip(&newer)
                .map(|(old, new)| migration::xbzrle::encode(old, new, &mut delta).unwrap())
                .sum::<usize>()
        })
    });
    let mut page = vec![0u8; PAGE_SIZE_BYTES];
    group.bench_function("decode", |b| {
        b.iter(|| {
            for (old, d) in pages.iter().zip(&deltas) {
                page.copy_from_slice(old);
                migration::xbzrle::decode(d, &mut page).unwrap();
            }
        })
    });
    group.finish();
}

fn ring_handoff(c: &mut Criterion) {
    use transport::abort::SessionAbort;
    use transport::ring::Ring;
    let mut group = c.benchmark_group("ring_handoff");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bounded_ring_256", |b| {
        b.iter_custom(|items| {
            let ring = Arc::new(Ring::<u64>::new(256));
            let abort = Arc::new(SessionAbort::new());
            let consumer = {
                let (ring, abort) = (ring.clone(), abort.clone());
                std::thread::spawn(move || {
                    let mut sum = 0u64;
                    for _ in 0..items {
                        sum = sum.wrapping_add(ring.pop(&abort).unwrap());
                    }
                    sum
                })
            };
            let start = Instant::now();
            for i in 0..items {
                ring.push(i, &abort).unwrap();
            }
            black_box(consumer.join().unwrap());
            start.elapsed()
        })
    });
    group.finish();
}

fn compression_workers(c: &mut Criterion) {
    let pages = guest_pages(PAGES);
    let mut group = c.benchmark_group("compression_workers");
    group.throughput(Throughput::Bytes((PAGES * PAGE_SIZE_BYTES) as u64));
    for workers in [1usize, 2] {
        group.bench_with_input(BenchmarkId::new("lz4", workers), &workers, |b, &workers| {
            b.iter(|| {
                std::thread::scope(|scope| {
                    let share = pages.len().div_ceil(workers);
                    let handles: Vec<_> = pages
                        .chunks(share)
                        .map(|chunk| {
                            scope.spawn(move || {
                                let mut compressor = PageCompressor::new(Codec::Lz4);
                                chunk
                                    .iter()
                                    .filter(|p| !matches!(compressor.compress(p), migration::codec::Compressed::Raw))
                                    .count()
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).sum::<usize>()
                })
            })
        });
    }
    group.finish();
}

/// The bit shuffle's filter alone, both ways, on pages of 12-bit numbers: the SSE2
/// transposes against the portable ones (the same output), on the same pages.
fn bit_shuffle(c: &mut Criterion) {
    use guests::synthetic::WorkloadSpec;
    use migration::shuffle;
    let pages = workload_pages(WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 1, bits: 12 }, PAGES);
    let mut group = c.benchmark_group("bit_shuffle");
    group.throughput(Throughput::Bytes((PAGES * PAGE_SIZE_BYTES) as u64));
    type Filter = fn(&[u8], &mut [u8], &mut Vec<u8>);
    let filters: [(&str, Filter, Filter); 2] = [
        ("vector", shuffle::bitshuffle, shuffle::unbitshuffle),
        ("portable", shuffle::portable::bitshuffle, shuffle::portable::unbitshuffle),
    ];
    let (mut out, mut back, mut scratch) = (vec![0u8; PAGE_SIZE_BYTES], vec![0u8; PAGE_SIZE_BYTES], Vec::new());
    let shuffled: Vec<Vec<u8>> = pages
        .iter()
        .map(|page| {
            shuffle::bitshuffle(page, &mut out, &mut scratch);
            out.clone()
        })
        .collect();
    for (name, forward, inverse) in filters {
        group.bench_function(format!("shuffle/{name}"), |b| {
            b.iter(|| pages.iter().map(|page| forward(page, &mut out, &mut scratch)).count())
        });
        group.bench_function(format!("unshuffle/{name}"), |b| {
            b.iter(|| shuffled.iter().map(|page| inverse(page, &mut back, &mut scratch)).count())
        });
    }
    group.finish();
}

/// CRC32C, every frame's checksum: `migration::crc` (crc-fast's carry-less multiplies)
/// against the `crc32c` crate (SSE4.2's `crc32` instruction) it replaced, over the same
/// 64 KiB payloads (a relay chunk; a page batch is about as large).
fn frame_checksum(c: &mut Criterion) {
    let payload: Vec<u8> = guest_pages(16).concat();
    let mut group = c.benchmark_group("frame_checksum");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    assert_eq!(migration::crc::crc32c(&payload), crc32c::crc32c(&payload));
    group.bench_function("crc_fast", |b| b.iter(|| migration::crc::crc32c(std::hint::black_box(&payload))));
    group.bench_function("crc32c_crate", |b| b.iter(|| crc32c::crc32c(std::hint::black_box(&payload))));
    group.finish();
}

fn frame_building(c: &mut Criterion) {
    use migration::frame::FrameBuf;
    use migration::page_batch::{BatchWriter, MAX_BATCH_BYTES, MAX_ENTRIES_PER_BATCH};
    let pages = guest_pages(PAGES);
    let mut frame = FrameBuf::with_capacity(MAX_BATCH_BYTES);
    let mut scratch = vec![0u8; PAGE_SIZE_BYTES];
    let mut group = c.benchmark_group("frame_building");
    group.throughput(Throughput::Bytes((PAGES * PAGE_SIZE_BYTES) as u64));
    // Raw pages: guest memory into a scratch page, then into the frame; or straight in.
    group.bench_function("raw_via_scratch", |b| {
        b.iter(|| {
            for batch_pages in pages.chunks(MAX_ENTRIES_PER_BATCH) {
                let mut batch = BatchWriter::new(frame.begin(), 0);
                for (index, page) in batch_pages.iter().enumerate() {
                    scratch.copy_from_slice(black_box(page));
                    batch.raw(index as u32, &scratch);
                }
            }
            frame.len()
        })
    });
    group.bench_function("raw_in_place", |b| {
        b.iter(|| {
            for batch_pages in pages.chunks(MAX_ENTRIES_PER_BATCH) {
                let mut batch = BatchWriter::new(frame.begin(), 0);
                for (index, page) in batch_pages.iter().enumerate() {
                    batch.raw_in_place(index as u32, |slot| {
                        slot.copy_from_slice(black_box(page));
                        true
                    });
                }
            }
            frame.len()
        })
    });
    // lz4 pages: compressed into the compressor's buffer and copied into the frame, or
    // compressed into the frame itself.
    let mut compressor = PageCompressor::new(Codec::Lz4);
    group.bench_function("lz4_via_buffer", |b| {
        b.iter(|| {
            for batch_pages in pages.chunks(MAX_ENTRIES_PER_BATCH) {
                let mut batch = BatchWriter::new(frame.begin(), 0);
                for (index, page) in batch_pages.iter().enumerate() {
                    match compressor.compress(black_box(page)) {
                        migration::codec::Compressed::Packed { len } => {
                            batch.compressed(index as u32, Codec::Lz4, &compressor.output()[..len])
                        }
                        migration::codec::Compressed::Raw => batch.raw(index as u32, page),
                    }
                }
            }
            frame.len()
        })
    });
    group.bench_function("lz4_in_place", |b| {
        b.iter(|| {
            for batch_pages in pages.chunks(MAX_ENTRIES_PER_BATCH) {
                let mut batch = BatchWriter::new(frame.begin(), 0);
                for (index, page) in batch_pages.iter().enumerate() {
                    let room = compressor.room();
                    let packed = batch.compressed_in_place(index as u32, Codec::Lz4, room, |out| {
                        compressor.compress_into(black_box(page), out)
                    });
                    if packed.is_none() {
                        batch.raw(index as u32, page);
                    }
                }
            }
            frame.len()
        })
    });
    group.finish();
}

fn loopback_wire(c: &mut Criterion) {
    use dataplane::stack::{LoopbackOptions, LoopbackStack};
    use std::io::{Read, Write};
    use transport::pipe::{Acceptor, Connector, Timeouts};
    const STREAM: usize = 64 << 20;
    let stack =
        LoopbackStack::start_with(LoopbackOptions { cores: 1, pin: false, ..LoopbackOptions::default() }).unwrap();
    let timeouts = Timeouts::default();
    let mut acceptor = stack.acceptor(5001, timeouts).unwrap();
    let connector = stack.connector(5001, timeouts);
    let block = vec![0x5au8; 1 << 20];
    let mut group = c.benchmark_group("loopback_wire");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(STREAM as u64));
    group.bench_function("one_core_per_side", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let mut sending = connector.connect().unwrap();
                let mut receiving = acceptor.accept(Duration::from_secs(10)).unwrap();
                let start = Instant::now();
                let reader = std::thread::spawn(move || {
                    let mut buffer = vec![0u8; 1 << 20];
                    let mut got = 0;
                    while got < STREAM {
                        got += receiving.reader.read(&mut buffer).unwrap();
                    }
                    receiving
                });
                for _ in 0..STREAM / block.len() {
                    sending.writer.write_all(&block).unwrap();
                }
                let receiving = reader.join().unwrap();
                total += start.elapsed();
                (sending.closer)();
                (receiving.closer)();
            }
            total
        })
    });
    group.finish();
}

/// What the copy index costs a page that is not a copy (the common case: a hash, a
/// bucket's lock, a slot written), against copying the page, the least any encoding does.
fn copy_index(c: &mut Criterion) {
    let dirty = guests::synthetic::WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 1, bits: 32 };
    let pages = workload_pages(dirty, PAGES);
    let mut group = c.benchmark_group("copy_index");
    group.throughput(Throughput::Bytes((PAGES * PAGE_SIZE_BYTES) as u64));
    let mut scratch = vec![0u8; PAGE_SIZE_BYTES];
    group.bench_function("page_copy", |b| {
        b.iter(|| {
            for page in &pages {
                scratch.copy_from_slice(black_box(page));
            }
            black_box(&scratch);
        })
    });
    let seen = migration::seen_pages::SeenPages::new(migration::seen_pages::DEFAULT_INDEX_BYTES, 1);
    let mut round = 0u32;
    group.bench_function("sight_distinct", |b| {
        b.iter(|| {
            round += 1;
            for (number, page) in pages.iter().enumerate() {
                black_box(seen.sight(0, number as u32, round, page, |_| true));
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = micro;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = zero_scan, lz4, deflate, page_codecs, bit_shuffle, xbzrle, ring_handoff, compression_workers, frame_checksum, frame_building, copy_index, loopback_wire
}
criterion_main!(micro);
