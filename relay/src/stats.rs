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
    /// Destination relay: microseconds spent writing to QEMU, most of them waiting for it
    /// to read (0 on the source relay). Against the stream's duration, whether QEMU or the
    /// link set the pace.
    pub writing_to_qemu_us: u64,
    /// When a completing main stream's RAM ended here (QEMU's last RAM section: the device
    /// state follows), in microseconds since the Unix epoch: the source relay read it from
    /// QEMU, the destination relay received it. With QEMU's own events (stamped by the same
    /// clock) these split the switchover's real downtime between QEMU and the path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram_ended_at_us: Option<u64>,
    /// When QEMU's end-of-file marker was read from QEMU (source relay), or handed to QEMU
    /// once the digest checked out (destination relay), as `ram_ended_at_us`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_marker_at_us: Option<u64>,
    /// Source relay: when the digest that lets the marker through went on the connection,
    /// behind what was queued before it in the relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_marker_sent_at_us: Option<u64>,
    /// Destination relay: when that digest arrived, before what it held went to QEMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_marker_arrived_at_us: Option<u64>,
}

impl DirectionStats {
    /// Stamps the main stream's RAM end the first time it is seen `completing`.
    pub(crate) fn note_ram_end(&mut self, completing: bool) {
        if completing {
            self.ram_ended_at_us.get_or_insert_with(wall_clock_us);
        }
    }

    /// Adds `other`'s counts; the first of each time stamp is kept.
    pub fn add(&mut self, other: &DirectionStats) {
        self.bytes += other.bytes;
        self.wire_bytes += other.wire_bytes;
        self.chunks += other.chunks;
        self.undelivered += other.undelivered;
        self.held_for_digest += other.held_for_digest;
        self.writing_to_qemu_us += other.writing_to_qemu_us;
        self.ram_ended_at_us = earliest(self.ram_ended_at_us, other.ram_ended_at_us);
        self.end_marker_at_us = earliest(self.end_marker_at_us, other.end_marker_at_us);
        self.end_marker_sent_at_us = earliest(self.end_marker_sent_at_us, other.end_marker_sent_at_us);
        self.end_marker_arrived_at_us = earliest(self.end_marker_arrived_at_us, other.end_marker_arrived_at_us);
    }
}

fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        _ => a.or(b),
    }
}

/// Now, in microseconds since the Unix epoch (the clock QEMU stamps its QMP events with).
pub(crate) fn wall_clock_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_micros() as u64)
}
