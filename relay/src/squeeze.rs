//! One carried stream's way out through the session's compression pool. The stream's
//! reader decides each page in stream order (zero, unchanged, delta: the XBZRLE cache must
//! see pages in that order on both relays) and hands whole chunks to the pool, whose
//! workers squeeze them (`compression.rs`); this stream's sender puts the chunks, and the
//! reader's heartbeats and end, back in order on the connection. Every queue is bounded: a
//! slow link slows its stream's reader, which slows QEMU.
//!
//! A worker must never wait on one stream: the pool serves them all, and QEMU's multifd
//! channels wait for each other (a channel's data stuck behind a worker that waits for
//! another channel's slow sender held the whole migration until the link timed out). So
//! each stream has credits for what it has in flight: its reader takes one per chunk or
//! control frame before handing it on, its sender gives it back once that went out, and
//! the stream's queue to its sender holds as many as there are credits.

use crate::compression::{SessionCompression, Squeezed};
use crate::net_writer::{lock, NetWriter};
use crate::waits::{during, waiting, SessionWaits, Wait};
use crate::RelayFailure;
use migration::frame::FrameKind;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use transport::abort::{Aborted, SessionAbort};
use transport::ring::Ring;

/// Chunks and control frames one stream may have in flight (handed on by its reader and
/// not yet written by its sender).
const CREDITS: usize = 8;
/// How long a sender whose write failed leaves the stream's reader to abort the session
/// with the peer's own reason, before it aborts the session itself.
const READER_GRACE: Duration = Duration::from_millis(250);

/// What the sender puts on the connection, in sequence order.
enum Out {
    /// A page-aware chunk, squeezed into its frame.
    Squeezed(Squeezed),
    /// A chunk of a stream that is not QEMU's, encoded by the reader.
    Data(Vec<u8>),
    Control {
        kind: FrameKind,
        payload: Vec<u8>,
    },
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
    /// One entry per item in flight: the reader pushes before handing an item on, the
    /// sender pops once it went out.
    credits: Arc<Ring<()>>,
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
        waits: Arc<SessionWaits>,
    ) -> Result<Squeezers, RelayFailure> {
        // Never fuller than the credits: a worker's push never waits.
        let done: Arc<Ring<(u64, Out)>> = Arc::new(Ring::new(CREDITS));
        let credits = Arc::new(Ring::new(CREDITS));
        let link = compression.add_link(probe);
        let sender = {
            let (done, credits, abort, compression) =
                (done.clone(), credits.clone(), abort.clone(), compression.clone());
            std::thread::Builder::new()
                .name(format!("relay-send-{channel}"))
                .spawn(move || {
                    let _registered = waits.register(format!("channel {channel}'s sender"));
                    send(&done, &credits, &writer, &compression, &abort, channel)
                })
                .map_err(RelayFailure::local)?
        };
        Ok(Squeezers { compression, credits, done, next: 0, link, sender, abort })
    }

    /// A buffer for the reader's next page-aware chunk (one a worker has finished with).
    pub fn spare_chunk(&self) -> Vec<u8> {
        self.compression.spare_chunk()
    }

    /// A page-aware chunk to squeeze and send.
    pub fn squeeze(&mut self, chunk: Vec<u8>) -> Result<(), Aborted> {
        let _waiting = waiting(Wait::PoolCredit);
        self.credits.push((), &self.abort)?;
        let seq = self.next;
        self.next += 1;
        let choice = self.compression.choose(self.link, !self.done.is_empty());
        // A chunk that goes as it is needs no worker: straight to the sender.
        let chunk = match self.compression.as_it_is(chunk, choice) {
            Ok(squeezed) => return self.done.push((seq, Out::Squeezed(squeezed)), &self.abort),
            Err(chunk) => chunk,
        };
        let (done, abort, compression) = (self.done.clone(), self.abort.clone(), self.compression.clone());
        self.compression.pool().submit(Box::new(move |worker| {
            let squeezed = compression.squeeze(worker, chunk, choice);
            // An abort ends the session; the pool's other tasks see it too.
            let _ = done.push((seq, Out::Squeezed(squeezed)), &abort);
        }))?;
        Ok(())
    }

    /// A chunk to send as it is (encoded already), after everything before it.
    pub fn data(&mut self, payload: &[u8]) -> Result<(), Aborted> {
        let _waiting = waiting(Wait::PoolCredit);
        self.credits.push((), &self.abort)?;
        self.done.push((self.next, Out::Data(payload.to_vec())), &self.abort)?;
        self.next += 1;
        Ok(())
    }

    /// A frame to send as it is, after everything before it.
    pub fn control(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), Aborted> {
        let _waiting = waiting(Wait::PoolCredit);
        self.credits.push((), &self.abort)?;
        self.done.push((self.next, Out::Control { kind, payload: payload.to_vec() }), &self.abort)?;
        self.next += 1;
        Ok(())
    }

    /// Waits for everything to be sent (the last control frame must have been the
    /// stream's end).
    pub fn finish(self) -> Result<Sent, RelayFailure> {
        let _waiting = waiting(Wait::SenderDone);
        self.sender.join().unwrap_or_else(|_| Err(RelayFailure::Local("the relay's sender panicked".into())))
    }
}

/// Writes the chunks and control frames in sequence order until the stream's end.
fn send(
    done: &Ring<(u64, Out)>,
    credits: &Ring<()>,
    writer: &Mutex<NetWriter>,
    compression: &SessionCompression,
    abort: &SessionAbort,
    channel: u16,
) -> Result<Sent, RelayFailure> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    let mut sent = Sent::default();
    loop {
        let (seq, out) = during(Wait::NextChunk, || done.pop(abort)).map_err(|_| RelayFailure::aborted(abort))?;
        pending.insert(seq, out);
        while let Some(out) = pending.remove(&next) {
            next += 1;
            let written = match out {
                Out::Squeezed(Squeezed { mut frame, packed, codec }) => {
                    sent.wire_bytes += frame.payload_len() as u64;
                    sent.chunks += 1;
                    sent.packed_pages += packed as u64;
                    *sent.codecs.entry(codec.to_string()).or_default() += 1;
                    compression.wrote(frame.payload_len());
                    let written = lock(writer).send_frame(FrameKind::StreamData, &mut frame);
                    compression.give_frame(frame);
                    written
                }
                Out::Data(payload) => {
                    sent.wire_bytes += payload.len() as u64;
                    sent.chunks += 1;
                    compression.wrote(payload.len());
                    lock(writer).send(FrameKind::StreamData, &payload)
                }
                Out::Control { kind, payload } => {
                    let written = lock(writer).send(kind, &payload);
                    if written.is_ok() && kind == FrameKind::StreamEnd {
                        return Ok(sent);
                    }
                    written
                }
            };
            // A dead connection. Its reader usually fails too and aborts the session with
            // the peer's reason, which says more. But a reader that has already seen the
            // peer end its direction never will, and with this sender gone the workers and
            // the stream's reader would wait on full queues for ever: after a moment for
            // the reader, the sender aborts the session itself.
            // The item is out (or the session is over): its credit goes back.
            let _ = credits.pop(abort);
            if let Err(err) = written {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::CompressionConfig;
    use migration::codec::Codec;
    use migration::qemu_stream::PageKey;
    use migration::relay_pages::RecordEncoder;
    use std::io::{self, Write};
    use std::sync::mpsc;

    /// A connection that takes nothing until the test ends (a peer that stopped reading).
    struct Stalled(Mutex<mpsc::Receiver<()>>);

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            let _ = self.0.lock().unwrap().recv();
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "released"))
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A connection that takes everything.
    struct Sink;

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A page-aware chunk of four pages, for the workers to squeeze.
    fn chunk() -> Vec<u8> {
        let mut encoder = RecordEncoder::deferring_compression(None, 0);
        for i in 0..4u64 {
            encoder.page(PageKey { block: 0, offset: i << 12 }, &[i as u8 + 1; 4096]);
        }
        encoder.finish_into(Vec::new())
    }

    #[test]
    fn a_stream_whose_link_stalls_holds_up_no_other_stream() {
        let abort = Arc::new(SessionAbort::new());
        let config = CompressionConfig { codec: Codec::Lz4, workers: 1, first_cpu: None };
        let compression = SessionCompression::start(config, abort.clone()).unwrap().unwrap();
        // Stream 0's peer stopped reading: its reader hands on chunks until it runs out of
        // credits, and waits there.
        let (release, stalled) = mpsc::channel::<()>();
        let writer = Arc::new(Mutex::new(NetWriter::new(Box::new(Stalled(Mutex::new(stalled))), Default::default())));
        let mut stuck =
            Squeezers::start(compression.clone(), None, writer, abort.clone(), 0, Default::default()).unwrap();
        let stuck_reader = std::thread::spawn(move || {
            while stuck.squeeze(chunk()).is_ok() {}
            stuck
        });
        std::thread::sleep(Duration::from_millis(100));
        // Stream 1 goes through the same one worker, whole.
        let (done_tx, done_rx) = mpsc::channel();
        let (compression_1, abort_1) = (compression.clone(), abort.clone());
        std::thread::spawn(move || {
            let writer = Arc::new(Mutex::new(NetWriter::new(Box::new(Sink), Default::default())));
            let mut flowing = Squeezers::start(compression_1, None, writer, abort_1, 1, Default::default()).unwrap();
            for _ in 0..50 {
                flowing.squeeze(chunk()).unwrap();
            }
            flowing.control(FrameKind::StreamEnd, &[0; 12]).unwrap();
            let _ = done_tx.send(flowing.finish());
        });
        let sent = done_rx.recv_timeout(Duration::from_secs(20)).expect("stream 1 waited on stream 0's link");
        assert_eq!(sent.expect("stream 1").chunks, 50);
        abort.raise("test over");
        drop(release);
        let _ = stuck_reader.join().unwrap().finish();
    }
}
