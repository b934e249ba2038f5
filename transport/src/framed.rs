//! Reading and writing whole frames on a byte pipe, with every bound checked before any
//! allocation.

use crate::abort::AbortKind;
use migration::frame::{encode_frame, FrameError, FrameHeader, FrameKind, SeqCounter, HEADER_BYTES};
use std::io::{self, Read, Write};

#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    Frame(FrameError),
    /// The peer closed the connection cleanly between frames.
    Closed,
    /// A frame of a kind larger than this reader allows for it.
    TooLarge {
        kind: FrameKind,
        length: u32,
        limit: u32,
    },
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                write!(f, "stream truncated inside a frame")
            }
            ReadError::Io(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                write!(f, "peer silent for too long (read timed out)")
            }
            ReadError::Io(err) => write!(f, "read failed: {err}"),
            ReadError::Frame(err) => write!(f, "{err}"),
            ReadError::Closed => write!(f, "connection closed by the peer"),
            ReadError::TooLarge { kind, length, limit } => {
                write!(f, "{kind:?} frame of {length} bytes exceeds the limit of {limit} bytes for it")
            }
        }
    }
}

impl ReadError {
    /// The kind of failure it is, for a session's abort.
    pub fn abort_kind(&self) -> AbortKind {
        match self {
            ReadError::Io(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                AbortKind::TimedOut
            }
            ReadError::Io(_) | ReadError::Closed => AbortKind::Link,
            ReadError::Frame(_) | ReadError::TooLarge { .. } => AbortKind::Damaged,
        }
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the first byte.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(true)
}

/// Reads one frame into `payload` (resized to fit), checking the header, the per-kind
/// size `limit` and the checksum. The sequence number is the caller's to check: the
/// destination's connection state machine does it with the rest of its checks.
pub fn read_frame(
    reader: &mut dyn Read,
    payload: &mut Vec<u8>,
    limit: impl Fn(FrameKind) -> u32,
) -> Result<FrameHeader, ReadError> {
    let mut header_bytes = [0u8; HEADER_BYTES];
    if !read_full(reader, &mut header_bytes).map_err(ReadError::Io)? {
        return Err(ReadError::Closed);
    }
    let header = checked_header(&header_bytes, &limit)?;
    // Resized, not cleared first: only bytes beyond the last frame's length are zeroed (a
    // run of data frames of one size zeroes nothing; a 64 KiB memset per frame was 1.4% of
    // a receiving relay's CPU); read_full overwrites all of them.
    payload.resize(header.length as usize, 0);
    if !read_full(reader, payload).map_err(ReadError::Io)? && header.length > 0 {
        return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    header.check(&header_bytes, payload).map_err(ReadError::Frame)?;
    Ok(header)
}

/// Parses a header and holds its length to the per-kind `limit`.
fn checked_header(bytes: &[u8; HEADER_BYTES], limit: &impl Fn(FrameKind) -> u32) -> Result<FrameHeader, ReadError> {
    let header = FrameHeader::parse(bytes).map_err(ReadError::Frame)?;
    let max = limit(header.kind);
    if header.length > max {
        return Err(ReadError::TooLarge { kind: header.kind, length: header.length, limit: max });
    }
    Ok(header)
}

/// Puts frames together from bytes as they arrive, for a reader that is fed rather than
/// reading (a polling core's `Inbound`): the checks of [`read_frame`], no IO, and each
/// byte copied once, into the payload buffer.
pub struct FrameAssembler<L> {
    header_bytes: [u8; HEADER_BYTES],
    /// Header bytes in so far.
    filled: usize,
    /// The header, once all of it is in and checked.
    header: Option<FrameHeader>,
    limit: L,
}

impl<L: Fn(FrameKind) -> u32> FrameAssembler<L> {
    pub fn new(limit: L) -> Self {
        FrameAssembler { header_bytes: [0; HEADER_BYTES], filled: 0, header: None, limit }
    }

    /// Takes bytes from the front of `bytes` into the frame under way (its payload into
    /// `payload`, which must be empty when a frame begins). Returns how many it took, and
    /// the frame's header once the frame is complete and checked; the next frame starts
    /// with the next byte.
    pub fn push(&mut self, bytes: &[u8], payload: &mut Vec<u8>) -> Result<(usize, Option<FrameHeader>), ReadError> {
        let mut taken = 0;
        let header = match self.header {
            Some(header) => header,
            None => {
                taken = bytes.len().min(HEADER_BYTES - self.filled);
                self.header_bytes[self.filled..self.filled + taken].copy_from_slice(&bytes[..taken]);
                self.filled += taken;
                if self.filled < HEADER_BYTES {
                    return Ok((taken, None));
                }
                let header = checked_header(&self.header_bytes, &self.limit)?;
                payload.reserve(header.length as usize);
                self.header = Some(header);
                header
            }
        };
        let wanted = (header.length as usize - payload.len()).min(bytes.len() - taken);
        payload.extend_from_slice(&bytes[taken..taken + wanted]);
        taken += wanted;
        if payload.len() < header.length as usize {
            return Ok((taken, None));
        }
        header.check(&self.header_bytes, payload).map_err(ReadError::Frame)?;
        self.filled = 0;
        self.header = None;
        Ok((taken, Some(header)))
    }

    /// Whether the stream may end here: no frame is under way.
    pub fn between_frames(&self) -> bool {
        self.filled == 0
    }
}

/// Writes one control frame.
pub fn write_frame(
    writer: &mut dyn Write,
    kind: FrameKind,
    epoch: u32,
    seq: &mut SeqCounter,
    payload: &[u8],
) -> io::Result<()> {
    writer.write_all(&encode_frame(kind, epoch, seq.take(), payload))?;
    writer.flush()
}

/// Frames other than page batches and device state are small.
pub const CONTROL_FRAME_LIMIT_BYTES: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(kind: FrameKind) -> u32 {
        if kind == FrameKind::Pages {
            1 << 20
        } else {
            CONTROL_FRAME_LIMIT_BYTES
        }
    }

    fn stream() -> (Vec<u8>, Vec<Vec<u8>>) {
        let payloads: Vec<Vec<u8>> =
            [0usize, 1, 24, 5000, 70_000].iter().map(|&n| (0..n).map(|i| (i * 7) as u8).collect()).collect();
        let mut bytes = Vec::new();
        let mut seq = SeqCounter::default();
        for payload in &payloads {
            bytes.extend(encode_frame(FrameKind::Pages, 3, seq.take(), payload));
        }
        (bytes, payloads)
    }

    /// Fed in pieces of every size, the assembler gives back the frames as sent, whatever
    /// the cuts (inside headers, at their ends, inside payloads).
    #[test]
    fn frames_come_out_whole_however_the_bytes_are_cut() {
        let (bytes, payloads) = stream();
        for piece in [1, 7, 23, 24, 25, 4096, 100_000] {
            let mut assembler = FrameAssembler::new(limit);
            let mut payload = Vec::new();
            let mut frames = Vec::new();
            for mut chunk in bytes.chunks(piece) {
                while !chunk.is_empty() {
                    let (n, header) = assembler.push(chunk, &mut payload).expect("a valid stream");
                    chunk = &chunk[n..];
                    if let Some(header) = header {
                        assert_eq!(header.seq, frames.len() as u64);
                        frames.push(std::mem::take(&mut payload));
                    }
                }
            }
            assert!(assembler.between_frames(), "pieces of {piece}: a frame left under way");
            assert_eq!(frames, payloads, "pieces of {piece}");
        }
    }

    #[test]
    fn a_flipped_payload_bit_and_an_oversized_control_frame_are_refused() {
        let (mut bytes, _) = stream();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let mut assembler = FrameAssembler::new(limit);
        let mut payload = Vec::new();
        let mut rest = &bytes[..];
        let error = loop {
            match assembler.push(rest, &mut payload) {
                Ok((n, Some(_))) => {
                    rest = &rest[n..];
                    payload.clear();
                }
                Ok((n, None)) => rest = &rest[n..],
                Err(err) => break err,
            }
        };
        assert!(matches!(error, ReadError::Frame(FrameError::Checksum { seq: 4, .. })), "{error}");

        let big = encode_frame(FrameKind::Commit, 0, 0, &[0; CONTROL_FRAME_LIMIT_BYTES as usize + 1]);
        let error = FrameAssembler::new(limit).push(&big, &mut Vec::new()).expect_err("refused");
        assert!(matches!(error, ReadError::TooLarge { kind: FrameKind::Commit, .. }), "{error}");
    }
}
