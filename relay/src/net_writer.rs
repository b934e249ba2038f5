//! The relay connection's writer, shared by the two directions of a carried stream and
//! by the compression workers that send what they squeezed.

use crate::control::RelayControls;
use crate::waits::{during, waiting, Wait};
use migration::frame::{FrameBuf, FrameKind, SeqCounter};
use migration::relay::MAX_CHUNK_BYTES;
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

/// Data and heartbeats go out from the "up" side, an `Abort` from whichever side failed;
/// every frame is sealed with the connection's next sequence number.
pub(crate) struct NetWriter {
    writer: Box<dyn Write + Send>,
    seq: SeqCounter,
    frame: FrameBuf,
    /// This direction's `StreamEnd` went out: nothing may follow it.
    ended: bool,
    /// The session's bandwidth cap (data frames wait for it) and its byte counts.
    controls: Arc<RelayControls>,
    /// When the first checkpoint was handed to the connection (microseconds since the Unix
    /// epoch): the digest that lets the destination pass QEMU's end-of-file marker on.
    pub(crate) checkpoint_sent_at_us: Option<u64>,
}

impl NetWriter {
    pub(crate) fn new(writer: Box<dyn Write + Send>, controls: Arc<RelayControls>) -> Self {
        // A whole chunk and its frame header fit without growing the buffer.
        NetWriter {
            writer,
            seq: SeqCounter::default(),
            frame: FrameBuf::with_capacity(MAX_CHUNK_BYTES + 64),
            ended: false,
            controls,
            checkpoint_sent_at_us: None,
        }
    }

    /// Whether this direction's stream has ended (its `StreamEnd` was sent).
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// Seals `frame` (its payload written, and checksummed where the writer of it could
    /// do that in parallel) with this connection's next sequence number and sends it.
    pub(crate) fn send_frame(&mut self, kind: FrameKind, frame: &mut FrameBuf) -> io::Result<()> {
        self.ended |= kind == FrameKind::StreamEnd;
        frame.seal(kind, 0, self.seq.take());
        self.write(kind, frame.as_bytes())
    }

    pub(crate) fn send(&mut self, kind: FrameKind, payload: &[u8]) -> io::Result<()> {
        self.ended |= kind == FrameKind::StreamEnd;
        self.frame.begin().extend_from_slice(payload);
        self.frame.seal(kind, 0, self.seq.take());
        let frame = std::mem::take(&mut self.frame);
        let written = self.write(kind, frame.as_bytes());
        self.frame = frame;
        written
    }

    /// Writes a sealed frame: data under the session's cap (control frames never wait).
    fn write(&mut self, kind: FrameKind, bytes: &[u8]) -> io::Result<()> {
        if kind == FrameKind::StreamData {
            let _pacing = waiting(Wait::Pacing);
            self.controls.pace(bytes.len());
        }
        // Stamped as the write begins: from here on the checkpoint waits only for the link
        // (a write that blocks waits for the socket's buffer to drain). Stamped after it,
        // the peer could read the frame, and stamp its arrival, before this thread ran
        // again.
        if kind == FrameKind::StreamCheckpoint {
            self.checkpoint_sent_at_us.get_or_insert_with(crate::stats::wall_clock_us);
        }
        during(Wait::WritingLink, || self.writer.write_all(bytes).and_then(|()| self.writer.flush()))?;
        self.controls.meter.wire_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// The writer, even when a thread panicked holding it: a frame is written whole or the
/// connection fails, so what a poisoned lock guards is still consistent.
pub(crate) fn lock(writer: &Mutex<NetWriter>) -> MutexGuard<'_, NetWriter> {
    match writer.try_lock() {
        Ok(writer) => writer,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => {
            let _waiting = waiting(Wait::Writer);
            writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }
}
