//! TLS where the stack moves the bytes itself (a polling core: `Connection::direct_send`,
//! `direct_receive`): records are sealed on the core as it pulls the application's bytes,
//! and opened on the core as they arrive, with no writer or reader thread and no byte
//! pipe in between. The keys are the ones the threaded halves used until then
//! (`stream.rs`); whatever they left (ciphertext read and not yet opened, plaintext not yet
//! read) goes first.

use super::record::{record_len, Opened, Opener, Sealer, HEADER, MAX_PLAINTEXT, MAX_RECORD};
use crate::pipe::{Inbound, Next, Outbound};

/// Plaintext sealed per pull: a few records, so the stack's next pull finds some ready.
const SEAL_PER_PULL: usize = 4 * MAX_PLAINTEXT;

/// The application's outgoing bytes, sealed into records as the stack pulls them.
pub(super) struct TlsOutbound {
    sealer: Sealer,
    inner: Box<dyn Outbound>,
    /// Records sealed and not yet all taken by the stack (`offset..`).
    sealed: Vec<u8>,
    offset: usize,
    /// The application is done and close_notify is sealed: nothing more follows.
    closed: bool,
}

impl TlsOutbound {
    pub(super) fn new(sealer: Sealer, inner: Box<dyn Outbound>) -> Self {
        TlsOutbound { sealer, inner, sealed: Vec::new(), offset: 0, closed: false }
    }

    /// Seals what the application offers now, or close_notify once it is done.
    fn seal_more(&mut self) {
        self.sealed.clear();
        self.offset = 0;
        let (taken, sealing) = match self.inner.next() {
            Next::Bytes(bytes) => {
                let bytes = &bytes[..bytes.len().min(SEAL_PER_PULL)];
                (bytes.len(), self.sealer.seal(bytes, &mut self.sealed))
            }
            Next::Done if !self.closed => {
                self.closed = true;
                (0, self.sealer.seal_close_notify(&mut self.sealed))
            }
            Next::Done | Next::Idle => (0, Ok(())),
        };
        match sealing {
            Ok(()) if taken > 0 => self.inner.advance(taken),
            Ok(()) => {}
            Err(err) => self.sealing_failed(&err),
        }
    }

    /// Sealing failed: nothing more goes out, and the application is told why.
    fn sealing_failed(&mut self, err: &std::io::Error) {
        self.closed = true;
        self.sealed.clear();
        self.offset = 0;
        self.inner.lost(&format!("TLS: sealing records failed: {err}"));
    }
}

impl Outbound for TlsOutbound {
    /// Seals the application's bytes straight into the stack's buffer while whole records
    /// fit there; records sealed before, the end of the session, and a room too small for
    /// a record (the end of the stack's ring) go through `next`.
    fn write_into(&mut self, room: &mut [u8]) -> Option<usize> {
        if self.offset < self.sealed.len() || self.closed {
            return None;
        }
        let sealing = match self.inner.next() {
            Next::Bytes(bytes) => self.sealer.seal_into(&bytes[..bytes.len().min(SEAL_PER_PULL)], room),
            Next::Idle | Next::Done => return None,
        };
        match sealing {
            Ok((0, _)) => None,
            Ok((taken, written)) => {
                self.inner.advance(taken);
                Some(written)
            }
            Err(err) => {
                self.sealing_failed(&err);
                None
            }
        }
    }

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

/// Records as they arrive: each is copied out of the stack's buffer whole (the stack's
/// bytes are not ours to decrypt in place), opened in place and offered to the
/// application. Where the application holds back, the plaintext waits here and no more
/// ciphertext is taken, so the stack's window closes on the peer as it would without TLS.
pub(super) struct TlsInbound {
    opener: Opener,
    inner: Box<dyn Inbound>,
    /// A record being gathered (`..filled`), then opened in place.
    record: Box<[u8]>,
    filled: usize,
    /// Opened and not yet taken by the application.
    plaintext: std::ops::Range<usize>,
    /// Ciphertext the threaded reader had read and not opened: before anything the stack
    /// delivers.
    leftover: Vec<u8>,
    /// Plaintext the threaded reader had opened and not handed out: first of all.
    opened_before: Vec<u8>,
    /// The peer's close_notify arrived.
    closed: bool,
    /// The session failed or ended: the application was told, the rest is dropped.
    finished: bool,
}

impl TlsInbound {
    pub(super) fn new(opener: Opener, inner: Box<dyn Inbound>, leftover: Vec<u8>, opened_before: Vec<u8>) -> Self {
        TlsInbound {
            opener,
            inner,
            record: vec![0; MAX_RECORD].into_boxed_slice(),
            filled: 0,
            plaintext: 0..0,
            leftover,
            opened_before,
            closed: false,
            finished: false,
        }
    }

    /// Offers what was opened and not yet taken; whether the application took all of it.
    fn deliver(&mut self) -> bool {
        if !self.opened_before.is_empty() {
            let taken = self.inner.receive(&self.opened_before);
            self.opened_before.drain(..taken);
            if !self.opened_before.is_empty() {
                return false;
            }
        }
        if !self.plaintext.is_empty() {
            let taken = self.inner.receive(&self.record[self.plaintext.clone()]);
            self.plaintext.start += taken;
        }
        self.plaintext.is_empty()
    }

    /// Takes ciphertext from `bytes` into the record being gathered and opens whole records
    /// while the application takes their plaintext; returns how many bytes were taken.
    fn open(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let mut taken = 0;
        while self.deliver() && !self.closed {
            // The header first, then as much as it says.
            let want = record_len(&self.record[..self.filled]).map_err(|e| e.to_string())?.unwrap_or(HEADER);
            if self.filled < want {
                let n = (want - self.filled).min(bytes.len() - taken);
                if n == 0 {
                    break;
                }
                self.record[self.filled..self.filled + n].copy_from_slice(&bytes[taken..taken + n]);
                self.filled += n;
                taken += n;
                continue;
            }
            self.filled = 0;
            match self.opener.open(&mut self.record[..want]).map_err(|e| e.to_string())? {
                Opened::Data(range) => self.plaintext = range,
                Opened::Closed => self.closed = true,
                Opened::Nothing => {}
            }
        }
        Ok(taken)
    }

    fn fail(&mut self, why: Option<&str>) {
        self.finished = true;
        self.inner.end(why.map_or(Ok(()), Err));
    }
}

impl Inbound for TlsInbound {
    fn receive(&mut self, bytes: &[u8]) -> usize {
        if self.finished {
            return bytes.len();
        }
        if self.plaintext.is_empty() && self.opened_before.is_empty() {
            // A poll: what the application holds may move on.
            self.inner.receive(&[]);
        }
        if !self.leftover.is_empty() {
            let leftover = std::mem::take(&mut self.leftover);
            match self.open(&leftover) {
                Ok(used) if used < leftover.len() => {
                    self.leftover = leftover[used..].to_vec();
                    return 0;
                }
                Ok(_) => {}
                Err(why) => {
                    self.fail(Some(&why));
                    return bytes.len();
                }
            }
        }
        match self.open(bytes) {
            // The peer ended the session and all it sent was taken.
            Ok(_) if self.closed && self.deliver() => {
                self.fail(None);
                bytes.len()
            }
            Ok(taken) => taken,
            Err(why) => {
                self.fail(Some(&why));
                bytes.len()
            }
        }
    }

    fn holding(&self) -> bool {
        !self.plaintext.is_empty() || !self.opened_before.is_empty() || self.inner.holding()
    }

    fn end(&mut self, how: Result<(), &str>) {
        if self.finished {
            return;
        }
        let why = match how {
            Ok(()) if !self.deliver() => Some("the stream ended before the application took all of it".to_string()),
            Ok(()) if self.closed => None,
            Ok(()) => Some("the peer closed the connection without a TLS close_notify".to_string()),
            Err(why) => Some(why.to_string()),
        };
        self.fail(why.as_deref());
    }
}
