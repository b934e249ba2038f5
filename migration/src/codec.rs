//! Page codecs: how one 4 KiB page is squeezed for the wire.
//!
//! Each compression worker owns a [`PageCompressor`] (and each decompression worker a
//! [`PageDecompressor`]) so that codec state is reused page after page: no allocation per
//! page. A page whose compressed form is not smaller than the page itself is sent raw, so
//! no codec ever puts more bytes on the wire than `none`.

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
}

impl Codec {
    /// QEMU's default zlib level for multi-thread compression is 1: the fastest, and
    /// already most of the gain on guest memory.
    pub const DEFAULT_ZLIB_LEVEL: u8 = 1;

    pub(crate) fn to_wire(self) -> (u8, u8) {
        match self {
            Codec::None => (1, 0),
            Codec::Lz4 => (2, 0),
            Codec::Zlib { level } => (3, level),
        }
    }

    pub(crate) fn from_wire(codec: u8, level: u8) -> Option<Self> {
        match (codec, level) {
            (1, 0) => Some(Codec::None),
            (2, 0) => Some(Codec::Lz4),
            (3, 1..=9) => Some(Codec::Zlib { level }),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zlib { .. } => "zlib",
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Zlib { level } => write!(f, "zlib:{level}"),
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for Codec {
    type Err = String;

    /// `none`, `lz4`, `zlib` or `zlib:LEVEL`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, level) = match text.split_once(':') {
            Some((name, level)) => (name, Some(level)),
            None => (text, None),
        };
        match (name, level) {
            ("none", None) => Ok(Codec::None),
            ("lz4", None) => Ok(Codec::Lz4),
            ("zlib", None) => Ok(Codec::Zlib { level: Codec::DEFAULT_ZLIB_LEVEL }),
            ("zlib", Some(level)) => match level.parse::<u8>() {
                Ok(level @ 1..=9) => Ok(Codec::Zlib { level }),
                _ => Err(format!("zlib level must be 1..=9, got {level:?}")),
            },
            _ => Err(format!("unknown codec {text:?}: expected none, lz4, zlib or zlib:LEVEL")),
        }
    }
}

/// Outcome of compressing one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressed {
    /// The page did not shrink (or the codec is `none`): send it raw.
    Raw,
    /// `len` bytes of compressed data are in the compressor's output buffer.
    Packed { len: usize },
}

/// Per-worker compression state.
pub struct PageCompressor {
    codec: Codec,
    deflate: Option<Compress>,
    out: Vec<u8>,
}

impl PageCompressor {
    pub fn new(codec: Codec) -> Self {
        let deflate = match codec {
            Codec::Zlib { level } => Some(Compress::new(Compression::new(level.into()), false)),
            _ => None,
        };
        // lz4 may need more than a page for incompressible input; deflate is stopped at
        // one byte under a page, since a larger result would be sent raw anyway.
        let out = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE_BYTES)];
        PageCompressor { codec, deflate, out }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Compresses one page. On `Packed { len }`, the bytes are `self.output()[..len]`.
    pub fn compress(&mut self, page: &[u8]) -> Compressed {
        debug_assert_eq!(page.len(), PAGE_SIZE_BYTES);
        let len = match self.codec {
            Codec::None => return Compressed::Raw,
            Codec::Lz4 => match lz4_flex::block::compress_into(page, &mut self.out) {
                Ok(len) => len,
                Err(_) => return Compressed::Raw,
            },
            Codec::Zlib { .. } => {
                let deflate = self.deflate.as_mut().expect("zlib compressor has deflate state");
                deflate.reset();
                let limit = PAGE_SIZE_BYTES - 1;
                match deflate.compress(page, &mut self.out[..limit], FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => deflate.total_out() as usize,
                    _ => return Compressed::Raw,
                }
            }
        };
        if len < PAGE_SIZE_BYTES {
            Compressed::Packed { len }
        } else {
            Compressed::Raw
        }
    }

    pub fn output(&self) -> &[u8] {
        &self.out
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

/// Per-worker decompression state.
pub struct PageDecompressor {
    inflate: Decompress,
}

impl Default for PageDecompressor {
    fn default() -> Self {
        PageDecompressor { inflate: Decompress::new(false) }
    }
}

impl PageDecompressor {
    /// Decompresses `data` into `page`, which must be exactly one page long. The output
    /// is bounded by the page: data that would expand past it is an error.
    pub fn decompress(&mut self, codec: Codec, data: &[u8], page: &mut [u8]) -> Result<(), DecompressError> {
        debug_assert_eq!(page.len(), PAGE_SIZE_BYTES);
        match codec {
            Codec::None => Err(DecompressError::Corrupt { codec: "none" }),
            Codec::Lz4 => match lz4_flex::block::decompress_into(data, page) {
                Ok(PAGE_SIZE_BYTES) => Ok(()),
                Ok(got) => Err(DecompressError::WrongSize { codec: "lz4", got }),
                Err(_) => Err(DecompressError::Corrupt { codec: "lz4" }),
            },
            Codec::Zlib { .. } => {
                self.inflate.reset(false);
                match self.inflate.decompress(data, page, FlushDecompress::Finish) {
                    Ok(Status::StreamEnd) if self.inflate.total_out() as usize == PAGE_SIZE_BYTES => Ok(()),
                    Ok(Status::StreamEnd) => {
                        Err(DecompressError::WrongSize { codec: "zlib", got: self.inflate.total_out() as usize })
                    }
                    _ => Err(DecompressError::Corrupt { codec: "zlib" }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CODECS: [Codec; 4] = [Codec::None, Codec::Lz4, Codec::Zlib { level: 1 }, Codec::Zlib { level: 9 }];

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

    #[test]
    fn codec_names_parse() {
        assert_eq!("zlib:6".parse::<Codec>(), Ok(Codec::Zlib { level: 6 }));
        assert_eq!("zlib".parse::<Codec>(), Ok(Codec::Zlib { level: 1 }));
        assert!("zlib:0".parse::<Codec>().is_err());
        assert!("zstd".parse::<Codec>().is_err());
        for codec in CODECS {
            let (c, l) = codec.to_wire();
            assert_eq!(Codec::from_wire(c, l), Some(codec));
        }
    }

    proptest! {
        #[test]
        fn any_page_round_trips(seed: Vec<u8>, repeat in 1usize..64, codec in 0usize..4) {
            let page: Vec<u8> = if seed.is_empty() { vec![0; PAGE_SIZE_BYTES] } else {
                seed.iter().flat_map(|&b| std::iter::repeat_n(b, repeat)).cycle().take(PAGE_SIZE_BYTES).collect()
            };
            round_trip(CODECS[codec], &page);
        }

        #[test]
        fn corrupt_data_never_panics(data in proptest::collection::vec(any::<u8>(), 0..5000), codec in 1usize..3) {
            let mut out = vec![0u8; PAGE_SIZE_BYTES];
            let _ = PageDecompressor::default().decompress(CODECS[codec], &data, &mut out);
        }
    }
}
