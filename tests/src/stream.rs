//! Hand-made source streams, for feeding a destination exactly the bytes a test wants.

use migration::codec::Codec;
use migration::frame::{encode_frame, FrameKind};
use migration::handshake::{encode_preamble, Hello};

pub fn hello(region_bytes: Vec<u64>) -> Hello {
    Hello {
        session_id: 42,
        connection_index: 0,
        connection_count: 1,
        page_size: 4096,
        codec: Codec::None,
        xbzrle: false,
        copies: false,
        region_addresses: migration::memory::contiguous_addresses(&region_bytes),
        region_bytes,
        vm_requirements: Vec::new(),
    }
}

/// Preamble and Hello for a one-connection session of one region.
pub fn opening(region_bytes: u64) -> Vec<u8> {
    opening_with(hello(vec![region_bytes]))
}

/// Preamble and the given Hello (a test's own options: copies, XBZRLE, a codec).
pub fn opening_with(hello: Hello) -> Vec<u8> {
    let mut out = encode_preamble().to_vec();
    out.extend(encode_frame(FrameKind::Hello, 0, 0, &hello.encode()));
    out
}

/// A Pages frame carrying `pages` raw pages of region 0 starting at `first`, filled with
/// `fill`.
pub fn raw_pages(epoch: u32, seq: u64, first: u32, pages: u32, fill: u8) -> Vec<u8> {
    let mut payload = Vec::new();
    {
        let mut batch = migration::page_batch::BatchWriter::new(&mut payload, 0);
        let page = vec![fill; 4096];
        for p in first..first + pages {
            batch.raw(p, &page);
        }
    }
    encode_frame(FrameKind::Pages, epoch, seq, &payload)
}

/// A Pages frame whose one entry says: page `page` of region 0 is a copy of `from_page`,
/// whose contents hash to `digest` (`seen_pages::copy_digest`).
pub fn copy_page(epoch: u32, seq: u64, page: u32, from_page: u32, digest: u64) -> Vec<u8> {
    let mut payload = Vec::new();
    migration::page_batch::BatchWriter::new(&mut payload, 0).copy(page, 0, from_page, digest);
    encode_frame(FrameKind::Pages, epoch, seq, &payload)
}

/// The end of round `epoch` on a connection that sent `pages_frames` Pages frames in it.
pub fn round_end(epoch: u32, seq: u64, pages_frames: u64) -> Vec<u8> {
    encode_frame(FrameKind::RoundEnd, epoch, seq, &pages_frames.to_le_bytes())
}
