//! What a carried stream's relays count, one direction at a time.

use serde::Serialize;

/// Bytes of one direction of a carried stream.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct DirectionStats {
    /// As QEMU wrote them.
    pub bytes: u64,
    /// Frame payloads on the relay connection (after compression).
    pub wire_bytes: u64,
    pub chunks: u64,
    /// Carried here, but QEMU had closed its end: the trailing packet without pages that
    /// QEMU 7.2 may leave on a multifd channel (`qemu_sink`). 0 but on such a channel.
    pub undelivered: u64,
    /// Bytes from QEMU's end-of-file marker on, held back until the stream's digest
    /// checked out, at a checkpoint or the stream's end (a completed main stream's; 0 on
    /// other streams).
    pub held_for_digest: u64,
}
