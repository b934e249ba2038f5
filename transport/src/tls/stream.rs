//! One TLS session under the engine's split connection. The engine reads a connection on
//! one thread and writes it on another, while a rustls session is one state machine; so the
//! session sits behind a lock that each half holds only to encrypt or decrypt, never while
//! it waits on the network. Ciphertext goes out under a second lock, taken before the
//! session's, so records leave in the order they were sealed. (Holding the session's lock
//! through a blocked write would let two peers, each writing to the other, stop each
//! other's readers for good.)

use super::direct::{TlsInbound, TlsOutbound};
use super::session::{describe, lock, Session};
use crate::pipe::{AttachInbound, AttachOutbound, Connection, Inbound, Outbound};
use rustls::{ClientConnection, ServerConnection};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sent by the destination once it has accepted the source's certificate. TLS 1.3 lets a
/// client finish its handshake before the server has checked the client's certificate;
/// waiting for this byte makes a refusal surface in `connect`, before any migration data.
const GO_AHEAD: u8 = 0x56;

/// Ciphertext read from the network per read call.
const READ_CHUNK_BYTES: usize = 64 * 1024;

fn tls_error(err: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, describe(&err))
}

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
/// is hung up once the peer could read our alert.
fn handshaken(mut connection: Connection, mut tls: rustls::Connection) -> io::Result<Connection> {
    if let Err(err) = handshake(&mut connection, &mut tls) {
        hang_up_after_alert(connection);
        return Err(err);
    }
    Ok(split(connection, tls))
}

/// Secures the source's end: handshake, then the destination's go-ahead.
pub(super) fn secure_client(connection: Connection, session: ClientConnection) -> io::Result<Connection> {
    let mut secured = handshaken(connection, session.into())?;
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
pub(super) fn secure_server(connection: Connection, session: ServerConnection) -> io::Result<Connection> {
    let mut secured = handshaken(connection, session.into())?;
    secured.writer.write_all(&[GO_AHEAD])?;
    Ok(secured)
}

fn split(connection: Connection, mut tls: rustls::Connection) -> Connection {
    // Each write is sealed and sent whole (`TlsWriter::seal_and_send`), so the records it
    // makes are bounded by the engine's largest frame, not by rustls's default 64 KiB.
    tls.set_buffer_limit(None);
    // The probe counts ciphertext: a record's overhead off the guest's bytes.
    // The write side is ours now: records are sealed on the writer's thread.
    let Connection { reader, writer, closer, peer, probe, direct_send, direct_receive } = connection;
    let session =
        Arc::new(Session { tls: Mutex::new(tls), wire_out: Mutex::new(Some(writer)), handed_over: Mutex::new(None) });
    Connection {
        direct_send: direct_send.map(|attach| seal_on_the_stack(session.clone(), attach)),
        direct_receive: direct_receive.map(|attach| open_on_the_stack(session.clone(), attach)),
        reader: Box::new(TlsReader {
            session: session.clone(),
            wire_in: reader,
            pending: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
            offset: 0,
            filled: 0,
        }),
        writer: Box::new(TlsWriter { session, sealed: Vec::new() }),
        closer,
        peer,
        probe,
    }
}

/// Where the stack pulls the write side: it gets records sealed as it pulls.
fn seal_on_the_stack(session: Arc<Session>, attach: AttachOutbound) -> AttachOutbound {
    Box::new(move |outbound: Box<dyn Outbound>| {
        // Bytes the threaded writer sent are ahead in the plain connection's queue.
        drop(session.hand_over_writes());
        attach(Box::new(TlsOutbound::new(session, outbound)));
    })
}

/// Where the stack delivers what arrives: it gets records opened as they arrive.
fn open_on_the_stack(session: Arc<Session>, attach: AttachInbound) -> AttachInbound {
    Box::new(move |reader: Box<dyn Read + Send>, inbound: Box<dyn Inbound>| {
        // Our `TlsReader`: dropped, it leaves the plain reader and its unopened ciphertext.
        drop(reader);
        let handed_over = lock(&session.handed_over).take();
        match handed_over {
            Some((wire_in, leftover)) => attach(wire_in, Box::new(TlsInbound::new(session, inbound, leftover))),
            None => {
                let mut inbound = inbound;
                inbound.end(Err("TLS: the read side handed over was not this connection's"));
            }
        }
    })
}

struct TlsReader {
    session: Arc<Session>,
    wire_in: Box<dyn Read + Send>,
    /// Ciphertext read (`offset..filled`) but not yet given to rustls, which takes records
    /// only while its plaintext buffer has room.
    pending: Box<[u8]>,
    offset: usize,
    filled: usize,
}

impl Drop for TlsReader {
    /// Leaves the plain reader and the ciphertext not yet opened for the stack, should it
    /// take the read side over (`open_on_the_stack`).
    fn drop(&mut self) {
        let wire_in = std::mem::replace(&mut self.wire_in, Box::new(io::empty()));
        let leftover = self.pending[self.offset..self.filled].to_vec();
        *lock(&self.session.handed_over) = Some((wire_in, leftover));
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let wants_write = {
                let mut tls = lock(&self.session.tls);
                if let Some(n) = plaintext(&mut tls, out)? {
                    return Ok(n);
                }
                if self.offset < self.filled {
                    let mut rest = &self.pending[self.offset..self.filled];
                    let taken = tls.read_tls(&mut rest)?;
                    self.offset += taken;
                    let processed = tls.process_new_packets();
                    if let Err(err) = processed {
                        drop(tls);
                        let _ = self.session.answer();
                        return Err(tls_error(err));
                    }
                    continue;
                }
                tls.wants_write()
            };
            if wants_write {
                self.session.answer()?;
            }
            self.offset = 0;
            self.filled = 0;
            let n = self.wire_in.read(&mut self.pending)?;
            self.filled = n;
            if n == 0 {
                // The end of the ciphertext: rustls decides whether it was a clean close.
                let mut tls = lock(&self.session.tls);
                tls.read_tls(&mut io::empty())?;
                tls.process_new_packets().map_err(tls_error)?;
                return plaintext(&mut tls, out)?
                    .ok_or_else(|| io::Error::new(io::ErrorKind::WouldBlock, "no TLS plaintext after the end"));
            }
        }
    }
}

/// Reads decrypted bytes rustls holds: `None` when it has none yet.
fn plaintext(tls: &mut rustls::Connection, out: &mut [u8]) -> io::Result<Option<usize>> {
    match tls.reader().read(out) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(io::Error::new(e.kind(), "the peer closed the connection without a TLS close_notify"))
        }
        Err(e) => Err(e),
    }
}

struct TlsWriter {
    session: Arc<Session>,
    /// Records sealed by the last write, reused.
    sealed: Vec<u8>,
}

impl TlsWriter {
    /// Seals `plaintext` (all of it) and sends the records.
    fn seal_and_send(&mut self, plaintext: &[u8], close: bool) -> io::Result<()> {
        let mut wire = lock(&self.session.wire_out);
        // Handed to the stack: its pull seals from now on (and closes at the end).
        let Some(wire) = wire.as_mut() else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the write side was handed to the stack"));
        };
        self.sealed.clear();
        {
            let mut tls = lock(&self.session.tls);
            tls.writer().write_all(plaintext)?;
            if close {
                tls.send_close_notify();
            }
            while tls.wants_write() {
                tls.write_tls(&mut self.sealed)?;
            }
        }
        wire.write_all(&self.sealed)
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.seal_and_send(buf, false)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.session.wire_out).as_mut().map_or(Ok(()), |wire| wire.flush())
    }
}

impl Drop for TlsWriter {
    /// Tells the peer this direction ended on purpose, so it sees a clean end of stream
    /// rather than a truncation.
    fn drop(&mut self) {
        let _ = self.seal_and_send(&[], true);
    }
}
