//! One TLS session under the engine's split connection. rustls runs the handshake; then
//! each direction has keys of its own (`record.rs`), so the engine's reader and writer, on
//! two threads, never wait on each other: the writer seals under the lock that also holds
//! the plain writer (records leave in the order they were sealed), the reader opens what it
//! read in place.

use super::direct::{TlsInbound, TlsOutbound};
use super::record::{
    record_len, sealed_room, split_keys, Opened, Opener, Sealer, TrafficSecrets, MAX_PLAINTEXT, MAX_RECORD,
};
use super::session::{describe, lock, HandedOver, Session};
use crate::pipe::{AttachInbound, AttachOutbound, Connection, Inbound, Outbound};
use rustls::{ClientConnection, ServerConnection};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sent by the destination once it has accepted the source's certificate. TLS 1.3 lets a
/// client finish its handshake before the server has checked the client's certificate;
/// waiting for this byte makes a refusal surface in `connect`, before any migration data.
const GO_AHEAD: u8 = 0x56;

/// Plaintext sealed per write into the plain connection.
const SEAL_PER_WRITE: usize = 4 * MAX_PLAINTEXT;

/// Room for ciphertext read from the network: a few records per read call.
const READ_BUFFER_BYTES: usize = 4 * MAX_RECORD;

/// One Read + Write over the connection's halves, for the handshake.
struct Joined<'a> {
    reader: &'a mut (dyn Read + Send),
    writer: &'a mut (dyn Write + Send),
}

impl Read for Joined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for Joined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// Runs the handshake to its end over the plain connection.
fn handshake(connection: &mut Connection, tls: &mut rustls::Connection) -> io::Result<()> {
    let mut io = Joined { reader: &mut *connection.reader, writer: &mut *connection.writer };
    while tls.is_handshaking() {
        match tls.complete_io(&mut io) {
            Ok((0, 0)) if tls.is_handshaking() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
            Ok(_) => {}
            Err(err) => {
                // rustls's last-gasp write sends one queued record; the alert that says
                // why may be queued behind another (a compatibility ChangeCipherSpec).
                while tls.wants_write() {
                    if tls.write_tls(&mut io).is_err() {
                        break;
                    }
                }
                let _ = io.flush();
                let inner = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).map(describe);
                return Err(io::Error::new(err.kind(), inner.unwrap_or_else(|| format!("TLS handshake: {err}"))));
            }
        }
    }
    // Whatever the handshake left to send (the client's Finished) goes out now.
    while tls.wants_write() {
        tls.write_tls(&mut io)?;
    }
    io.flush()
}

/// Runs the handshake and splits the secured connection; a failed handshake's connection
/// is hung up once the peer could read our alert. `secrets` is the key log of the
/// session's configuration.
fn handshaken(
    mut connection: Connection,
    mut tls: rustls::Connection,
    secrets: &TrafficSecrets,
) -> io::Result<Connection> {
    if let Err(err) = handshake(&mut connection, &mut tls) {
        hang_up_after_alert(connection);
        return Err(err);
    }
    let (sealer, opener) = split_keys(tls, secrets)?;
    Ok(split(connection, sealer, opener))
}

/// Secures the source's end: handshake, then the destination's go-ahead.
pub(super) fn secure_client(
    connection: Connection,
    session: ClientConnection,
    secrets: &TrafficSecrets,
) -> io::Result<Connection> {
    let mut secured = handshaken(connection, session.into(), secrets)?;
    let mut byte = [0u8; 1];
    secured.reader.read_exact(&mut byte).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            io::Error::new(e.kind(), "the destination closed the connection after the TLS handshake")
        }
        _ => e,
    })?;
    if byte[0] != GO_AHEAD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the destination sent no TLS go-ahead"));
    }
    Ok(secured)
}

/// How long a refusing end waits for the peer to hang up after reading its alert.
const ALERT_LINGER: Duration = Duration::from_secs(1);

/// Closes a connection whose handshake we failed, after the peer has had the chance to
/// read our alert: closing a socket with unread input (the rest of the peer's flight)
/// resets it, and a reset can destroy the alert before the peer reads it. So the input is
/// drained until the peer, having read the alert, hangs up (or a short while passes).
fn hang_up_after_alert(connection: Connection) {
    let Connection { mut reader, writer, closer, .. } = connection;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let drained = std::thread::Builder::new().name("tls-refused".into()).spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
        let _ = done_tx.send(());
    });
    if drained.is_ok() {
        let _ = done_rx.recv_timeout(ALERT_LINGER);
    }
    closer();
    drop(writer);
}

/// Secures the destination's end: handshake (the source's certificate is checked in it),
/// then the go-ahead.
pub(super) fn secure_server(
    connection: Connection,
    session: ServerConnection,
    secrets: &TrafficSecrets,
) -> io::Result<Connection> {
    let mut secured = handshaken(connection, session.into(), secrets)?;
    secured.writer.write_all(&[GO_AHEAD])?;
    Ok(secured)
}

fn split(connection: Connection, sealer: Sealer, opener: Opener) -> Connection {
    let Connection { reader, writer, closer, peer, probe, direct_send, direct_receive } = connection;
    let session = Arc::new(Session { wire_out: Mutex::new(Some((writer, sealer))), handed_over: Mutex::new(None) });
    Connection {
        direct_send: direct_send.map(|attach| seal_on_the_stack(session.clone(), attach)),
        direct_receive: direct_receive.map(|attach| open_on_the_stack(session.clone(), attach)),
        reader: Box::new(TlsReader {
            session: session.clone(),
            wire_in: Some(reader),
            opener: Some(opener),
            buffer: vec![0; READ_BUFFER_BYTES].into_boxed_slice(),
            ciphertext: 0..0,
            plaintext: 0..0,
            closed: false,
        }),
        writer: Box::new(TlsWriter { session, sealed: vec![0; sealed_room(SEAL_PER_WRITE)].into_boxed_slice() }),
        closer,
        peer,
        probe,
    }
}

/// Where the stack pulls the write side: it gets records sealed as it pulls.
fn seal_on_the_stack(session: Arc<Session>, attach: AttachOutbound) -> AttachOutbound {
    Box::new(move |outbound: Box<dyn Outbound>| {
        // Records the threaded writer sent are ahead in the plain connection's queue; the
        // sealing keys (and their numbering) go on with the stack.
        let handed_over = lock(&session.wire_out).take();
        match handed_over {
            Some((writer, sealer)) => {
                drop(writer);
                attach(Box::new(TlsOutbound::new(sealer, outbound)))
            }
            None => {
                let mut outbound = outbound;
                outbound.lost("TLS: the write side was already handed over");
            }
        }
    })
}

/// Where the stack delivers what arrives: it gets records opened as they arrive.
fn open_on_the_stack(session: Arc<Session>, attach: AttachInbound) -> AttachInbound {
    Box::new(move |reader: Box<dyn Read + Send>, inbound: Box<dyn Inbound>| {
        // Our `TlsReader`: dropped, it leaves the plain reader and what it held.
        drop(reader);
        let handed_over = lock(&session.handed_over).take();
        match handed_over {
            Some(HandedOver { wire_in, opener, ciphertext, plaintext }) => {
                attach(wire_in, Box::new(TlsInbound::new(opener, inbound, ciphertext, plaintext)))
            }
            None => {
                let mut inbound = inbound;
                inbound.end(Err("TLS: the read side handed over was not this connection's"));
            }
        }
    })
}

/// The threaded read side: ciphertext is read into `buffer` and each record opened in
/// place there; the application's reads copy the plaintext out.
struct TlsReader {
    session: Arc<Session>,
    /// `None` only once dropped (handed over).
    wire_in: Option<Box<dyn Read + Send>>,
    opener: Option<Opener>,
    buffer: Box<[u8]>,
    /// Read and not yet opened.
    ciphertext: std::ops::Range<usize>,
    /// Opened and not yet read.
    plaintext: std::ops::Range<usize>,
    /// The peer's close_notify arrived: the end of the stream.
    closed: bool,
}

impl Drop for TlsReader {
    /// Leaves the plain reader, the keys and what is held for the stack, should it take the
    /// read side over (`open_on_the_stack`).
    fn drop(&mut self) {
        if let (Some(wire_in), Some(opener)) = (self.wire_in.take(), self.opener.take()) {
            *lock(&self.session.handed_over) = Some(HandedOver {
                wire_in,
                opener,
                ciphertext: self.buffer[self.ciphertext.clone()].to_vec(),
                plaintext: self.buffer[self.plaintext.clone()].to_vec(),
            });
        }
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let (Some(wire_in), Some(opener)) = (self.wire_in.as_mut(), self.opener.as_mut()) else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the read side was handed to the stack"));
        };
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.plaintext.is_empty() {
                let n = out.len().min(self.plaintext.len());
                out[..n].copy_from_slice(&self.buffer[self.plaintext.start..self.plaintext.start + n]);
                self.plaintext.start += n;
                return Ok(n);
            }
            if self.closed {
                return Ok(0);
            }
            if let Some(len) = record_len(&self.buffer[self.ciphertext.clone()])? {
                if len <= self.ciphertext.len() {
                    let at = self.ciphertext.start;
                    self.ciphertext.start += len;
                    match opener.open(&mut self.buffer[at..at + len])? {
                        Opened::Data(range) => self.plaintext = at + range.start..at + range.end,
                        Opened::Closed => self.closed = true,
                        Opened::Nothing => {}
                    }
                    continue;
                }
            }
            // A record is not all here: make room for the largest at the end, and read.
            if self.buffer.len() - self.ciphertext.end < MAX_RECORD {
                self.buffer.copy_within(self.ciphertext.clone(), 0);
                self.ciphertext = 0..self.ciphertext.len();
            }
            let n = wire_in.read(&mut self.buffer[self.ciphertext.end..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without a TLS close_notify",
                ));
            }
            self.ciphertext.end += n;
        }
    }
}

struct TlsWriter {
    session: Arc<Session>,
    /// Where a write's records are sealed, a few at a time, reused.
    sealed: Box<[u8]>,
}

impl TlsWriter {
    /// Seals `plaintext` (all of it) and sends the records: a few at a time, so that the
    /// kernel copies them while they are still in this CPU's cache.
    fn seal_and_send(&mut self, plaintext: &[u8], close: bool) -> io::Result<()> {
        let mut wire = lock(&self.session.wire_out);
        // Handed to the stack: its pull seals from now on (and closes at the end).
        let Some((wire, sealer)) = wire.as_mut() else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the write side was handed to the stack"));
        };
        let mut rest = plaintext;
        while !rest.is_empty() {
            let (taken, written) = sealer.seal_into(&rest[..rest.len().min(SEAL_PER_WRITE)], &mut self.sealed)?;
            if taken == 0 {
                return Err(io::Error::other("TLS: no room to seal a record"));
            }
            wire.write_all(&self.sealed[..written])?;
            rest = &rest[taken..];
        }
        if close {
            let mut alert = Vec::new();
            sealer.seal_close_notify(&mut alert)?;
            wire.write_all(&alert)?;
        }
        Ok(())
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.seal_and_send(buf, false)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.session.wire_out).as_mut().map_or(Ok(()), |(wire, _)| wire.flush())
    }
}

impl Drop for TlsWriter {
    /// Tells the peer this direction ended on purpose, so it sees a clean end of stream
    /// rather than a truncation.
    fn drop(&mut self) {
        let _ = self.seal_and_send(&[], true);
    }
}
