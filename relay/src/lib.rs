//! Carrying QEMU's own live migration: a relay pair between a source QEMU (`migrate
//! unix:PATH`) and a destination QEMU (`-incoming unix:PATH`), over any of our stacks.
//!
//! The source relay (`source.rs`) accepts the connections the source QEMU opens, the main
//! channel first and then one per multifd channel, and carries each over a connection of
//! its own to the destination relay (`destination.rs`), which opens the same number of
//! connections, in the same order, to the destination QEMU. Each carried stream arrives
//! exactly as QEMU wrote it (`channel.rs`; the wire format is `migration::relay`). The
//! relays' buffers are bounded (a chunk per direction, and the sockets'), so the source
//! QEMU sees the real end-to-end rate and its downtime estimate stays honest.
//!
//! `qmp.rs` is a small QMP client, for orchestration and tests.

pub mod channel;
pub mod destination;
mod net_writer;
pub mod qmp;
pub mod source;
mod squeeze;

pub use channel::{ChannelReport, DirectionStats};

use serde::Serialize;
use std::io;
use thiserror::Error;

/// Why a relay session failed.
#[derive(Debug, Clone, Error)]
pub enum RelayFailure {
    /// This host's side: its QEMU socket, or the relay's own setup.
    #[error("{0}")]
    Local(String),
    /// The relay connection: cut, timed out, or damaged.
    #[error("relay link: {0}")]
    Link(String),
    /// The peer relay gave up, and said why.
    #[error("the peer relay aborted: {0}")]
    Peer(String),
    /// The peer relay refused the session or one of its streams.
    #[error("the peer relay refused: {0}")]
    Refused(String),
    /// Another channel of the session failed first.
    #[error("{0}")]
    Aborted(String),
}

impl RelayFailure {
    pub(crate) fn local(err: io::Error) -> RelayFailure {
        RelayFailure::Local(err.to_string())
    }

    pub(crate) fn link(err: io::Error) -> RelayFailure {
        RelayFailure::Link(err.to_string())
    }

    /// The session was aborted: its first failure, which names its channel.
    pub(crate) fn aborted(abort: &transport::abort::SessionAbort) -> RelayFailure {
        RelayFailure::Aborted(abort.reason().unwrap_or_default())
    }
}

/// A relay session at its end: every stream it carried.
#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    pub session_id: u64,
    pub channels: Vec<ChannelReport>,
    pub seconds: f64,
}

impl RelayReport {
    /// Totals over the channels: (sent, received).
    pub fn totals(&self) -> (DirectionStats, DirectionStats) {
        let mut sent = DirectionStats::default();
        let mut received = DirectionStats::default();
        for channel in &self.channels {
            for (total, one) in [(&mut sent, &channel.sent), (&mut received, &channel.received)] {
                total.bytes += one.bytes;
                total.wire_bytes += one.wire_bytes;
                total.chunks += one.chunks;
            }
        }
        (sent, received)
    }
}

/// Collects the channels' pumps once they end: the session's first failure, or every
/// channel's report in channel order.
fn collect(
    pumps: Vec<(u16, std::thread::JoinHandle<Result<ChannelReport, RelayFailure>>)>,
    abort: &transport::abort::SessionAbort,
) -> Result<Vec<ChannelReport>, RelayFailure> {
    let mut reports = Vec::with_capacity(pumps.len());
    let mut failure = None;
    for (channel, pump) in pumps {
        match pump.join() {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(err)) => {
                failure.get_or_insert(err);
            }
            Err(_) => {
                failure.get_or_insert(RelayFailure::Local(format!("channel {channel}: the relay thread panicked")));
            }
        }
    }
    if let Some(reason) = abort.reason() {
        // The first failure anywhere in the session (it names its channel), rather than
        // the consequences of it in the other channels.
        return Err(RelayFailure::Aborted(reason));
    }
    match failure {
        Some(err) => Err(err),
        None => {
            reports.sort_by_key(|r| r.channel);
            Ok(reports)
        }
    }
}
