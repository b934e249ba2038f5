//! The payload of a `Pages` frame: a batch of encoded pages of one memory region.
//!
//! ```text
//! region u16 | entry_count u16 | reserved u32 (0)
//! entry_count x entry:
//!   page u32 (index in the region) | encoding u8 | body
//!     1 zero-run : count u32            (no payload: the pages are all zero)
//!     2 raw      : 4096 bytes
//!     3 lz4      : len u16 | len bytes  (1 <= len < 4096)
//!     4 zlib     : len u16 | len bytes  (raw deflate, 1 <= len < 4096)
//!     5 xbzrle   : base_epoch u32 | len u16 | len bytes (delta against the copy of the
//!                  page the destination holds from round base_epoch; len < 4096)
//!     6 zstd     : len u16 | len bytes
//!     7 shuffle-lz4  : len u16 | len bytes  (lz4 of the page byte-shuffled, `shuffle.rs`)
//!     8 shuffle-zstd : len u16 | len bytes
//!     9 deflate      : len u16 | len bytes  (raw deflate, from a compression device)
//!    10 block        : count u8 | (count - 1) x page u32 | encoding u8 | len u16 | len bytes
//!                      (`count` pages, 2..=16, the entry's page first, compressed together
//!                      with one of the compressed encodings 3..=11: their contents one
//!                      after another; len at most `block_room(count)`)
//!    11 bitshuffle-lz4 : len u16 | len bytes
//!    12 copy           : from_region u16 | from_page u32 | digest u64  (the page's contents
//!                        equal those of `from_page`, sent with its contents in the same
//!                        round: the destination copies it at the round's barrier, once
//!                        `digest`, XXH3-64 of the contents, checks out; `seen_pages.rs`)
//! ```
//! Every page index and run is checked against the region's size before use.

use crate::codec::Codec;
use crate::frame::{le_u16, le_u32, le_u64, FrameBuf};
use crate::PAGE_SIZE_BYTES;
use thiserror::Error;

pub const BATCH_HEADER_BYTES: usize = 8;

/// A batch covers at most this many entries. It bounds the work a receiver does per frame
/// and, with at most one page per entry (a zero run is one entry), keeps a batch of raw
/// pages (64 x 4 KiB) well under the frame payload limit.
pub const MAX_ENTRIES_PER_BATCH: usize = 64;

/// Most pages one block entry carries.
pub const MAX_BLOCK_PAGES: usize = 16;

/// The most bytes a block of `pages` pages may take: 4 bytes a page under the pages sent
/// raw, so that a batch with blocks is never larger than the same pages raw
/// (`MAX_BATCH_BYTES` holds), and a block only goes where it saves.
pub fn block_room(pages: usize) -> usize {
    pages * (PAGE_SIZE_BYTES - 4)
}

/// Bound on a batch payload: every entry raw, plus headers.
pub const MAX_BATCH_BYTES: usize = BATCH_HEADER_BYTES + MAX_ENTRIES_PER_BATCH * (5 + 6 + PAGE_SIZE_BYTES);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Encoding {
    ZeroRun = 1,
    Raw = 2,
    Lz4 = 3,
    Zlib = 4,
    Xbzrle = 5,
    Zstd = 6,
    ShuffleLz4 = 7,
    ShuffleZstd = 8,
    Deflate = 9,
    Block = 10,
    BitShuffleLz4 = 11,
    Copy = 12,
}

/// The compressed encodings and the codecs that decode them (levels are the sender's
/// business; zlib's is the session's).
const COMPRESSED: [(Encoding, Codec); 7] = [
    (Encoding::Lz4, Codec::Lz4),
    (Encoding::Zlib, Codec::Zlib { level: Codec::DEFAULT_ZLIB_LEVEL }),
    (Encoding::Zstd, Codec::Zstd { level: Codec::DEFAULT_ZSTD_LEVEL }),
    (Encoding::ShuffleLz4, Codec::ShuffleLz4),
    (Encoding::ShuffleZstd, Codec::ShuffleZstd { level: Codec::DEFAULT_ZSTD_LEVEL }),
    (Encoding::Deflate, Codec::Deflate),
    (Encoding::BitShuffleLz4, Codec::BitShuffleLz4),
];

impl Encoding {
    /// How pages compressed with `codec` are marked in a batch.
    fn of(codec: Codec) -> Option<Encoding> {
        match codec {
            Codec::None | Codec::Adaptive => None,
            Codec::Lz4 => Some(Encoding::Lz4),
            Codec::Zlib { .. } => Some(Encoding::Zlib),
            Codec::Zstd { .. } => Some(Encoding::Zstd),
            Codec::ShuffleLz4 => Some(Encoding::ShuffleLz4),
            Codec::ShuffleZstd { .. } => Some(Encoding::ShuffleZstd),
            Codec::Deflate => Some(Encoding::Deflate),
            Codec::BitShuffleLz4 => Some(Encoding::BitShuffleLz4),
        }
    }
}

/// One decoded entry of a batch, borrowing its data from the frame payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEntry<'a> {
    ZeroRun {
        page: u32,
        count: u32,
    },
    Raw {
        page: u32,
        data: &'a [u8],
    },
    Compressed {
        page: u32,
        codec: Codec,
        data: &'a [u8],
    },
    Xbzrle {
        page: u32,
        base_epoch: u32,
        data: &'a [u8],
    },
    /// Several pages of the region (any, in any order) compressed together, their
    /// contents one after another: `codec`'s matches and tables carry across pages, and a
    /// compression device takes one operation per block.
    Block {
        page: u32,
        others: &'a [u8],
        codec: Codec,
        data: &'a [u8],
    },
    /// The page's contents are those of `from_page` of `from_region`, whose XXH3-64 is
    /// `digest`, as sent in this round.
    Copy {
        page: u32,
        from_region: u16,
        from_page: u32,
        digest: u64,
    },
}

impl PageEntry<'_> {
    /// Number of pages this entry covers.
    pub fn pages(&self) -> u64 {
        match self {
            PageEntry::ZeroRun { count, .. } => u64::from(*count),
            PageEntry::Block { others, .. } => 1 + others.len() as u64 / 4,
            _ => 1,
        }
    }

    pub fn first_page(&self) -> u32 {
        match *self {
            PageEntry::ZeroRun { page, .. }
            | PageEntry::Raw { page, .. }
            | PageEntry::Compressed { page, .. }
            | PageEntry::Xbzrle { page, .. }
            | PageEntry::Block { page, .. }
            | PageEntry::Copy { page, .. } => page,
        }
    }

    /// The pages a block covers, in the order of its data: its first page, then the others.
    pub fn block_pages(page: u32, others: &[u8]) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(page).chain(others.chunks_exact(4).map(le_u32))
    }

    /// The highest page this entry covers, plus one.
    fn end(&self) -> u64 {
        match *self {
            PageEntry::Block { page, others, .. } => {
                PageEntry::block_pages(page, others).map(|p| u64::from(p) + 1).max().unwrap_or(0)
            }
            _ => u64::from(self.first_page()) + self.pages(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BatchError {
    #[error("page batch of {len} bytes is shorter than its header")]
    ShortHeader { len: usize },
    #[error("page batch names region {region}, the session has {regions}")]
    NoSuchRegion { region: u16, regions: usize },
    #[error("page batch declares {count} entries (limit {MAX_ENTRIES_PER_BATCH})")]
    TooManyEntries { count: u16 },
    #[error("page batch ends inside entry {index}")]
    Truncated { index: usize },
    #[error("entry {index} has unknown encoding {encoding}")]
    UnknownEncoding { index: usize, encoding: u8 },
    #[error("entry {index} covers pages {first}..{end} of a region of {region_pages} pages")]
    OutOfRange { index: usize, first: u64, end: u64, region_pages: u64 },
    #[error("entry {index} has a payload of {len} bytes, outside 1..{PAGE_SIZE_BYTES}")]
    BadLength { index: usize, len: usize },
    #[error("entry {index} uses {got}, which the session did not negotiate")]
    NotNegotiated { index: usize, got: &'static str },
    #[error("entry {index} is a block of {count} pages, outside 2..={MAX_BLOCK_PAGES}")]
    BadBlock { index: usize, count: usize },
    #[error("entry {index} is a copy of page {page} of region {region}, which the session does not have")]
    CopyOutOfRange { index: usize, region: u16, page: u32 },
    #[error("page batch has {extra} bytes after its last entry")]
    TrailingBytes { extra: usize },
}

/// A validated view of a page batch.
#[derive(Debug, Clone, Copy)]
pub struct PageBatch<'a> {
    pub region: u16,
    entry_count: u16,
    entries: &'a [u8],
}

/// What a receiver allows: the region sizes and negotiated encodings of its session.
#[derive(Debug, Clone)]
pub struct BatchLimits<'a> {
    pub region_pages: &'a [u64],
    pub codec: Codec,
    pub xbzrle: bool,
    /// Pages may go as copies of others (`PageEntry::Copy`).
    pub copies: bool,
}

impl<'a> PageBatch<'a> {
    pub fn parse(payload: &'a [u8], limits: &BatchLimits<'_>) -> Result<Self, BatchError> {
        if payload.len() < BATCH_HEADER_BYTES {
            return Err(BatchError::ShortHeader { len: payload.len() });
        }
        let region = le_u16(&payload[0..2]);
        if usize::from(region) >= limits.region_pages.len() {
            return Err(BatchError::NoSuchRegion { region, regions: limits.region_pages.len() });
        }
        let entry_count = le_u16(&payload[2..4]);
        if usize::from(entry_count) > MAX_ENTRIES_PER_BATCH {
            return Err(BatchError::TooManyEntries { count: entry_count });
        }
        Ok(PageBatch { region, entry_count, entries: &payload[BATCH_HEADER_BYTES..] })
    }

    /// Decodes every entry, checking each against `limits`, and hands it to `apply`.
    /// Stops at the first malformed entry or the first error from `apply`.
    pub fn for_each<E: From<BatchError>>(
        &self,
        limits: &BatchLimits<'_>,
        mut apply: impl FnMut(PageEntry<'a>) -> Result<(), E>,
    ) -> Result<(), E> {
        let region_pages = limits.region_pages[usize::from(self.region)];
        let mut rest = self.entries;
        for index in 0..usize::from(self.entry_count) {
            let (entry, tail) = parse_entry(index, rest, limits)?;
            let first = u64::from(entry.first_page());
            let end = entry.end();
            if end > region_pages || entry.pages() == 0 {
                return Err(BatchError::OutOfRange { index, first, end, region_pages }.into());
            }
            apply(entry)?;
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(BatchError::TrailingBytes { extra: rest.len() }.into());
        }
        Ok(())
    }
}

fn parse_entry<'a>(
    index: usize,
    bytes: &'a [u8],
    limits: &BatchLimits<'_>,
) -> Result<(PageEntry<'a>, &'a [u8]), BatchError> {
    let truncated = BatchError::Truncated { index };
    let take = |bytes: &'a [u8], n: usize| -> Result<(&'a [u8], &'a [u8]), BatchError> {
        if bytes.len() < n {
            Err(BatchError::Truncated { index })
        } else {
            Ok(bytes.split_at(n))
        }
    };
    let sized = |bytes: &'a [u8]| -> Result<(&'a [u8], &'a [u8]), BatchError> {
        let (len, rest) = take(bytes, 2)?;
        let len = usize::from(le_u16(len));
        if len == 0 || len >= PAGE_SIZE_BYTES {
            return Err(BatchError::BadLength { index, len });
        }
        take(rest, len)
    };
    if bytes.len() < 5 {
        return Err(truncated);
    }
    let page = le_u32(&bytes[0..4]);
    let encoding = bytes[4];
    let body = &bytes[5..];
    let (entry, rest) = match encoding {
        e if e == Encoding::ZeroRun as u8 => {
            let (count, rest) = take(body, 4)?;
            (PageEntry::ZeroRun { page, count: le_u32(count) }, rest)
        }
        e if e == Encoding::Raw as u8 => {
            let (data, rest) = take(body, PAGE_SIZE_BYTES)?;
            (PageEntry::Raw { page, data }, rest)
        }
        e if COMPRESSED.iter().any(|(encoding, _)| *encoding as u8 == e) => {
            let codec = negotiated_codec(index, e, limits)?;
            let (data, rest) = sized(body)?;
            (PageEntry::Compressed { page, codec, data }, rest)
        }
        e if e == Encoding::Block as u8 => {
            let (count, rest) = take(body, 1)?;
            let count = usize::from(count[0]);
            if !(2..=MAX_BLOCK_PAGES).contains(&count) {
                return Err(BatchError::BadBlock { index, count });
            }
            let (others, rest) = take(rest, 4 * (count - 1))?;
            let (inner, rest) = take(rest, 1)?;
            let codec = negotiated_codec(index, inner[0], limits)?;
            let (len, rest) = take(rest, 2)?;
            let len = usize::from(le_u16(len));
            if len == 0 || len > block_room(count) {
                return Err(BatchError::BadLength { index, len });
            }
            let (data, rest) = take(rest, len)?;
            (PageEntry::Block { page, others, codec, data }, rest)
        }
        e if e == Encoding::Xbzrle as u8 => {
            if !limits.xbzrle {
                return Err(BatchError::NotNegotiated { index, got: "xbzrle" });
            }
            let (base, rest) = take(body, 4)?;
            let (data, rest) = sized(rest)?;
            (PageEntry::Xbzrle { page, base_epoch: le_u32(base), data }, rest)
        }
        e if e == Encoding::Copy as u8 => {
            if !limits.copies {
                return Err(BatchError::NotNegotiated { index, got: "copies of pages" });
            }
            let (from, rest) = take(body, 14)?;
            let (from_region, from_page) = (le_u16(&from[0..2]), le_u32(&from[2..6]));
            let pages = limits.region_pages.get(usize::from(from_region));
            if pages.is_none_or(|&pages| u64::from(from_page) >= pages) {
                return Err(BatchError::CopyOutOfRange { index, region: from_region, page: from_page });
            }
            (PageEntry::Copy { page, from_region, from_page, digest: le_u64(&from[6..14]) }, rest)
        }
        encoding => return Err(BatchError::UnknownEncoding { index, encoding }),
    };
    Ok((entry, rest))
}

/// The codec of compressed encoding `encoding`, where the session negotiated it: its own
/// codec, or adaptive, which may choose it. Any byte not in `COMPRESSED` is unknown here.
fn negotiated_codec(index: usize, encoding: u8, limits: &BatchLimits<'_>) -> Result<Codec, BatchError> {
    let Some(&(_, codec)) = COMPRESSED.iter().find(|(e, _)| *e as u8 == encoding) else {
        return Err(BatchError::UnknownEncoding { index, encoding });
    };
    let codec = if encoding == Encoding::Zlib as u8 { limits.codec } else { codec };
    let negotiated = Encoding::of(limits.codec).map(|n| n as u8) == Some(encoding)
        || (limits.codec == Codec::Adaptive && codec.adaptive_may_choose());
    if !negotiated {
        return Err(BatchError::NotNegotiated { index, got: codec.name() });
    }
    Ok(codec)
}

/// Where a batch is written: a frame buffer, whose end compressors fill in place, or (in
/// tests and tools) a plain vector.
pub trait BatchOut {
    /// Bytes written so far.
    fn written_len(&self) -> usize;
    fn extend_from_slice(&mut self, data: &[u8]);
    fn truncate(&mut self, len: usize);
    /// Everything written so far, for patching counts and lengths in place.
    fn written_mut(&mut self) -> &mut [u8];
    /// Lets `fill` write up to `room` bytes at the end; keeps the length it returns.
    fn fill_in_place(&mut self, room: usize, fill: impl FnOnce(&mut [u8]) -> Option<usize>) -> Option<usize>;
}

impl BatchOut for FrameBuf {
    fn written_len(&self) -> usize {
        FrameBuf::len(self)
    }
    fn extend_from_slice(&mut self, data: &[u8]) {
        FrameBuf::extend_from_slice(self, data)
    }
    fn truncate(&mut self, len: usize) {
        FrameBuf::truncate(self, len)
    }
    fn written_mut(&mut self) -> &mut [u8] {
        FrameBuf::written_mut(self)
    }
    fn fill_in_place(&mut self, room: usize, fill: impl FnOnce(&mut [u8]) -> Option<usize>) -> Option<usize> {
        FrameBuf::fill_in_place(self, room, fill)
    }
}

impl BatchOut for Vec<u8> {
    fn written_len(&self) -> usize {
        Vec::len(self)
    }
    fn extend_from_slice(&mut self, data: &[u8]) {
        Vec::extend_from_slice(self, data)
    }
    fn truncate(&mut self, len: usize) {
        Vec::truncate(self, len)
    }
    fn written_mut(&mut self) -> &mut [u8] {
        self
    }
    fn fill_in_place(&mut self, room: usize, fill: impl FnOnce(&mut [u8]) -> Option<usize>) -> Option<usize> {
        let at = self.len();
        self.resize(at + room, 0);
        let written = fill(&mut self[at..]);
        self.truncate(at + written.unwrap_or(0).min(room));
        written
    }
}

/// Writes a page batch into a frame payload, entry by entry.
pub struct BatchWriter<'b, O: BatchOut = Vec<u8>> {
    out: &'b mut O,
    start: usize,
    entries: u16,
}

impl<'b, O: BatchOut> BatchWriter<'b, O> {
    /// Starts a batch at the end of `out` (normally a `FrameBuf` after its header).
    pub fn new(out: &'b mut O, region: u16) -> Self {
        let start = out.written_len();
        out.extend_from_slice(&region.to_le_bytes());
        out.extend_from_slice(&[0u8; 6]);
        BatchWriter { out, start, entries: 0 }
    }

    pub fn entries(&self) -> usize {
        usize::from(self.entries)
    }

    pub fn is_full(&self) -> bool {
        self.entries() >= MAX_ENTRIES_PER_BATCH
    }

    fn entry(&mut self, page: u32, encoding: Encoding) {
        assert!(!self.is_full(), "page batch is full");
        self.entries += 1;
        self.out.extend_from_slice(&page.to_le_bytes());
        self.out.extend_from_slice(&[encoding as u8]);
    }

    pub fn zero_run(&mut self, page: u32, count: u32) {
        self.entry(page, Encoding::ZeroRun);
        self.out.extend_from_slice(&count.to_le_bytes());
    }

    pub fn raw(&mut self, page: u32, data: &[u8]) {
        assert_eq!(data.len(), PAGE_SIZE_BYTES);
        self.entry(page, Encoding::Raw);
        self.out.extend_from_slice(data);
    }

    /// A raw entry whose page `read` writes straight into the batch (one copy from guest
    /// memory to the frame, not two). `read` returns whether to keep it: a page it finds
    /// zero is dropped again, leaving the batch as it was. Returns whether it was kept.
    pub fn raw_in_place(&mut self, page: u32, read: impl FnOnce(&mut [u8]) -> bool) -> bool {
        let mark = self.out.written_len();
        self.entry(page, Encoding::Raw);
        let kept = self.out.fill_in_place(PAGE_SIZE_BYTES, |slot| read(slot).then_some(PAGE_SIZE_BYTES));
        if kept.is_none() {
            self.undo_entry(mark);
        }
        kept.is_some()
    }

    pub fn compressed(&mut self, page: u32, codec: Codec, data: &[u8]) {
        assert!(!data.is_empty() && data.len() < PAGE_SIZE_BYTES);
        self.compressed_in_place(page, codec, data.len(), |out| {
            out.copy_from_slice(data);
            Some(data.len())
        });
    }

    /// A compressed entry that `compress` writes straight into the batch, into at most
    /// `room` bytes: the length kept. Unless it returns a length in 1..PAGE_SIZE_BYTES
    /// (data worth sending compressed), the batch is left as it was and this is `None`.
    pub fn compressed_in_place(
        &mut self,
        page: u32,
        codec: Codec,
        room: usize,
        compress: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) -> Option<usize> {
        let encoding = Encoding::of(codec).expect("codec none has no compressed entries");
        let mark = self.out.written_len();
        self.entry(page, encoding);
        let len_at = self.out.written_len();
        self.out.extend_from_slice(&[0u8; 2]);
        let written =
            self.out.fill_in_place(room, |out| compress(out).filter(|len| (1..PAGE_SIZE_BYTES).contains(len)));
        match written {
            Some(len) => self.out.written_mut()[len_at..len_at + 2].copy_from_slice(&(len as u16).to_le_bytes()),
            None => self.undo_entry(mark),
        }
        written
    }

    /// Takes back the entry begun at `mark`.
    fn undo_entry(&mut self, mark: usize) {
        self.out.truncate(mark);
        self.entries -= 1;
    }

    /// A block of `pages` (2..=MAX_BLOCK_PAGES of them) compressed together with
    /// `codec`, `data` at most `block_room(pages.len())` bytes.
    pub fn block(&mut self, pages: &[u32], codec: Codec, data: &[u8]) {
        assert!(!data.is_empty() && data.len() <= block_room(pages.len()));
        self.block_in_place(pages, codec, data.len(), |out| {
            out.copy_from_slice(data);
            Some(data.len())
        });
    }

    /// A block entry of `pages` (2..=MAX_BLOCK_PAGES of them) that `compress` writes
    /// straight into the batch, into at most `room` bytes (no more than
    /// `block_room(pages.len())`): the length kept. Unless it returns a length in
    /// 1..=room, the batch is left as it was and this is `None`.
    pub fn block_in_place(
        &mut self,
        pages: &[u32],
        codec: Codec,
        room: usize,
        compress: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) -> Option<usize> {
        assert!((2..=MAX_BLOCK_PAGES).contains(&pages.len()) && room <= block_room(pages.len()));
        let encoding = Encoding::of(codec).expect("codec none has no compressed entries");
        let mark = self.out.written_len();
        self.entry(pages[0], Encoding::Block);
        self.out.extend_from_slice(&[pages.len() as u8]);
        for page in &pages[1..] {
            self.out.extend_from_slice(&page.to_le_bytes());
        }
        self.out.extend_from_slice(&[encoding as u8]);
        let len_at = self.out.written_len();
        self.out.extend_from_slice(&[0u8; 2]);
        let written = self.out.fill_in_place(room, |out| compress(out).filter(|len| (1..=room).contains(len)));
        match written {
            Some(len) => self.out.written_mut()[len_at..len_at + 2].copy_from_slice(&(len as u16).to_le_bytes()),
            None => self.undo_entry(mark),
        }
        written
    }

    /// Page `page` is a copy of `from_page` of `from_region`, whose contents hash to
    /// `digest` (`seen_pages::copy_digest`).
    pub fn copy(&mut self, page: u32, from_region: u16, from_page: u32, digest: u64) {
        self.entry(page, Encoding::Copy);
        self.out.extend_from_slice(&from_region.to_le_bytes());
        self.out.extend_from_slice(&from_page.to_le_bytes());
        self.out.extend_from_slice(&digest.to_le_bytes());
    }

    pub fn xbzrle(&mut self, page: u32, base_epoch: u32, data: &[u8]) {
        assert!(!data.is_empty() && data.len() < PAGE_SIZE_BYTES);
        self.entry(page, Encoding::Xbzrle);
        self.out.extend_from_slice(&base_epoch.to_le_bytes());
        self.out.extend_from_slice(&(data.len() as u16).to_le_bytes());
        self.out.extend_from_slice(data);
    }
}

impl<O: BatchOut> Drop for BatchWriter<'_, O> {
    fn drop(&mut self) {
        let at = self.start + 2;
        self.out.written_mut()[at..at + 2].copy_from_slice(&self.entries.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(region_pages: &[u64]) -> BatchLimits<'_> {
        BatchLimits { region_pages, codec: Codec::Lz4, xbzrle: true, copies: true }
    }

    fn collect<'a>(payload: &'a [u8], limits: &BatchLimits<'_>) -> Result<Vec<PageEntry<'a>>, BatchError> {
        let batch = PageBatch::parse(payload, limits)?;
        let mut entries = Vec::new();
        batch.for_each(limits, |entry| {
            entries.push(entry);
            Ok::<_, BatchError>(())
        })?;
        Ok(entries)
    }

    fn sample() -> Vec<u8> {
        let mut payload = Vec::new();
        let raw = vec![7u8; PAGE_SIZE_BYTES];
        {
            let mut writer = BatchWriter::new(&mut payload, 1);
            writer.zero_run(0, 10);
            writer.raw(10, &raw);
            writer.compressed(11, Codec::Lz4, &[1, 2, 3]);
            writer.xbzrle(12, 4, &[5, 6]);
            writer.copy(9, 0, 0, 0xfeed);
        }
        payload
    }

    #[test]
    fn write_parse_round_trip() {
        let payload = sample();
        let entries = collect(&payload, &limits(&[1, 13])).unwrap();
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[0], PageEntry::ZeroRun { page: 0, count: 10 });
        assert!(matches!(entries[1], PageEntry::Raw { page: 10, data } if data == &[7u8; PAGE_SIZE_BYTES][..]));
        assert_eq!(entries[2], PageEntry::Compressed { page: 11, codec: Codec::Lz4, data: &[1, 2, 3] });
        assert_eq!(entries[3], PageEntry::Xbzrle { page: 12, base_epoch: 4, data: &[5, 6] });
        assert_eq!(entries[4], PageEntry::Copy { page: 9, from_region: 0, from_page: 0, digest: 0xfeed });
    }

    #[test]
    fn copies_need_negotiating_and_an_original_the_session_has() {
        let payload = sample();
        let without = BatchLimits { copies: false, ..limits(&[1, 13]) };
        assert!(matches!(collect(&payload, &without), Err(BatchError::NotNegotiated { index: 4, .. })));
        let mut elsewhere = Vec::new();
        BatchWriter::new(&mut elsewhere, 1).copy(2, 0, 1, 0);
        let err = collect(&elsewhere, &limits(&[1, 13])).unwrap_err();
        assert_eq!(err, BatchError::CopyOutOfRange { index: 0, region: 0, page: 1 });
        let mut nowhere = Vec::new();
        BatchWriter::new(&mut nowhere, 1).copy(2, 2, 0, 0);
        assert!(matches!(collect(&nowhere, &limits(&[1, 13])), Err(BatchError::CopyOutOfRange { region: 2, .. })));
        assert!(collect(&nowhere, &limits(&[1, 13, 1])).is_ok());
    }

    #[test]
    fn out_of_range_pages_are_rejected() {
        let payload = sample();
        assert!(matches!(collect(&payload, &limits(&[1, 12])), Err(BatchError::OutOfRange { index: 3, .. })));
        assert!(matches!(collect(&payload, &limits(&[1])), Err(BatchError::NoSuchRegion { .. })));
    }

    #[test]
    fn unnegotiated_encodings_are_rejected() {
        let payload = sample();
        let zlib_only = BatchLimits { codec: Codec::Zlib { level: 1 }, ..limits(&[1, 13]) };
        assert!(matches!(collect(&payload, &zlib_only), Err(BatchError::NotNegotiated { index: 2, got: "lz4" })));
    }

    #[test]
    fn blocks_name_their_pages_and_codec_and_are_checked_like_other_entries() {
        let mut payload = Vec::new();
        BatchWriter::new(&mut payload, 0).block(&[9, 2, 30], Codec::Deflate, &[1, 2, 3]);
        let deflate = BatchLimits { region_pages: &[31], codec: Codec::Deflate, xbzrle: false, copies: false };
        let entries = collect(&payload, &deflate).unwrap();
        let [PageEntry::Block { page: 9, others, codec: Codec::Deflate, data: [1, 2, 3] }] = entries[..] else {
            panic!("{entries:?}")
        };
        assert_eq!(PageEntry::block_pages(9, others).collect::<Vec<_>>(), [9, 2, 30]);
        assert_eq!(entries[0].pages(), 3);
        // Adaptive may send them; lz4 may not.
        assert!(collect(&payload, &BatchLimits { codec: Codec::Adaptive, ..deflate.clone() }).is_ok());
        let lz4 = collect(&payload, &BatchLimits { codec: Codec::Lz4, ..deflate.clone() });
        assert!(matches!(lz4, Err(BatchError::NotNegotiated { got: "deflate", .. })), "{lz4:?}");
        // Any page past the region, not only the first, is out of range.
        let small = collect(&payload, &BatchLimits { region_pages: &[30], ..deflate.clone() });
        assert!(matches!(small, Err(BatchError::OutOfRange { end: 31, .. })), "{small:?}");
        // A block of one page, or of more than the most, is malformed.
        for count in [1u8, MAX_BLOCK_PAGES as u8 + 1] {
            let mut bad = payload.clone();
            bad[BATCH_HEADER_BYTES + 5] = count;
            let err = collect(&bad, &deflate).unwrap_err();
            assert!(matches!(err, BatchError::BadBlock { .. } | BatchError::Truncated { .. }), "{err:?}");
        }
        // The codec inside must be a compressed encoding: raw (2), a block (10) or an
        // unknown byte is refused.
        let codec_at = BATCH_HEADER_BYTES + 5 + 1 + 2 * 4;
        for inner in [2u8, 10, 200] {
            let mut bad = payload.clone();
            bad[codec_at] = inner;
            let err = collect(&bad, &deflate).unwrap_err();
            assert!(matches!(err, BatchError::UnknownEncoding { encoding, .. } if encoding == inner), "{err:?}");
        }
        // Data longer than the block's pages raw (less 4 bytes each) is refused.
        let mut long = Vec::new();
        BatchWriter::new(&mut long, 0).block(&[1, 2], Codec::Deflate, &vec![5u8; block_room(2)]);
        let at = BATCH_HEADER_BYTES + 5 + 1 + 4 + 1;
        long[at..at + 2].copy_from_slice(&(block_room(2) as u16 + 1).to_le_bytes());
        long.push(0);
        assert!(matches!(collect(&long, &deflate), Err(BatchError::BadLength { .. })));
    }

    #[test]
    fn blocks_of_any_compressing_codec_need_it_negotiated() {
        let mut payload = Vec::new();
        BatchWriter::new(&mut payload, 0).block(&[0, 1], Codec::ShuffleZstd { level: 1 }, &[1, 2, 3]);
        let limits = |codec| BatchLimits { region_pages: &[2], codec, xbzrle: false, copies: false };
        let entries = collect(&payload, &limits(Codec::ShuffleZstd { level: 3 })).unwrap();
        assert!(matches!(entries[..], [PageEntry::Block { codec: Codec::ShuffleZstd { .. }, .. }]), "{entries:?}");
        assert!(collect(&payload, &limits(Codec::Adaptive)).is_ok());
        let zstd = collect(&payload, &limits(Codec::Zstd { level: 1 }));
        assert!(matches!(zstd, Err(BatchError::NotNegotiated { got: "shuffle-zstd", .. })), "{zstd:?}");
        // Written in place: a result over the room leaves no trace.
        let mut refused = Vec::new();
        let mut writer = BatchWriter::new(&mut refused, 0);
        assert_eq!(writer.block_in_place(&[0, 1], Codec::Lz4, 100, |_| Some(101)), None);
        assert_eq!(writer.entries(), 0);
        drop(writer);
        assert_eq!(refused.len(), BATCH_HEADER_BYTES);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let payload = sample();
        for len in 0..payload.len() {
            assert!(collect(&payload[..len], &limits(&[1, 13])).is_err(), "truncated to {len} accepted");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..6000))| {
            let _ = collect(&bytes, &limits(&[1000, 5]));
        });
    }

    #[test]
    fn entries_written_in_place_match_copied_ones_and_refused_ones_leave_no_trace() {
        let raw = vec![7u8; PAGE_SIZE_BYTES];
        // A frame buffer that held a longer, different frame before: its old bytes must
        // not show through.
        let mut frame = FrameBuf::with_capacity(MAX_BATCH_BYTES);
        frame.begin().extend_from_slice(&[0xee; 3 * PAGE_SIZE_BYTES]);
        frame.begin();
        {
            let mut writer = BatchWriter::new(&mut frame, 1);
            writer.zero_run(0, 10);
            assert!(writer.raw_in_place(10, |slot| {
                slot.copy_from_slice(&raw);
                true
            }));
            assert!(!writer.raw_in_place(13, |_| false), "a page the reader drops");
            assert_eq!(
                writer.compressed_in_place(11, Codec::Lz4, 4000, |out| {
                    out[..3].copy_from_slice(&[1, 2, 3]);
                    Some(3)
                }),
                Some(3)
            );
            // Not worth sending compressed, or failed: nothing is kept.
            assert_eq!(writer.compressed_in_place(14, Codec::Lz4, 5000, |_| Some(PAGE_SIZE_BYTES)), None);
            assert_eq!(writer.compressed_in_place(14, Codec::Lz4, 5000, |_| None), None);
            writer.xbzrle(12, 4, &[5, 6]);
            writer.copy(9, 0, 0, 0xfeed);
        }
        assert_eq!(frame.payload(), &sample()[..]);
    }
}
