//! The destination's state machine and page applier, fed frames a source could send:
//! every frame is sealed with a correct CRC and sequence number (a random one would only
//! exercise the CRC check), so the fuzzer reaches the per-connection rules (epochs, rounds,
//! Complete, Commit) and the page batches (zero runs, raw, lz4, zlib, zstd, XBZRLE deltas,
//! page epochs) behind them. Whatever the frames, the answer is an error or progress: never a
//! panic, a write outside guest memory, or an allocation past the session's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::codec::Codec;
use migration::frame::{FrameHeader, FrameKind};
use migration::memory::GuestMemory;
use migration::page_batch::BatchLimits;
use migration::receiver::{ApplyWorker, BatchApplier, ConnectionInbound, Inbound, PageEpochs, PendingCopies};
use migration::PAGE_SIZE_BYTES;
use std::sync::Mutex;

/// Two small regions, as a prepared destination holds them.
const REGION_PAGES: [u64; 2] = [8, 3];

struct Memory(Vec<Mutex<Vec<u8>>>);

impl GuestMemory for Memory {
    fn region_bytes(&self) -> Vec<u64> {
        self.0.iter().map(|r| r.lock().unwrap().len() as u64).collect()
    }
    fn region_addresses(&self) -> Vec<u64> {
        migration::memory::contiguous_addresses(&self.region_bytes())
    }
    fn read_page(&self, region: usize, page: u64, dst: &mut [u8]) {
        let start = page as usize * PAGE_SIZE_BYTES;
        dst.copy_from_slice(&self.0[region].lock().unwrap()[start..start + PAGE_SIZE_BYTES]);
    }
    fn write_page(&self, region: usize, page: u64, src: &[u8]) {
        let start = page as usize * PAGE_SIZE_BYTES;
        self.0[region].lock().unwrap()[start..start + PAGE_SIZE_BYTES].copy_from_slice(src);
    }
}

fuzz_target!(|data: &[u8]| {
    let [setup, connection, records @ ..] = data else { return };
    let codec = match setup % 9 {
        0 => Codec::None,
        1 => Codec::Lz4,
        2 => Codec::Zlib { level: 1 },
        3 => Codec::Zstd { level: 1 },
        4 => Codec::ShuffleLz4,
        5 => Codec::ShuffleZstd { level: 1 },
        6 => Codec::Deflate,
        7 => Codec::BitShuffleLz4,
        _ => Codec::Adaptive,
    };
    let limits = BatchLimits { region_pages: &REGION_PAGES, codec, xbzrle: setup & 0x80 != 0, copies: setup & 0x40 != 0 };
    let memory = Memory(REGION_PAGES.iter().map(|&p| Mutex::new(vec![0u8; p as usize * PAGE_SIZE_BYTES])).collect());
    let epochs = PageEpochs::new(&REGION_PAGES);
    let copies = PendingCopies::default();
    let applier = BatchApplier { limits, memory: &memory, epochs: &epochs, copies: &copies };
    let mut worker = ApplyWorker::new();
    let mut inbound = ConnectionInbound::new(u16::from(connection % 2), 0);
    let mut seq = 0u64;
    let mut rest = records;
    // Each record: kind, epoch, a sequence nudge, payload length (u16), payload.
    while let [kind, epoch, nudge, len_lo, len_hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*len_lo, *len_hi])).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        let Some(kind) = FrameKind::from_u8(*kind % 16) else { return };
        // Now and then a frame out of sequence, as a repeated or lost frame would be.
        let frame_seq = if *nudge == 0xff { seq.wrapping_add(1) } else { seq };
        seq += 1;
        let bytes = FrameHeader::emit(kind, u32::from(*epoch), frame_seq, payload);
        let Ok(header) = FrameHeader::parse(&bytes) else { return };
        if header.check(&bytes, payload).is_err() {
            return;
        }
        match inbound.on_frame(&header, payload) {
            Ok(Inbound::Pages) => {
                if applier.apply(payload, inbound.epoch(), &mut worker).is_err() {
                    return;
                }
            }
            // The round's barrier: the copies are filled in.
            Ok(Inbound::RoundEnd { .. }) => {
                if copies.apply(&memory).is_err() {
                    return;
                }
            }
            Ok(Inbound::Abort) | Err(_) => return,
            Ok(_) => {}
        }
    }
});
