//! The sending side's way out: page-aware chunks being built from what the stream's
//! reader saw (`PageChunks`), and where the finished chunks and control frames go
//! (`Outlet`): straight onto the relay connection, or through the session's compression
//! pool (`squeeze.rs`).

use crate::net_writer::{lock, NetWriter};
use crate::squeeze::Squeezers;
use crate::stats::DirectionStats;
use crate::RelayFailure;
use migration::codec::Codec;
use migration::frame::FrameKind;
use migration::qemu_stream::{Piece, PAGE_BYTES};
use migration::relay_cache::SharedPageCache;
use migration::relay_pages::RecordEncoder;
use std::sync::{Arc, Mutex};
use transport::abort::SessionAbort;

/// Where the sending side's frames go: straight onto the connection, or through the
/// session's compression pool (the stream's chunks keep their order).
pub(crate) enum Outlet<'a> {
    Direct(&'a Mutex<NetWriter>),
    Pool(Squeezers),
}

impl Outlet<'_> {
    /// The page-aware chunk built so far, if any (`ended`: the stream's last): sent as it
    /// is, or handed to the pool to squeeze.
    pub(crate) fn pages(
        &mut self,
        pages: &mut PageChunks,
        ended: bool,
        stats: &mut DirectionStats,
        abort: &SessionAbort,
    ) -> Result<(), RelayFailure> {
        let Some(original) = pages.close(ended) else { return Ok(()) };
        match self {
            Outlet::Direct(_) => self.data(pages.encoder.finish(), original, stats, abort),
            Outlet::Pool(squeezers) => {
                stats.bytes += original as u64;
                let chunk = pages.encoder.finish_into(squeezers.spare_chunk());
                squeezers.squeeze(chunk).map_err(|_| RelayFailure::aborted(abort))
            }
        }
    }

    /// A chunk encoded already, `original` bytes of the stream.
    pub(crate) fn data(
        &mut self,
        payload: &[u8],
        original: usize,
        stats: &mut DirectionStats,
        abort: &SessionAbort,
    ) -> Result<(), RelayFailure> {
        stats.bytes += original as u64;
        match self {
            Outlet::Direct(writer) => {
                stats.wire_bytes += payload.len() as u64;
                stats.chunks += 1;
                lock(writer).send(FrameKind::StreamData, payload).map_err(RelayFailure::link)
            }
            Outlet::Pool(squeezers) => squeezers.data(payload).map_err(|_| RelayFailure::aborted(abort)),
        }
    }

    pub(crate) fn control(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        abort: &SessionAbort,
    ) -> Result<(), RelayFailure> {
        match self {
            Outlet::Direct(writer) => lock(writer).send(kind, payload).map_err(RelayFailure::link),
            Outlet::Pool(squeezers) => squeezers.control(kind, payload).map_err(|_| RelayFailure::aborted(abort)),
        }
    }
}

/// Page-aware chunks being built from the reader's pieces: the bytes between pages as they
/// are, each page once it is whole.
pub(crate) struct PageChunks {
    pub(crate) encoder: RecordEncoder,
    pub(crate) page: Vec<u8>,
}

impl PageChunks {
    /// Stream `channel`'s pages, compressed with `codec` or (`deferred`) left to the
    /// session's pool, with XBZRLE on the session's `cache` where there is one.
    pub(crate) fn new(codec: Codec, cache: Option<Arc<SharedPageCache>>, channel: u16, deferred: bool) -> PageChunks {
        PageChunks {
            encoder: if deferred {
                RecordEncoder::deferring_compression(cache, channel)
            } else {
                RecordEncoder::new(codec, cache, channel)
            },
            page: Vec::with_capacity(PAGE_BYTES),
        }
    }

    pub(crate) fn piece(&mut self, piece: Piece) {
        match piece {
            Piece::Other(bytes) => self.encoder.other(bytes),
            // A whole page goes from the reader's buffer; one the read cut in two is
            // put together first.
            Piece::Page { key, bytes } if self.page.is_empty() && bytes.len() == PAGE_BYTES => {
                self.encoder.page(key, bytes)
            }
            Piece::Page { key, bytes } => {
                self.page.extend_from_slice(bytes);
                if self.page.len() == PAGE_BYTES {
                    self.encoder.page(key, &self.page);
                    self.page.clear();
                }
            }
        }
    }

    /// Whether the chunk so far holds anything, and its original length if so: the
    /// encoder's chunk is then ready to finish. A page still incomplete waits for the next
    /// chunk unless the stream `ended`.
    pub(crate) fn close(&mut self, ended: bool) -> Option<usize> {
        if ended && !self.page.is_empty() {
            let partial = std::mem::take(&mut self.page);
            self.encoder.other(&partial);
        }
        Some(self.encoder.original_len()).filter(|&original| original > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::qemu_stream::PageKey;

    /// The chunk `pieces` make, each page given in pieces cut at `cuts`.
    fn chunk_of(cuts: &[usize]) -> Vec<u8> {
        let mut chunks = PageChunks::new(Codec::None, None, 0, true);
        chunks.piece(Piece::Other(b"header"));
        for i in 0..3u64 {
            let page: Vec<u8> = (0..PAGE_BYTES).map(|b| (b as u64 * 7 + i) as u8).collect();
            let key = PageKey { block: 1, offset: i << 12 };
            let mut at = 0;
            for &cut in cuts.iter().chain([&PAGE_BYTES]) {
                chunks.piece(Piece::Page { key, bytes: &page[at..cut] });
                at = cut;
            }
        }
        assert_eq!(chunks.close(true), Some(6 + 3 * PAGE_BYTES));
        chunks.encoder.finish().to_vec()
    }

    #[test]
    fn a_page_cut_by_the_reads_makes_the_chunk_a_whole_one_does() {
        let whole = chunk_of(&[]);
        assert!(chunk_of(&[1]) == whole);
        assert!(chunk_of(&[100, 4000]) == whole);
    }
}
