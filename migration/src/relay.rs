//! The relay protocol: byte streams another program wrote (QEMU's own migration channels)
//! carried between two vmigrate relays, exactly, over any of our stacks.
//!
//! One connection per carried stream. It opens with a preamble of its own (so that a relay
//! and a vmigrate destination each refuse the other's stream from its first bytes), then
//! the frames of `frame.rs`:
//!
//! ```text
//! preamble:     magic "VMRELAY\0" (8) | version_min u16 | version_max u16 | reserved u32 (0)
//! StreamHello:  session_id u64 | channel u16 | codec u8 | zlib_level u8      (source -> destination)
//!               | xbzrle_cache_pages u32 (0: no XBZRLE)
//!               (codec adaptive: each chunk says which codec it was squeezed with)
//! HelloAck:     as in handshake.rs                                           (destination -> source)
//! StreamData:   codec u8 | original_len u32 | data                           (either way)
//!               (codec 4: page-aware records, `relay_pages.rs`)
//! StreamEnd:    total_bytes u64 | crc32c u32 (of every original byte)        (either way)
//! Heartbeat:    empty                                                        (either way)
//! StreamDecoded: chunks u64: page-aware chunks of the other direction        (either way)
//!               decoded so far (the shared XBZRLE cache's ordering, `relay_cache.rs`)
//! Abort:        reason (UTF-8)                                               (either way)
//! ```
//!
//! Each direction is a stream of its own with its own frame sequence; the handshake's two
//! frames are numbered 0 and each direction's stream frames count from 0 again after it. A chunk is compressed
//! whole (lz4 block, or raw deflate) and sent raw when that does not make it smaller. The
//! frame CRC and the sequence catch damage, loss and reordering chunk by chunk; the
//! `StreamEnd` digest checks the whole stream once more, end to end.

use crate::codec::{BlockCompressor, BlockDecompressor, Codec};
use crate::crc::crc32c_append;
use crate::frame::{le_u16, le_u32, le_u64};
use crate::handshake::{accept_preamble_of, encode_preamble_of, HandshakeError};
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"VMRELAY\0";
pub const PREAMBLE_BYTES: usize = crate::handshake::PREAMBLE_BYTES;
/// Version 2: each page-aware chunk names its own page codec (the adaptive policy's
/// choice), and a hello may say `adaptive`. Version 3: `Tune`, the destination relay's
/// operator changing the migration, which a version-2 source relay would refuse.
pub const VERSION_MIN: u16 = 4;
pub const VERSION_MAX: u16 = 4;

/// The most original bytes one chunk carries: large enough that per-frame costs vanish,
/// small enough that a chunk crosses a link in well under a millisecond.
pub const MAX_CHUNK_BYTES: usize = 64 << 10;
/// Streams one session may carry: QEMU's main channel and up to 255 multifd channels.
pub const MAX_CHANNELS: u16 = 256;

pub fn encode_preamble() -> [u8; PREAMBLE_BYTES] {
    encode_preamble_of(&MAGIC, VERSION_MIN, VERSION_MAX)
}

/// Checks a relay preamble; returns the protocol version to use.
pub fn accept_preamble(bytes: &[u8; PREAMBLE_BYTES]) -> Result<u16, HandshakeError> {
    accept_preamble_of(bytes, &MAGIC, VERSION_MIN, VERSION_MAX)
}

/// How a stream's chunks are encoded: the codec of chunks and of pages, and the size of
/// the XBZRLE page cache both ends keep (in pages; 0 turns XBZRLE off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub codec: Codec,
    pub xbzrle_cache_pages: u32,
}

/// The most pages an XBZRLE cache may hold: 4 GiB per stream, well past QEMU's default
/// (64 MiB), and a bound on what a hello makes the destination allocate.
pub const MAX_CACHE_PAGES: u32 = 1 << 20;

/// Which stream of which session a connection carries, and how its chunks are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHello {
    pub session_id: u64,
    /// The stream's place in the order the source accepted them (QEMU's main channel is 0);
    /// the destination opens its streams in the same order.
    pub channel: u16,
    pub encoding: Encoding,
}

impl StreamHello {
    pub const BYTES: usize = 16;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.session_id.to_le_bytes());
        out[8..10].copy_from_slice(&self.channel.to_le_bytes());
        let (codec, level) = self.encoding.codec.to_wire();
        out[10] = codec;
        out[11] = level;
        out[12..16].copy_from_slice(&self.encoding.xbzrle_cache_pages.to_le_bytes());
        out
    }

    pub fn decode(payload: &[u8]) -> Result<Self, HandshakeError> {
        let malformed = |detail: String| HandshakeError::Malformed { what: "stream hello", detail };
        if payload.len() != Self::BYTES {
            return Err(malformed(format!("{} bytes, expected {}", payload.len(), Self::BYTES)));
        }
        let channel = le_u16(&payload[8..10]);
        if channel >= MAX_CHANNELS {
            return Err(malformed(format!("channel {channel}, at most {} are carried", MAX_CHANNELS)));
        }
        let codec = Codec::from_wire(payload[10], payload[11])
            .ok_or_else(|| malformed(format!("unknown codec {} level {}", payload[10], payload[11])))?;
        let xbzrle_cache_pages = le_u32(&payload[12..16]);
        if xbzrle_cache_pages > MAX_CACHE_PAGES {
            return Err(malformed(format!("an XBZRLE cache of {xbzrle_cache_pages} pages, at most {MAX_CACHE_PAGES}")));
        }
        Ok(StreamHello { session_id: le_u64(&payload[..8]), channel, encoding: Encoding { codec, xbzrle_cache_pages } })
    }
}

/// The end of one direction of a stream: how many bytes it had and their CRC32C.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamEnd {
    pub total_bytes: u64,
    pub crc32c: u32,
}

impl StreamEnd {
    pub const BYTES: usize = 12;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.total_bytes.to_le_bytes());
        out[8..].copy_from_slice(&self.crc32c.to_le_bytes());
        out
    }

    pub fn decode(payload: &[u8]) -> Result<Self, RelayError> {
        if payload.len() != Self::BYTES {
            return Err(RelayError::Malformed(format!("stream end of {} bytes", payload.len())));
        }
        Ok(StreamEnd { total_bytes: le_u64(&payload[..8]), crc32c: le_u32(&payload[8..]) })
    }
}

/// A running digest of a stream's original bytes, kept by both ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamDigest {
    end: StreamEnd,
}

impl StreamDigest {
    pub fn update(&mut self, bytes: &[u8]) {
        self.end.total_bytes += bytes.len() as u64;
        self.end.crc32c = crc32c_append(self.end.crc32c, bytes);
    }

    pub fn end(&self) -> StreamEnd {
        self.end
    }

    /// Checks the sender's account of the stream against what was received.
    pub fn check(&self, sender: &StreamEnd) -> Result<(), RelayError> {
        if *sender == self.end {
            Ok(())
        } else {
            Err(RelayError::DigestMismatch { sent: *sender, received: self.end })
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RelayError {
    #[error("malformed relay frame: {0}")]
    Malformed(String),
    #[error("corrupt {codec} chunk")]
    Corrupt { codec: &'static str },
    #[error("chunk of {length} bytes exceeds the limit of {MAX_CHUNK_BYTES}")]
    Oversized { length: usize },
    #[error(
        "stream digest mismatch: the sender wrote {} bytes (crc32c {:#010x}), {} bytes (crc32c {:#010x}) arrived",
        sent.total_bytes, sent.crc32c, received.total_bytes, received.crc32c
    )]
    DigestMismatch { sent: StreamEnd, received: StreamEnd },
}

const CHUNK_HEADER_BYTES: usize = 5;

/// The largest `StreamData` payload a sender may produce: a chunk of `MAX_CHUNK_BYTES`
/// (lz4's worst case is a little over its input), or a page-aware chunk of as much plus a
/// partial page, with its items' headers. What a receiver accepts, checked before
/// allocating.
pub fn max_data_payload_bytes() -> usize {
    2 * MAX_CHUNK_BYTES + 64
}

/// Encodes chunks of a stream into `StreamData` payloads, reusing its buffers.
pub struct ChunkEncoder {
    block: BlockCompressor,
    out: Vec<u8>,
}

impl ChunkEncoder {
    pub fn new(codec: Codec) -> Self {
        let room = CHUNK_HEADER_BYTES + lz4_flex::block::get_maximum_output_size(MAX_CHUNK_BYTES);
        ChunkEncoder { block: BlockCompressor::new(codec), out: Vec::with_capacity(room) }
    }

    /// The `StreamData` payload for `chunk` (at most `MAX_CHUNK_BYTES`): compressed with
    /// the stream's codec, or raw when that is not smaller.
    pub fn encode(&mut self, chunk: &[u8]) -> &[u8] {
        assert!(chunk.len() <= MAX_CHUNK_BYTES, "chunk over the limit");
        let codec = self.block.codec();
        // lz4 needs its worst case to start; the others stop once past the raw size.
        let room = match codec.unfiltered() {
            Codec::Lz4 => lz4_flex::block::get_maximum_output_size(chunk.len()),
            _ => chunk.len(),
        };
        self.out.clear();
        self.out.resize(CHUNK_HEADER_BYTES + room.max(chunk.len()), 0);
        let body = &mut self.out[CHUNK_HEADER_BYTES..];
        let (codec, len) = match self.block.compress_into(chunk, &mut body[..room]) {
            Some(len) if len < chunk.len() => (codec, len),
            _ => {
                body[..chunk.len()].copy_from_slice(chunk);
                (Codec::None, chunk.len())
            }
        };
        self.out[0] = codec.to_wire().0;
        self.out[1..CHUNK_HEADER_BYTES].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        self.out.truncate(CHUNK_HEADER_BYTES + len);
        &self.out
    }
}

/// Decodes `StreamData` payloads back into the original bytes, every length bounded before
/// anything is allocated.
pub struct ChunkDecoder {
    block: BlockDecompressor,
    out: Vec<u8>,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        ChunkDecoder { block: BlockDecompressor::default(), out: Vec::with_capacity(MAX_CHUNK_BYTES) }
    }
}

impl ChunkDecoder {
    pub fn decode<'a>(&'a mut self, payload: &'a [u8]) -> Result<&'a [u8], RelayError> {
        if payload.len() < CHUNK_HEADER_BYTES {
            return Err(RelayError::Malformed(format!("data frame of {} bytes", payload.len())));
        }
        let length = le_u32(&payload[1..CHUNK_HEADER_BYTES]) as usize;
        if length > MAX_CHUNK_BYTES {
            return Err(RelayError::Oversized { length });
        }
        let body = &payload[CHUNK_HEADER_BYTES..];
        // The level is the sender's business; decoding does not need it.
        let codec = match payload[0] {
            1 => Codec::None,
            2 => Codec::Lz4,
            3 => Codec::Zlib { level: Codec::DEFAULT_ZLIB_LEVEL },
            5 => Codec::Zstd { level: Codec::DEFAULT_ZSTD_LEVEL },
            7 => Codec::ShuffleLz4,
            8 => Codec::ShuffleZstd { level: Codec::DEFAULT_ZSTD_LEVEL },
            10 => Codec::BitShuffleLz4,
            other => return Err(RelayError::Malformed(format!("unknown chunk codec {other}"))),
        };
        if codec == Codec::None {
            return if body.len() == length {
                Ok(body)
            } else {
                Err(RelayError::Malformed(format!("raw chunk of {} bytes says {length}", body.len())))
            };
        }
        self.out.resize(length, 0);
        match self.block.decompress_into(codec, body, &mut self.out) {
            Ok(n) if n == length => Ok(&self.out),
            _ => Err(RelayError::Corrupt { codec: codec.name() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CODECS: [Codec; 7] = [
        Codec::None,
        Codec::Lz4,
        Codec::Zlib { level: 1 },
        Codec::Zstd { level: 1 },
        Codec::ShuffleLz4,
        Codec::ShuffleZstd { level: 1 },
        Codec::BitShuffleLz4,
    ];

    #[test]
    fn preamble_and_hello_round_trip() {
        assert_eq!(accept_preamble(&encode_preamble()), Ok(4));
        // A relay of version 2 (no Tune) is refused by its version.
        let mut old = encode_preamble();
        old[8..12].copy_from_slice(&[2, 0, 2, 0]);
        assert!(matches!(accept_preamble(&old), Err(HandshakeError::VersionMismatch { .. })));
        let mut engine = crate::handshake::encode_preamble();
        assert!(
            matches!(accept_preamble(&engine), Err(HandshakeError::BadMagic { .. })),
            "an engine stream is refused"
        );
        engine[..8].copy_from_slice(&MAGIC);
        engine[8..12].copy_from_slice(&[5, 0, 6, 0]);
        assert!(matches!(accept_preamble(&engine), Err(HandshakeError::VersionMismatch { .. })));
        for codec in CODECS.into_iter().chain([Codec::Adaptive]) {
            let hello = StreamHello {
                session_id: 0xdead_beef,
                channel: 3,
                encoding: Encoding { codec, xbzrle_cache_pages: 7 },
            };
            assert_eq!(StreamHello::decode(&hello.encode()), Ok(hello));
        }
        let lz4 = Encoding { codec: Codec::Lz4, xbzrle_cache_pages: 0 };
        let mut huge = StreamHello { session_id: 1, channel: 0, encoding: lz4 }.encode();
        huge[12..16].copy_from_slice(&(MAX_CACHE_PAGES + 1).to_le_bytes());
        assert!(StreamHello::decode(&huge).is_err(), "a cache over the bound is refused");
        let mut bad = StreamHello { session_id: 1, channel: 0, encoding: lz4 }.encode();
        bad[8..10].copy_from_slice(&MAX_CHANNELS.to_le_bytes());
        assert!(StreamHello::decode(&bad).is_err());
        assert!(StreamHello::decode(&bad[..5]).is_err());
    }

    #[test]
    fn guest_like_chunks_shrink_and_random_ones_go_raw() {
        let mut text = Vec::new();
        while text.len() < MAX_CHUNK_BYTES {
            text.extend_from_slice(b"QEMU RAM page record; mostly zeros and repeats ");
        }
        text.truncate(MAX_CHUNK_BYTES);
        // xorshift64: bytes no codec can shrink.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..MAX_CHUNK_BYTES)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 56) as u8
            })
            .collect();
        for codec in [Codec::Lz4, Codec::Zlib { level: 1 }] {
            let mut encoder = ChunkEncoder::new(codec);
            assert!(encoder.encode(&text).len() < text.len() / 4, "{codec} did not compress text");
            assert_eq!(encoder.encode(&noise).len(), noise.len() + CHUNK_HEADER_BYTES, "{codec}: noise goes raw");
        }
    }

    #[test]
    fn damaged_chunks_are_refused_without_panicking() {
        let mut encoder = ChunkEncoder::new(Codec::Lz4);
        let payload = encoder.encode(&[7u8; 9000]).to_vec();
        let mut decoder = ChunkDecoder::default();
        let mut long = payload.clone();
        long[1..5].copy_from_slice(&(MAX_CHUNK_BYTES as u32 + 1).to_le_bytes());
        assert_eq!(decoder.decode(&long), Err(RelayError::Oversized { length: MAX_CHUNK_BYTES + 1 }));
        let mut wrong_length = payload.clone();
        wrong_length[1..5].copy_from_slice(&9001u32.to_le_bytes());
        assert!(decoder.decode(&wrong_length).is_err());
        assert!(decoder.decode(&payload[..3]).is_err());
        let mut unknown = payload;
        unknown[0] = 9;
        assert!(decoder.decode(&unknown).is_err());
    }

    #[test]
    fn a_digest_mismatch_names_both_accounts() {
        let mut sent = StreamDigest::default();
        sent.update(b"abc");
        let mut received = StreamDigest::default();
        received.update(b"abd");
        let err = received.check(&sent.end()).unwrap_err();
        assert!(err.to_string().contains("3 bytes"), "{err}");
        assert_eq!(StreamEnd::decode(&sent.end().encode()), Ok(sent.end()));
    }

    proptest! {
        #[test]
        fn chunks_round_trip(data in proptest::collection::vec(any::<u8>(), 0..MAX_CHUNK_BYTES), zeros in 0usize..4096) {
            let mut chunk = data;
            chunk.truncate(MAX_CHUNK_BYTES - zeros.min(MAX_CHUNK_BYTES));
            chunk.extend(std::iter::repeat_n(0, zeros));
            for codec in CODECS {
                let mut encoder = ChunkEncoder::new(codec);
                let payload = encoder.encode(&chunk).to_vec();
                let mut decoder = ChunkDecoder::default();
                prop_assert_eq!(decoder.decode(&payload).unwrap(), &chunk[..]);
            }
        }

        #[test]
        fn random_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ChunkDecoder::default().decode(&payload);
            let _ = StreamHello::decode(&payload);
            let _ = StreamEnd::decode(&payload);
        }
    }
}
