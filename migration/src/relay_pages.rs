//! Page-aware chunks of a carried QEMU stream (`relay.rs`, chunk codec `records`): the
//! guest pages that `qemu_stream` finds are sent one by one, each the cheapest way (zero,
//! unchanged, an XBZRLE delta against the copy last carried, compressed, or raw), and the
//! bytes between them as they are. The destination rebuilds the exact bytes.
//!
//! ```text
//! chunk:  u8 4 | u32 original_len | u8 codec | u8 level | items...
//!         (codec and level: the chunk's page codec, as in a hello; never adaptive)
//! item:   u8 tag, then
//!   OTHER     u16 len, bytes                  (stream bytes that are not page contents)
//!   OTHER_LZ4 u16 len, u16 packed_len, lz4 block (the same, compressed)
//!   RAW       key, 4096 bytes
//!   PACKED    key, u16 len, bytes            (the chunk's codec)
//!   XBZRLE    key, u16 len, delta            (against the page's copy in the cache)
//!   ZERO      key
//!   UNCHANGED key                            (equal to the page's copy in the cache)
//! key:    u16 block, u64 offset
//!   BLOCK     u16 pages, u32 len, bytes      (the chunk's codec over its raw pages as one
//!                                            block, first; zstd's chunks)
//!   BLOCKED   key                            (the block's next page)
//!   DUPLICATE key, key                       (equal to the second key's copy in the cache)
//! tag | 0x80 (RAW, PACKED, ZERO, BLOCKED): the page leaves the cache alone on both sides
//! ```
//!
//! Both ends keep the same cache of the pages carried last, one for all the session's
//! streams (`relay_cache.rs`, direct-mapped like QEMU's): every page goes through it on
//! both sides in an order that keeps the copies equal, so a delta always applies to the
//! copy it was made against.
//!
//! Building a chunk is two steps so that compression can run on several cores while the
//! cache is kept in stream order: `RecordEncoder` decides each page in order (zero,
//! unchanged, delta, or to be compressed) and, deferring compression, leaves the latter
//! RAW; `squeeze`, a pure function of one chunk that any worker can run, then compresses
//! the RAW pages (and long runs of other bytes) with the codec it is given (each chunk may
//! have its own: the adaptive policy chooses per chunk) and writes that codec into the
//! chunk's header.

use crate::codec::{Codec, Compressed, PageCompressor, PageDecompressor};
use crate::frame::{le_u16, le_u32, le_u64};
use crate::qemu_stream::PageKey;
use crate::relay::RelayError;
use crate::relay_cache::{Origin, SharedPageCache};
use crate::{xbzrle, zero, PAGE_SIZE_BYTES};
use std::sync::Arc;

/// The chunk codec byte of page-aware chunks.
pub const RECORDS: u8 = 4;

mod tag {
    pub const OTHER: u8 = 0;
    pub const OTHER_LZ4: u8 = 6;
    pub const RAW: u8 = 1;
    pub const PACKED: u8 = 2;
    pub const XBZRLE: u8 = 3;
    pub const ZERO: u8 = 4;
    pub const UNCHANGED: u8 = 5;
    pub const BLOCK: u8 = 7;
    pub const BLOCKED: u8 = 8;
    pub const DUPLICATE: u8 = 9;
    /// Added to RAW, PACKED, ZERO or BLOCKED: the page leaves the cache alone
    /// (`relay_cache.rs`).
    pub const UNCACHED: u8 = 0x80;
}

const KEY_BYTES: usize = 10;
/// `RECORDS`, the original length, the codec and its level.
const HEADER_BYTES: usize = 7;
/// A delta longer than this is not worth it: the page goes compressed or raw instead.
const XBZRLE_LIMIT: usize = PAGE_SIZE_BYTES * 3 / 4;
/// Runs of other bytes shorter than this are not worth compressing (record headers are a
/// dozen bytes; device state and foreign data come in long runs).
const OTHER_SQUEEZE_MIN: usize = 1024;

/// How the pages of a stream went, for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PageCounts {
    pub raw: u64,
    pub packed: u64,
    pub xbzrle: u64,
    pub zero: u64,
    pub unchanged: u64,
    /// Pages that went without the cache: their slot's last operation came from a chunk
    /// of another stream that the destination had not yet said it decoded.
    pub uncached: u64,
    /// Pages that went as a reference to an equal page the cache held under another key.
    pub duplicate: u64,
}

/// Builds page-aware chunks on the sending side.
pub struct RecordEncoder {
    compressor: PageCompressor,
    cache: Option<Arc<SharedPageCache>>,
    /// This stream, and its page-aware chunks handed out so far.
    stream: u16,
    chunks: u64,
    delta: Vec<u8>,
    /// The chunk, after `front` bytes of room: a deferring encoder leaves room for a
    /// frame's header, so that a chunk `squeeze` would leave as it is goes out as its own
    /// frame, uncopied (`FrameBuf::wrap`).
    out: Vec<u8>,
    front: usize,
    original: u32,
    /// The last chunk was handed out: the next item starts a new one.
    finished: bool,
    /// Pages to compress go RAW, for `squeeze` to compress elsewhere.
    defer_compression: bool,
    pub counts: PageCounts,
}

impl RecordEncoder {
    /// Stream `stream`'s encoder: `codec` for pages that are neither zero nor deltas (not
    /// `Adaptive`: a chunk's codec is chosen by whoever squeezes it); a `cache` (the
    /// session's) turns XBZRLE on.
    pub fn new(codec: Codec, cache: Option<Arc<SharedPageCache>>, stream: u16) -> RecordEncoder {
        assert_ne!(codec, Codec::Adaptive, "a chunk's codec is a fixed one");
        RecordEncoder {
            compressor: PageCompressor::new(codec),
            cache,
            stream,
            chunks: 0,
            delta: vec![0; XBZRLE_LIMIT],
            out: Vec::with_capacity(96 << 10),
            front: 0,
            original: 0,
            finished: true,
            defer_compression: false,
            counts: PageCounts::default(),
        }
    }

    /// As `new`, leaving the compression of pages (and long runs of other bytes) to
    /// `squeeze` and its codec: the pages that would be compressed go and are counted raw.
    /// The buffers `finish_into` hands over begin with room for a frame's header.
    pub fn deferring_compression(cache: Option<Arc<SharedPageCache>>, stream: u16) -> RecordEncoder {
        RecordEncoder {
            defer_compression: true,
            front: crate::frame::HEADER_BYTES,
            ..RecordEncoder::new(Codec::None, cache, stream)
        }
    }

    /// Starts a new chunk if the last one was handed out.
    fn open(&mut self) {
        if std::mem::take(&mut self.finished) {
            self.out.clear();
            self.out.resize(self.front, 0);
            self.out.push(RECORDS);
            self.out.extend_from_slice(&[0; 4]);
            let (codec, level) = self.compressor.codec().to_wire();
            self.out.extend_from_slice(&[codec, level]);
            self.original = 0;
        }
    }

    /// Original stream bytes in the chunk so far.
    pub fn original_len(&self) -> usize {
        if self.finished {
            0
        } else {
            self.original as usize
        }
    }

    /// Adds stream bytes that are not page contents.
    pub fn other(&mut self, mut bytes: &[u8]) {
        self.open();
        while !bytes.is_empty() {
            let n = bytes.len().min(usize::from(u16::MAX));
            self.out.push(tag::OTHER);
            self.out.extend_from_slice(&(n as u16).to_le_bytes());
            self.out.extend_from_slice(&bytes[..n]);
            self.original += n as u32;
            bytes = &bytes[n..];
        }
    }

    /// Adds one whole page, sent the cheapest way.
    pub fn page(&mut self, key: PageKey, page: &[u8]) {
        debug_assert_eq!(page.len(), PAGE_SIZE_BYTES);
        self.open();
        self.original += PAGE_SIZE_BYTES as u32;
        let zero = zero::is_zero(page);
        let mut flags = 0;
        if let Some(cache) = self.cache.clone() {
            let origin = Origin { stream: self.stream, chunk: self.chunks };
            let mut slots = cache.lock();
            if !cache.may_operate(&slots, key, origin) {
                flags = tag::UNCACHED;
                self.counts.uncached += 1;
            } else if zero {
                slots.forget(key, origin);
            } else {
                let delta = slots.get(key, origin).map(|old| xbzrle::encode(old, page, &mut self.delta));
                // A page held under another key (a copy, the same text in two places): a
                // reference to it, where its slot may be read.
                let equal = match delta {
                    None => slots.find_equal(key, page).filter(|&other| cache.may_operate(&slots, other, origin)),
                    Some(_) => None,
                };
                if let Some(other) = equal {
                    slots.get(other, origin);
                }
                slots.put(key, page, origin);
                drop(slots);
                if let Some(other) = equal {
                    self.item(tag::DUPLICATE, key);
                    self.out.extend_from_slice(&other.block.to_le_bytes());
                    self.out.extend_from_slice(&other.offset.to_le_bytes());
                    self.counts.duplicate += 1;
                    return;
                }
                match delta {
                    Some(Ok(0)) => {
                        self.item(tag::UNCHANGED, key);
                        self.counts.unchanged += 1;
                        return;
                    }
                    Some(Ok(len)) => {
                        self.item(tag::XBZRLE, key);
                        self.out.extend_from_slice(&(len as u16).to_le_bytes());
                        self.out.extend_from_slice(&self.delta[..len]);
                        self.counts.xbzrle += 1;
                        return;
                    }
                    _ => {}
                }
            }
        }
        if zero {
            self.item(tag::ZERO | flags, key);
            self.counts.zero += 1;
            return;
        }
        let compressed = if self.defer_compression { Compressed::Raw } else { self.compressor.compress(page) };
        match compressed {
            Compressed::Packed { len } => {
                self.item(tag::PACKED | flags, key);
                self.out.extend_from_slice(&(len as u16).to_le_bytes());
                self.out.extend_from_slice(&self.compressor.output()[..len]);
                self.counts.packed += 1;
            }
            Compressed::Raw => {
                self.item(tag::RAW | flags, key);
                self.out.extend_from_slice(page);
                self.counts.raw += 1;
            }
        }
    }

    fn item(&mut self, tag: u8, key: PageKey) {
        self.out.push(tag);
        self.out.extend_from_slice(&key.block.to_le_bytes());
        self.out.extend_from_slice(&key.offset.to_le_bytes());
    }

    /// As [`RecordEncoder::finish`], handing the buffer over (the encoder goes on in
    /// `spare`, a buffer the caller no longer needs): a deferring encoder's chunk follows
    /// room for a frame's header ([`crate::frame::HEADER_BYTES`]), a frame's payload as it
    /// is.
    pub fn finish_into(&mut self, spare: Vec<u8>) -> Vec<u8> {
        self.finish();
        std::mem::replace(&mut self.out, spare)
    }

    /// The chunk built so far, as a `StreamData` payload; the next item starts a new one.
    pub fn finish(&mut self) -> &[u8] {
        self.open();
        let original = self.original.to_le_bytes();
        self.out[self.front + 1..self.front + 5].copy_from_slice(&original);
        self.finished = true;
        self.chunks += 1;
        &self.out[self.front..]
    }
}

/// Rebuilds the original bytes of page-aware chunks on the receiving side.
pub struct RecordDecoder {
    decompressor: PageDecompressor,
    /// A chunk's block of pages (`BLOCK`), and how many of its bytes `BLOCKED` took.
    block: Vec<u8>,
    block_taken: usize,
    cache: Option<Arc<SharedPageCache>>,
    /// This stream, and its page-aware chunks decoded so far.
    stream: u16,
    chunks: u64,
    page: Vec<u8>,
}

impl RecordDecoder {
    /// Stream `stream`'s decoder, with the session's `cache` where the sender has one (of
    /// the same size); each chunk names its own codec.
    pub fn new(cache: Option<Arc<SharedPageCache>>, stream: u16) -> RecordDecoder {
        RecordDecoder {
            decompressor: PageDecompressor::default(),
            block: Vec::new(),
            block_taken: 0,
            cache,
            stream,
            chunks: 0,
            page: vec![0; PAGE_SIZE_BYTES],
        }
    }

    /// Page-aware chunks decoded so far (what `StreamDecoded` tells the sender).
    pub fn decoded_chunks(&self) -> u64 {
        self.chunks
    }

    /// Appends the original bytes of the chunk `payload` to `out`, every length checked.
    pub fn decode(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), RelayError> {
        if payload.len() < HEADER_BYTES || payload[0] != RECORDS {
            return Err(malformed("no header".into()));
        }
        let original = le_u32(&payload[1..5]) as usize;
        if original > crate::relay::MAX_CHUNK_BYTES + PAGE_SIZE_BYTES {
            return Err(RelayError::Oversized { length: original });
        }
        let codec = match Codec::from_wire(payload[5], payload[6]) {
            Some(Codec::Adaptive) | None => {
                return Err(malformed(format!("unknown page codec {} level {}", payload[5], payload[6])))
            }
            Some(codec) => codec,
        };
        let start = out.len();
        let mut rest = &payload[HEADER_BYTES..];
        let origin = Origin { stream: self.stream, chunk: self.chunks };
        self.block.clear();
        self.block_taken = 0;
        while !rest.is_empty() {
            let tag = take(&mut rest, 1)?[0];
            if tag == tag::BLOCK {
                let fields = take(&mut rest, 6)?;
                let (pages, len) = (usize::from(le_u16(&fields[..2])), le_u32(&fields[2..]) as usize);
                if !self.block.is_empty() || pages * PAGE_SIZE_BYTES > original {
                    return Err(malformed(format!("a block of {pages} pages where it cannot be")));
                }
                self.block.resize(pages * PAGE_SIZE_BYTES, 0);
                self.decompressor
                    .decompress_block(codec, take(&mut rest, len)?, &mut self.block)
                    .map_err(|err| malformed(err.to_string()))?;
                continue;
            }
            // Every item's output is bounded by what the chunk declares, before it is made.
            let room = original - (out.len() - start);
            if tag == tag::OTHER {
                let len = usize::from(le_u16(take(&mut rest, 2)?));
                if len > room {
                    return Err(malformed("more bytes than the chunk declares".into()));
                }
                out.extend_from_slice(take(&mut rest, len)?);
                continue;
            }
            if tag == tag::OTHER_LZ4 {
                let lengths = take(&mut rest, 4)?;
                let (len, packed) = (usize::from(le_u16(&lengths[..2])), usize::from(le_u16(&lengths[2..])));
                if len > room {
                    return Err(malformed("more bytes than the chunk declares".into()));
                }
                let data = take(&mut rest, packed)?;
                let at = out.len();
                out.resize(at + len, 0);
                match lz4_flex::block::decompress_into(data, &mut out[at..]) {
                    Ok(n) if n == len => continue,
                    _ => return Err(malformed("corrupt lz4 run of other bytes".into())),
                }
            }
            if room < PAGE_SIZE_BYTES {
                return Err(malformed("more bytes than the chunk declares".into()));
            }
            let uncached = tag & tag::UNCACHED != 0;
            let tag = tag & !tag::UNCACHED;
            if uncached && !matches!(tag, tag::RAW | tag::PACKED | tag::ZERO | tag::BLOCKED) {
                return Err(malformed(format!("item {tag} cannot leave the cache alone")));
            }
            let key = read_key(&mut rest)?;
            self.rebuild_page(tag, key, &mut rest, codec, origin)?;
            if let (Some(cache), false) = (&self.cache, uncached) {
                let mut slots = cache.lock();
                if tag == tag::ZERO {
                    slots.forget(key, origin);
                } else {
                    slots.put(key, &self.page, origin);
                }
            }
            out.extend_from_slice(&self.page);
        }
        if out.len() - start != original {
            return Err(malformed(format!("{} bytes, the chunk declares {original}", out.len() - start)));
        }
        if self.block_taken != self.block.len() {
            return Err(malformed("pages of the block left over".into()));
        }
        self.chunks += 1;
        Ok(())
    }

    /// The contents of the page item `tag` for `key` into `self.page`, from its data in
    /// `rest`, the chunk's block or the cache.
    fn rebuild_page(
        &mut self,
        tag: u8,
        key: PageKey,
        rest: &mut &[u8],
        codec: Codec,
        origin: Origin,
    ) -> Result<(), RelayError> {
        match tag {
            tag::RAW => self.page.copy_from_slice(take(rest, PAGE_SIZE_BYTES)?),
            tag::BLOCKED => {
                let page = self.block.get(self.block_taken..self.block_taken + PAGE_SIZE_BYTES);
                self.page.copy_from_slice(page.ok_or_else(|| malformed("more pages than the block holds".into()))?);
                self.block_taken += PAGE_SIZE_BYTES;
            }
            tag::PACKED => {
                let len = usize::from(le_u16(take(rest, 2)?));
                let data = take(rest, len)?;
                self.decompressor.decompress(codec, data, &mut self.page).map_err(|err| malformed(err.to_string()))?;
            }
            tag::DUPLICATE | tag::XBZRLE | tag::UNCHANGED => {
                // The copy the item builds on: another key's (a reference) or its own.
                let base = if tag == tag::DUPLICATE { read_key(rest)? } else { key };
                let cache =
                    self.cache.as_ref().ok_or_else(|| malformed("a delta or reference without a cache".into()))?;
                let mut slots = cache.lock();
                let held = slots.get(base, origin).ok_or_else(|| malformed(format!("no cached copy of {base:?}")))?;
                self.page.copy_from_slice(held);
                drop(slots);
                if tag == tag::XBZRLE {
                    let len = usize::from(le_u16(take(rest, 2)?));
                    xbzrle::decode(take(rest, len)?, &mut self.page).map_err(|err| malformed(err.to_string()))?;
                }
            }
            tag::ZERO => self.page.fill(0),
            other => return Err(malformed(format!("unknown item {other}"))),
        }
        Ok(())
    }
}

/// A chunk the decoder refuses, and why.
fn malformed(what: String) -> RelayError {
    RelayError::Malformed(format!("page chunk: {what}"))
}

/// An item's page key.
fn read_key(rest: &mut &[u8]) -> Result<PageKey, RelayError> {
    let key = take(rest, KEY_BYTES)?;
    Ok(PageKey { block: le_u16(&key[..2]), offset: le_u64(&key[2..]) })
}

mod squeeze;
pub use squeeze::{in_blocks, raw_pages, squeeze, squeeze_keeps, squeezed_len};

/// The next `n` bytes of a chunk being read.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], RelayError> {
    if rest.len() < n {
        return Err(RelayError::Malformed("page chunk: an item runs past the chunk".into()));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameBuf;
    use proptest::prelude::*;

    /// A session's cache of `pages` pages (none for 0), for up to 4 streams.
    fn cache(pages: usize) -> Option<Arc<SharedPageCache>> {
        (pages > 0).then(|| Arc::new(SharedPageCache::new(pages, 4)))
    }

    fn key(offset: u64) -> PageKey {
        PageKey { block: 0, offset }
    }

    fn text_page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE_BYTES).map(|i| if i % 64 < 8 { seed.wrapping_add((i / 64) as u8) } else { 0 }).collect()
    }

    #[test]
    fn pages_round_trip_each_the_cheapest_way() {
        for codec in [Codec::None, Codec::Lz4, Codec::Zlib { level: 1 }, Codec::Zstd { level: 1 }] {
            let mut encoder = RecordEncoder::new(codec, cache(64), 0);
            let mut decoder = RecordDecoder::new(cache(64), 0);
            let mut original = Vec::new();
            let mut changed = text_page(1);
            changed[100] ^= 0xff;
            let steps: Vec<(u64, Vec<u8>)> = vec![
                (0x1000, text_page(1)),
                (0x2000, vec![0; PAGE_SIZE_BYTES]),
                (0x1000, text_page(1)),
                (0x1000, changed.clone()),
                (0x3000, (0..PAGE_SIZE_BYTES).map(|i| (i * 7919 % 251) as u8).collect()),
            ];
            encoder.other(b"QEVM header bytes");
            original.extend_from_slice(b"QEVM header bytes");
            for (offset, page) in &steps {
                encoder.page(key(*offset), page);
                original.extend_from_slice(page);
            }
            let payload = encoder.finish().to_vec();
            let mut rebuilt = Vec::new();
            decoder.decode(&payload, &mut rebuilt).unwrap();
            assert_eq!(rebuilt, original, "{codec}");
            let counts = encoder.counts;
            assert_eq!((counts.zero, counts.unchanged, counts.xbzrle), (1, 1, 1), "{codec}: {counts:?}");
            assert!(payload.len() < original.len(), "{codec}: {} of {}", payload.len(), original.len());
        }
    }

    #[test]
    fn the_caches_stay_equal_across_chunks_and_evictions() {
        // A cache of 4 pages and 6 pages cycling through it: pages 2 and 3 keep their slots,
        // the others evict each other, on both sides alike.
        let mut encoder = RecordEncoder::new(Codec::Lz4, cache(4), 0);
        let mut decoder = RecordDecoder::new(cache(4), 0);
        for round in 0..5u8 {
            let mut original = Vec::new();
            for page in 0..6u64 {
                let mut contents = text_page(page as u8);
                contents[7] = round;
                encoder.page(key(page * 4096), &contents);
                original.extend_from_slice(&contents);
            }
            let payload = encoder.finish().to_vec();
            let mut rebuilt = Vec::new();
            decoder.decode(&payload, &mut rebuilt).unwrap();
            assert_eq!(rebuilt, original, "round {round}");
        }
        assert_eq!(encoder.counts.xbzrle, 2 * 4, "{:?}", encoder.counts);
    }

    #[test]
    fn squeezing_elsewhere_gives_what_compressing_in_place_gives() {
        for codec in [Codec::Lz4, Codec::Zlib { level: 1 }, Codec::Zstd { level: 1 }] {
            let pages: Vec<Vec<u8>> = (0..12u8).map(text_page).collect();
            let other: Vec<u8> = b"device state, repeated; ".iter().cycle().take(5000).copied().collect();
            let mut direct = RecordEncoder::new(codec, cache(16), 0);
            let mut deferred = RecordEncoder::deferring_compression(cache(16), 0);
            let mut original = Vec::new();
            for encoder in [&mut direct, &mut deferred] {
                for (i, page) in pages.iter().enumerate() {
                    encoder.page(key(i as u64 * 4096), page);
                }
                encoder.other(&other);
            }
            for page in &pages {
                original.extend_from_slice(page);
            }
            original.extend_from_slice(&other);
            assert_eq!(deferred.counts.raw, 12, "deferred pages are counted raw until squeezed");
            let chunk = deferred.finish().to_vec();
            assert_eq!(raw_pages(&chunk).unwrap(), pages.iter().map(|p| &p[..]).collect::<Vec<_>>());
            let mut frame = FrameBuf::default();
            let packed = squeeze(&chunk, &mut PageCompressor::new(codec), &mut frame).unwrap();
            let squeezed = frame.payload().to_vec();
            assert_eq!(packed as u64, direct.counts.packed, "{codec}");
            let direct_chunk = direct.finish().to_vec();
            assert!(squeezed.len() < direct_chunk.len(), "{codec}: the long run of other bytes is compressed too");
            let mut rebuilt = Vec::new();
            RecordDecoder::new(cache(16), 0).decode(&squeezed, &mut rebuilt).unwrap();
            assert_eq!(rebuilt, original, "{codec}");
            // Squeezing twice would name a codec the pages no longer have.
            assert!(squeeze(&squeezed, &mut PageCompressor::new(codec), &mut FrameBuf::default()).is_err());
        }
    }

    #[test]
    fn zstd_squeezes_a_chunks_pages_as_one_block() {
        // Sixteen pages of text that differ a little: one block finds what they share.
        let pages: Vec<Vec<u8>> = (0..16u8)
            .map(|i| {
                let mut page = b"the quick brown fox jumps over the lazy dog; ".repeat(100)[..PAGE_SIZE_BYTES].to_vec();
                page[..64]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = i.wrapping_mul(31).wrapping_add((j as u8).wrapping_mul(7)));
                page
            })
            .collect();
        let mut encoder = RecordEncoder::deferring_compression(cache(0), 0);
        for (i, page) in pages.iter().enumerate() {
            encoder.other(b"record header");
            encoder.page(key(i as u64 * 4096), page);
        }
        let chunk = encoder.finish().to_vec();
        let zstd = Codec::Zstd { level: 1 };
        let mut compressor = PageCompressor::new(zstd);
        let mut frame = FrameBuf::default();
        assert_eq!(squeeze(&chunk, &mut compressor, &mut frame).unwrap(), 16);
        let page_by_page: usize = pages
            .iter()
            .map(|p| match compressor.compress(p) {
                Compressed::Packed { len } => len,
                Compressed::Raw => PAGE_SIZE_BYTES,
            })
            .sum();
        let squeezed = frame.payload().to_vec();
        assert!(squeezed.len() * 2 < page_by_page, "one block {} bytes, page by page {page_by_page}", squeezed.len());
        let refs: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
        assert!(squeezed_len(&refs, &mut compressor) < squeezed.len(), "what the policy measures is the block");
        let mut rebuilt = Vec::new();
        RecordDecoder::new(cache(0), 0).decode(&squeezed, &mut rebuilt).unwrap();
        let original: Vec<u8> = pages.iter().flat_map(|p| [&b"record header"[..], p].concat()).collect();
        assert_eq!(rebuilt, original);
        // A block that claims more pages than the chunk has, or fewer BLOCKED items than it
        // holds, is refused.
        let mut claims_more = squeezed.clone();
        claims_more[HEADER_BYTES + 1..HEADER_BYTES + 3].copy_from_slice(&40u16.to_le_bytes());
        assert!(RecordDecoder::new(cache(0), 0).decode(&claims_more, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_chunk_squeeze_keeps_is_its_own_squeezed_form_behind_room_for_a_frame_header() {
        // Pages raw, a short run of other bytes, a zero page and a page of text: squeezing
        // without a codec leaves it as it is, and the deferring encoder's buffer holds it
        // after room for a frame's header.
        let mut encoder = RecordEncoder::deferring_compression(cache(0), 0);
        encoder.other(b"record header");
        encoder.page(key(0), &text_page(1));
        encoder.page(key(1), &[0; PAGE_SIZE_BYTES]);
        let buffer = encoder.finish_into(Vec::new());
        let chunk = buffer[crate::frame::HEADER_BYTES..].to_vec();
        assert!(squeeze_keeps(&chunk, Codec::None));
        let mut frame = FrameBuf::default();
        squeeze(&chunk, &mut PageCompressor::new(Codec::None), &mut frame).unwrap();
        assert!(frame.payload() == chunk, "squeezed without a codec, the chunk is as it was");
        assert!(FrameBuf::wrap(buffer).payload() == chunk);
        let mut rebuilt = Vec::new();
        RecordDecoder::new(cache(0), 0).decode(&chunk, &mut rebuilt).unwrap();
        assert!(rebuilt == [&b"record header"[..], &text_page(1), &[0; PAGE_SIZE_BYTES]].concat());
        // A codec, or a run of other bytes long enough for lz4, and squeezing changes it.
        assert!(!squeeze_keeps(&chunk, Codec::Lz4));
        encoder.other(&text_page(2));
        let long_other = encoder.finish().to_vec();
        assert!(!squeeze_keeps(&long_other, Codec::None));
        squeeze(&long_other, &mut PageCompressor::new(Codec::None), &mut frame).unwrap();
        assert!(frame.payload() != long_other);
        // Nor is a chunk that does not parse kept.
        assert!(!squeeze_keeps(&chunk[..chunk.len() - 1], Codec::None));
    }

    #[test]
    fn each_chunk_names_its_own_codec() {
        // One decoder takes chunks squeezed with different codecs, as the adaptive policy
        // sends them, and a chunk whose codec byte is unknown (or adaptive) is refused.
        let mut decoder = RecordDecoder::new(cache(0), 0);
        for codec in [Codec::Zstd { level: 1 }, Codec::None, Codec::Lz4, Codec::Zlib { level: 3 }] {
            let mut encoder = RecordEncoder::deferring_compression(cache(0), 0);
            encoder.page(key(0), &text_page(9));
            let mut frame = FrameBuf::default();
            squeeze(encoder.finish(), &mut PageCompressor::new(codec), &mut frame).unwrap();
            let squeezed = frame.payload().to_vec();
            let mut rebuilt = Vec::new();
            decoder.decode(&squeezed, &mut rebuilt).unwrap();
            assert_eq!(rebuilt, text_page(9), "{codec}");
            for (byte, level) in [(6, 0), (11, 0), (3, 0)] {
                let mut bad = squeezed.clone();
                bad[5..7].copy_from_slice(&[byte, level]);
                let err = decoder.decode(&bad, &mut Vec::new()).unwrap_err();
                assert!(err.to_string().contains("unknown page codec"), "{err}");
            }
        }
    }

    #[test]
    fn a_page_held_under_another_key_goes_as_a_reference() {
        let (source, destination) = (cache(8), cache(8));
        let mut encoder = RecordEncoder::new(Codec::None, source, 0);
        let mut decoder = RecordDecoder::new(destination, 0);
        let mut original = Vec::new();
        for offset in [0u64, 0x5000, 0x9000] {
            encoder.page(key(offset), &text_page(7));
            original.extend_from_slice(&text_page(7));
        }
        assert_eq!(encoder.counts.duplicate, 2, "{:?}", encoder.counts);
        let payload = encoder.finish().to_vec();
        assert!(payload.len() < PAGE_SIZE_BYTES + 100, "{} bytes", payload.len());
        let mut rebuilt = Vec::new();
        decoder.decode(&payload, &mut rebuilt).unwrap();
        assert_eq!(rebuilt, original);
        // A decoder whose cache never held the page refuses the reference.
        let mut encoder = RecordEncoder::new(Codec::None, cache(8), 0);
        encoder.page(key(0), &text_page(8));
        encoder.finish();
        encoder.page(key(0x3000), &text_page(8));
        let err = RecordDecoder::new(cache(8), 0).decode(encoder.finish(), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("no cached copy"), "{err}");
    }

    #[test]
    fn a_delta_without_its_copy_is_refused() {
        let mut encoder = RecordEncoder::new(Codec::None, cache(8), 0);
        encoder.page(key(0), &text_page(1));
        encoder.finish();
        let mut changed = text_page(1);
        changed[0] ^= 1;
        encoder.page(key(0), &changed);
        let payload = encoder.finish().to_vec();
        // A decoder that never saw the first chunk has no copy to apply the delta to.
        let err = RecordDecoder::new(cache(8), 0).decode(&payload, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("no cached copy"), "{err}");
    }

    #[test]
    fn a_page_moving_to_another_stream_goes_as_a_delta_once_its_copy_was_decoded() {
        let (source, destination) = (cache(8), cache(8));
        let mut encoders: Vec<RecordEncoder> =
            (0..2).map(|s| RecordEncoder::new(Codec::Lz4, source.clone(), s)).collect();
        let mut decoders: Vec<RecordDecoder> = (0..2).map(|s| RecordDecoder::new(destination.clone(), s)).collect();
        let version = |v: u8| {
            let mut page = text_page(3);
            page[9] = v;
            page
        };
        // Stream 0 carries the page; stream 1 carries its next version before the
        // destination said it decoded stream 0's chunk: no delta, and the cache left alone.
        encoders[0].page(key(0), &version(1));
        let first = encoders[0].finish().to_vec();
        encoders[1].page(key(0), &version(2));
        let second = encoders[1].finish().to_vec();
        assert_eq!((encoders[1].counts.uncached, encoders[1].counts.xbzrle), (1, 0));
        // The destination may decode them in either order.
        let mut out = Vec::new();
        decoders[1].decode(&second, &mut out).unwrap();
        decoders[0].decode(&first, &mut out).unwrap();
        assert_eq!(out, [version(2), version(1)].concat());
        // Once it has said so, the page's next version on stream 1 is a delta against the
        // copy stream 0 carried.
        source.as_ref().unwrap().peer_decoded(0, decoders[0].decoded_chunks());
        encoders[1].page(key(0), &version(3));
        let third = encoders[1].finish().to_vec();
        assert_eq!(encoders[1].counts.xbzrle, 1, "{:?}", encoders[1].counts);
        assert!(third.len() < 100, "{} bytes", third.len());
        out.clear();
        decoders[1].decode(&third, &mut out).unwrap();
        assert_eq!(out, version(3));
    }

    proptest! {
        /// Three streams share a cache of 4 slots over 6 pages; the destination decodes
        /// each stream's chunks in order but the streams in any interleaving, and its
        /// acknowledgements reach the source late: every chunk still decodes to what was
        /// sent. Each stream's chunks are squeezed with a codec of their own (zstd's as one
        /// block).
        #[test]
        fn shared_caches_stay_consistent_whatever_the_streams_interleaving(
            steps in proptest::collection::vec((0u8..4, 0u8..3, 0u8..6, any::<u8>()), 1..300),
        ) {
            let (source, destination) = (cache(4), cache(4));
            let mut encoders: Vec<RecordEncoder> =
                (0..3).map(|s| RecordEncoder::deferring_compression(source.clone(), s)).collect();
            let codecs = [Codec::Zstd { level: 1 }, Codec::Lz4, Codec::ShuffleZstd { level: 1 }];
            let mut compressors: Vec<PageCompressor> = codecs.iter().map(|&c| PageCompressor::new(c)).collect();
            let mut frame = FrameBuf::default();
            let mut decoders: Vec<RecordDecoder> = (0..3).map(|s| RecordDecoder::new(destination.clone(), s)).collect();
            let mut originals: Vec<Vec<u8>> = vec![Vec::new(); 3];
            let mut in_flight: Vec<std::collections::VecDeque<(Vec<u8>, Vec<u8>)>> = vec![Default::default(); 3];
            let mut acks: std::collections::VecDeque<(u16, u64)> = Default::default();
            for (action, stream, page, value) in steps {
                let s = usize::from(stream);
                match action {
                    // A page (every 16th value zero) on stream s, the chunk then sent.
                    0 | 1 => {
                        // Odd values give the same few contents under any key: references.
                        let contents = if value % 16 == 0 { vec![0; PAGE_SIZE_BYTES] } else if value % 2 == 1 {
                            text_page(100 + value % 3)
                        } else {
                            let mut p = text_page(page);
                            p[100] = value;
                            p
                        };
                        encoders[s].page(key(u64::from(page) * 4096), &contents);
                        originals[s].extend_from_slice(&contents);
                        // A chunk holds at most 16 pages, as the relay's do.
                        if action == 1 || encoders[s].original_len() >= 16 * PAGE_SIZE_BYTES {
                            squeeze(encoders[s].finish(), &mut compressors[s], &mut frame).unwrap();
                            in_flight[s].push_back((frame.payload().to_vec(), std::mem::take(&mut originals[s])));
                        }
                    }
                    // The destination decodes stream s's next chunk and acknowledges it.
                    2 => if let Some((chunk, original)) = in_flight[s].pop_front() {
                        let mut out = Vec::new();
                        decoders[s].decode(&chunk, &mut out).unwrap();
                        prop_assert_eq!(out, original);
                        acks.push_back((stream.into(), decoders[s].decoded_chunks()));
                    },
                    // The oldest acknowledgement reaches the source.
                    _ => if let Some((stream, chunks)) = acks.pop_front() {
                        source.as_ref().unwrap().peer_decoded(stream, chunks);
                    },
                }
            }
        }
    }

    proptest! {
        #[test]
        fn random_payloads_never_panic(mut payload in proptest::collection::vec(any::<u8>(), 0..10_000)) {
            if let Some(first) = payload.first_mut() {
                *first = RECORDS;
            }
            let _ = RecordDecoder::new(cache(8), 0).decode(&payload, &mut Vec::new());
            let _ = RecordDecoder::new(cache(0), 0).decode(&payload, &mut Vec::new());
            let _ = squeeze(&payload, &mut PageCompressor::new(Codec::Lz4), &mut FrameBuf::default());
            let _ = raw_pages(&payload);
        }
    }
}
