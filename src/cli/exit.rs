//! What `vmigrate` exits with: one status per kind of ending, so that a script or a service
//! manager can act on it (retry what timed out or lost its link; look before retrying
//! what failed its integrity check; fix the command line for a usage error). The table is
//! docs/exit-codes.md; the tests in tests/e2e/exit_codes.rs hold each one to it.

use ::relay::{LinkFailure, RelayFailure};
use engine::MigrationError;
use migration::handshake::HandshakeError;
use std::process::ExitCode;
use transport::abort::AbortKind;

/// The kinds of ending, with their exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Anything on this host: the guest, its memory, a file, QEMU's sockets.
    Local = 1,
    /// The command line asks for something it cannot have (clap's own errors exit 2 too).
    Usage = 2,
    /// The peer (or this end, of the peer's session) refused: another protocol version,
    /// a limit, a guest it cannot host, a session in progress.
    Refused = 3,
    /// Nothing came within the time allowed: no source, a silent link.
    TimedOut = 4,
    /// What arrived cannot be trusted: verification failed, a stream damaged or out of
    /// order.
    Integrity = 5,
    /// Cancelled by the operator (a signal, the control socket).
    Cancelled = 6,
    /// The link or the peer failed: the connection cut, the peer gone or aborted.
    Link = 7,
}

impl Exit {
    pub fn code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }
}

/// A failure the command line itself classifies (its own checks, a verification that
/// failed, QEMU's migration cancelled).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: Exit,
    pub message: String,
}

impl Failure {
    pub fn err(kind: Exit, message: impl Into<String>) -> anyhow::Error {
        Failure { kind, message: message.into() }.into()
    }

    /// A command line that asks for something it cannot have.
    pub fn usage(message: impl Into<String>) -> anyhow::Error {
        Failure::err(Exit::Usage, message)
    }
}

/// The kind of ending an error stands for: the first cause in its chain that says.
pub fn classify(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if let Some(failure) = cause.downcast_ref::<Failure>() {
            return failure.kind;
        }
        if let Some(err) = cause.downcast_ref::<MigrationError>() {
            return of_migration(err);
        }
        if let Some(err) = cause.downcast_ref::<RelayFailure>() {
            return of_relay(err);
        }
        if let Some(err) = cause.downcast_ref::<HandshakeError>() {
            return of_handshake(err);
        }
    }
    Exit::Local
}

fn of_migration(err: &MigrationError) -> Exit {
    match err {
        MigrationError::Handshake(err) => of_handshake(err),
        MigrationError::Limit(_) => Exit::Refused,
        MigrationError::TimedOut { .. } => Exit::TimedOut,
        MigrationError::Receive(_)
        | MigrationError::Protocol(_)
        | MigrationError::Answer(_)
        | MigrationError::Session(_) => Exit::Integrity,
        MigrationError::Cancelled(_) => Exit::Cancelled,
        MigrationError::Io { source, .. } if is_timeout(source) => Exit::TimedOut,
        // A frame that failed its checksum or its length limit, read off the connection.
        MigrationError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData => Exit::Integrity,
        MigrationError::Io { .. } | MigrationError::PeerAborted(_) => Exit::Link,
        MigrationError::Aborted { kind, .. } => of_abort(*kind),
        MigrationError::FailedAfterResume(err) => of_migration(err),
        MigrationError::Memory(_) | MigrationError::Vm(_) | MigrationError::Offload { .. } => Exit::Local,
    }
}

fn of_abort(kind: AbortKind) -> Exit {
    match kind {
        AbortKind::Local => Exit::Local,
        AbortKind::Link | AbortKind::Peer => Exit::Link,
        AbortKind::TimedOut => Exit::TimedOut,
        AbortKind::Damaged => Exit::Integrity,
        AbortKind::Cancelled => Exit::Cancelled,
    }
}

fn of_relay(err: &RelayFailure) -> Exit {
    match err {
        RelayFailure::Local(_) => Exit::Local,
        RelayFailure::Link(LinkFailure::TimedOut(_)) => Exit::TimedOut,
        RelayFailure::Link(LinkFailure::Lost(_)) => Exit::Link,
        RelayFailure::Link(LinkFailure::Damaged(_) | LinkFailure::Unexpected(_)) => Exit::Integrity,
        RelayFailure::Peer(_) | RelayFailure::Aborted(_) => Exit::Link,
        RelayFailure::Refused(_) => Exit::Refused,
        RelayFailure::Cancelled(_) => Exit::Cancelled,
    }
}

fn of_handshake(err: &HandshakeError) -> Exit {
    match err {
        HandshakeError::Malformed { .. } => Exit::Integrity,
        HandshakeError::BadMagic { .. } | HandshakeError::VersionMismatch { .. } | HandshakeError::Refused { .. } => {
            Exit::Refused
        }
    }
}

fn is_timeout(err: &std::io::Error) -> bool {
    matches!(err.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use std::time::Duration;

    #[test]
    fn a_cause_deep_in_the_chain_decides() {
        let timed_out = MigrationError::TimedOut { waiting_for: "a source".into(), after: Duration::from_secs(1) };
        let err = Err::<(), _>(timed_out).context("receiving the migration").unwrap_err();
        assert_eq!(classify(&err), Exit::TimedOut);
        let after_resume = MigrationError::FailedAfterResume(Box::new(MigrationError::Cancelled("signal".into())));
        assert_eq!(classify(&anyhow::Error::new(after_resume)), Exit::Cancelled);
        let lost = RelayFailure::Link(LinkFailure::Lost("reset".into()));
        assert_eq!(classify(&anyhow::Error::new(lost).context("relaying")), Exit::Link);
    }

    #[test]
    fn our_own_failures_say_their_kind_and_the_rest_is_local() {
        assert_eq!(classify(&Failure::usage("--io-timeout 0.5: at least 1 s")), Exit::Usage);
        assert_eq!(classify(&anyhow::anyhow!("no such file")), Exit::Local);
        assert_eq!(Exit::Integrity as u8, 5);
    }
}
