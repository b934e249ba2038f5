//! Greeting the source: its connections accepted and their Hellos checked (refused with a
//! reason where they do not fit), strangers at the listener turned away without holding it
//! up (each connection greets in the lobby, on a thread of its own), and whoever else
//! connects while a session runs turned away.

use crate::config::DestinationConfig;
use crate::error::{LimitExceeded, ProtocolViolation};
use crate::vm::{DestinationVm, GuestLayout};
use crate::MigrationError;
use migration::frame::{FrameKind, SeqCounter};
use migration::handshake::{accept_preamble, HandshakeError, Hello, HelloAck, HELLO_FRAME_LIMIT_BYTES, PREAMBLE_BYTES};
use migration::memory::{GuestMemory, Region};
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport::framed::{read_frame, write_frame};
use transport::lobby::{Lobby, LobbyError, Refusal};
use transport::pipe::{Acceptor, Connection};

use super::Shared;

/// How long a connection has to send its preamble and Hello before it is taken for a
/// stranger and closed (a source sends both as soon as it has connected).
const GREETING_TIME: Duration = Duration::from_secs(10);
/// Why a connection from another source is refused while a session runs.
const BUSY: &str = "another migration session is in progress on this destination";
/// How often the doorman looks up from the listener to see whether the session ended.
const DOORMAN_POLL: Duration = Duration::from_millis(100);

/// Refuses every connection that arrives while the session runs. The refusal goes out at
/// once (the source reads it after its hello); the connection is then drained on a thread
/// of its own until the source hangs up, so that closing it with its hello unread does not
/// reset it before the refusal is read, and a silent stranger holds up nobody.
pub(super) fn turn_away(acceptor: &mut dyn Acceptor, shared: &Shared) {
    while !shared.finished.load(Ordering::Acquire) && !shared.abort.is_raised() {
        if let Ok(mut connection) = acceptor.accept(DOORMAN_POLL) {
            refuse(&mut connection, BUSY);
            let _ = std::thread::Builder::new().name("turned-away".into()).spawn(move || {
                let mut sink = [0u8; 4096];
                while matches!(connection.reader.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    }
}

pub(super) fn refuse(connection: &mut Connection, reason: &str) {
    let _ = write_frame(
        &mut *connection.writer,
        FrameKind::HelloAck,
        0,
        &mut SeqCounter::default(),
        &HelloAck::Refused { reason: reason.into() }.encode(),
    );
}

/// Reads a connection's preamble and Hello; returns the Hello and the protocol version
/// both ends speak. A connection that is not a vmigrate source (no preamble in time, bad
/// magic, no Hello frame after it) is a stranger, turned away without a word; a source
/// whose preamble or Hello cannot be served is refused with the reason, which ends the
/// wait for it.
fn read_hello(connection: &mut Connection) -> Result<(Hello, u16), Refusal<MigrationError>> {
    let mut preamble = [0u8; PREAMBLE_BYTES];
    connection.reader.read_exact(&mut preamble).map_err(|e| Refusal::Stranger(closed_early("preamble", &e)))?;
    let version = match accept_preamble(&preamble) {
        Ok(version) => version,
        Err(err @ HandshakeError::BadMagic { .. }) => return Err(Refusal::Stranger(err.to_string())),
        Err(err) => {
            refuse(connection, &err.to_string());
            return Err(Refusal::Fatal(err.into()));
        }
    };
    let mut payload = Vec::new();
    let header = read_frame(&mut *connection.reader, &mut payload, |_| HELLO_FRAME_LIMIT_BYTES)
        .map_err(|e| Refusal::Stranger(format!("a vmigrate preamble, then no Hello: {e}")))?;
    if header.kind != FrameKind::Hello || header.seq != 0 {
        let reason = format!("expected Hello, got {:?} (seq {})", header.kind, header.seq);
        refuse(connection, &reason);
        return Err(Refusal::Fatal(ProtocolViolation::BadGreeting(reason).into()));
    }
    let hello = Hello::decode(&payload).map_err(|err| {
        refuse(connection, &err.to_string());
        Refusal::Fatal(MigrationError::from(err))
    })?;
    Ok((hello, version))
}

/// What a connection that ended (or was closed by the lobby) before its `what` did.
fn closed_early(what: &str, err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::UnexpectedEof => format!("closed before its {what} was whole"),
        _ => format!("no {what}: {err}"),
    }
}

/// The destination's lobby: connections greet on threads of their own, each within
/// `GREETING_TIME`, so that strangers at the listener hold up no source.
fn lobby() -> Lobby<(Hello, u16), MigrationError> {
    Lobby::new(GREETING_TIME, read_hello)
}

/// Waits up to `config.accept_timeout` for the next connection that greets as a source.
fn next_source(
    lobby: &mut Lobby<(Hello, u16), MigrationError>,
    acceptor: &mut dyn Acceptor,
    config: &DestinationConfig,
) -> Result<(Connection, (Hello, u16)), MigrationError> {
    lobby.accept(acceptor, config.accept_timeout).map_err(|err| match err {
        LobbyError::TimedOut => MigrationError::TimedOut {
            waiting_for: format!(
                "a connection from the source on {}{}",
                acceptor.local_addr(),
                lobby.turned_away().summary()
            ),
            after: config.accept_timeout,
        },
        LobbyError::Accept(source) => MigrationError::Io { connection: 0, source },
        LobbyError::Fatal(err) => err,
    })
}

fn accept_ack(connection: &mut Connection, version: u16) -> Result<(), MigrationError> {
    write_frame(
        &mut *connection.writer,
        FrameKind::HelloAck,
        0,
        &mut SeqCounter::default(),
        &HelloAck::Accepted { version }.encode(),
    )
    .map_err(|source| MigrationError::Io { connection: 0, source })
}

/// A session whose connections are all accepted: the source's Hello, its connections in
/// index order, the memory the VM prepared, and when the first Hello came.
pub(super) struct Greeted {
    pub hello: Hello,
    pub connections: Vec<Connection>,
    pub memory: Arc<dyn GuestMemory>,
    pub started: Instant,
}

/// Accepts the source's first connection, checks its Hello against the limits and the VM
/// (refusing with the reason), then its other connections; strangers are turned away
/// without ending the session. `prepared` is set once the VM holds memory for it.
pub(super) fn accept_session(
    acceptor: &mut dyn Acceptor,
    vm: &mut dyn DestinationVm,
    config: &DestinationConfig,
    prepared: &mut bool,
) -> Result<Greeted, MigrationError> {
    let mut lobby = lobby();
    let (mut first, (hello, version)) = next_source(&mut lobby, acceptor, config)?;
    let started = Instant::now();
    if hello.connection_index != 0 {
        let err = ProtocolViolation::FirstConnectionNotZero { index: hello.connection_index };
        refuse(&mut first, &err.to_string());
        return Err(err.into());
    }
    if hello.total_bytes() > config.max_memory_bytes {
        let err = LimitExceeded::GuestTooLarge { bytes: hello.total_bytes(), limit: config.max_memory_bytes };
        refuse(&mut first, &err.to_string());
        return Err(err.into());
    }
    let layout = GuestLayout {
        regions: hello
            .region_addresses
            .iter()
            .zip(&hello.region_bytes)
            .map(|(&guest_address, &bytes)| Region { guest_address, bytes })
            .collect(),
        requirements: hello.vm_requirements.clone(),
    };
    let memory = match vm.prepare(&layout) {
        Ok(memory) => memory,
        Err(err) => {
            refuse(&mut first, &err.to_string());
            return Err(err.into());
        }
    };
    *prepared = true;
    accept_ack(&mut first, version)?;
    let mut connections: Vec<Option<Connection>> = (0..hello.connection_count).map(|_| None).collect();
    connections[0] = Some(first);
    let mut missing = usize::from(hello.connection_count) - 1;
    while missing > 0 {
        // A stranger (or a broken peer) does not end the session being set up.
        let (mut connection, (other, version)) = match next_source(&mut lobby, acceptor, config) {
            Ok(greeted) => greeted,
            Err(MigrationError::Handshake(_) | MigrationError::Protocol(_)) => continue,
            Err(err) => return Err(err),
        };
        if other.session_id != hello.session_id {
            refuse(&mut connection, BUSY);
            continue;
        }
        let index = usize::from(other.connection_index);
        if !other.same_session(&hello) || connections[index].is_some() {
            let err =
                ProtocolViolation::ForeignConnection { index: other.connection_index, session_id: hello.session_id };
            refuse(&mut connection, &err.to_string());
            return Err(err.into());
        }
        accept_ack(&mut connection, version)?;
        connections[index] = Some(connection);
        missing -= 1;
    }
    let connections: Vec<Connection> = connections.into_iter().map(|c| c.expect("every index accepted")).collect();

    Ok(Greeted { hello, connections, memory, started })
}
