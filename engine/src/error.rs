use migration::handshake::HandshakeError;
use migration::receiver::ReceiveError;
use thiserror::Error;

/// Why a migration did not complete. Every variant reads as one line for an operator.
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
    #[error("{0}")]
    Failed(String),
}
