//! Frames: the unit of the vmigrate stream after the connection preamble.
//!
//! A frame is a fixed 24-byte header followed by a payload. The header names the frame's
//! kind, the pre-copy round (epoch) it belongs to, its sequence number on this connection
//! and its payload length; a CRC32C covers the first 20 header bytes and the payload, so a
//! flipped bit anywhere in a frame is caught before the frame is acted on.
//!
//! ```text
//! offset  size  field
//!      0     1  kind      (FrameKind; 0 is invalid)
//!      1     1  flags     (must be 0)
//!      2     2  reserved  (must be 0)
//!      4     4  epoch     (pre-copy round the frame belongs to)
//!      8     8  seq       (per-connection sequence number, from 0)
//!     16     4  length    (payload bytes, at most MAX_PAYLOAD_BYTES)
//!     20     4  crc32c    (over the payload, then header bytes 0..20)
//! ```
//! All integers are little-endian.

use crate::crc::{crc32c, crc32c_append};
use thiserror::Error;

/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 24;

/// Upper bound on any frame payload. A page batch of 64 raw pages is 262 KiB; 1 MiB
/// leaves room for device state and larger batches while capping what a hostile peer can
/// make a receiver allocate for one frame.
pub const MAX_PAYLOAD_BYTES: u32 = 1 << 20;

mod field {
    use std::ops::Range;
    pub const KIND: usize = 0;
    pub const FLAGS: usize = 1;
    pub const RESERVED: Range<usize> = 2..4;
    pub const EPOCH: Range<usize> = 4..8;
    pub const SEQ: Range<usize> = 8..16;
    pub const LENGTH: Range<usize> = 16..20;
    pub const CRC: Range<usize> = 20..24;
}

/// What a frame carries. Zero is reserved as invalid so that a zeroed buffer never parses
/// as a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Source to destination, first frame on every connection: session and memory layout.
    Hello = 1,
    /// Destination to source: the Hello was accepted or refused.
    HelloAck = 2,
    /// Source to destination: a batch of encoded pages of one region.
    Pages = 3,
    /// Source to destination: this connection sent every frame of the epoch.
    RoundEnd = 4,
    /// Source to destination (connection 0): the guest's device state, final round only.
    DeviceState = 5,
    /// Source to destination (connection 0): the final round has been sent.
    Complete = 6,
    /// Destination to source: all state received and checked; ready to resume.
    Ready = 7,
    /// Source to destination: the source has let go of the guest; resume it.
    Commit = 8,
    /// Destination to source: the guest runs on the destination.
    Resumed = 9,
    /// Either way: the session is abandoned, with a reason.
    Abort = 10,
    /// Source to destination: the digest of the source's guest memory (`--verify`).
    VerifyDigest = 11,
    /// Destination to source: whether the digests matched.
    VerifyResult = 12,
    /// Destination to source (connection 0): every page of the epoch is applied. The
    /// source waits for it before stopping the guest, so the downtime never includes the
    /// destination catching up on an earlier round.
    RoundApplied = 13,
    /// Relay (`relay.rs`), source to destination, first frame on every connection: the
    /// session and which of its streams this connection carries.
    StreamHello = 14,
    /// Relay, either way: a chunk of the carried stream.
    StreamData = 15,
    /// Relay, either way: the stream in this direction ended; its length and digest.
    StreamEnd = 16,
    /// Either way: nothing to carry now, but alive. The relay's links both ways; the
    /// engine's destination on connection 0 while the source's rounds arrive.
    Heartbeat = 17,
    /// Relay, either way: how many page-aware chunks of the other direction have been
    /// decoded, so that its XBZRLE may build on the copies they left (`relay_cache.rs`).
    StreamDecoded = 18,
    /// Relay, either way: the digest of the direction's bytes so far (as `StreamEnd`'s),
    /// sent where a QEMU main stream may have ended but its socket stays open.
    StreamCheckpoint = 19,
    /// Destination to source (connection 0), and relay either way: an operator's change to
    /// the running migration, asked for where the source cannot be reached (`Tune`).
    Tune = 20,
}

impl FrameKind {
    pub fn from_u8(value: u8) -> Option<Self> {
        use FrameKind::*;
        Some(match value {
            1 => Hello,
            2 => HelloAck,
            3 => Pages,
            4 => RoundEnd,
            5 => DeviceState,
            6 => Complete,
            7 => Ready,
            8 => Commit,
            9 => Resumed,
            10 => Abort,
            11 => VerifyDigest,
            12 => VerifyResult,
            13 => RoundApplied,
            14 => StreamHello,
            15 => StreamData,
            16 => StreamEnd,
            17 => Heartbeat,
            18 => StreamDecoded,
            19 => StreamCheckpoint,
            20 => Tune,
            _ => return None,
        })
    }
}

/// Why a frame was rejected. Every variant is a property of the bytes received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("frame header has reserved bits set (flags {flags:#x}, reserved {reserved:#x})")]
    ReservedBits { flags: u8, reserved: u16 },
    #[error("frame payload of {length} bytes exceeds the limit of {limit} bytes")]
    Oversized { length: u32, limit: u32 },
    #[error("frame checksum mismatch (seq {seq}): expected {expected:#010x}, computed {computed:#010x}")]
    Checksum { seq: u64, expected: u32, computed: u32 },
    #[error("frame out of sequence: expected seq {expected}, got {got}")]
    Sequence { expected: u64, got: u64 },
    #[error("stream ended inside a frame")]
    Truncated,
}

/// The parsed form of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub epoch: u32,
    pub seq: u64,
    pub length: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Parses and validates a header: kind known, reserved bits clear, length bounded.
    /// The checksum can only be checked once the payload is in: see [`FrameHeader::check`].
    pub fn parse(bytes: &[u8; HEADER_BYTES]) -> Result<Self, FrameError> {
        let kind_byte = bytes[field::KIND];
        let kind = FrameKind::from_u8(kind_byte).ok_or(FrameError::UnknownKind { kind: kind_byte })?;
        let flags = bytes[field::FLAGS];
        let reserved = u16::from_le_bytes(bytes[field::RESERVED].try_into().unwrap_or_default());
        if flags != 0 || reserved != 0 {
            return Err(FrameError::ReservedBits { flags, reserved });
        }
        let length = le_u32(&bytes[field::LENGTH]);
        if length > MAX_PAYLOAD_BYTES {
            return Err(FrameError::Oversized { length, limit: MAX_PAYLOAD_BYTES });
        }
        Ok(FrameHeader {
            kind,
            epoch: le_u32(&bytes[field::EPOCH]),
            seq: le_u64(&bytes[field::SEQ]),
            length,
            crc: le_u32(&bytes[field::CRC]),
        })
    }

    /// Checks the frame's CRC32C over its header bytes and payload.
    pub fn check(&self, header: &[u8; HEADER_BYTES], payload: &[u8]) -> Result<(), FrameError> {
        let computed = frame_crc(header, payload);
        if computed != self.crc {
            return Err(FrameError::Checksum { seq: self.seq, expected: self.crc, computed });
        }
        Ok(())
    }

    /// Builds the header of a frame carrying `payload`, checksum included.
    pub fn emit(kind: FrameKind, epoch: u32, seq: u64, payload: &[u8]) -> [u8; HEADER_BYTES] {
        Self::emit_with_payload_crc(kind, epoch, seq, payload.len(), crc32c(payload))
    }

    /// As [`FrameHeader::emit`], from the payload's length and CRC32C computed earlier (a
    /// compression worker checksums the payload; the connection writer, which alone knows
    /// the sequence number, finishes the header).
    pub fn emit_with_payload_crc(
        kind: FrameKind,
        epoch: u32,
        seq: u64,
        payload_len: usize,
        payload_crc: u32,
    ) -> [u8; HEADER_BYTES] {
        let mut header = [0u8; HEADER_BYTES];
        header[field::KIND] = kind as u8;
        header[field::EPOCH].copy_from_slice(&epoch.to_le_bytes());
        header[field::SEQ].copy_from_slice(&seq.to_le_bytes());
        let length = u32::try_from(payload_len).expect("payload length fits u32");
        assert!(length <= MAX_PAYLOAD_BYTES, "payload over the frame limit");
        header[field::LENGTH].copy_from_slice(&length.to_le_bytes());
        let crc = crc32c_append(payload_crc, &header[..field::CRC.start]);
        header[field::CRC].copy_from_slice(&crc.to_le_bytes());
        header
    }
}

fn frame_crc(header: &[u8; HEADER_BYTES], payload: &[u8]) -> u32 {
    crc32c_append(crc32c(payload), &header[..field::CRC.start])
}

/// Builds a complete frame (header and payload) in one buffer. The transport reuses these
/// buffers: `begin` keeps the allocation, so steady-state framing allocates nothing.
///
/// Compressors write page data straight into the frame ([`FrameBuf::fill_in_place`]),
/// so the frame that goes to the socket is the compressor's output, with no copy between.
/// For that, the buffer is kept initialized past the frame's end: `bytes` holds every byte
/// ever written (zeroed once, on first use), and the frame is its first `len` bytes.
#[derive(Debug, Default)]
pub struct FrameBuf {
    bytes: Vec<u8>,
    len: usize,
    payload_crc: Option<u32>,
}

impl FrameBuf {
    pub fn with_capacity(payload_bytes: usize) -> Self {
        FrameBuf { bytes: Vec::with_capacity(HEADER_BYTES + payload_bytes), len: 0, payload_crc: None }
    }

    /// A frame whose payload was written in place, after room for the header: `bytes`
    /// as `begin` and writes of the payload would have left them.
    pub fn wrap(bytes: Vec<u8>) -> Self {
        assert!(bytes.len() >= HEADER_BYTES, "a frame begins with room for its header");
        FrameBuf { len: bytes.len(), bytes, payload_crc: None }
    }

    /// The buffer, to write another frame's bytes into in place ([`FrameBuf::wrap`]).
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Starts a new frame, discarding what the buffer held; returns the frame, whose
    /// payload is written after the header's room.
    pub fn begin(&mut self) -> &mut Self {
        self.len = 0;
        self.payload_crc = None;
        self.extend_from_slice(&[0u8; HEADER_BYTES]);
        self
    }

    /// Bytes in the frame so far, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.room(data.len()).copy_from_slice(data);
        self.len += data.len();
    }

    /// Cuts the frame back to `len` bytes (no-op if it is shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The frame written so far, header included, for patching in place.
    pub fn written_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }

    /// Lets `fill` write up to `room` bytes at the end of the frame, in place; keeps the
    /// length it returns (`None` keeps nothing).
    pub fn fill_in_place(&mut self, room: usize, fill: impl FnOnce(&mut [u8]) -> Option<usize>) -> Option<usize> {
        let written = fill(self.room(room))?;
        assert!(written <= room, "wrote {written} bytes into {room} bytes of room");
        self.len += written;
        Some(written)
    }

    /// The `n` bytes after the frame's end, zeroed only the first time the buffer reaches
    /// that far (afterwards they hold old frames' bytes, about to be overwritten).
    fn room(&mut self, n: usize) -> &mut [u8] {
        let end = self.len + n;
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        &mut self.bytes[self.len..end]
    }

    /// Checksums the finished payload now, so that `seal` only has the header left to do.
    pub fn checksum_payload(&mut self) {
        self.payload_crc = Some(crc32c(self.payload()));
    }

    /// Writes the header over the first bytes once the payload is complete.
    pub fn seal(&mut self, kind: FrameKind, epoch: u32, seq: u64) {
        assert!(self.len >= HEADER_BYTES, "seal without begin");
        let payload_crc = self.payload_crc.unwrap_or_else(|| crc32c(self.payload()));
        let header = FrameHeader::emit_with_payload_crc(kind, epoch, seq, self.len - HEADER_BYTES, payload_crc);
        self.bytes[..HEADER_BYTES].copy_from_slice(&header);
    }

    /// Payload bytes (the frame's length less its header).
    pub fn payload_len(&self) -> usize {
        self.len.saturating_sub(HEADER_BYTES)
    }

    /// The payload written so far (after `begin`).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_BYTES.min(self.len)..self.len]
    }

    /// The whole frame, ready for the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Encodes a complete frame into a new vector (control frames; page frames use
/// [`FrameBuf`]).
pub fn encode_frame(kind: FrameKind, epoch: u32, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&FrameHeader::emit(kind, epoch, seq, payload));
    out.extend_from_slice(payload);
    out
}

/// A decoded frame that owns its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

/// A streaming frame decoder: feed it bytes as they arrive, take frames out. It checks
/// lengths, checksums and sequence numbers; it never allocates more than one bounded frame
/// beyond what was fed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    next_seq: u64,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(header_bytes) = self.buffer.first_chunk::<HEADER_BYTES>() else {
            return Ok(None);
        };
        let header_bytes = *header_bytes;
        let header = FrameHeader::parse(&header_bytes)?;
        let total = HEADER_BYTES + header.length as usize;
        if self.buffer.len() < total {
            return Ok(None);
        }
        let payload = self.buffer[HEADER_BYTES..total].to_vec();
        header.check(&header_bytes, &payload)?;
        if header.seq != self.next_seq {
            return Err(FrameError::Sequence { expected: self.next_seq, got: header.seq });
        }
        self.next_seq += 1;
        self.buffer.drain(..total);
        Ok(Some(Frame { header, payload }))
    }

    /// Call at end of stream: an error if a partial frame was left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

/// Tracks the expected sequence number of one direction of a connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqCounter {
    next: u64,
}

impl SeqCounter {
    /// Checks that `seq` is the next one and advances.
    pub fn accept(&mut self, seq: u64) -> Result<(), FrameError> {
        if seq != self.next {
            return Err(FrameError::Sequence { expected: self.next, got: seq });
        }
        self.next += 1;
        Ok(())
    }

    /// Hands out the next sequence number to send.
    pub fn take(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        seq
    }
}

pub(crate) fn le_u16(bytes: &[u8]) -> u16 {
    u16::from_le_bytes(bytes.try_into().unwrap_or_default())
}
pub(crate) fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().unwrap_or_default())
}
pub(crate) fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixture_bytes_are_stable() {
        let frame = encode_frame(FrameKind::RoundEnd, 3, 7, &[1, 2, 3, 4]);
        assert_eq!(&frame[..20], &[4, 0, 0, 0, 3, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0]);
        assert_eq!(frame.len(), HEADER_BYTES + 4);
        let header = FrameHeader::parse(frame[..HEADER_BYTES].try_into().unwrap()).unwrap();
        assert_eq!(header.crc, crc32c_append(crc32c(&[1, 2, 3, 4]), &frame[..20]));
    }

    #[test]
    fn a_reused_frame_buffer_holds_only_the_new_frame() {
        let mut frame = FrameBuf::with_capacity(16);
        frame.begin().extend_from_slice(&[9; 100]);
        frame.seal(FrameKind::Pages, 1, 0);
        frame.begin().extend_from_slice(&[1, 2]);
        assert_eq!(
            frame.fill_in_place(50, |out| {
                out[..3].copy_from_slice(&[3, 4, 5]);
                Some(3)
            }),
            Some(3)
        );
        assert_eq!(frame.fill_in_place(50, |_| None), None);
        frame.seal(FrameKind::Pages, 1, 1);
        assert_eq!(frame.as_bytes(), &encode_frame(FrameKind::Pages, 1, 1, &[1, 2, 3, 4, 5])[..]);
    }

    #[test]
    fn zeroed_header_is_invalid() {
        assert_eq!(FrameHeader::parse(&[0; HEADER_BYTES]), Err(FrameError::UnknownKind { kind: 0 }));
    }

    #[test]
    fn oversized_length_is_rejected_before_reading_payload() {
        let mut frame = encode_frame(FrameKind::Pages, 0, 0, &[]);
        frame[16..20].copy_from_slice(&(MAX_PAYLOAD_BYTES + 1).to_le_bytes());
        let mut decoder = FrameDecoder::new();
        decoder.feed(&frame);
        assert!(matches!(decoder.next_frame(), Err(FrameError::Oversized { .. })));
    }

    #[test]
    fn truncated_stream_is_reported() {
        let frame = encode_frame(FrameKind::Pages, 0, 0, &[9; 100]);
        let mut decoder = FrameDecoder::new();
        decoder.feed(&frame[..50]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Err(FrameError::Truncated));
    }

    #[test]
    fn sequence_gap_is_rejected() {
        let mut decoder = FrameDecoder::new();
        decoder.feed(&encode_frame(FrameKind::Pages, 0, 1, &[]));
        assert_eq!(decoder.next_frame(), Err(FrameError::Sequence { expected: 0, got: 1 }));
    }

    proptest! {
        #[test]
        fn emit_parse_round_trip(kind in 1u8..=13, epoch: u32, payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..5), split in 1usize..64) {
            let kind = FrameKind::from_u8(kind).unwrap();
            let mut stream = Vec::new();
            for (seq, payload) in payloads.iter().enumerate() {
                stream.extend(encode_frame(kind, epoch, seq as u64, payload));
            }
            let mut decoder = FrameDecoder::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(split) {
                decoder.feed(chunk);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    got.push(frame);
                }
            }
            decoder.finish().unwrap();
            prop_assert_eq!(got.len(), payloads.len());
            for (frame, payload) in got.iter().zip(&payloads) {
                prop_assert_eq!(frame.header.kind, kind);
                prop_assert_eq!(frame.header.epoch, epoch);
                prop_assert_eq!(&frame.payload, payload);
            }
        }

        #[test]
        fn any_flipped_bit_is_caught(payload in proptest::collection::vec(any::<u8>(), 1..200), bit in 0usize..10_000) {
            let mut frame = encode_frame(FrameKind::Pages, 1, 0, &payload);
            let bit = bit % (frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
            let mut decoder = FrameDecoder::new();
            decoder.feed(&frame);
            // A flip either breaks header validation, the checksum, the sequence, or (when
            // it grows the length) leaves the frame incomplete: never a valid frame.
            match decoder.next_frame() {
                Ok(Some(_)) => prop_assert!(false, "corrupt frame accepted"),
                Ok(None) => prop_assert!(decoder.finish().is_err()),
                Err(_) => {}
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = FrameDecoder::new();
            decoder.feed(&bytes);
            while let Ok(Some(_)) = decoder.next_frame() {}
        }
    }
}
