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
pub mod compression;
pub mod control;
pub mod destination;
mod doorway;
mod holdback;
mod net_writer;
mod outlet;
mod qemu_sink;
pub mod qmp;
pub mod source;
mod squeeze;
mod stats;
mod waits;

pub use channel::{ChannelReport, DirectionStats};

use serde::Serialize;
use std::io;
use thiserror::Error;
use transport::framed::ReadError;

/// Why a relay session failed.
#[derive(Debug, Clone, Error)]
pub enum RelayFailure {
    /// This host's side: its QEMU socket, or the relay's own setup.
    #[error("{0}")]
    Local(String),
    /// The relay connection: cut, timed out, damaged, or spoken to out of turn.
    #[error("relay link: {0}")]
    Link(LinkFailure),
    /// The peer relay gave up, and said why.
    #[error("the peer relay aborted: {0}")]
    Peer(String),
    /// The peer relay refused the session or one of its streams.
    #[error("the peer relay refused: {0}")]
    Refused(String),
    /// Another channel of the session failed first.
    #[error("{0}")]
    Aborted(String),
    /// The operator cancelled the session (its control socket).
    #[error("{0}")]
    Cancelled(String),
}

/// What went wrong on the relay connection, for a caller that acts on it (retry a lost
/// link, distrust a damaged one).
#[derive(Debug, Clone, Error)]
pub enum LinkFailure {
    /// Nothing came within the connection's I/O timeout.
    #[error("{0}")]
    TimedOut(String),
    /// The connection closed or failed.
    #[error("{0}")]
    Lost(String),
    /// What arrived was damaged: a checksum or sequence number wrong, a chunk that does
    /// not decode, a stream whose digest does not match what was sent.
    #[error("{0}")]
    Damaged(String),
    /// The peer sent a frame the protocol does not allow where it came.
    #[error("{0}")]
    Unexpected(String),
}

impl RelayFailure {
    pub(crate) fn local(err: io::Error) -> RelayFailure {
        RelayFailure::Local(err.to_string())
    }

    /// A failed write or connect on the relay connection.
    pub(crate) fn link(err: io::Error) -> RelayFailure {
        let timed_out = matches!(err.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock);
        RelayFailure::Link(if timed_out { LinkFailure::TimedOut } else { LinkFailure::Lost }(err.to_string()))
    }

    /// A frame that could not be read from the relay connection; `context` says what was
    /// being read.
    pub(crate) fn read(context: &str, err: &ReadError) -> RelayFailure {
        let message = format!("{context}: {err}");
        RelayFailure::Link(match err {
            ReadError::Io(io) if matches!(io.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
                LinkFailure::TimedOut(message)
            }
            ReadError::Io(_) | ReadError::Closed => LinkFailure::Lost(message),
            ReadError::Frame(_) | ReadError::TooLarge { .. } => LinkFailure::Damaged(message),
        })
    }

    pub(crate) fn damaged(message: impl std::fmt::Display) -> RelayFailure {
        RelayFailure::Link(LinkFailure::Damaged(message.to_string()))
    }

    pub(crate) fn unexpected(message: impl std::fmt::Display) -> RelayFailure {
        RelayFailure::Link(LinkFailure::Unexpected(message.to_string()))
    }

    /// The session was aborted: its first failure, which names its channel.
    pub(crate) fn aborted(abort: &transport::abort::SessionAbort) -> RelayFailure {
        RelayFailure::Aborted(abort.reason().unwrap_or_default())
    }
}

/// A relay session at its end: every stream it carried.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
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
            sent.add(&channel.sent);
            received.add(&channel.received);
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
        if abort.kind() == transport::abort::AbortKind::Cancelled {
            return Err(RelayFailure::Cancelled(reason));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use migration::frame::FrameError;

    #[test]
    fn link_failures_say_what_kind_they_are() {
        let kind = |err: ReadError| match RelayFailure::read("reading", &err) {
            RelayFailure::Link(failure) => failure,
            other => panic!("not a link failure: {other:?}"),
        };
        let timed_out = io::Error::new(io::ErrorKind::WouldBlock, "no data");
        assert!(matches!(kind(ReadError::Io(timed_out)), LinkFailure::TimedOut(_)));
        assert!(matches!(kind(ReadError::Closed), LinkFailure::Lost(_)));
        assert!(matches!(kind(ReadError::Io(io::Error::from(io::ErrorKind::ConnectionReset))), LinkFailure::Lost(_)));
        let corrupt = FrameError::Checksum { seq: 3, expected: 1, computed: 2 };
        assert!(matches!(kind(ReadError::Frame(corrupt)), LinkFailure::Damaged(_)));
        let failure = RelayFailure::read("from 10.0.0.1", &ReadError::Closed);
        assert_eq!(failure.to_string(), "relay link: from 10.0.0.1: connection closed by the peer");
        let refused = RelayFailure::link(io::Error::from(io::ErrorKind::TimedOut));
        assert!(matches!(refused, RelayFailure::Link(LinkFailure::TimedOut(_))));
    }
}
