//! TLS where the stack moves the bytes itself (a polling core: `Connection::direct_send`,
//! `direct_receive`): records are sealed on the core as it pulls the application's bytes,
//! and opened on the core as they arrive, with no writer or reader thread and no byte
//! pipe in between. The rustls session is the one the threaded halves used until then
//! (`stream.rs`); whatever they left (ciphertext read and not yet opened, records a reader
//! wanted to send) goes first.

use super::session::{describe, lock, Session};
use crate::pipe::{Inbound, Next, Outbound};
use std::io::{self, BufRead, Write};
use std::sync::Arc;

/// The application's outgoing bytes, sealed into records as the stack pulls them.
pub(super) struct TlsOutbound {
    session: Arc<Session>,
    inner: Box<dyn Outbound>,
    /// Records sealed and not yet all taken by the stack (`offset..`).
    sealed: Vec<u8>,
    offset: usize,
    /// The application is done and close_notify is sealed: nothing more follows.
    closed: bool,
}

impl TlsOutbound {
    pub(super) fn new(session: Arc<Session>, inner: Box<dyn Outbound>) -> Self {
        TlsOutbound { session, inner, sealed: Vec::new(), offset: 0, closed: false }
    }

    /// Seals what the application offers now, or close_notify once it is done, with
    /// whatever else rustls wants to send (a reader's answers: a key update, an alert).
    fn seal_more(&mut self) {
        self.sealed.clear();
        self.offset = 0;
        let mut tls = lock(&self.session.tls);
        let (taken, sealing) = match self.inner.next() {
            Next::Bytes(bytes) => (bytes.len(), tls.writer().write_all(bytes)),
            Next::Done if !self.closed => {
                tls.send_close_notify();
                self.closed = true;
                (0, Ok(()))
            }
            Next::Done | Next::Idle => (0, Ok(())),
        };
        let sealing = sealing.and_then(|()| {
            while tls.wants_write() {
                tls.write_tls(&mut self.sealed)?;
            }
            Ok(())
        });
        drop(tls);
        match sealing {
            Ok(()) if taken > 0 => self.inner.advance(taken),
            Ok(()) => {}
            Err(err) => {
                self.closed = true;
                self.sealed.clear();
                self.inner.lost(&format!("TLS: sealing records failed: {err}"));
            }
        }
    }
}

impl Outbound for TlsOutbound {
    fn next(&mut self) -> Next<'_> {
        if self.offset == self.sealed.len() {
            self.seal_more();
        }
        match (self.offset < self.sealed.len(), self.closed) {
            (true, _) => Next::Bytes(&self.sealed[self.offset..]),
            (false, true) => Next::Done,
            (false, false) => Next::Idle,
        }
    }

    fn advance(&mut self, n: usize) {
        self.offset += n;
    }

    fn lost(&mut self, why: &str) {
        self.closed = true;
        self.inner.lost(why);
    }
}

/// How far the application took the plaintext rustls holds.
enum Delivered {
    /// All of it (or there was none).
    All,
    /// It held back: the rest waits in rustls.
    Held,
    /// All of it, and the peer closed the session cleanly after it.
    Closed,
}

/// Records as they arrive, opened and handed to the application's [`Inbound`] straight
/// from rustls's buffer (`BufRead`: no copy out, no buffer of ours). Where the application
/// holds back, the plaintext waits in rustls and no more ciphertext is taken, so the
/// stack's window closes on the peer as it would without TLS.
pub(super) struct TlsInbound {
    session: Arc<Session>,
    inner: Box<dyn Inbound>,
    /// Ciphertext the threaded reader had read and not given to rustls: before anything
    /// the stack delivers.
    leftover: Vec<u8>,
    /// The application left plaintext in rustls on the last offer.
    held: bool,
    /// The session failed or ended: the application was told, the rest is dropped.
    finished: bool,
}

impl TlsInbound {
    pub(super) fn new(session: Arc<Session>, inner: Box<dyn Inbound>, leftover: Vec<u8>) -> Self {
        TlsInbound { session, inner, leftover, held: false, finished: false }
    }

    /// Offers the plaintext rustls holds to the application, chunk by chunk.
    fn deliver(&mut self, tls: &mut rustls::Connection) -> io::Result<Delivered> {
        loop {
            let mut reader = tls.reader();
            let chunk = match reader.fill_buf() {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Delivered::All),
                Err(e) => return Err(e),
            };
            let len = chunk.len();
            if len == 0 {
                return Ok(Delivered::Closed);
            }
            let taken = self.inner.receive(chunk);
            reader.consume(taken);
            if taken < len {
                return Ok(Delivered::Held);
            }
        }
    }

    /// Opens what of `bytes` rustls takes while the application takes the plaintext;
    /// returns how many bytes were taken.
    fn open(&mut self, bytes: &[u8]) -> usize {
        let session = self.session.clone();
        let mut tls = lock(&session.tls);
        let mut rest = bytes;
        let outcome = loop {
            match self.deliver(&mut tls) {
                Ok(Delivered::All) => self.held = false,
                Ok(Delivered::Held) => {
                    self.held = true;
                    break Ok(());
                }
                // The peer ended the session (close_notify) and all it sent was taken.
                Ok(Delivered::Closed) => {
                    rest = &[];
                    break Err(None);
                }
                Err(err) => break Err(Some(format!("TLS: {err}"))),
            }
            if rest.is_empty() {
                break Ok(());
            }
            if let Err(err) = tls.read_tls(&mut rest) {
                break Err(Some(format!("TLS: {err}")));
            }
            if let Err(err) = tls.process_new_packets() {
                break Err(Some(describe(&err)));
            }
        };
        let wants_write = tls.wants_write();
        drop(tls);
        if wants_write {
            let _ = session.answer();
        }
        match outcome {
            Ok(()) => bytes.len() - rest.len(),
            Err(why) => {
                self.finished = true;
                self.inner.end(why.as_deref().map_or(Ok(()), Err));
                bytes.len()
            }
        }
    }
}

impl Inbound for TlsInbound {
    fn receive(&mut self, bytes: &[u8]) -> usize {
        if self.finished {
            return bytes.len();
        }
        if !self.held {
            // A poll: what the application holds may move on.
            self.inner.receive(&[]);
        }
        if !self.leftover.is_empty() {
            let leftover = std::mem::take(&mut self.leftover);
            let used = self.open(&leftover);
            if used < leftover.len() {
                self.leftover = leftover[used..].to_vec();
                return 0;
            }
        }
        self.open(bytes)
    }

    fn holding(&self) -> bool {
        self.held || self.inner.holding()
    }

    fn end(&mut self, how: Result<(), &str>) {
        if self.finished {
            return;
        }
        self.finished = true;
        let why = match how {
            // rustls decides whether the peer closed cleanly (close_notify) or was cut
            // off; what was opened before the end is the application's, if it takes it.
            Ok(()) => {
                let session = self.session.clone();
                let mut tls = lock(&session.tls);
                let _ = tls.read_tls(&mut io::empty());
                match tls.process_new_packets() {
                    Err(err) => Some(describe(&err)),
                    Ok(_) => match self.deliver(&mut tls) {
                        Ok(Delivered::Held) => Some("the stream ended before the application took all of it".into()),
                        Ok(Delivered::All | Delivered::Closed) => None,
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            Some("the peer closed the connection without a TLS close_notify".to_string())
                        }
                        Err(e) => Some(format!("TLS: {e}")),
                    },
                }
            }
            Err(why) => Some(why.to_string()),
        };
        self.inner.end(why.as_deref().map_or(Ok(()), Err));
    }
}
