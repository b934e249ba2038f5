//! The compression workers of one carried stream. The stream's reader decides each page in
//! stream order (zero, unchanged, delta: the XBZRLE cache must see pages in that order on
//! both relays) and hands whole chunks to a pool of workers that compress the rest
//! (`relay_pages::squeeze`); a sender puts the chunks, and the reader's heartbeats and end,
//! back in order on the connection. Every queue is bounded: a slow link slows the workers,
//! which slow the reader, which slows QEMU.

use crate::net_writer::{lock, NetWriter};
use crate::RelayFailure;
use migration::codec::{Codec, PageCompressor};
use migration::frame::FrameKind;
use migration::relay_pages::squeeze;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use transport::abort::{Aborted, SessionAbort};
use transport::ring::Ring;

/// Chunks waiting for a worker, per worker.
const QUEUED_PER_WORKER: usize = 2;
/// How long a sender whose write failed leaves the stream's reader to abort the session
/// with the peer's own reason, before it aborts the session itself.
const READER_GRACE: Duration = Duration::from_millis(250);

/// What the sender puts on the connection, in sequence order.
enum Out {
    Data { payload: Vec<u8>, packed: usize },
    Control { kind: FrameKind, payload: Vec<u8> },
}

/// A chunk for a worker; `None` tells a worker to stop.
type Job = Option<(u64, Vec<u8>)>;

/// What the sender counted.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Sent {
    pub wire_bytes: u64,
    pub chunks: u64,
    /// Pages the workers compressed (the reader counted them raw).
    pub packed_pages: u64,
}

pub(super) struct Squeezers {
    jobs: Arc<Ring<Job>>,
    done: Arc<Ring<(u64, Out)>>,
    next: u64,
    workers: Vec<JoinHandle<()>>,
    sender: JoinHandle<Result<Sent, RelayFailure>>,
    abort: Arc<SessionAbort>,
}

impl Squeezers {
    /// `count` workers compressing with `codec` (pinned to cores `first_core`, the next...,
    /// as the engine's workers are, when given), and the sender writing to `writer`.
    pub fn start(
        codec: Codec,
        count: usize,
        first_core: Option<usize>,
        writer: Arc<Mutex<NetWriter>>,
        abort: Arc<SessionAbort>,
        channel: u16,
    ) -> Result<Squeezers, RelayFailure> {
        let count = count.max(1);
        let jobs: Arc<Ring<Job>> = Arc::new(Ring::new(QUEUED_PER_WORKER * count));
        let done: Arc<Ring<(u64, Out)>> = Arc::new(Ring::new(QUEUED_PER_WORKER * count));
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let (jobs, done, abort) = (jobs.clone(), done.clone(), abort.clone());
            let worker = std::thread::Builder::new()
                .name(format!("relay-zip-{channel}.{index}"))
                .spawn(move || {
                    if let Some(first) = first_core {
                        transport::pin::pin_current(first + index);
                    }
                    work(codec, &jobs, &done, &abort)
                })
                .map_err(RelayFailure::local)?;
            workers.push(worker);
        }
        let sender = {
            let (done, abort) = (done.clone(), abort.clone());
            std::thread::Builder::new()
                .name(format!("relay-send-{channel}"))
                .spawn(move || send(&done, &writer, &abort, channel))
                .map_err(RelayFailure::local)?
        };
        Ok(Squeezers { jobs, done, next: 0, workers, sender, abort })
    }

    /// A page-aware chunk to compress and send.
    pub fn data(&mut self, chunk: &[u8]) -> Result<(), Aborted> {
        self.jobs.push(Some((self.next, chunk.to_vec())), &self.abort)?;
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
    /// stream's end) and stops the workers.
    pub fn finish(self) -> Result<Sent, RelayFailure> {
        for _ in &self.workers {
            let _ = self.jobs.push(None, &self.abort);
        }
        for worker in self.workers {
            let _ = worker.join();
        }
        self.sender.join().unwrap_or_else(|_| Err(RelayFailure::Local("the relay's sender panicked".into())))
    }
}

fn work(codec: Codec, jobs: &Ring<Job>, done: &Ring<(u64, Out)>, abort: &SessionAbort) {
    let mut compressor = PageCompressor::new(codec);
    while let Ok(Some((seq, chunk))) = jobs.pop(abort) {
        let mut payload = Vec::with_capacity(chunk.len());
        let out = match squeeze(&chunk, &mut compressor, &mut payload) {
            Ok(packed) => Out::Data { payload, packed },
            // Not expected (the reader built the chunk); send it as built.
            Err(_) => Out::Data { payload: chunk, packed: 0 },
        };
        if done.push((seq, out), abort).is_err() {
            return;
        }
    }
}

/// Writes the chunks and control frames in sequence order until the stream's end.
fn send(
    done: &Ring<(u64, Out)>,
    writer: &Mutex<NetWriter>,
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
                Out::Data { payload, packed, .. } => {
                    sent.wire_bytes += payload.len() as u64;
                    sent.chunks += 1;
                    sent.packed_pages += *packed as u64;
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
