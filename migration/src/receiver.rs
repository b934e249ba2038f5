//! The destination's protocol logic, without IO: what each connection may receive next,
//! the page-epoch table that keeps stale pages and misplaced deltas out, and the decoding
//! of page batches into guest memory.
//!
//! Ordering across connections works by rounds: every connection ends each epoch with a
//! `RoundEnd` frame that counts the page frames it carried, and the transport holds every
//! connection at that point until all of them have reached it and every page of the epoch
//! is applied (a barrier). On top of that, each page records the epoch it was last written
//! in, so a page can be written at most once per epoch and an XBZRLE delta applies only to
//! the exact version it was computed from.

use crate::codec::{Codec, DecompressError, PageDecompressor};
use crate::frame::{le_u32, le_u64, FrameError, FrameHeader, FrameKind, SeqCounter};
use crate::memory::GuestMemory;
use crate::page_batch::{BatchError, BatchLimits, PageBatch, PageEntry};
use crate::xbzrle::{self, XbzrleError};
use crate::PAGE_SIZE_BYTES;
use std::sync::atomic::{AtomicU32, Ordering};
use thiserror::Error;

mod copies;
mod deflated;
pub use copies::{fill as fill_copies, PendingCopies, PendingCopy};
pub use deflated::PageInflater;
use deflated::{Deflated, PackedEntry, Target};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("region {region} page {page}: {source}")]
    Decompress { region: u16, page: u64, source: DecompressError },
    #[error("region {region} page {page}: corrupt XBZRLE delta: {source}")]
    Xbzrle { region: u16, page: u64, source: XbzrleError },
    #[error("region {region} page {page}: delta made against round {base}, but the page is from round {held}")]
    DeltaBase { region: u16, page: u64, base: u32, held: u32 },
    #[error("region {region} page {page} sent twice in round {epoch} (held from round {held})")]
    StalePage { region: u16, page: u64, epoch: u32, held: u32 },
    #[error(
        "region {region} page {page}: sent as a copy of region {from_region} page {from_page}, which does not \
         hold the contents the source hashed"
    )]
    CopyDigest { region: u16, page: u64, from_region: u16, from_page: u64 },
    #[error("protocol violation on connection {connection}: {detail}")]
    Protocol { connection: u16, detail: String },
}

/// What a frame on a connection means for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// A batch of pages of the connection's current epoch: decode and apply it.
    Pages,
    /// The connection finished `epoch`: wait at the barrier before reading on.
    RoundEnd {
        epoch: u32,
    },
    /// The guest's device state (connection 0, final round).
    DeviceState,
    /// The final round `final_epoch` was sent: check and answer Ready.
    Complete {
        final_epoch: u32,
    },
    Commit,
    VerifyDigest,
    Abort,
}

/// Per-connection receive state: sequence numbers, the current epoch, frames per epoch.
#[derive(Debug)]
pub struct ConnectionInbound {
    connection: u16,
    seq: SeqCounter,
    epoch: u32,
    pages_frames: u64,
    device_state_seen: bool,
    complete: bool,
}

/// Epoch 0 is the handshake; page rounds start at 1 (the bulk round).
pub const FIRST_EPOCH: u32 = 1;

impl ConnectionInbound {
    /// `seq` is where sequence numbers continue after the handshake frames.
    pub fn new(connection: u16, next_seq: u64) -> Self {
        let mut seq = SeqCounter::default();
        for _ in 0..next_seq {
            seq.take();
        }
        ConnectionInbound {
            connection,
            seq,
            epoch: FIRST_EPOCH,
            pages_frames: 0,
            device_state_seen: false,
            complete: false,
        }
    }

    /// The epoch this connection is receiving.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    fn violation(&self, detail: impl Into<String>) -> ReceiveError {
        ReceiveError::Protocol { connection: self.connection, detail: detail.into() }
    }

    /// Checks a frame (header already parsed and checksummed) against the connection's
    /// state and advances it.
    pub fn on_frame(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<Inbound, ReceiveError> {
        self.seq.accept(header.seq)?;
        if header.kind == FrameKind::Abort {
            return Ok(Inbound::Abort);
        }
        if self.complete && !matches!(header.kind, FrameKind::Commit | FrameKind::VerifyDigest) {
            return Err(self.violation(format!("{:?} frame after Complete", header.kind)));
        }
        let control_only = self.connection == 0;
        match header.kind {
            FrameKind::Pages | FrameKind::RoundEnd | FrameKind::DeviceState if header.epoch != self.epoch => Err(self
                .violation(format!(
                    "{:?} frame for round {} while in round {}",
                    header.kind, header.epoch, self.epoch
                ))),
            FrameKind::Pages => {
                self.pages_frames += 1;
                Ok(Inbound::Pages)
            }
            FrameKind::RoundEnd => {
                if payload.len() != 8 {
                    return Err(self.violation(format!("RoundEnd payload of {} bytes", payload.len())));
                }
                let declared = le_u64(payload);
                if declared != self.pages_frames {
                    return Err(self.violation(format!(
                        "round {} ended after {} page frames, the source sent {declared}",
                        self.epoch, self.pages_frames
                    )));
                }
                let epoch = self.epoch;
                self.epoch = epoch.checked_add(1).ok_or_else(|| self.violation("epoch overflow"))?;
                self.pages_frames = 0;
                Ok(Inbound::RoundEnd { epoch })
            }
            FrameKind::DeviceState if control_only && !self.device_state_seen => {
                self.device_state_seen = true;
                Ok(Inbound::DeviceState)
            }
            FrameKind::Complete if control_only => {
                if payload.len() != 4 {
                    return Err(self.violation(format!("Complete payload of {} bytes", payload.len())));
                }
                let final_epoch = le_u32(payload);
                if final_epoch.checked_add(1) != Some(self.epoch) {
                    return Err(
                        self.violation(format!("Complete names round {final_epoch}, but round {} is open", self.epoch))
                    );
                }
                self.complete = true;
                Ok(Inbound::Complete { final_epoch })
            }
            FrameKind::Commit if control_only && self.complete => Ok(Inbound::Commit),
            FrameKind::VerifyDigest if control_only && self.complete => Ok(Inbound::VerifyDigest),
            kind => Err(self.violation(format!("unexpected {kind:?} frame"))),
        }
    }
}

/// The epoch each destination page was last written in (0: never written, still zero).
pub struct PageEpochs {
    regions: Vec<Vec<AtomicU32>>,
}

impl PageEpochs {
    pub fn new(region_pages: &[u64]) -> Self {
        PageEpochs {
            regions: region_pages.iter().map(|&pages| (0..pages).map(|_| AtomicU32::new(0)).collect()).collect(),
        }
    }

    /// Records that `pages` from `first` are written in `epoch`. Fails if any of them was
    /// already written in this or a later epoch: with the round barrier that can only be
    /// a page sent twice in one round, which would otherwise race two writers.
    /// Returns the epoch the page held before (0: never written).
    pub(crate) fn claim(&self, region: u16, page: u64, epoch: u32) -> Result<u32, ReceiveError> {
        let held = self.regions[usize::from(region)][page as usize].swap(epoch, Ordering::AcqRel);
        if held >= epoch {
            return Err(ReceiveError::StalePage { region, page, epoch, held });
        }
        Ok(held)
    }

    fn held(&self, region: u16, page: u64) -> u32 {
        self.regions[usize::from(region)][page as usize].load(Ordering::Acquire)
    }
}

/// Per-worker counters of what was applied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyCounters {
    pub zero_pages: u64,
    pub raw_pages: u64,
    pub compressed_pages: u64,
    pub xbzrle_pages: u64,
    /// Pages that came as copies of others (applied at the round's barrier).
    pub copied_pages: u64,
    /// `deflate` pages a device inflated.
    pub device_pages: u64,
    /// `deflate` pages the device failed, inflated on the CPU instead.
    pub device_fallback_pages: u64,
}

impl ApplyCounters {
    pub fn merge(&mut self, other: &ApplyCounters) {
        self.zero_pages += other.zero_pages;
        self.raw_pages += other.raw_pages;
        self.compressed_pages += other.compressed_pages;
        self.xbzrle_pages += other.xbzrle_pages;
        self.copied_pages += other.copied_pages;
        self.device_pages += other.device_pages;
        self.device_fallback_pages += other.device_fallback_pages;
    }
}

/// What every decompression worker of a session shares: the session's limits, the guest
/// memory being built, its page-epoch table and the copies held for the round's barrier.
pub struct BatchApplier<'a> {
    pub limits: BatchLimits<'a>,
    pub memory: &'a dyn GuestMemory,
    pub epochs: &'a PageEpochs,
    pub copies: &'a PendingCopies,
}

/// What each decompression worker owns: codec state, one page of scratch, counters, and
/// a device's queue for `deflate` pages where it has one.
#[derive(Default)]
pub struct ApplyWorker {
    decompressor: PageDecompressor,
    scratch: Box<[u8]>,
    pub counters: ApplyCounters,
    /// `deflate` entries: the device, and the pages of a block as inflated.
    deflated: Deflated,
    /// The batch's copies, on their way to the session's `PendingCopies`.
    copies: Vec<PendingCopy>,
}

impl ApplyWorker {
    pub fn new() -> Self {
        ApplyWorker { scratch: vec![0u8; PAGE_SIZE_BYTES].into_boxed_slice(), ..Default::default() }
    }

    /// A worker whose `deflate` pages `inflater` inflates, a batch's at once.
    pub fn with_inflater(inflater: Box<dyn PageInflater>) -> Self {
        ApplyWorker { deflated: Deflated::with_inflater(inflater), ..ApplyWorker::new() }
    }
}

impl BatchApplier<'_> {
    /// Decodes one `Pages` frame of `epoch` and writes its pages into guest memory.
    pub fn apply(&self, payload: &[u8], epoch: u32, worker: &mut ApplyWorker) -> Result<(), ReceiveError> {
        let BatchApplier { limits, memory, epochs, copies } = self;
        let ApplyWorker { decompressor, scratch, counters, deflated, copies: batch_copies } = worker;
        // Left over only from a batch that failed, whose session is failing.
        batch_copies.clear();
        let batch = PageBatch::parse(payload, limits)?;
        let region = batch.region;
        let r = usize::from(region);
        let target = Target { region, epoch, memory: *memory, epochs };
        fault_in_runs(&batch, limits, epochs, *memory);
        // A batch's `deflate` entries, kept for the device where there is one.
        let mut for_device: Vec<PackedEntry<'_>> = Vec::new();
        batch.for_each(limits, |entry| {
            let page = u64::from(entry.first_page());
            match entry {
                PageEntry::ZeroRun { count, .. } => {
                    // Destination memory starts zeroed: a page never written needs no store
                    // (and is not faulted in), which keeps the bulk stage cheap.
                    for zero_page in page..page + u64::from(count) {
                        if epochs.claim(region, zero_page, epoch)? != 0 {
                            memory.zero_pages(r, zero_page, 1);
                        }
                    }
                    counters.zero_pages += u64::from(count);
                }
                PageEntry::Raw { data, .. } => {
                    epochs.claim(region, page, epoch)?;
                    memory.write_page(r, page, data);
                    counters.raw_pages += 1;
                }
                PageEntry::Compressed { codec: Codec::Deflate, data, page } if deflated.has_device() => {
                    for_device.push(PackedEntry { page, others: &[], codec: Codec::Deflate, data });
                }
                PageEntry::Block { page, others, codec, data } => {
                    let entry = PackedEntry { page, others, codec, data };
                    match codec == Codec::Deflate && deflated.has_device() {
                        true => for_device.push(entry),
                        false => deflated.apply_on_cpu(&target, entry, decompressor, counters)?,
                    }
                }
                PageEntry::Compressed { codec, data, .. } => {
                    decompressor.decompress(codec, data, scratch).map_err(|source| ReceiveError::Decompress {
                        region,
                        page,
                        source,
                    })?;
                    epochs.claim(region, page, epoch)?;
                    memory.write_page(r, page, scratch);
                    counters.compressed_pages += 1;
                }
                PageEntry::Xbzrle { base_epoch, data, .. } => {
                    let held = epochs.held(region, page);
                    if held != base_epoch || base_epoch == 0 {
                        return Err(ReceiveError::DeltaBase { region, page, base: base_epoch, held });
                    }
                    memory.read_page(r, page, scratch);
                    xbzrle::decode(data, scratch).map_err(|source| ReceiveError::Xbzrle { region, page, source })?;
                    epochs.claim(region, page, epoch)?;
                    memory.write_page(r, page, scratch);
                    counters.xbzrle_pages += 1;
                }
                PageEntry::Copy { page: number, from_region, from_page, digest } => {
                    // Claimed now (a page still goes once a round), filled at the barrier.
                    epochs.claim(region, page, epoch)?;
                    batch_copies.push(PendingCopy { from_region, from_page, region, page: number, digest });
                    counters.copied_pages += 1;
                }
            }
            Ok(())
        })?;
        copies.hold(batch_copies);
        deflated.apply_on_device(&target, &for_device, decompressor, counters)
    }
}

/// Runs of at least this many pages are faulted in with one call.
const FAULT_IN_RUN_PAGES: u64 = 4;

/// Hints `memory` ([`GuestMemory::prepare_write`]) at the runs of pages `batch` writes for
/// the first time, before its entries are applied: on the bulk round of an incompressible
/// guest the faults of each page's first store were most of a decompression worker's
/// samples, a fifth of the round's. Only headers are read; an entry the real pass will
/// refuse ends the runs.
fn fault_in_runs(batch: &PageBatch<'_>, limits: &BatchLimits<'_>, epochs: &PageEpochs, memory: &dyn GuestMemory) {
    let r = usize::from(batch.region);
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: &mut Option<(u64, u64)>| {
        if let Some((first, count)) = run.take().filter(|&(_, count)| count >= FAULT_IN_RUN_PAGES) {
            memory.prepare_write(r, first, count);
        }
    };
    let _ = batch.for_each::<BatchError>(limits, |entry| {
        let mut written = |page: u64| {
            if epochs.held(batch.region, page) != 0 {
                return;
            }
            match &mut run {
                Some((first, count)) if *first + *count == page => *count += 1,
                _ => {
                    flush(&mut run);
                    run = Some((page, 1));
                }
            }
        };
        match entry {
            PageEntry::Raw { page, .. } | PageEntry::Compressed { page, .. } => written(u64::from(page)),
            PageEntry::Block { page, others, .. } => {
                PageEntry::block_pages(page, others).for_each(|page| written(u64::from(page)))
            }
            // Zero runs store nothing into memory never written; an XBZRLE page was
            // written before; copies are filled at the round's end.
            PageEntry::ZeroRun { .. } | PageEntry::Xbzrle { .. } | PageEntry::Copy { .. } => {}
        }
        Ok(())
    });
    flush(&mut run);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Codec, Compressed};
    use crate::frame::FrameHeader;
    use crate::page_batch::BatchWriter;
    use std::sync::Mutex;

    struct VecMemory(Mutex<Vec<u8>>);
    impl GuestMemory for VecMemory {
        fn region_bytes(&self) -> Vec<u64> {
            vec![self.0.lock().unwrap().len() as u64]
        }
        fn region_addresses(&self) -> Vec<u64> {
            vec![0]
        }
        fn read_page(&self, _: usize, page: u64, dst: &mut [u8]) {
            let at = page as usize * PAGE_SIZE_BYTES;
            dst.copy_from_slice(&self.0.lock().unwrap()[at..at + PAGE_SIZE_BYTES]);
        }
        fn write_page(&self, _: usize, page: u64, src: &[u8]) {
            let at = page as usize * PAGE_SIZE_BYTES;
            self.0.lock().unwrap()[at..at + PAGE_SIZE_BYTES].copy_from_slice(src);
        }
    }

    fn header(kind: FrameKind, epoch: u32, seq: u64) -> FrameHeader {
        FrameHeader { kind, epoch, seq, length: 0, crc: 0 }
    }

    #[test]
    fn round_end_must_count_the_frames() {
        let mut inbound = ConnectionInbound::new(1, 0);
        assert_eq!(inbound.on_frame(&header(FrameKind::Pages, 1, 0), &[]).unwrap(), Inbound::Pages);
        let err = inbound.on_frame(&header(FrameKind::RoundEnd, 1, 1), &2u64.to_le_bytes()).unwrap_err();
        assert!(err.to_string().contains("1 page frames, the source sent 2"), "{err}");
    }

    #[test]
    fn frames_of_another_round_are_rejected() {
        let mut inbound = ConnectionInbound::new(0, 0);
        assert!(inbound.on_frame(&header(FrameKind::Pages, 2, 0), &[]).is_err());
        let mut inbound = ConnectionInbound::new(0, 0);
        assert_eq!(
            inbound.on_frame(&header(FrameKind::RoundEnd, 1, 0), &0u64.to_le_bytes()).unwrap(),
            Inbound::RoundEnd { epoch: 1 }
        );
        assert!(inbound.on_frame(&header(FrameKind::Pages, 1, 1), &[]).is_err());
    }

    #[test]
    fn complete_only_on_connection_zero_after_its_round() {
        let mut other = ConnectionInbound::new(1, 0);
        other.on_frame(&header(FrameKind::RoundEnd, 1, 0), &0u64.to_le_bytes()).unwrap();
        assert!(other.on_frame(&header(FrameKind::Complete, 0, 1), &1u32.to_le_bytes()).is_err());
        let mut control = ConnectionInbound::new(0, 0);
        assert!(control.on_frame(&header(FrameKind::Complete, 0, 0), &1u32.to_le_bytes()).is_err());
        let mut control = ConnectionInbound::new(0, 0);
        control.on_frame(&header(FrameKind::RoundEnd, 1, 0), &0u64.to_le_bytes()).unwrap();
        assert_eq!(
            control.on_frame(&header(FrameKind::Complete, 0, 1), &1u32.to_le_bytes()).unwrap(),
            Inbound::Complete { final_epoch: 1 }
        );
        assert!(control.on_frame(&header(FrameKind::Pages, 2, 2), &[]).is_err());
        assert_eq!(control.on_frame(&header(FrameKind::Commit, 0, 3), &[]).unwrap(), Inbound::Commit);
    }

    /// A memory that records the runs it is told are about to be written.
    struct HintedMemory {
        pages: VecMemory,
        hints: Mutex<Vec<(u64, u64)>>,
    }
    impl GuestMemory for HintedMemory {
        fn region_bytes(&self) -> Vec<u64> {
            self.pages.region_bytes()
        }
        fn region_addresses(&self) -> Vec<u64> {
            self.pages.region_addresses()
        }
        fn read_page(&self, region: usize, page: u64, dst: &mut [u8]) {
            self.pages.read_page(region, page, dst)
        }
        fn write_page(&self, region: usize, page: u64, src: &[u8]) {
            self.pages.write_page(region, page, src)
        }
        fn prepare_write(&self, _: usize, first: u64, count: u64) {
            self.hints.lock().unwrap().push((first, count));
        }
    }

    #[test]
    fn runs_of_pages_written_for_the_first_time_are_faulted_in_together() {
        let memory =
            HintedMemory { pages: VecMemory(Mutex::new(vec![0; 64 * PAGE_SIZE_BYTES])), hints: Mutex::default() };
        let pages = [64u64];
        let limits =
            BatchLimits { region_pages: &pages, codec: Codec::Zstd { level: 1 }, xbzrle: false, copies: false };
        let epochs = PageEpochs::new(&pages);
        epochs.claim(0, 42, 1).unwrap();
        let page = vec![5u8; PAGE_SIZE_BYTES];
        let mut payload = Vec::new();
        {
            let mut batch = BatchWriter::new(&mut payload, 0);
            (10..16).for_each(|p| batch.raw(p, &page));
            // Too short a run for a call of its own.
            (20..22).for_each(|p| batch.raw(p, &page));
            batch.block(&[30, 31, 32, 33, 34], Codec::Zstd { level: 1 }, &[1, 2, 3]);
            // Page 42 was written in round 1: it splits the run.
            (40..48).for_each(|p| batch.raw(p, &page));
            // Zero runs store nothing into memory never written.
            batch.zero_run(50, 10);
        }
        let batch = PageBatch::parse(&payload, &limits).unwrap();
        fault_in_runs(&batch, &limits, &epochs, &memory);
        assert_eq!(*memory.hints.lock().unwrap(), [(10, 6), (30, 5), (43, 5)]);
    }

    #[test]
    fn deltas_apply_only_to_their_base_and_pages_once_per_round() {
        let memory = VecMemory(Mutex::new(vec![0; 4 * PAGE_SIZE_BYTES]));
        let pages = [4u64];
        let limits = BatchLimits { region_pages: &pages, codec: Codec::None, xbzrle: true, copies: false };
        let epochs = PageEpochs::new(&pages);
        let copies = PendingCopies::default();
        let applier = BatchApplier { limits, memory: &memory, epochs: &epochs, copies: &copies };
        let mut worker = ApplyWorker::new();
        let mut apply = |payload: &[u8], epoch| applier.apply(payload, epoch, &mut worker);
        let v1 = vec![1u8; PAGE_SIZE_BYTES];
        let mut v2 = v1.clone();
        v2[100] = 9;
        let mut delta = vec![0u8; 64];
        let len = xbzrle::encode(&v1, &v2, &mut delta).unwrap();

        let mut raw = Vec::new();
        BatchWriter::new(&mut raw, 0).raw(2, &v1);
        let mut xb = Vec::new();
        BatchWriter::new(&mut xb, 0).xbzrle(2, 1, &delta[..len]);

        // The delta before its base is refused.
        assert!(matches!(apply(&xb, 2), Err(ReceiveError::DeltaBase { held: 0, .. })));
        apply(&raw, 1).unwrap();
        // The same page twice in one round is refused.
        assert!(matches!(apply(&raw, 1), Err(ReceiveError::StalePage { .. })));
        apply(&xb, 2).unwrap();
        let mut page = vec![0u8; PAGE_SIZE_BYTES];
        memory.read_page(0, 2, &mut page);
        assert_eq!(page, v2);
        // A delta against round 1 no longer applies once round 2 wrote the page.
        assert!(matches!(apply(&xb, 3), Err(ReceiveError::DeltaBase { base: 1, held: 2, .. })));
    }

    #[test]
    fn blocks_of_any_codec_fill_their_pages_and_a_wrong_size_is_the_batchs_error() {
        let memory = VecMemory(Mutex::new(vec![0; 4 * PAGE_SIZE_BYTES]));
        let pages = [4u64];
        let codec = Codec::ShuffleZstd { level: 1 };
        let limits = BatchLimits { region_pages: &pages, codec, xbzrle: false, copies: false };
        let epochs = PageEpochs::new(&pages);
        let copies = PendingCopies::default();
        let applier = BatchApplier { limits, memory: &memory, epochs: &epochs, copies: &copies };
        let contents: Vec<u8> = (0..3 * PAGE_SIZE_BYTES as u32).flat_map(|i| (i % 4000).to_le_bytes()).collect();
        let contents = &contents[..3 * PAGE_SIZE_BYTES];
        let mut packed = vec![0u8; 3 * PAGE_SIZE_BYTES];
        let len = crate::codec::BlockCompressor::new(codec).compress_into(contents, &mut packed).expect("numbers pack");
        let block = |pages: &[u32]| {
            let mut batch = Vec::new();
            BatchWriter::new(&mut batch, 0).block(pages, codec, &packed[..len]);
            batch
        };
        let mut worker = ApplyWorker::new();
        applier.apply(&block(&[3, 0, 2]), 1, &mut worker).unwrap();
        let mut page = vec![0u8; PAGE_SIZE_BYTES];
        for (number, content) in [3u64, 0, 2].into_iter().zip(contents.chunks_exact(PAGE_SIZE_BYTES)) {
            memory.read_page(0, number, &mut page);
            assert_eq!(page, content, "page {number}");
        }
        assert_eq!(worker.counters.compressed_pages, 3);
        // The same data named as two pages, or four, decompresses to the wrong size.
        for (epoch, pages) in [(2, &[1u32, 2][..]), (3, &[0, 1, 2, 3][..])] {
            let err = applier.apply(&block(pages), epoch, &mut worker).unwrap_err();
            assert!(matches!(err, ReceiveError::Decompress { page: 0 | 1, .. }), "{err}");
        }
    }

    /// An inflater on the CPU that fails the pages whose index `fail` says, and says
    /// "a page" of the wrong size for those `short` says.
    struct Flaky {
        fail: fn(usize) -> bool,
        short: fn(usize) -> bool,
    }

    impl PageInflater for Flaky {
        fn inflate_pages(&mut self, inputs: &[(&[u8], usize)], done: &mut dyn FnMut(usize, Option<&[u8]>)) {
            // In reverse, as a device may finish them.
            for (index, &(input, size)) in inputs.iter().enumerate().rev() {
                let mut out = vec![0u8; size];
                let inflated = PageDecompressor::default().decompress_block(Codec::Deflate, input, &mut out).is_ok();
                match (inflated && !(self.fail)(index), (self.short)(index)) {
                    (false, _) => done(index, None),
                    (true, true) => done(index, Some(&out[..100])),
                    (true, false) => done(index, Some(&out)),
                }
            }
        }
    }

    #[test]
    fn deflate_pages_go_to_the_inflater_and_what_it_fails_to_the_cpu() {
        let memory = VecMemory(Mutex::new(vec![0; 8 * PAGE_SIZE_BYTES]));
        let pages = [8u64];
        let limits = BatchLimits { region_pages: &pages, codec: Codec::Deflate, xbzrle: false, copies: false };
        let epochs = PageEpochs::new(&pages);
        let copies = PendingCopies::default();
        let applier = BatchApplier { limits, memory: &memory, epochs: &epochs, copies: &copies };
        let contents: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i + 1; PAGE_SIZE_BYTES]).collect();
        let mut compressor = crate::codec::PageCompressor::new(Codec::Deflate);
        let mut batch = Vec::new();
        {
            let mut writer = BatchWriter::new(&mut batch, 0);
            for (page, content) in contents.iter().enumerate() {
                let Compressed::Packed { len } = compressor.compress(content) else { panic!("a run of bytes packs") };
                writer.compressed(page as u32, Codec::Deflate, &compressor.output()[..len]);
            }
            writer.raw(7, &[9u8; PAGE_SIZE_BYTES]);
        }
        // Pages 6, 5 and 3 again as one block (another round): entry 1 of the next batch.
        let block_pages = [6u32, 5, 3];
        let block_contents: Vec<u8> = (0..3u8).flat_map(|i| vec![0x40 + i; PAGE_SIZE_BYTES]).collect();
        let mut block_batch = Vec::new();
        {
            let mut packed = vec![0u8; 3 * PAGE_SIZE_BYTES];
            let len = crate::codec::BlockCompressor::new(Codec::Deflate)
                .compress_into(&block_contents, &mut packed)
                .expect("runs of one byte pack");
            let mut writer = BatchWriter::new(&mut block_batch, 0);
            writer.raw(2, &[7u8; PAGE_SIZE_BYTES]);
            writer.block(&block_pages, Codec::Deflate, &packed[..len]);
        }
        let mut worker = ApplyWorker::with_inflater(Box::new(Flaky { fail: |i| i % 3 == 0, short: |i| i == 4 }));
        applier.apply(&batch, 1, &mut worker).unwrap();
        let mut page = vec![0u8; PAGE_SIZE_BYTES];
        for (index, content) in contents.iter().enumerate() {
            memory.read_page(0, index as u64, &mut page);
            assert_eq!(&page, content, "page {index}");
        }
        let counters = worker.counters;
        assert_eq!((counters.compressed_pages, counters.raw_pages), (6, 1));
        // Pages 0 and 3 failed, page 4 came back short: all three went to the CPU.
        assert_eq!((counters.device_pages, counters.device_fallback_pages), (3, 3));
        // A block goes to the device as one input (index 0: failed, inflated on the CPU),
        // and without a device to the CPU: the same pages either way.
        let on_device = ApplyWorker::with_inflater(Box::new(Flaky { fail: |i| i == 0, short: |_| false }));
        for (epoch, mut worker) in [(2, on_device), (3, ApplyWorker::new())] {
            applier.apply(&block_batch, epoch, &mut worker).unwrap();
            for (&number, content) in block_pages.iter().zip(block_contents.chunks_exact(PAGE_SIZE_BYTES)) {
                memory.read_page(0, u64::from(number), &mut page);
                assert_eq!(page, content, "page {number}");
            }
            assert_eq!((worker.counters.compressed_pages, worker.counters.raw_pages), (3, 1));
        }
        // Data no inflater can read is the batch's error, whichever way it went.
        let mut corrupt = Vec::new();
        BatchWriter::new(&mut corrupt, 0).compressed(5, Codec::Deflate, &[0xff; 40]);
        let err = applier.apply(&corrupt, 4, &mut worker).unwrap_err();
        assert!(matches!(err, ReceiveError::Decompress { page: 5, .. }), "{err}");
    }

    #[test]
    fn copies_wait_for_the_barrier_and_must_match_their_digest() {
        let memory = VecMemory(Mutex::new(vec![0; 8 * PAGE_SIZE_BYTES]));
        let pages = [8u64];
        let limits = BatchLimits { region_pages: &pages, codec: Codec::None, xbzrle: false, copies: true };
        let epochs = PageEpochs::new(&pages);
        let copies = PendingCopies::default();
        let applier = BatchApplier { limits, memory: &memory, epochs: &epochs, copies: &copies };
        let mut worker = ApplyWorker::new();
        let original = vec![5u8; PAGE_SIZE_BYTES];
        let digest = crate::seen_pages::copy_digest(&original);
        // The copies may come before their original, in another batch of the round.
        let mut first = Vec::new();
        {
            let mut writer = BatchWriter::new(&mut first, 0);
            writer.copy(3, 0, 1, digest);
            writer.copy(4, 0, 1, digest);
        }
        let mut second = Vec::new();
        BatchWriter::new(&mut second, 0).raw(1, &original);
        applier.apply(&first, 1, &mut worker).unwrap();
        applier.apply(&second, 1, &mut worker).unwrap();
        let mut page = vec![0u8; PAGE_SIZE_BYTES];
        memory.read_page(0, 3, &mut page);
        assert_eq!(page, vec![0u8; PAGE_SIZE_BYTES], "nothing copied before the barrier");
        assert_eq!(copies.apply(&memory).unwrap(), 2);
        for number in [3, 4] {
            memory.read_page(0, number, &mut page);
            assert_eq!(page, original, "page {number}");
        }
        assert_eq!(worker.counters.copied_pages, 2);
        // A copy is a page's send of the round: the page twice in a round is refused.
        let mut again = Vec::new();
        BatchWriter::new(&mut again, 0).raw(3, &original);
        assert!(matches!(applier.apply(&again, 1, &mut worker), Err(ReceiveError::StalePage { .. })));
        // An original that does not hold what was hashed fails the copy.
        let mut wrong = Vec::new();
        BatchWriter::new(&mut wrong, 0).copy(6, 0, 2, digest);
        applier.apply(&wrong, 2, &mut worker).unwrap();
        let err = copies.apply(&memory).unwrap_err();
        assert_eq!(err, ReceiveError::CopyDigest { region: 0, page: 6, from_region: 0, from_page: 2 });
    }
}
