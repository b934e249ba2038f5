//! Reading and writing whole frames on a byte pipe, with every bound checked before any
//! allocation.

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
    let header = FrameHeader::parse(&header_bytes).map_err(ReadError::Frame)?;
    let max = limit(header.kind);
    if header.length > max {
        return Err(ReadError::TooLarge { kind: header.kind, length: header.length, limit: max });
    }
    payload.clear();
    payload.resize(header.length as usize, 0);
    if !read_full(reader, payload).map_err(ReadError::Io)? && header.length > 0 {
        return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    header.check(&header_bytes, payload).map_err(ReadError::Frame)?;
    Ok(header)
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
