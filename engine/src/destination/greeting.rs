//! Greeting the source: its connections accepted and their Hellos checked (refused with a
//! reason where they do not fit), and whoever else connects while a session runs turned
//! away.

use crate::config::DestinationConfig;
use crate::error::{LimitExceeded, ProtocolViolation};
use crate::vm::{DestinationVm, GuestLayout};
use crate::MigrationError;
use migration::frame::{FrameKind, SeqCounter};
use migration::handshake::{accept_preamble, Hello, HelloAck, HELLO_FRAME_LIMIT_BYTES, PREAMBLE_BYTES};
use migration::memory::{GuestMemory, Region};
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport::framed::{read_frame, write_frame};
use transport::pipe::{Acceptor, Connection};

use super::Shared;

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
/// both ends speak.
fn read_hello(connection: &mut Connection) -> Result<(Hello, u16), MigrationError> {
    let mut preamble = [0u8; PREAMBLE_BYTES];
    connection
        .reader
        .read_exact(&mut preamble)
        .map_err(|e| ProtocolViolation::BadGreeting(format!("no preamble from {}: {e}", connection.peer)))?;
    let version = accept_preamble(&preamble).map_err(|err| {
        refuse(connection, &err.to_string());
        MigrationError::from(err)
    })?;
    let mut payload = Vec::new();
    let header = read_frame(&mut *connection.reader, &mut payload, |_| HELLO_FRAME_LIMIT_BYTES)
        .map_err(|e| ProtocolViolation::BadGreeting(format!("bad Hello from {}: {e}", connection.peer)))?;
    if header.kind != FrameKind::Hello || header.seq != 0 {
        let reason = format!("expected Hello, got {:?} (seq {})", header.kind, header.seq);
        refuse(connection, &reason);
        return Err(ProtocolViolation::BadGreeting(reason).into());
    }
    let hello = Hello::decode(&payload).map_err(|err| {
        refuse(connection, &err.to_string());
        MigrationError::from(err)
    })?;
    Ok((hello, version))
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
    let accept = |acceptor: &mut dyn Acceptor| {
        acceptor.accept(config.accept_timeout).map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => MigrationError::TimedOut {
                waiting_for: format!("a connection from the source on {}", acceptor.local_addr()),
                after: config.accept_timeout,
            },
            _ => MigrationError::Io { connection: 0, source: e },
        })
    };
    let mut first = accept(acceptor)?;
    let (hello, version) = read_hello(&mut first)?;
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
        let mut connection = accept(acceptor)?;
        let (other, version) = match read_hello(&mut connection) {
            Ok(answer) => answer,
            // A stranger (or a broken peer) does not end the session being set up.
            Err(_) => continue,
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
