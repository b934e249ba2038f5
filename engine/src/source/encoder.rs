//! The compression workers: each takes a job (up to 64 pages of one region), reads the
//! pages, finds zero pages, tries XBZRLE, looks for a page of the same contents sent in
//! the round (`migration::seen_pages`), compresses, and builds the batch frame in place.

use crate::adaptive::{self, AdaptivePolicy, Choice, Pipeline};
use crate::offload::{OffloadQueue, Offloaded};
use migration::codec::{Codec, Compressed, PageCompressor};
use migration::frame::{FrameBuf, HEADER_BYTES};
use migration::page_batch::{
    block_room, BatchOut, BatchWriter, MAX_BATCH_BYTES, MAX_BLOCK_PAGES, MAX_ENTRIES_PER_BATCH,
};
use migration::receiver::FIRST_EPOCH;
use migration::seen_pages::{copy_digest, Original, Sampling};
use migration::stats::EncodeCounters;
use migration::xbzrle_cache::XbzrleOutcome;
use migration::{zero, PAGE_SIZE_BYTES};
use std::sync::atomic::Ordering;
use std::time::Instant;
use transport::pin;

use super::{Job, Outgoing, Shared};

pub(super) fn compression_worker(shared: &Shared<'_>, index: usize) {
    let _cpu = shared.config.pin_workers.then(|| pin::claim_worker_cpu(index));
    let compressors = match &shared.adaptive {
        Some(policy) => policy.choices().iter().map(|&codec| PageCompressor::new(codec)).collect(),
        None => crate::pool::compressors_for(shared.config.codec),
    };
    let offload = shared.offload.lock().unwrap_or_else(|p| p.into_inner()).get_mut(index).and_then(Option::take);
    let mut encoder = BatchEncoder {
        compressors,
        offload: offload.map(|queue| Offload::new(queue, shared)),
        staged: Staged::default(),
        page: vec![0u8; PAGE_SIZE_BYTES],
        other: vec![0u8; PAGE_SIZE_BYTES],
        sampling: Sampling::default(),
        delta: vec![0u8; PAGE_SIZE_BYTES - 1],
        counters: EncodeCounters::default(),
        measured: Vec::with_capacity(MAX_ENTRIES_PER_BATCH),
    };
    while let Ok(Some(job)) = shared.jobs.pop(&shared.abort) {
        let frame = encoder.encode(shared, &job);
        let pushed = match frame {
            Some(frame) => {
                shared.links.outgoing[job.connection].push(Outgoing::Pages { frame, epoch: job.epoch }, &shared.abort)
            }
            None => Ok(()),
        };
        shared.round_counters.lock().unwrap_or_else(|p| p.into_inner()).merge(&encoder.counters);
        encoder.counters = EncodeCounters::default();
        let mut pages = job.pages;
        pages.clear();
        shared.job_pool.give(pages);
        shared.jobs_in_flight.fetch_sub(1, Ordering::AcqRel);
        if pushed.is_err() {
            return;
        }
    }
}

/// A compression worker's reusable state.
struct BatchEncoder {
    /// One per codec this worker may use (several with `Codec::Adaptive`).
    compressors: Vec<PageCompressor>,
    /// This worker's queue of the compression device.
    offload: Option<Offload>,
    /// The batch's pages that go to the codec together at its end.
    staged: Staged,
    page: Vec<u8>,
    /// Another page's contents: the original a page may go as a copy of.
    other: Vec<u8>,
    /// Which pages this worker looks up in the copy index.
    sampling: Sampling,
    delta: Vec<u8>,
    counters: EncodeCounters,
    /// Pages of a batch the adaptive policy measures its choices on.
    measured: Vec<u32>,
}

impl BatchEncoder {
    /// Encodes one job into a page-batch frame; `None` if nothing needs sending (every
    /// page unchanged since the copy the destination holds).
    fn encode(&mut self, shared: &Shared<'_>, job: &Job) -> Option<FrameBuf> {
        let mut frame = shared.links.frame_pool.take(|| FrameBuf::with_capacity(MAX_BATCH_BYTES));
        let choice = self.choose(shared, job);
        let codec = choice.codec;
        let chosen = self
            .compressors
            .iter()
            .position(|c| c.codec() == codec)
            .expect("a compressor for every codec the policy chooses");
        // The batch's CPU time, for the adaptive policy (measured only for it).
        let started = shared.adaptive.is_some().then(|| (adaptive::cpu::thread_time(), Instant::now()));
        let bulk = job.epoch == FIRST_EPOCH;
        let use_cache = !bulk || shared.cache_bulk.load(Ordering::Relaxed);
        // Pages that go raw and need no snapshot for the XBZRLE cache are read from guest
        // memory straight into the frame: one copy, not two.
        let direct = codec == Codec::None && !(shared.cache.is_some() && use_cache) && shared.seen.is_none();
        // Pages for the compression device, or for a codec that packs them in blocks, wait
        // for the batch's end.
        let staging = codec.packs_in_blocks() || (codec == Codec::Deflate && self.offload.is_some());
        let entries = {
            let mut batch = BatchWriter::new(frame.begin(), job.region);
            let mut zero_runs = ZeroRuns::default();
            for &page in &job.pages {
                let (region, index) = (usize::from(job.region), u64::from(page));
                if direct {
                    let kept = batch.raw_in_place(page, |slot| {
                        shared.memory.read_page(region, index, slot);
                        !(shared.config.zero_detect && zero::is_zero(slot))
                    });
                    if kept {
                        self.counters.raw_pages += 1;
                    } else {
                        self.zero_page(shared, job, page, &mut zero_runs, &mut batch);
                    }
                    continue;
                }
                shared.memory.read_page(region, index, &mut self.page);
                if shared.config.zero_detect && zero::is_zero(&self.page) {
                    self.zero_page(shared, job, page, &mut zero_runs, &mut batch);
                    continue;
                }
                if let (Some(cache), true) = (&shared.cache, use_cache) {
                    match cache.encode(job.region, index, job.epoch, &self.page, &mut self.delta, true) {
                        XbzrleOutcome::Unchanged => {
                            self.counters.xbzrle_unchanged += 1;
                            continue;
                        }
                        XbzrleOutcome::Delta { len, base_epoch } => {
                            batch.xbzrle(page, base_epoch, &self.delta[..len]);
                            self.counters.xbzrle_pages += 1;
                            self.counters.xbzrle_bytes += len as u64;
                            continue;
                        }
                        // Every bulk page misses (first sight); QEMU counts none of them.
                        XbzrleOutcome::Miss if bulk => {}
                        XbzrleOutcome::Miss => self.counters.xbzrle_cache_miss += 1,
                        XbzrleOutcome::Overflow => self.counters.xbzrle_overflow += 1,
                    }
                }
                if self.copied(shared, job, page, &mut batch) {
                    continue;
                }
                if codec == Codec::None {
                    batch.raw(page, &self.page);
                    self.counters.raw_pages += 1;
                    continue;
                }
                self.counters.codec_input_pages += 1;
                if staging {
                    self.staged.stage(page, &self.page);
                    continue;
                }
                compress_or_raw(&mut batch, page, &self.page, &mut self.compressors[chosen], &mut self.counters);
            }
            let (staged, compressor) = (&self.staged, &mut self.compressors[chosen]);
            match &mut self.offload {
                Some(offload) if codec == Codec::Deflate => {
                    offload.flush(staged, &mut batch, compressor, &mut self.counters)
                }
                _ => compress_blocks(staged, &mut batch, compressor, &mut self.counters),
            }
            self.staged.clear();
            zero_runs.flush(&mut batch);
            batch.entries()
        };
        let frame = self.seal(shared, frame, entries);
        if let (Some(policy), Some((cpu_start, wall_start))) = (&shared.adaptive, started) {
            if choice.measure {
                self.measure_choices(shared, job, policy);
            }
            // The counters hold this batch alone (the worker merges and resets them per job).
            let input = (self.counters.raw_pages + self.counters.compressed_pages) * PAGE_SIZE_BYTES as u64;
            policy.account(input, adaptive::cpu::thread_time() - cpu_start, wall_start.elapsed());
        }
        frame
    }

    /// The codec for this batch: the adaptive policy's choice, or the one configured.
    fn choose(&self, shared: &Shared<'_>, job: &Job) -> Choice {
        match &shared.adaptive {
            Some(policy) => {
                let pipeline = Pipeline {
                    link_full: shared.link_full(job.connection),
                    scanner_ahead: !shared.jobs.is_empty(),
                    receiver_bound: shared.receiver_bound(),
                };
                policy.choose(pipeline, &|| shared.delivered_bytes())
            }
            None => Choice { codec: self.compressors[0].codec(), measure: false },
        }
    }

    /// The frame of a batch of `entries` entries, checksummed and counted; none for an
    /// empty batch (its buffer goes back to the pool).
    fn seal(&mut self, shared: &Shared<'_>, mut frame: FrameBuf, entries: usize) -> Option<FrameBuf> {
        if entries == 0 {
            shared.links.frame_pool.give(frame);
            return None;
        }
        frame.checksum_payload();
        self.counters.wire_bytes += (HEADER_BYTES + frame.payload_len()) as u64;
        Some(frame)
    }

    /// Compresses the batch's non-zero pages with every choice the adaptive policy has, and
    /// tells it what each made of them and at what CPU cost: all measured on the same pages.
    fn measure_choices(&mut self, shared: &Shared<'_>, job: &Job, policy: &AdaptivePolicy) {
        let region = usize::from(job.region);
        self.measured.clear();
        for &page in &job.pages {
            shared.memory.read_page(region, u64::from(page), &mut self.page);
            if !zero::is_zero(&self.page) {
                self.measured.push(page);
            }
        }
        for compressor in &mut self.compressors {
            let start = adaptive::cpu::thread_time();
            if let (Codec::Deflate, Some(offload)) = (compressor.codec(), &mut self.offload) {
                let (input, output) = offload.measure(shared, region, &self.measured, &mut self.staged.contents);
                policy.measure(Codec::Deflate, input, output, adaptive::cpu::thread_time() - start);
                continue;
            }
            let input = (self.measured.len() * PAGE_SIZE_BYTES) as u64;
            if compressor.codec().packs_in_blocks() {
                // As it would send them: read, then in blocks.
                let contents = &mut self.staged.contents;
                read_pages(shared, region, &self.measured, contents);
                let output = measure_blocks(contents, compressor);
                contents.clear();
                policy.measure(compressor.codec(), input, output, adaptive::cpu::thread_time() - start);
                continue;
            }
            let mut output = 0;
            for &page in &self.measured {
                shared.memory.read_page(region, u64::from(page), &mut self.page);
                output += match compressor.compress(&self.page) {
                    Compressed::Packed { len } => len,
                    Compressed::Raw => PAGE_SIZE_BYTES,
                } as u64;
            }
            policy.measure(compressor.codec(), input, output, adaptive::cpu::thread_time() - start);
        }
    }

    /// Sends page `page`, read into `self.page`, as a copy of a page alike sent earlier in
    /// the round, where the copy index finds one (and this worker looks the page up at
    /// all); whether it did.
    fn copied<O: BatchOut>(
        &mut self,
        shared: &Shared<'_>,
        job: &Job,
        page: u32,
        batch: &mut BatchWriter<'_, O>,
    ) -> bool {
        let Some(seen) = &shared.seen else { return false };
        if !self.sampling.wants(&self.page) {
            return false;
        }
        let (contents, other) = (&self.page, &mut self.other);
        let same = |original: Original| {
            shared.memory.read_page(usize::from(original.region), u64::from(original.page), other);
            other == contents
        };
        let original = seen.sight(job.region, page, job.epoch, contents, same);
        self.sampling.record(original.is_some());
        let Some(original) = original else { return false };
        batch.copy(page, original.region, original.page, copy_digest(contents));
        self.counters.copied_pages += 1;
        true
    }

    /// A page found zero: the destination's copy becomes zero through a run entry, and the
    /// XBZRLE cache forgets the page (its next version is sent whole).
    fn zero_page<O: BatchOut>(
        &mut self,
        shared: &Shared<'_>,
        job: &Job,
        page: u32,
        runs: &mut ZeroRuns,
        batch: &mut BatchWriter<'_, O>,
    ) {
        if let Some(cache) = &shared.cache {
            cache.forget(job.region, u64::from(page));
        }
        self.counters.zero_pages += 1;
        runs.add(page, batch);
    }
}

/// A batch's pages that go to the codec together at its end (to a compression device, or
/// in blocks on the CPU): their numbers, and their contents one after another.
struct Staged {
    pages: Vec<u32>,
    contents: Vec<u8>,
}

impl Default for Staged {
    fn default() -> Self {
        let contents = Vec::with_capacity(MAX_ENTRIES_PER_BATCH * PAGE_SIZE_BYTES);
        Staged { pages: Vec::with_capacity(MAX_ENTRIES_PER_BATCH), contents }
    }
}

impl Staged {
    /// Page number `page`, whose contents are `data`, waits for the batch's end.
    fn stage(&mut self, page: u32, data: &[u8]) {
        self.pages.push(page);
        self.contents.extend_from_slice(data);
    }

    fn clear(&mut self) {
        self.pages.clear();
        self.contents.clear();
    }
}

/// The staged pages compressed by `compressor` in blocks of up to `MAX_BLOCK_PAGES`, each
/// straight into the frame; a block that does not save 4 bytes a page goes raw (its pages
/// would not have shrunk much one by one either), a lone page goes as any page does.
fn compress_blocks<O: BatchOut>(
    staged: &Staged,
    batch: &mut BatchWriter<'_, O>,
    compressor: &mut PageCompressor,
    counters: &mut EncodeCounters,
) {
    let codec = compressor.codec();
    let blocks = staged.pages.chunks(MAX_BLOCK_PAGES).zip(staged.contents.chunks(MAX_BLOCK_PAGES * PAGE_SIZE_BYTES));
    for (pages, data) in blocks {
        if let [page] = pages {
            compress_or_raw(batch, *page, data, compressor, counters);
            continue;
        }
        let room = block_room(pages.len());
        match batch.block_in_place(pages, codec, room, |out| compressor.block().compress_into(data, out)) {
            Some(len) => {
                counters.compressed_pages += pages.len() as u64;
                counters.compressed_bytes += len as u64;
            }
            None => {
                for (&page, content) in pages.iter().zip(data.chunks_exact(PAGE_SIZE_BYTES)) {
                    batch.raw(page, content);
                }
                counters.raw_pages += pages.len() as u64;
            }
        }
    }
}

/// Reads `pages` of `region` into `contents`, one after another.
fn read_pages(shared: &Shared<'_>, region: usize, pages: &[u32], contents: &mut Vec<u8>) {
    contents.resize(pages.len() * PAGE_SIZE_BYTES, 0);
    for (&page, slot) in pages.iter().zip(contents.chunks_exact_mut(PAGE_SIZE_BYTES)) {
        shared.memory.read_page(region, u64::from(page), slot);
    }
}

/// The wire bytes `compressor` makes of `contents` (pages one after another) in blocks as
/// `compress_blocks` sends them.
fn measure_blocks(contents: &[u8], compressor: &mut PageCompressor) -> u64 {
    let mut out = vec![0u8; block_room(MAX_BLOCK_PAGES)];
    contents
        .chunks(MAX_BLOCK_PAGES * PAGE_SIZE_BYTES)
        .map(|data| {
            let room = block_room(data.len() / PAGE_SIZE_BYTES).min(out.len());
            compressor.block().compress_into(data, &mut out[..room]).unwrap_or(data.len()) as u64
        })
        .sum()
}

/// A worker's queue of the compression device: the batch's pages that `deflate` is to
/// compress go to the device together at the batch's end.
struct Offload {
    queue: Box<dyn OffloadQueue>,
    /// The device's name, for the warning when it first fails a page.
    device: String,
    warned: bool,
}

impl Offload {
    fn new(queue: Box<dyn OffloadQueue>, shared: &Shared<'_>) -> Offload {
        let device = shared.config.offload.as_ref().map_or_else(String::new, |device| device.name().to_string());
        Offload { queue, device, warned: false }
    }

    /// Sends the staged pages through the device, all in flight at once, and writes
    /// each block into `batch` as it comes back: compressed (one entry, a block entry for
    /// several pages), raw (it did not shrink), or, where the device failed it, its pages
    /// compressed one by one by `cpu` (the CPU's deflate) and counted.
    fn flush<O: BatchOut>(
        &mut self,
        staged: &Staged,
        batch: &mut BatchWriter<'_, O>,
        cpu: &mut PageCompressor,
        counters: &mut EncodeCounters,
    ) {
        if staged.pages.is_empty() {
            return;
        }
        let (inputs, ranges) = blocks(&staged.contents, self.queue.pages_per_operation());
        let (numbers, device, warned) = (&staged.pages, &self.device, &mut self.warned);
        self.queue.compress_pages(&inputs, &mut |index, outcome| {
            let (data, room) = inputs[index];
            let pages = &numbers[ranges[index].clone()];
            let count = pages.len() as u64;
            match outcome {
                Offloaded::Packed(bytes) if (1..=room).contains(&bytes.len()) => {
                    match pages {
                        [page] => batch.compressed(*page, Codec::Deflate, bytes),
                        pages => batch.block(pages, Codec::Deflate, bytes),
                    }
                    counters.device_pages += count;
                    counters.compressed_pages += count;
                    counters.compressed_bytes += bytes.len() as u64;
                }
                Offloaded::Raw => {
                    for (&page, content) in pages.iter().zip(data.chunks_exact(PAGE_SIZE_BYTES)) {
                        batch.raw(page, content);
                    }
                    counters.device_pages += count;
                    counters.raw_pages += count;
                }
                Offloaded::Packed(_) | Offloaded::Failed(_) => {
                    let reason = match outcome {
                        Offloaded::Failed(reason) => reason,
                        _ => "its output did not fit the room given",
                    };
                    if !std::mem::replace(warned, true) {
                        log::warn!(
                            "compression device {device} failed pages ({reason}): such pages are compressed on \
                             the CPU instead, and counted"
                        );
                    }
                    counters.device_fallback_pages += count;
                    for (&page, content) in pages.iter().zip(data.chunks_exact(PAGE_SIZE_BYTES)) {
                        compress_or_raw(batch, page, content, cpu, counters);
                    }
                }
            }
        });
    }

    /// `deflate` on the device measured on `pages` of `region`, in blocks as it sends
    /// them: guest bytes in, wire bytes out (a block that does not shrink or fails counts
    /// whole). `contents` is scratch room for the pages.
    fn measure(&mut self, shared: &Shared<'_>, region: usize, pages: &[u32], contents: &mut Vec<u8>) -> (u64, u64) {
        read_pages(shared, region, pages, contents);
        let (inputs, _) = blocks(contents, self.queue.pages_per_operation());
        let mut output = 0u64;
        self.queue.compress_pages(&inputs, &mut |index, outcome| {
            output += match outcome {
                Offloaded::Packed(bytes) => bytes.len(),
                Offloaded::Raw | Offloaded::Failed(_) => inputs[index].0.len(),
            } as u64;
        });
        contents.clear();
        ((pages.len() * PAGE_SIZE_BYTES) as u64, output)
    }
}

/// Page `page`, whose contents are `data`, compressed by `compressor` straight into the
/// frame (which goes to the socket as it is), or raw where it does not shrink; counted.
fn compress_or_raw<O: BatchOut>(
    batch: &mut BatchWriter<'_, O>,
    page: u32,
    data: &[u8],
    compressor: &mut PageCompressor,
    counters: &mut EncodeCounters,
) {
    let codec = compressor.codec();
    let packed = batch.compressed_in_place(page, codec, compressor.room(), |out| compressor.compress_into(data, out));
    if let Some(len) = packed {
        counters.compressed_pages += 1;
        counters.compressed_bytes += len as u64;
    } else {
        batch.raw(page, data);
        counters.raw_pages += 1;
    }
}

/// Pages (their contents one after another) as a device's inputs: blocks of up to
/// `per_block` pages, each with the room its compressed form may take (under a page, or
/// under the block's pages raw), and the range of the pages each covers.
type Blocks<'a> = (Vec<(&'a [u8], usize)>, Vec<std::ops::Range<usize>>);

fn blocks(contents: &[u8], per_block: usize) -> Blocks<'_> {
    let count = contents.len() / PAGE_SIZE_BYTES;
    let per_block = per_block.clamp(1, MAX_BLOCK_PAGES);
    let ranges: Vec<std::ops::Range<usize>> =
        (0..count).step_by(per_block).map(|at| at..(at + per_block).min(count)).collect();
    let inputs = ranges
        .iter()
        .map(|range| {
            let data = &contents[range.start * PAGE_SIZE_BYTES..range.end * PAGE_SIZE_BYTES];
            let room = if range.len() == 1 { PAGE_SIZE_BYTES - 1 } else { block_room(range.len()) };
            (data, room)
        })
        .collect();
    (inputs, ranges)
}

/// Zero pages of a batch gathered into runs of consecutive pages, one entry per run.
#[derive(Default)]
struct ZeroRuns {
    open: Option<(u32, u32)>,
}

impl ZeroRuns {
    /// Adds `page`, extending the open run or writing it out and starting another.
    fn add<O: BatchOut>(&mut self, page: u32, batch: &mut BatchWriter<'_, O>) {
        self.open = match self.open {
            Some((first, count)) if first + count == page => Some((first, count + 1)),
            previous => {
                if let Some((first, count)) = previous {
                    batch.zero_run(first, count);
                }
                Some((page, 1))
            }
        };
    }

    /// Writes out the open run.
    fn flush<O: BatchOut>(&mut self, batch: &mut BatchWriter<'_, O>) {
        if let Some((first, count)) = self.open.take() {
            batch.zero_run(first, count);
        }
    }
}
