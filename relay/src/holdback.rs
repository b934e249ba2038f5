//! What reaches this host's QEMU from the network, and when. A chunk waits until the next
//! frame (data, a heartbeat, a checkpoint or the end) proves more is coming; in a
//! completing main stream, QEMU's end-of-file marker, on which the destination QEMU
//! finishes loading and starts the guest, and what follows it wait until a digest of the
//! whole stream so far (a checkpoint's or the end's) checks out.

use crate::qemu_sink::QemuSink;
use crate::stats::DirectionStats;
use crate::RelayFailure;
use migration::qemu_stream::{end_marker_candidate, Kind, Progress, StreamReader};
use migration::relay::{StreamDigest, StreamEnd};
use std::os::unix::net::UnixStream;

pub(crate) struct HoldBack {
    local: QemuSink,
    held: Vec<u8>,
    /// The buffer the next decoded chunk goes into (the one held before it, delivered).
    spare: Vec<u8>,
    /// The stream as it passes, to know when its last, opaque part (the device state, then
    /// the marker) has begun.
    stream: StreamReader,
    digest: StreamDigest,
    pub stats: DirectionStats,
}

impl HoldBack {
    pub fn new(local: UnixStream) -> HoldBack {
        HoldBack {
            local: QemuSink::new(local),
            held: Vec::with_capacity(migration::relay::MAX_CHUNK_BYTES),
            spare: Vec::with_capacity(migration::relay::MAX_CHUNK_BYTES),
            stream: StreamReader::default(),
            digest: StreamDigest::default(),
            stats: DirectionStats::default(),
        }
    }

    /// A chunk's original `bytes` (`wire` bytes on the connection): what was held before
    /// goes on, these wait.
    pub fn chunk(&mut self, bytes: &[u8], wire: usize) -> Result<(), RelayFailure> {
        self.vouched()?;
        self.took(bytes, wire);
        self.held.extend_from_slice(bytes);
        Ok(())
    }

    /// As [`HoldBack::chunk`], for a chunk that `decode` writes into the (empty) vector
    /// it is given: nothing held goes on if it fails, and its bytes are then held without
    /// another copy (the buffers trade places; a memmove of every byte was 6.5% of a
    /// receiving relay's CPU).
    pub fn chunk_with(
        &mut self,
        wire: usize,
        decode: impl FnOnce(&mut Vec<u8>) -> Result<(), RelayFailure>,
    ) -> Result<(), RelayFailure> {
        let mut decoded = std::mem::take(&mut self.spare);
        decoded.clear();
        let decoding = decode(&mut decoded);
        let outcome = decoding.and_then(|()| self.vouched());
        if outcome.is_ok() {
            self.took(&decoded, wire);
            if self.held.is_empty() {
                std::mem::swap(&mut self.held, &mut decoded);
            } else {
                // Only in a completing stream's last chunks: the marker is still held.
                self.held.extend_from_slice(&decoded);
            }
        }
        self.spare = decoded;
        outcome
    }

    /// Counts and reads a chunk's bytes as they are taken in.
    fn took(&mut self, bytes: &[u8], wire: usize) {
        self.digest.update(bytes);
        if matches!(self.stream.kind(), Kind::Unknown | Kind::Main) {
            self.stream.feed(bytes, &mut |_| {});
        }
        self.stats.note_ram_end(completing(&self.stream));
        self.stats.bytes += bytes.len() as u64;
        self.stats.wire_bytes += wire as u64;
        self.stats.chunks += 1;
    }

    /// More is coming (a heartbeat, or the next chunk): what is held goes on, but for the
    /// marker and what follows it in a completing main stream.
    pub fn vouched(&mut self) -> Result<(), RelayFailure> {
        // Only a completing main stream has a marker to look for: the search walks every byte.
        match completing(&self.stream).then(|| end_marker_candidate(&self.held)).flatten() {
            Some(0) => Ok(()),
            Some(at) => {
                self.local.deliver(&self.held[..at])?;
                self.held.drain(..at);
                Ok(())
            }
            None => self.release(),
        }
    }

    /// The sender's digest of the stream so far (a checkpoint's, or the end's): if it
    /// checks out, everything held goes on.
    pub fn checked(&mut self, point: &StreamEnd) -> Result<(), RelayFailure> {
        self.digest.check(point).map_err(RelayFailure::damaged)?;
        let marker = completing(&self.stream).then(|| end_marker_candidate(&self.held)).flatten();
        self.stats.held_for_digest += marker.map_or(0, |at| (self.held.len() - at) as u64);
        self.release()?;
        if marker.is_some() {
            self.stats.end_marker_at_us.get_or_insert_with(crate::stats::wall_clock_us);
        }
        Ok(())
    }

    /// The stream ended and checked out: how it went.
    pub fn finish(mut self) -> Result<DirectionStats, RelayFailure> {
        self.stats.writing_to_qemu_us = self.local.writing.as_micros() as u64;
        self.stats.undelivered = self.local.finish()?;
        Ok(self.stats)
    }

    fn release(&mut self) -> Result<(), RelayFailure> {
        if !self.held.is_empty() {
            self.local.deliver(&self.held)?;
            self.held.clear();
        }
        Ok(())
    }
}

/// A main stream past RAM's end section: its migration is completing.
pub(crate) fn completing(stream: &StreamReader) -> bool {
    stream.kind() == Kind::Main && stream.progress() == Progress::Completing
}
