//! The application's side of a dataplane connection: a read half and a write half that
//! exchange byte chunks with the owning core through bounded rings, presented to the
//! engine as a `transport::pipe::Connection`.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transport::abort::SessionAbort;
use transport::pipe::{Connection, Inbound, Outbound, ReceiverLimit, SendProbe};
use transport::ring::{Pool, Ring};

/// Bytes per chunk handed between an application thread and its core: large enough that
/// ring traffic is a small cost per byte, small enough to keep many in flight.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks queued each way per connection: 4 MiB, a little more than the socket buffers.
pub const PIPE_RING_CHUNKS: usize = 64;

/// What a connection's application halves and its core share.
pub struct PipeShared {
    /// Application to network (written by the app's writer, drained by the core).
    pub(crate) to_net: Ring<Vec<u8>>,
    /// Network to application; an empty chunk marks the end of the stream.
    pub(crate) from_net: Ring<Vec<u8>>,
    /// Raised when the application closes the connection (or the core lost it).
    pub(crate) closed: SessionAbort,
    pub(crate) free: Pool<Vec<u8>>,
    /// Bytes the peer has acknowledged, as the core last saw them.
    pub(crate) acknowledged: AtomicU64,
    /// Whether the socket's send buffer was full when the core last looked.
    pub(crate) send_full: AtomicBool,
    /// The core's running totals of send time (µs): with data to send or in flight, and
    /// the part of it the peer's window held the sender back.
    pub(crate) busy_us: AtomicU64,
    pub(crate) window_limited_us: AtomicU64,
    limit: ReceiverLimit,
    /// The write side, once the application handed it over (`Connection::direct_send`): the
    /// core takes it after draining what `to_net` holds, and pulls from it from then on.
    pub(crate) outbound: Mutex<Option<Box<dyn Outbound>>>,
    /// Set once `outbound` was filled, so the core need not lock to look.
    pub(crate) attached: AtomicBool,
    /// The read side, once the application handed it over (`Connection::direct_receive`),
    /// with the read timeout: the core feeds it what `from_net` holds, then the socket.
    pub(crate) inbound: Mutex<Option<(Box<dyn Inbound>, Duration)>>,
    pub(crate) inbound_attached: AtomicBool,
    /// What the application's reader had taken from `from_net` and not returned when it was
    /// handed over: the first bytes for the `Inbound`.
    pub(crate) unread: Mutex<Option<(Vec<u8>, usize)>>,
}

impl SendProbe for PipeShared {
    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    fn full(&self) -> bool {
        self.send_full.load(Ordering::Relaxed)
    }

    fn receiver_limited(&self) -> bool {
        self.limit
            .judge(|| Some((self.busy_us.load(Ordering::Relaxed), self.window_limited_us.load(Ordering::Relaxed))))
    }
}

impl PipeShared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(PipeShared {
            to_net: Ring::new(PIPE_RING_CHUNKS),
            from_net: Ring::new(PIPE_RING_CHUNKS),
            closed: SessionAbort::new(),
            free: Pool::new(2 * PIPE_RING_CHUNKS),
            acknowledged: AtomicU64::new(0),
            send_full: AtomicBool::new(false),
            busy_us: AtomicU64::new(0),
            window_limited_us: AtomicU64::new(0),
            limit: ReceiverLimit::default(),
            outbound: Mutex::new(None),
            attached: AtomicBool::new(false),
            inbound: Mutex::new(None),
            inbound_attached: AtomicBool::new(false),
            unread: Mutex::new(None),
        })
    }

    /// Takes the write side the application handed over, if it has (once).
    pub(crate) fn take_outbound(&self) -> Option<Box<dyn Outbound>> {
        if !self.attached.load(Ordering::Acquire) {
            return None;
        }
        self.outbound.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Takes the read side the application handed over, if it has (once).
    pub(crate) fn take_inbound(&self) -> Option<HandedInbound> {
        if !self.inbound_attached.load(Ordering::Acquire) {
            return None;
        }
        let (inbound, timeout) = self.inbound.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let unread = self.unread.lock().unwrap_or_else(|p| p.into_inner()).take();
        Some(HandedInbound { inbound, timeout, unread })
    }
}

/// A read side handed over to the core.
pub(crate) struct HandedInbound {
    pub inbound: Box<dyn Inbound>,
    /// How long the peer may stay silent while the `Inbound` waits for it.
    pub timeout: Duration,
    /// What the application's reader took from `from_net` and left unread (chunk, offset).
    pub unread: Option<(Vec<u8>, usize)>,
}

struct PipeReader {
    shared: Arc<PipeShared>,
    current: Vec<u8>,
    offset: usize,
    eof: bool,
    timeout: Duration,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.eof {
            return Ok(0);
        }
        if self.offset == self.current.len() {
            let chunk = match self.shared.from_net.pop_timeout(&self.shared.closed, self.timeout) {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no data from the peer in time")),
                Err(_) => return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed")),
            };
            if chunk.is_empty() {
                self.eof = true;
                return Ok(0);
            }
            let spent = std::mem::replace(&mut self.current, chunk);
            self.shared.free.give(spent);
            self.offset = 0;
        }
        let n = buf.len().min(self.current.len() - self.offset);
        buf[..n].copy_from_slice(&self.current[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

impl Drop for PipeReader {
    /// Leaves what it took and did not return for whoever reads on: the core, when the
    /// read side is handed over (`Connection::direct_receive`).
    fn drop(&mut self) {
        if self.offset < self.current.len() && !self.eof {
            let current = std::mem::take(&mut self.current);
            *self.shared.unread.lock().unwrap_or_else(|p| p.into_inner()) = Some((current, self.offset));
        }
    }
}

struct PipeWriter {
    shared: Arc<PipeShared>,
}

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK_BYTES);
        let mut chunk = self.shared.free.take(|| Vec::with_capacity(CHUNK_BYTES));
        chunk.clear();
        chunk.extend_from_slice(&buf[..n]);
        self.shared
            .to_net
            .push(chunk, &self.shared.closed)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wraps a core's connection as the engine's byte pipe. `timeout` bounds a read that
/// waits for the peer, as a kernel socket's read timeout does.
pub(crate) fn connection(shared: Arc<PipeShared>, peer: String, timeout: Duration) -> Connection {
    let closer = shared.clone();
    let probe = shared.clone();
    let attach = shared.clone();
    let attach_inbound = shared.clone();
    Connection {
        reader: Box::new(PipeReader { shared: shared.clone(), current: Vec::new(), offset: 0, eof: false, timeout }),
        writer: Box::new(PipeWriter { shared }),
        closer: Box::new(move || closer.closed.raise("closed by the application")),
        peer,
        probe: Some(probe),
        direct_send: Some(Box::new(move |outbound| {
            *attach.outbound.lock().unwrap_or_else(|p| p.into_inner()) = Some(outbound);
            attach.attached.store(true, Ordering::Release);
        })),
        direct_receive: Some(Box::new(move |reader, inbound| {
            // Dropped first: a pipe reader leaves its unread bytes to the core.
            drop(reader);
            *attach_inbound.inbound.lock().unwrap_or_else(|p| p.into_inner()) = Some((inbound, timeout));
            attach_inbound.inbound_attached.store(true, Ordering::Release);
        })),
    }
}
