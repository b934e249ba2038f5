//! The connections' send sides and connection 0's reader of the destination's answers.
//!
//! A `LinkWriter` sends one connection's frames in ring order (the abort notice first on
//! connection 0). Over our stack the connection's polling core pulls it itself (it is the
//! connection's `Outbound`): no thread per connection, no copy into the core's rings.
//! Over kernel TCP and TLS, `connection_writer` drives it on a thread of its own.

use crate::tuning::Tuning;
use migration::control::Tune;
use migration::frame::{FrameBuf, FrameKind, SeqCounter};
use migration::source_session::SourceFailure;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use transport::abort::AbortKind;
use transport::abort::SessionAbort;
use transport::framed::{read_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};
use transport::pipe::{Next, Outbound};
use transport::ring::{Pool, Ring};

use super::{Outgoing, Shared, WRITER_NOTICE_POLL};
use crate::rate::RateLimiter;

/// What the connections' write sides share with the scanner and the workers. Owned
/// (`Arc`), not borrowed from the session, so that a polling core of the dataplane can
/// hold a connection's [`LinkWriter`] on its own thread.
pub(super) struct Links {
    pub abort: Arc<SessionAbort>,
    /// Frames for each connection, in the order they go on the wire.
    pub outgoing: Vec<Ring<Outgoing>>,
    pub frame_pool: Pool<FrameBuf>,
    /// Bytes handed to the connections (counted before they leave: see `LinkWriter`).
    pub wire_bytes: AtomicU64,
    /// Page-frame bytes handed to the connections (encoded bytes less these are still
    /// queued).
    pub page_bytes_written: AtomicU64,
    pub limiter: Option<RateLimiter>,
    /// An Abort notice for connection 0 to send before anything else queued.
    notice: Mutex<Option<Vec<u8>>>,
    /// Whether `notice` holds one, so that a polling core need not lock to look.
    notice_posted: AtomicBool,
    /// Set once connection 0 has handed the Abort notice to its stack.
    pub abort_sent: AtomicBool,
    /// Writers that took their connection's `Close`: everything before it is in the stack.
    closed_writers: AtomicUsize,
}

impl Links {
    pub fn new(
        abort: Arc<SessionAbort>,
        connections: usize,
        frames_per_connection: usize,
        spare_frames: usize,
    ) -> Self {
        Links {
            abort,
            outgoing: (0..connections).map(|_| Ring::new(frames_per_connection)).collect(),
            frame_pool: Pool::new(connections * frames_per_connection + spare_frames),
            wire_bytes: AtomicU64::new(0),
            page_bytes_written: AtomicU64::new(0),
            limiter: None,
            notice: Mutex::new(None),
            notice_posted: AtomicBool::new(false),
            abort_sent: AtomicBool::new(false),
            closed_writers: AtomicUsize::new(0),
        }
    }

    /// Posts an Abort notice for connection 0 (the first one posted stays).
    pub fn post_notice(&self, payload: impl FnOnce() -> Vec<u8>) {
        self.notice.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(payload);
        self.notice_posted.store(true, Ordering::Release);
    }

    fn take_notice(&self) -> Option<Vec<u8>> {
        if !self.notice_posted.load(Ordering::Acquire) {
            return None;
        }
        self.notice.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// How many writers have taken their `Close`.
    pub fn closed_writers(&self) -> usize {
        self.closed_writers.load(Ordering::Acquire)
    }
}

/// What a writer is sending.
enum Sending {
    Page(FrameBuf),
    Other { bytes: Vec<u8>, notice: bool },
}

impl Sending {
    fn bytes(&self) -> &[u8] {
        match self {
            Sending::Page(frame) => frame.as_bytes(),
            Sending::Other { bytes, .. } => bytes,
        }
    }
}

/// One connection's write side: takes its frames in ring order, seals them with the
/// connection's sequence numbers (and a round's `RoundEnd` with its count of page
/// frames), holds them to the bandwidth cap, and offers them to the stack. Connection 0
/// sends a posted Abort notice ahead of everything queued, then stops. A polling core
/// drives it as an [`Outbound`]; on a kernel socket, [`connection_writer`] does.
pub(super) struct LinkWriter {
    links: Arc<Links>,
    index: usize,
    seq: SeqCounter,
    /// Page frames since the last `RoundEnd`.
    pages_frames: u64,
    sending: Option<Sending>,
    offset: usize,
    /// When the bandwidth cap lets the frame in `sending` go.
    not_before: Option<Instant>,
    done: bool,
}

impl LinkWriter {
    pub fn new(links: Arc<Links>, index: usize) -> Self {
        // The Hello was sequence 0.
        let mut seq = SeqCounter::default();
        seq.take();
        LinkWriter { links, index, seq, pages_frames: 0, sending: None, offset: 0, not_before: None, done: false }
    }

    /// Takes the next frame to send, if there is one now: a posted notice first.
    fn stage(&mut self) {
        if self.index == 0 {
            if let Some(payload) = self.links.take_notice() {
                let bytes = migration::frame::encode_frame(FrameKind::Abort, 0, self.seq.take(), &payload);
                self.start(Sending::Other { bytes, notice: true });
                return;
            }
        }
        if self.links.abort.is_raised() {
            self.done = true;
            return;
        }
        if let Some(item) = self.links.outgoing[self.index].try_pop() {
            self.stage_item(item);
        }
    }

    fn stage_item(&mut self, item: Outgoing) {
        let sending = match item {
            Outgoing::Pages { mut frame, epoch } => {
                frame.seal(FrameKind::Pages, epoch, self.seq.take());
                self.pages_frames += 1;
                Sending::Page(frame)
            }
            Outgoing::RoundEnd { epoch } => {
                let payload = std::mem::take(&mut self.pages_frames).to_le_bytes();
                let bytes = migration::frame::encode_frame(FrameKind::RoundEnd, epoch, self.seq.take(), &payload);
                Sending::Other { bytes, notice: false }
            }
            Outgoing::Control { kind, epoch, payload } => {
                let bytes = migration::frame::encode_frame(kind, epoch, self.seq.take(), &payload);
                Sending::Other { bytes, notice: false }
            }
            Outgoing::Close => {
                self.done = true;
                self.links.closed_writers.fetch_add(1, Ordering::AcqRel);
                return;
            }
        };
        self.start(sending);
    }

    /// Makes `sending` the frame on offer: held to the bandwidth cap, and counted.
    fn start(&mut self, sending: Sending) {
        let len = sending.bytes().len();
        if let Some(limiter) = &self.links.limiter {
            let wait = limiter.reserve(len);
            self.not_before = (!wait.is_zero()).then(|| Instant::now() + wait);
        }
        // Counted before the bytes leave: the destination may answer a frame (VerifyResult
        // to VerifyDigest) before this writer runs again, and the totals read then must
        // include it. A failed send fails the session, so the count never lies.
        self.links.wire_bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.sending = Some(sending);
        self.offset = 0;
    }

    /// Waits (on a writer thread) until `next` may have something: the bandwidth cap's
    /// hold, or a frame in the ring (or the poll interval, to look for a notice).
    fn wait(&mut self) {
        if let Some(until) = self.not_before {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            return;
        }
        if self.sending.is_none() && !self.done {
            // An abort shows in the next `next`; a notice may be posted meanwhile.
            if let Ok(Some(item)) = self.links.outgoing[self.index].pop_timeout(&self.links.abort, WRITER_NOTICE_POLL) {
                self.stage_item(item);
            }
        }
    }
}

impl Outbound for LinkWriter {
    fn next(&mut self) -> Next<'_> {
        if self.sending.is_none() && !self.done {
            self.stage();
        }
        if let Some(until) = self.not_before {
            if Instant::now() < until {
                return Next::Idle;
            }
            self.not_before = None;
        }
        match &self.sending {
            Some(sending) => Next::Bytes(&sending.bytes()[self.offset..]),
            None if self.done => Next::Done,
            None => Next::Idle,
        }
    }

    fn advance(&mut self, n: usize) {
        self.offset += n;
        let Some(sending) = &self.sending else { return };
        if self.offset < sending.bytes().len() {
            return;
        }
        match self.sending.take() {
            Some(Sending::Page(frame)) => {
                self.links.page_bytes_written.fetch_add(frame.as_bytes().len() as u64, Ordering::Relaxed);
                self.links.frame_pool.give(frame);
            }
            Some(Sending::Other { notice: true, .. }) => {
                self.links.abort_sent.store(true, Ordering::Release);
                self.done = true;
            }
            _ => {}
        }
    }

    fn lost(&mut self, why: &str) {
        self.done = true;
        self.links.abort.raise_as(AbortKind::Link, format!("connection {}: {why}", self.index));
    }
}

/// Drives a connection's [`LinkWriter`] on a thread of its own, for a stack that cannot
/// pull (a kernel socket, or TLS, which seals records on the writer's thread).
pub(super) fn connection_writer(mut link: LinkWriter, mut writer: Box<dyn Write + Send>) {
    loop {
        let written = match link.next() {
            Next::Bytes(bytes) => writer.write(bytes),
            Next::Idle => {
                link.wait();
                continue;
            }
            Next::Done => return,
        };
        match written {
            Ok(0) => return link.lost("write failed: the stack took nothing"),
            Ok(n) => link.advance(n),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return link.lost(&format!("write failed: {err}")),
        }
    }
}

/// Reads the destination's answers on connection 0 and feeds them to the session machine,
/// then wakes the scanner to do what it now asks.
pub(super) fn control_reader_loop(
    shared: &Shared<'_>,
    mut reader: Box<dyn std::io::Read + Send>,
    wake: mpsc::Sender<()>,
) {
    let mut payload = Vec::new();
    loop {
        let header = match read_frame(&mut *reader, &mut payload, |_| CONTROL_FRAME_LIMIT_BYTES) {
            Ok(header) => header,
            Err(err) => {
                // After a successful session the socket is shut under us: not an error.
                if !shared.finished.load(Ordering::Acquire) {
                    let reason = match &err {
                        ReadError::Closed => "the destination closed connection 0".to_string(),
                        err => format!("destination connection 0: {err}"),
                    };
                    shared.abort.raise_as(err.abort_kind(), reason);
                }
                return;
            }
        };
        let now = shared.clock.elapsed();
        let (fed, tune) = {
            let mut session = shared.session.lock().unwrap_or_else(|p| p.into_inner());
            let fed = session.handle_answer(&header, &payload, now);
            (fed, session.take_tune())
        };
        if let Some(tune) = tune {
            apply_tune(shared.config.tuning.as_ref(), tune);
        }
        if let Err(failure) = fed {
            // The session machine has failed; the scanner finds the abort and ends.
            let kind = match failure {
                SourceFailure::DestinationAborted { .. } => AbortKind::Peer,
                SourceFailure::Cancelled { .. } => AbortKind::Cancelled,
                SourceFailure::RoundNotApplied { .. } => AbortKind::TimedOut,
                _ => AbortKind::Damaged,
            };
            shared.abort.raise_as(kind, failure.to_string());
            return;
        }
        if wake.send(()).is_err() {
            return;
        }
    }
}

/// The destination's operator changed the migration (`Tune`): applied as this side's own
/// control socket would, or refused with a warning where this source takes no changes.
fn apply_tune(tuning: Option<&Tuning>, tune: Tune) {
    let Some(tuning) = tuning else {
        log::warn!("the destination asked to change the migration ({tune:?}), but this source takes no changes");
        return;
    };
    if let Some(ms) = tune.downtime_limit_ms {
        log::info!("downtime limit set to {ms} ms by the destination");
        tuning.set_downtime_limit(Duration::from_millis(ms));
    }
    if let Some(rate) = tune.max_bandwidth {
        log::info!("bandwidth cap set to {rate} bytes/s by the destination (0: none)");
        tuning.set_max_bandwidth((rate > 0).then_some(rate));
    }
    if tune.switchover {
        log::info!("switchover asked for by the destination");
        tuning.switch_over_now();
    }
}
