use migration::control::ControlError;
use migration::destination_session::DestinationFailure;
use migration::frame::FrameKind;
use migration::handshake::HandshakeError;
use migration::receiver::ReceiveError;
use migration::source_session::{AnswerError, SourceFailure};
use std::time::Duration;
use thiserror::Error;
use transport::abort::AbortKind;

/// Why a migration did not complete. Every variant reads as one line for an operator, and
/// the variant itself says what kind of failure it was, for a caller that acts on it:
/// refused by the peer ([`Handshake`](Self::Handshake) with `HandshakeError::Refused`),
/// timed out ([`TimedOut`](Self::TimedOut)), damaged or hostile input
/// ([`Receive`](Self::Receive), [`Protocol`](Self::Protocol)), cancelled
/// ([`Cancelled`](Self::Cancelled)), over a limit ([`Limit`](Self::Limit)), local IO
/// ([`Io`](Self::Io), [`Memory`](Self::Memory)), the VM ([`Vm`](Self::Vm)).
#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("connection {connection}: {source}")]
    Io { connection: usize, source: std::io::Error },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    #[error("memory: {0}")]
    Memory(#[from] hugepages::Error),
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(String),
    #[error("migration cancelled: {0}")]
    Cancelled(String),
    /// The compression device could not be opened for the session's workers.
    #[error("compression device {device}: {reason}")]
    Offload { device: String, reason: String },
    /// Nothing came within the time allowed for it.
    #[error("{waiting_for}: nothing within {after:?}")]
    TimedOut { waiting_for: String, after: Duration },
    #[error(transparent)]
    Protocol(#[from] ProtocolViolation),
    /// The destination's answers broke the session's order or form.
    #[error(transparent)]
    Answer(AnswerError),
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The source's part of the session broke its order or form (the destination's view).
    #[error(transparent)]
    Session(DestinationFailure),
    /// The guest was resumed here (the source had let go of it), and then the session
    /// failed: the guest runs on and must be kept.
    #[error("{0} (after the guest was resumed here: it runs on)")]
    FailedAfterResume(Box<MigrationError>),
    /// The session was aborted by one of its threads (a connection's reader or writer, a
    /// worker), which gave this reason and said what kind of failure it was.
    #[error("{reason}")]
    Aborted { reason: String, kind: AbortKind },
}

/// The peer sent something the protocol does not allow where it came.
#[derive(Debug, Error)]
pub enum ProtocolViolation {
    #[error("connection {connection}: expected {expected}, got {got:?} (seq {seq})")]
    UnexpectedFrame { connection: usize, expected: &'static str, got: FrameKind, seq: u64 },
    #[error("connection {connection}: no answer to Hello: {reason}{}", if *tls_hint { " (does the destination require TLS?)" } else { "" })]
    NoHelloAnswer { connection: usize, reason: String, tls_hint: bool },
    #[error("first connection is number {index}, expected 0")]
    FirstConnectionNotZero { index: u16 },
    #[error("connection {index} does not belong to session {session_id:#x} or repeats an index")]
    ForeignConnection { index: u16, session_id: u64 },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("{0}")]
    BadGreeting(String),
}

/// A size over what one side accepts.
#[derive(Debug, Error)]
pub enum LimitExceeded {
    #[error("guest of {bytes} bytes exceeds this destination's limit of {limit} bytes")]
    GuestTooLarge { bytes: u64, limit: u64 },
    #[error("device state of {bytes} bytes exceeds the {limit}-byte limit")]
    DeviceStateTooLarge { bytes: usize, limit: usize },
}

/// What a [`DestinationVm`](crate::vm::DestinationVm) says when it cannot take the guest
/// or start it.
#[derive(Debug, Error)]
pub enum VmError {
    /// It cannot hold a guest of this layout (too large, too many regions, ...).
    #[error("the destination VM cannot take this guest: {0}")]
    Unfit(String),
    /// Its hypervisor cannot give the guest what the source's requirements ask (a CPU
    /// feature, a capability, a vCPU state it cannot load).
    #[error("the destination cannot host this guest: {0}")]
    Incompatible(String),
    /// Its memory could not be provided.
    #[error("the destination VM's memory: {0}")]
    Memory(#[from] hugepages::Error),
    /// The device state did not restore.
    #[error("could not resume the guest: {0}")]
    Resume(String),
}

impl From<AnswerError> for MigrationError {
    fn from(err: AnswerError) -> Self {
        match err {
            AnswerError::Timeout { phase, timeout } => MigrationError::TimedOut {
                waiting_for: format!("the destination's answer while the source was {phase}"),
                after: timeout,
            },
            other => MigrationError::Answer(other),
        }
    }
}

impl From<DestinationFailure> for MigrationError {
    fn from(err: DestinationFailure) -> Self {
        match err {
            DestinationFailure::SourceAborted { reason } => MigrationError::PeerAborted(reason),
            DestinationFailure::Timeout { phase, timeout } => MigrationError::TimedOut {
                waiting_for: format!("the source while the destination was {phase}"),
                after: timeout,
            },
            other => MigrationError::Session(other),
        }
    }
}

impl From<SourceFailure> for MigrationError {
    fn from(err: SourceFailure) -> Self {
        match err {
            SourceFailure::Answer(err) => err.into(),
            SourceFailure::DestinationAborted { reason } => MigrationError::PeerAborted(reason),
            SourceFailure::Cancelled { reason } => MigrationError::Cancelled(reason),
            err @ SourceFailure::DidNotConverge { .. } => MigrationError::Cancelled(err.to_string()),
            SourceFailure::RoundNotApplied { epoch, timeout } => MigrationError::TimedOut {
                waiting_for: format!("the destination's confirmation of round {epoch}"),
                after: timeout,
            },
        }
    }
}
