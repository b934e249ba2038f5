//! One carried stream's way out through the session's compression pool. The stream's
//! reader decides each page in stream order (zero, unchanged, delta: the XBZRLE cache must
//! see pages in that order on both relays) and hands whole chunks to the pool, whose
//! workers squeeze them (`compression.rs`); this stream's sender puts the chunks, and the
//! reader's heartbeats and end, back in order on the connection. Every queue is bounded: a
//! slow link slows the workers, which slow the readers, which slow QEMU.

use crate::compression::{SessionCompression, Squeezed};
use crate::net_writer::{lock, NetWriter};
use crate::RelayFailure;
use migration::frame::FrameKind;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use transport::abort::{Aborted, SessionAbort};
use transport::ring::Ring;

/// Chunks squeezed and waiting for this stream's sender, at most (the pool's queue bounds
/// what is in the workers).
const DONE_CAPACITY: usize = 8;
/// How long a sender whose write failed leaves the stream's reader to abort the session
/// with the peer's own reason, before it aborts the session itself.
const READER_GRACE: Duration = Duration::from_millis(250);

/// What the sender puts on the connection, in sequence order.
enum Out {
    Data(Squeezed),
    Control { kind: FrameKind, payload: Vec<u8> },
}

/// What the sender counted.
#[derive(Debug, Default, Clone)]
pub(super) struct Sent {
    pub wire_bytes: u64,
    pub chunks: u64,
    /// Pages the workers compressed (the reader counted them raw).
    pub packed_pages: u64,
    /// Page-aware chunks by the codec they were squeezed with.
    pub codecs: BTreeMap<String, u64>,
}

pub(super) struct Squeezers {
    compression: Arc<SessionCompression>,
    done: Arc<Ring<(u64, Out)>>,
    next: u64,
    link: usize,
    sender: JoinHandle<Result<Sent, RelayFailure>>,
    abort: Arc<SessionAbort>,
}

impl Squeezers {
    /// This stream's way through `compression`'s pool, and its sender writing to
    /// `writer`; `probe` is what the connection's stack says of its send side.
    pub fn start(
        compression: Arc<SessionCompression>,
        probe: Option<Arc<dyn transport::pipe::SendProbe>>,
        writer: Arc<Mutex<NetWriter>>,
        abort: Arc<SessionAbort>,
        channel: u16,
    ) -> Result<Squeezers, RelayFailure> {
        let done: Arc<Ring<(u64, Out)>> = Arc::new(Ring::new(DONE_CAPACITY));
        let link = compression.add_link(probe);
        let sender = {
            let (done, abort, compression) = (done.clone(), abort.clone(), compression.clone());
            std::thread::Builder::new()
                .name(format!("relay-send-{channel}"))
                .spawn(move || send(&done, &writer, &compression, &abort, channel))
                .map_err(RelayFailure::local)?
        };
        Ok(Squeezers { compression, done, next: 0, link, sender, abort })
    }

    /// A page-aware chunk to squeeze and send.
    pub fn data(&mut self, chunk: &[u8]) -> Result<(), Aborted> {
        let (seq, link, chunk) = (self.next, self.link, chunk.to_vec());
        let (done, abort, compression) = (self.done.clone(), self.abort.clone(), self.compression.clone());
        self.compression.pool().submit(Box::new(move |worker| {
            let squeezed = compression.squeeze(worker, &chunk, link, !done.is_empty());
            // An abort ends the session; the pool's other tasks see it too.
            let _ = done.push((seq, Out::Data(squeezed)), &abort);
        }))?;
        self.next += 1;
        Ok(())
    }

    /// A frame to send as it is, after everything before it.
    pub fn control(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), Aborted> {
        self.done.push((self.next, Out::Control { kind, payload: payload.to_vec() }), &self.abort)?;
        self.next += 1;
        Ok(())
    }

    /// Waits for everything to be sent (the last control frame must have been the
    /// stream's end).
    pub fn finish(self) -> Result<Sent, RelayFailure> {
        self.sender.join().unwrap_or_else(|_| Err(RelayFailure::Local("the relay's sender panicked".into())))
    }
}

/// Writes the chunks and control frames in sequence order until the stream's end.
fn send(
    done: &Ring<(u64, Out)>,
    writer: &Mutex<NetWriter>,
    compression: &SessionCompression,
    abort: &SessionAbort,
    channel: u16,
) -> Result<Sent, RelayFailure> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    let mut sent = Sent::default();
    loop {
        let (seq, out) = done.pop(abort).map_err(|_| RelayFailure::aborted(abort))?;
        pending.insert(seq, out);
        while let Some(out) = pending.remove(&next) {
            next += 1;
            let (kind, payload) = match &out {
                Out::Data(Squeezed { payload, packed, codec }) => {
                    sent.wire_bytes += payload.len() as u64;
                    sent.chunks += 1;
                    sent.packed_pages += *packed as u64;
                    *sent.codecs.entry(codec.to_string()).or_default() += 1;
                    compression.wrote(payload.len());
                    (FrameKind::StreamData, payload)
                }
                Out::Control { kind, payload } => (*kind, payload),
            };
            // A dead connection. Its reader usually fails too and aborts the session with
            // the peer's reason, which says more. But a reader that has already seen the
            // peer end its direction never will, and with this sender gone the workers and
            // the stream's reader would wait on full queues for ever: after a moment for
            // the reader, the sender aborts the session itself.
            if let Err(err) = lock(writer).send(kind, payload) {
                let failure = RelayFailure::link(err);
                let waited = Instant::now();
                while !abort.is_raised() && waited.elapsed() < READER_GRACE {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if !abort.is_raised() {
                    abort.raise(format!("channel {channel}: {failure}"));
                }
                return Err(failure);
            }
            if kind == FrameKind::StreamEnd {
                return Ok(sent);
            }
        }
    }
}
