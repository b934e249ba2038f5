//! Page codecs: how one 4 KiB page (or a relay's chunk) is squeezed for the wire.
//!
//! Each compression worker owns a [`PageCompressor`] (and each decompression worker a
//! [`PageDecompressor`]) so that codec state is reused page after page: no allocation per
//! page. A page whose compressed form is not smaller than the page itself is sent raw, so
//! no codec ever puts more bytes on the wire than `none`. [`BlockCompressor`] and
//! [`BlockDecompressor`] hold the codec state for blocks of any size; the relay's chunks
//! use them too.

use crate::PAGE_SIZE_BYTES;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// The compression applied to pages that are neither zero nor XBZRLE-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Codec {
    None,
    Lz4,
    /// Raw deflate (zlib's algorithm without the zlib header) at `level` 1..=9.
    Zlib {
        level: u8,
    },
    /// Zstandard at `level` 1..=19 (one zstd frame per page, without a checksum).
    Zstd {
        level: u8,
    },
    /// lz4 after a byte shuffle of 4-byte elements (`shuffle.rs`): for numeric content.
    ShuffleLz4,
    /// zstd at `level` after a byte shuffle of 4-byte elements.
    ShuffleZstd {
        level: u8,
    },
    /// lz4 after a bit shuffle of 4-byte elements (`shuffle::bitshuffle`): for numbers of
    /// fewer bits than their bytes hold.
    BitShuffleLz4,
    /// Raw deflate compressed on a compression device (DPDK's compressdev: ISA-L's deflate
    /// in software, Intel QAT in hardware), several pages in flight at once; on the CPU
    /// (zlib's level 1) for a page the device fails. Any inflater decodes it.
    Deflate,
    /// Chosen per batch by the source among [`Codec::ADAPTIVE_CHOICES`] (no compression,
    /// lz4, zstd:1), from the link's and the cores' measured rates; the destination takes
    /// any of them.
    Adaptive,
}

impl Codec {
    /// Whether a source under `adaptive` may send pages with `self`: one of
    /// [`Codec::ADAPTIVE_CHOICES`], or `deflate`, which joins them where the source has a
    /// compression device.
    pub fn adaptive_may_choose(self) -> bool {
        Codec::ADAPTIVE_CHOICES.contains(&self) || self == Codec::Deflate
    }

    /// QEMU's default zlib level for multi-thread compression is 1: the fastest, and
    /// already most of the gain on guest memory.
    pub const DEFAULT_ZLIB_LEVEL: u8 = 1;
    /// zstd's fastest regular level: on guest memory it packs tighter than zlib at 1 and
    /// runs several times faster (the brief's measurements: 2.4x at ~450 MB/s per core).
    pub const DEFAULT_ZSTD_LEVEL: u8 = 1;
    /// What `Adaptive` chooses among, cheapest first.
    pub const ADAPTIVE_CHOICES: [Codec; 6] = [
        Codec::None,
        Codec::Lz4,
        Codec::ShuffleLz4,
        Codec::Zstd { level: 1 },
        Codec::ShuffleZstd { level: 1 },
        Codec::BitShuffleLz4,
    ];

    /// The codec's number and level on the wire. Number 4 is taken: the relay marks its
    /// page-aware chunks with it (`relay_pages::RECORDS`), in the same byte.
    pub(crate) fn to_wire(self) -> (u8, u8) {
        match self {
            Codec::None => (1, 0),
            Codec::Lz4 => (2, 0),
            Codec::Zlib { level } => (3, level),
            Codec::Zstd { level } => (5, level),
            Codec::Adaptive => (6, 0),
            Codec::ShuffleLz4 => (7, 0),
            Codec::ShuffleZstd { level } => (8, level),
            Codec::Deflate => (9, 0),
            Codec::BitShuffleLz4 => (10, 0),
        }
    }

    pub(crate) fn from_wire(codec: u8, level: u8) -> Option<Self> {
        match (codec, level) {
            (1, 0) => Some(Codec::None),
            (2, 0) => Some(Codec::Lz4),
            (3, 1..=9) => Some(Codec::Zlib { level }),
            (5, 1..=19) => Some(Codec::Zstd { level }),
            (6, 0) => Some(Codec::Adaptive),
            (7, 0) => Some(Codec::ShuffleLz4),
            (8, 1..=19) => Some(Codec::ShuffleZstd { level }),
            (9, 0) => Some(Codec::Deflate),
            (10, 0) => Some(Codec::BitShuffleLz4),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zlib { .. } => "zlib",
            Codec::Zstd { .. } => "zstd",
            Codec::Adaptive => "adaptive",
            Codec::ShuffleLz4 => "shuffle-lz4",
            Codec::ShuffleZstd { .. } => "shuffle-zstd",
            Codec::Deflate => "deflate",
            Codec::BitShuffleLz4 => "bitshuffle-lz4",
        }
    }

    /// The codec without its filter (the codec itself where it has none).
    pub fn unfiltered(self) -> Codec {
        match self {
            Codec::ShuffleLz4 | Codec::BitShuffleLz4 => Codec::Lz4,
            Codec::ShuffleZstd { level } => Codec::Zstd { level },
            codec => codec,
        }
    }

    /// Whether a batch's pages for this codec go in blocks of several pages (zstd's: its
    /// matches and entropy tables carry across pages; on the dirty guest's pages, blocks of
    /// 16 ran 1.8x faster than page by page, and shuffle-zstd's 2.2x, at the same ratio or
    /// better). lz4 gains nothing from them.
    pub fn packs_in_blocks(self) -> bool {
        matches!(self.unfiltered(), Codec::Zstd { .. })
    }

    /// The filter that goes before the codec.
    pub fn filter(self) -> Filter {
        match self {
            Codec::ShuffleLz4 | Codec::ShuffleZstd { .. } => Filter::ByteShuffle,
            Codec::BitShuffleLz4 => Filter::BitShuffle,
            _ => Filter::None,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Zlib { level } | Codec::Zstd { level } | Codec::ShuffleZstd { level } => {
                write!(f, "{}:{level}", self.name())
            }
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for Codec {
    type Err = String;

    /// `none`, `lz4`, `zlib[:LEVEL]`, `zstd[:LEVEL]`, `shuffle-lz4`, `shuffle-zstd[:LEVEL]`,
    /// `bitshuffle-lz4`, `deflate` or `adaptive`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, level) = match text.split_once(':') {
            Some((name, level)) => (name, Some(level)),
            None => (text, None),
        };
        let level_in = |range: std::ops::RangeInclusive<u8>, default: u8| match level {
            None => Ok(default),
            Some(level) => match level.parse::<u8>() {
                Ok(level) if range.contains(&level) => Ok(level),
                _ => Err(format!("{name} level must be {}..={}, got {level:?}", range.start(), range.end())),
            },
        };
        match (name, level) {
            ("none", None) => Ok(Codec::None),
            ("lz4", None) => Ok(Codec::Lz4),
            ("adaptive", None) => Ok(Codec::Adaptive),
            ("deflate", None) => Ok(Codec::Deflate),
            ("zlib", _) => Ok(Codec::Zlib { level: level_in(1..=9, Codec::DEFAULT_ZLIB_LEVEL)? }),
            ("zstd", _) => Ok(Codec::Zstd { level: level_in(1..=19, Codec::DEFAULT_ZSTD_LEVEL)? }),
            ("shuffle-lz4", None) => Ok(Codec::ShuffleLz4),
            ("bitshuffle-lz4", None) => Ok(Codec::BitShuffleLz4),
            ("shuffle-zstd", _) => Ok(Codec::ShuffleZstd { level: level_in(1..=19, Codec::DEFAULT_ZSTD_LEVEL)? }),
            _ => Err(format!(
                "unknown codec {text:?}: expected none, lz4, zlib[:LEVEL], zstd[:LEVEL], shuffle-lz4, \
                 shuffle-zstd[:LEVEL], bitshuffle-lz4, deflate or adaptive"
            )),
        }
    }
}

/// What goes before a codec: nothing, or a shuffle for numeric content (`shuffle.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    None,
    ByteShuffle,
    BitShuffle,
}

/// Outcome of compressing one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressed {
    /// The page did not shrink (or the codec is `none`): send it raw.
    Raw,
    /// `len` bytes of compressed data are in the compressor's output buffer.
    Packed { len: usize },
}

/// Codec state for compressing blocks of any size, reused block after block.
pub struct BlockCompressor {
    codec: Codec,
    deflate: Option<Compress>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// The shuffled block, for a codec with a shuffle filter, and the bit shuffle's
    /// byte-shuffled step.
    shuffled: Vec<u8>,
    scratch: Vec<u8>,
}

impl BlockCompressor {
    pub fn new(codec: Codec) -> Self {
        let filtered = codec;
        let codec = codec.unfiltered();
        let deflate = match codec {
            Codec::Zlib { level } => Some(Compress::new(Compression::new(level.into()), false)),
            // The CPU's deflate, for what the device fails (and without one).
            Codec::Deflate => Some(Compress::new(Compression::new(Codec::DEFAULT_ZLIB_LEVEL.into()), false)),
            _ => None,
        };
        let zstd = match codec {
            Codec::Zstd { level } => {
                let mut zstd = zstd::bulk::Compressor::new(level.into()).expect("zstd levels 1..=19 are valid");
                // A checksum would be dead weight: the frame CRC covers every byte.
                let _ = zstd.include_checksum(false);
                Some(zstd)
            }
            _ => None,
        };
        BlockCompressor { codec: filtered, deflate, zstd, shuffled: Vec::new(), scratch: Vec::new() }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Compresses `input` into `out`: the length written, or `None` when it does not fit
    /// (the caller sizes `out` to what is worth sending) or the codec is `none`.
    pub fn compress_into(&mut self, input: &[u8], out: &mut [u8]) -> Option<usize> {
        let filter = self.codec.filter();
        if filter == Filter::None {
            return self.compress_unfiltered(input, out);
        }
        let mut shuffled = std::mem::take(&mut self.shuffled);
        shuffled.resize(input.len(), 0);
        match filter {
            Filter::BitShuffle => crate::shuffle::bitshuffle(input, &mut shuffled, &mut self.scratch),
            _ => crate::shuffle::shuffle(input, &mut shuffled),
        }
        let len = self.compress_unfiltered(&shuffled, out);
        self.shuffled = shuffled;
        len
    }

    /// `input` through the codec alone, without its filter.
    fn compress_unfiltered(&mut self, input: &[u8], out: &mut [u8]) -> Option<usize> {
        match self.codec.unfiltered() {
            // Adaptive chooses a concrete codec per batch; a compressor holds one.
            Codec::None | Codec::Adaptive | Codec::ShuffleLz4 | Codec::ShuffleZstd { .. } | Codec::BitShuffleLz4 => {
                None
            }
            Codec::Lz4 => lz4_flex::block::compress_into(input, out).ok(),
            Codec::Zlib { .. } | Codec::Deflate => {
                let deflate = self.deflate.as_mut().expect("zlib compressor has deflate state");
                deflate.reset();
                match deflate.compress(input, out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => Some(deflate.total_out() as usize),
                    _ => None,
                }
            }
            Codec::Zstd { .. } => {
                let zstd = self.zstd.as_mut().expect("zstd compressor has its context");
                zstd.compress_to_buffer(input, out).ok()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecompressError {
    #[error("corrupt {codec} page data")]
    Corrupt { codec: &'static str },
    #[error("{codec} page data expanded to {got} bytes, expected {PAGE_SIZE_BYTES}")]
    WrongSize { codec: &'static str, got: usize },
    #[error("page encoded with {got}, but the session negotiated {negotiated}")]
    CodecNotNegotiated { got: &'static str, negotiated: &'static str },
}

/// Codec state for decompressing blocks, reused block after block.
pub struct BlockDecompressor {
    inflate: Decompress,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// The block as decompressed, before its shuffle is undone, and the bit shuffle's
    /// byte-shuffled step.
    shuffled: Vec<u8>,
    scratch: Vec<u8>,
}

impl Default for BlockDecompressor {
    fn default() -> Self {
        BlockDecompressor { inflate: Decompress::new(false), zstd: None, shuffled: Vec::new(), scratch: Vec::new() }
    }
}

impl BlockDecompressor {
    /// Decompresses `data` into `out`, which bounds the output: data that would expand
    /// past it is an error. Returns the length produced.
    pub fn decompress_into(&mut self, codec: Codec, data: &[u8], out: &mut [u8]) -> Result<usize, DecompressError> {
        let filter = codec.filter();
        if filter == Filter::None {
            return self.decompress_unfiltered(codec, data, out);
        }
        let mut shuffled = std::mem::take(&mut self.shuffled);
        shuffled.resize(out.len(), 0);
        let result = self.decompress_unfiltered(codec, data, &mut shuffled);
        if let Ok(len) = result {
            match filter {
                Filter::BitShuffle => {
                    crate::shuffle::unbitshuffle(&shuffled[..len], &mut out[..len], &mut self.scratch)
                }
                _ => crate::shuffle::unshuffle(&shuffled[..len], &mut out[..len]),
            }
        }
        self.shuffled = shuffled;
        result
    }

    /// `data` through `codec`'s decoder alone, without undoing its filter; errors name
    /// `codec`.
    fn decompress_unfiltered(&mut self, codec: Codec, data: &[u8], out: &mut [u8]) -> Result<usize, DecompressError> {
        let corrupt = DecompressError::Corrupt { codec: codec.name() };
        match codec.unfiltered() {
            Codec::None | Codec::Adaptive | Codec::ShuffleLz4 | Codec::ShuffleZstd { .. } | Codec::BitShuffleLz4 => {
                Err(corrupt)
            }
            Codec::Lz4 => lz4_flex::block::decompress_into(data, out).map_err(|_| corrupt),
            Codec::Zlib { .. } | Codec::Deflate => {
                self.inflate.reset(false);
                match self.inflate.decompress(data, out, FlushDecompress::Finish) {
                    Ok(Status::StreamEnd) => Ok(self.inflate.total_out() as usize),
                    _ => Err(corrupt),
                }
            }
            Codec::Zstd { .. } => {
                if self.zstd.is_none() {
                    self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|_| corrupt)?);
                }
                let zstd = self.zstd.as_mut().expect("made above");
                zstd.decompress_to_buffer(data, out).map_err(|_| corrupt)
            }
        }
    }
}

/// Per-worker page compression: the block codec and one page's worth of output.
pub struct PageCompressor {
    block: BlockCompressor,
    out: Vec<u8>,
}

impl PageCompressor {
    pub fn new(codec: Codec) -> Self {
        let block = BlockCompressor::new(codec);
        let out = vec![0u8; Self::room_for(codec)];
        PageCompressor { block, out }
    }

    /// lz4 needs room for its worst case to compress at all; the others are stopped at
    /// one byte under a page, since a larger result would be sent raw anyway.
    fn room_for(codec: Codec) -> usize {
        match codec.unfiltered() {
            Codec::Lz4 => lz4_flex::block::get_maximum_output_size(PAGE_SIZE_BYTES),
            _ => PAGE_SIZE_BYTES - 1,
        }
    }

    pub fn codec(&self) -> Codec {
        self.block.codec()
    }

    /// The room [`PageCompressor::compress_into`] needs in its output.
    pub fn room(&self) -> usize {
        Self::room_for(self.codec())
    }

    /// Compresses one page into `out` (at least [`PageCompressor::room`] bytes long, e.g.
    /// the end of a frame): the length written, or `None` when the page should go raw.
    pub fn compress_into(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        pack(&mut self.block, page, out)
    }

    /// Compresses one page into this compressor's own buffer. On `Packed { len }`, the
    /// bytes are `self.output()[..len]`.
    pub fn compress(&mut self, page: &[u8]) -> Compressed {
        match pack(&mut self.block, page, &mut self.out) {
            Some(len) => Compressed::Packed { len },
            None => Compressed::Raw,
        }
    }

    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// The block codec underneath, for compressing several pages as one block.
    pub fn block(&mut self) -> &mut BlockCompressor {
        &mut self.block
    }
}

/// One page through `block` into `out`: the length, unless the page should go raw.
fn pack(block: &mut BlockCompressor, page: &[u8], out: &mut [u8]) -> Option<usize> {
    debug_assert_eq!(page.len(), PAGE_SIZE_BYTES);
    let room = PageCompressor::room_for(block.codec());
    block.compress_into(page, &mut out[..room]).filter(|len| *len < PAGE_SIZE_BYTES)
}

/// Per-worker page decompression.
#[derive(Default)]
pub struct PageDecompressor {
    block: BlockDecompressor,
}

impl PageDecompressor {
    /// Decompresses `data` into `page`, which must be exactly one page long. The output
    /// is bounded by the page: data that would expand past it is an error.
    pub fn decompress(&mut self, codec: Codec, data: &[u8], page: &mut [u8]) -> Result<(), DecompressError> {
        debug_assert_eq!(page.len(), PAGE_SIZE_BYTES);
        match self.block.decompress_into(codec, data, page)? {
            PAGE_SIZE_BYTES => Ok(()),
            got => Err(DecompressError::WrongSize { codec: codec.name(), got }),
        }
    }

    /// Decompresses a block of several pages into `out`, which it must fill exactly.
    pub fn decompress_block(&mut self, codec: Codec, data: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
        match self.block.decompress_into(codec, data, out)? {
            got if got == out.len() => Ok(()),
            got => Err(DecompressError::WrongSize { codec: codec.name(), got }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CODECS: [Codec; 10] = [
        Codec::None,
        Codec::Lz4,
        Codec::Zlib { level: 1 },
        Codec::Zlib { level: 9 },
        Codec::Zstd { level: 1 },
        Codec::Zstd { level: 19 },
        Codec::ShuffleLz4,
        Codec::ShuffleZstd { level: 1 },
        Codec::Deflate,
        Codec::BitShuffleLz4,
    ];

    fn round_trip(codec: Codec, page: &[u8]) -> Compressed {
        let mut compressor = PageCompressor::new(codec);
        let result = compressor.compress(page);
        if let Compressed::Packed { len } = result {
            assert!(len < PAGE_SIZE_BYTES);
            let mut out = vec![0u8; PAGE_SIZE_BYTES];
            PageDecompressor::default().decompress(codec, &compressor.output()[..len], &mut out).unwrap();
            assert_eq!(out, page);
        }
        result
    }

    #[test]
    fn incompressible_page_goes_raw() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let page: Vec<u8> = (0..PAGE_SIZE_BYTES)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for codec in CODECS {
            assert_eq!(round_trip(codec, &page), Compressed::Raw, "{codec}");
        }
    }

    #[test]
    fn text_page_shrinks() {
        let page: Vec<u8> =
            b"the quick brown fox jumps over the lazy dog. ".iter().copied().cycle().take(PAGE_SIZE_BYTES).collect();
        for codec in &CODECS[1..] {
            assert!(matches!(round_trip(*codec, &page), Compressed::Packed { .. }));
        }
    }

    /// A page of 32-bit words, each `bits` random bits.
    fn numbers_page(bits: u32) -> Vec<u8> {
        let mut state = 0x2545f4914f6cdd1du64;
        (0..PAGE_SIZE_BYTES / 4)
            .flat_map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> (64 - bits)) as u32).to_le_bytes()
            })
            .collect()
    }

    /// `codec`'s ratio on `page` (1 where it goes raw), round trip checked.
    fn ratio(codec: Codec, page: &[u8]) -> f64 {
        match round_trip(codec, page) {
            Compressed::Packed { len } => PAGE_SIZE_BYTES as f64 / len as f64,
            Compressed::Raw => 1.0,
        }
    }

    #[test]
    fn the_shuffle_brings_small_numbers_near_their_bound() {
        // 16 random bits in each 32-bit word: at most 2x.
        let page = numbers_page(16);
        let ratio = |codec| ratio(codec, &page);
        assert!(ratio(Codec::Lz4) < 1.2, "lz4 {}", ratio(Codec::Lz4));
        assert!(ratio(Codec::ShuffleLz4) > 1.9, "shuffle-lz4 {}", ratio(Codec::ShuffleLz4));
        assert!(ratio(Codec::ShuffleZstd { level: 1 }) > ratio(Codec::Zstd { level: 1 }));
    }

    #[test]
    fn the_bit_shuffle_finds_what_the_byte_shuffle_leaves_in_numbers_of_few_bits() {
        // 12 random bits in each 32-bit word: at most 2.67x.
        let page = numbers_page(12);
        let ratio = |codec| ratio(codec, &page);
        let (byte, bit) = (ratio(Codec::ShuffleLz4), ratio(Codec::BitShuffleLz4));
        assert!(bit > 2.2 && bit > 1.2 * byte, "bitshuffle-lz4 {bit}, shuffle-lz4 {byte}");
    }

    #[test]
    fn codec_names_parse() {
        assert_eq!("shuffle-lz4".parse::<Codec>(), Ok(Codec::ShuffleLz4));
        assert_eq!("bitshuffle-lz4".parse::<Codec>(), Ok(Codec::BitShuffleLz4));
        assert_eq!("shuffle-zstd:3".parse::<Codec>(), Ok(Codec::ShuffleZstd { level: 3 }));
        assert_eq!(Codec::ShuffleZstd { level: 3 }.to_string(), "shuffle-zstd:3");
        assert_eq!("zlib:6".parse::<Codec>(), Ok(Codec::Zlib { level: 6 }));
        assert_eq!("zlib".parse::<Codec>(), Ok(Codec::Zlib { level: 1 }));
        assert!("zlib:0".parse::<Codec>().is_err());
        assert_eq!("zstd".parse::<Codec>(), Ok(Codec::Zstd { level: 1 }));
        assert_eq!("zstd:3".parse::<Codec>(), Ok(Codec::Zstd { level: 3 }));
        assert!("zstd:20".parse::<Codec>().is_err());
        assert!("lz5".parse::<Codec>().is_err());
        assert_eq!("adaptive".parse::<Codec>(), Ok(Codec::Adaptive));
        assert_eq!("deflate".parse::<Codec>(), Ok(Codec::Deflate));
        assert!("deflate:1".parse::<Codec>().is_err());
        assert!(Codec::Deflate.adaptive_may_choose() && !Codec::Zlib { level: 1 }.adaptive_may_choose());
        for codec in CODECS.into_iter().chain([Codec::Adaptive]) {
            let (c, l) = codec.to_wire();
            assert_eq!(Codec::from_wire(c, l), Some(codec));
        }
    }

    proptest! {
        #[test]
        fn any_page_round_trips(seed: Vec<u8>, repeat in 1usize..64, codec in proptest::sample::select(CODECS.to_vec())) {
            let page: Vec<u8> = if seed.is_empty() { vec![0; PAGE_SIZE_BYTES] } else {
                seed.iter().flat_map(|&b| std::iter::repeat_n(b, repeat)).cycle().take(PAGE_SIZE_BYTES).collect()
            };
            round_trip(codec, &page);
        }

        #[test]
        fn corrupt_data_never_panics(
            data in proptest::collection::vec(any::<u8>(), 0..5000),
            codec in proptest::sample::select(CODECS[1..].to_vec()),
        ) {
            let mut out = vec![0u8; PAGE_SIZE_BYTES];
            let _ = PageDecompressor::default().decompress(codec, &data, &mut out);
        }
    }
}
