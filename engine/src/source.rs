//! The source engine: iterative pre-copy over N connections.
//!
//! ```text
//! scanner (calling thread) --jobs--> compression workers (pinned) --frames--> ring per
//! connection --> connection writer --> byte pipe
//!                                      connection 0 reader <-- Ready, Resumed, Abort
//! ```
//! The scanner takes the dirty log, cuts the round's pages into jobs of up to 64 pages of
//! one region and hands them out; workers read the pages (after the scanner cleared their
//! dirty bits, so a store the copy misses is marked again), detect zero pages, try XBZRLE,
//! compress, and push the finished batch to one connection's ring. At the end of a round
//! the scanner waits for every job to be encoded, then puts a `RoundEnd` on every
//! connection: frames of a round never overtake frames of the next one on a connection,
//! and the destination holds all connections at each `RoundEnd` until the round is applied.
//!
//! The downtime window holds only the final dirty sync, the last pages, the device state
//! and the completion handshake (`Complete`, `Ready`, `Commit`, `Resumed`); worker
//! teardown and freeing the XBZRLE cache wait until the destination has resumed (unless
//! `deferred_cleanup` is off, which exists to measure what it saves).

use crate::adaptive::{self, AdaptivePolicy, Choice, Pipeline};
use crate::cancel::Cancel;
use crate::config::SourceConfig;
use crate::error::{LimitExceeded, ProtocolViolation};
use crate::rate::RateLimiter;
use crate::verify::memory_digest;
use crate::vm::SourceVm;
use crate::MigrationError;
use migration::codec::{Codec, Compressed, PageCompressor};
use migration::dirty::{bitmap_words, for_each_set_bit};
use migration::frame::{FrameBuf, FrameKind, SeqCounter, HEADER_BYTES, MAX_PAYLOAD_BYTES};
use migration::handshake::{encode_preamble, HandshakeError, Hello, HelloAck};
use migration::memory::{pages_of, GuestMemory};
use migration::page_batch::{BatchOut, BatchWriter, MAX_BATCH_BYTES, MAX_ENTRIES_PER_BATCH};
use migration::precopy::{Precopy, RoundReport};
use migration::receiver::FIRST_EPOCH;
use migration::source_session::{SourceAction, SourceOutcome, SourceSession, Stage};
use migration::stats::{mbps, EncodeCounters, MigrationStats, RoundStats};
use migration::xbzrle_cache::{XbzrleCache, XbzrleOutcome};
use migration::{zero, PAGE_SIZE_BYTES};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use transport::abort::SessionAbort;
use transport::framed::{read_frame, write_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};
use transport::pin;
use transport::pipe::{Connection, Connector, SendProbe};
use transport::ring::{Pool, Ring};

/// Jobs waiting for a compression worker. Enough to keep every worker busy while the
/// scanner fills the next; each holds only page numbers.
const JOB_RING_CAPACITY: usize = 256;
/// Encoded batches waiting per connection writer: 8 x up to 263 KiB bounds the memory
/// between workers and a slow link to ~2 MiB per connection (16 ms at 1 Gbit/s), so
/// back-pressure reaches the scanner quickly and round timings track the link.
const FRAME_RING_CAPACITY: usize = 8;
/// How long a failing source waits for its Abort notice to reach the wire.
const ABORT_NOTICE_WAIT: Duration = Duration::from_millis(200);
/// A cancel is not urgent: the destination's being told why is worth a longer wait.
const CANCEL_NOTICE_WAIT: Duration = Duration::from_secs(2);
/// How often an idle writer of connection 0 looks for a notice to send.
const WRITER_NOTICE_POLL: Duration = Duration::from_millis(5);
/// After a cancel's notice went out, how long the destination has to act on it before the
/// connections are shut.
const CANCEL_GRACE: Duration = Duration::from_millis(300);
/// How often the cancel watcher looks at the caller's token.
const CANCEL_POLL: Duration = Duration::from_millis(5);
/// How often progress is reported inside a long round.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// A live view of a running migration, for progress displays.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub round: u32,
    pub stage: &'static str,
    /// Pages left to send in this round.
    pub remaining_pages: u64,
    pub transferred_bytes: u64,
    pub mbps: f64,
    pub elapsed: Duration,
}

struct Job {
    epoch: u32,
    region: u16,
    pages: Vec<u32>,
    connection: usize,
}

enum Outgoing {
    Pages { frame: FrameBuf, epoch: u32 },
    RoundEnd { epoch: u32 },
    Control { kind: FrameKind, epoch: u32, payload: Vec<u8> },
    Close,
}

/// State shared by the scanner, workers and writers of one session.
struct Shared<'a> {
    abort: SessionAbort,
    config: &'a SourceConfig,
    memory: &'a dyn GuestMemory,
    jobs: Ring<Option<Job>>,
    job_pool: Pool<Vec<u32>>,
    outgoing: Vec<Ring<Outgoing>>,
    frame_pool: Pool<FrameBuf>,
    jobs_in_flight: AtomicU64,
    round_counters: Mutex<EncodeCounters>,
    wire_bytes: AtomicU64,
    /// Page-frame bytes written by the connection writers (encoded bytes less these are
    /// still queued).
    page_bytes_written: AtomicU64,
    cache: Option<XbzrleCache>,
    limiter: Option<RateLimiter>,
    /// Set once the session completed: the connections are then shut under the reader.
    finished: AtomicBool,
    /// The session's state machine: fed by the scanner (rounds), the control reader (the
    /// destination's answers) and the cancel watcher; the scanner does what it asks.
    session: Mutex<SourceSession>,
    /// The session's clock: `now` for the state machines is time since this instant.
    clock: Instant,
    /// An Abort notice for connection 0's writer to send before anything else queued.
    notice: Mutex<Option<Vec<u8>>>,
    /// Set by connection 0's writer once an Abort notice is on the wire.
    abort_sent: AtomicBool,
    /// Whether the bulk round fills the XBZRLE cache (only when the cache holds it all).
    cache_bulk: AtomicBool,
    /// With `Codec::Adaptive`: what chooses each batch's codec.
    adaptive: Option<AdaptivePolicy>,
    /// What each connection's stack says of its send side (all of them, or none).
    probes: Option<Vec<Arc<dyn SendProbe>>>,
}

impl Shared<'_> {
    /// Whether the link holds writes back when a worker on `connection` asks: every
    /// connection's stack has its send buffer full, or the bandwidth cap makes writes
    /// wait. Where a stack cannot tell: whether frames wait for the connection's writer.
    fn link_full(&self, connection: usize) -> bool {
        match &self.probes {
            Some(probes) => {
                self.limiter.as_ref().is_some_and(|limiter| limiter.holding_back()) || probes.iter().all(|p| p.full())
            }
            None => !self.outgoing[connection].is_empty(),
        }
    }

    /// Bytes the destination has acknowledged; where a stack cannot tell, bytes written.
    fn delivered_bytes(&self) -> u64 {
        match &self.probes {
            Some(probes) => probes.iter().map(|p| p.acknowledged()).sum(),
            None => self.wire_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Migrates `vm` to the destination `connector` reaches. On success the source guest
/// stays paused: it runs on the destination now. On any failure before the destination
/// confirms it has resumed, the source guest is resumed here and the error returned.
pub fn migrate(
    vm: &dyn SourceVm,
    connector: &dyn Connector,
    config: &SourceConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationStats, MigrationError> {
    let started = Instant::now();
    let layout = vm.memory().region_bytes();
    let hello = Hello {
        session_id: rand::random(),
        connection_index: 0,
        connection_count: config.connections.max(1),
        page_size: PAGE_SIZE_BYTES as u32,
        codec: config.codec,
        xbzrle: config.xbzrle_cache_bytes.is_some(),
        region_bytes: layout.clone(),
    };
    let cancelled =
        || config.cancel.as_ref().filter(|c| c.is_cancelled()).map(|c| MigrationError::Cancelled(c.reason()));
    let mut connections = Vec::with_capacity(usize::from(hello.connection_count));
    for index in 0..hello.connection_count {
        if let Some(err) = cancelled() {
            return Err(err);
        }
        connections.push(open_connection(connector, &Hello { connection_index: index, ..hello.clone() })?);
    }
    let setup_time = started.elapsed();

    let mut paused = false;
    let mut result = run_session(vm, connections, config, &hello, started, setup_time, &mut paused, progress);
    if result.is_err() {
        // The source guest is never lost: whatever failed, it runs on here.
        vm.set_throttle(0);
        if paused {
            vm.resume();
        }
        // A cancel shows as the session's abort: say it was a cancel.
        if let Some(err) = cancelled() {
            result = Err(err);
        }
    }
    result
}

/// Opens one connection: preamble, Hello, and the destination's answer.
fn open_connection(connector: &dyn Connector, hello: &Hello) -> Result<Connection, MigrationError> {
    let index = usize::from(hello.connection_index);
    let io = |source| MigrationError::Io { connection: index, source };
    let mut connection = connector.connect().map_err(io)?;
    connection.writer.write_all(&encode_preamble()).map_err(io)?;
    write_frame(&mut *connection.writer, FrameKind::Hello, 0, &mut SeqCounter::default(), &hello.encode())
        .map_err(io)?;
    let mut payload = Vec::new();
    let header = read_frame(&mut *connection.reader, &mut payload, |_| CONTROL_FRAME_LIMIT_BYTES).map_err(|e| {
        // A destination that requires TLS hangs up on a plain hello.
        let tls_hint = match &e {
            ReadError::Closed => true,
            ReadError::Io(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
            _ => false,
        };
        ProtocolViolation::NoHelloAnswer { connection: index, reason: e.to_string(), tls_hint }
    })?;
    match (header.kind, header.seq) {
        (FrameKind::HelloAck, 0) => match HelloAck::decode(&payload)? {
            HelloAck::Accepted { .. } => Ok(connection),
            HelloAck::Refused { reason } => Err(HandshakeError::Refused { reason }.into()),
        },
        (FrameKind::Abort, _) => Err(MigrationError::PeerAborted(migration::handshake::decode_reason(&payload))),
        (got, seq) => {
            Err(ProtocolViolation::UnexpectedFrame { connection: index, expected: "HelloAck", got, seq: seq.into() }
                .into())
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_session(
    vm: &dyn SourceVm,
    connections: Vec<Connection>,
    config: &SourceConfig,
    hello: &Hello,
    started: Instant,
    setup_time: Duration,
    paused: &mut bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationStats, MigrationError> {
    let count = connections.len();
    let probes = connections.iter().map(|c| c.probe.clone()).collect();
    let shared = Shared {
        abort: SessionAbort::new(),
        config,
        memory: vm.memory(),
        jobs: Ring::new(JOB_RING_CAPACITY),
        job_pool: Pool::new(JOB_RING_CAPACITY + config.compress_threads),
        outgoing: (0..count).map(|_| Ring::new(FRAME_RING_CAPACITY)).collect(),
        frame_pool: Pool::new(count * FRAME_RING_CAPACITY + 2 * config.compress_threads),
        jobs_in_flight: AtomicU64::new(0),
        round_counters: Mutex::new(EncodeCounters::default()),
        wire_bytes: AtomicU64::new(0),
        page_bytes_written: AtomicU64::new(0),
        cache: config.xbzrle_cache_bytes.map(XbzrleCache::new),
        limiter: config.max_bandwidth_bytes_per_s.map(RateLimiter::new),
        finished: AtomicBool::new(false),
        session: Mutex::new(SourceSession::new(
            config.precopy.clone(),
            config.verify,
            config.answer_timeout,
            Duration::ZERO,
        )),
        clock: Instant::now(),
        notice: Mutex::new(None),
        abort_sent: AtomicBool::new(false),
        cache_bulk: AtomicBool::new(false),
        adaptive: (config.codec == Codec::Adaptive).then(|| AdaptivePolicy::new(config.compress_threads)),
        probes,
    };
    let (wake_tx, wake) = mpsc::channel::<()>();

    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for index in 0..config.compress_threads.max(1) {
            let shared = &shared;
            workers.push(
                std::thread::Builder::new()
                    .name(format!("compress-{index}"))
                    .spawn_scoped(scope, move || {
                        shared.abort.guard("compression", || compression_worker(shared, index))
                    })
                    .expect("spawn compression worker"),
            );
        }
        let mut writers = Vec::new();
        for (index, connection) in connections.into_iter().enumerate() {
            let Connection { reader, writer, closer, .. } = connection;
            shared.abort.on_raise(closer);
            let shared = &shared;
            if index == 0 {
                let wake_tx = wake_tx.clone();
                std::thread::Builder::new()
                    .name("control-reader".into())
                    .spawn_scoped(scope, move || {
                        shared.abort.guard("control reader", || control_reader_loop(shared, reader, wake_tx))
                    })
                    .expect("spawn control reader");
            }
            writers.push(
                std::thread::Builder::new()
                    .name(format!("conn-writer-{index}"))
                    .spawn_scoped(scope, move || {
                        shared.abort.guard("connection writer", || connection_writer(shared, index, writer))
                    })
                    .expect("spawn connection writer"),
            );
        }
        drop(wake_tx);
        if let Some(cancel) = &config.cancel {
            let shared = &shared;
            std::thread::Builder::new()
                .name("cancel-watch".into())
                .spawn_scoped(scope, move || watch_for_cancel(shared, cancel))
                .expect("spawn cancel watcher");
        }

        let mut scanner = Scanner::new(&shared, vm, hello, started, setup_time, progress);
        let result = scanner.run(paused, &wake, &mut workers);
        match &result {
            Ok(_) => {
                // Writers send what is queued and exit on Close; then the sockets are shut
                // so that the control reader, blocked in a read, returns too.
                for ring in &shared.outgoing {
                    let _ = ring.push(Outgoing::Close, &shared.abort);
                }
                for writer in writers {
                    let _ = writer.join();
                }
                shared.finished.store(true, Ordering::Release);
                shared.abort.close_all();
            }
            Err(err) => notify_and_abort(&shared, &err.to_string(), ABORT_NOTICE_WAIT, false),
        }
        stop_workers(&shared, &mut workers);
        result
    })
}

/// A failure of our own (not a broken connection), or a cancel: tells the destination why
/// before the connections are shut, then aborts. The notice goes to connection 0's writer
/// ahead of everything queued (`Shared::notice`), so it is the next frame on the wire
/// whatever the scanner and workers keep queueing; the writer stops after it. The writer
/// gets up to `wait` (it may be in the middle of a frame, or held by the bandwidth cap);
/// after a cancel, whose session is still running, the destination then gets a moment to
/// read the notice and stop before the connections are shut under it.
fn notify_and_abort(shared: &Shared<'_>, reason: &str, wait: Duration, cancelled: bool) {
    if !shared.abort.is_raised() {
        let deadline = Instant::now() + wait;
        shared
            .notice
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| migration::handshake::encode_reason(reason));
        while !shared.abort_sent.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if cancelled && shared.abort_sent.load(Ordering::Acquire) {
            std::thread::sleep(CANCEL_GRACE.min(deadline.saturating_duration_since(Instant::now())));
        }
    }
    shared.abort.raise(reason);
}

/// Waits for a cancel and turns it into the session's abort, unless the destination has
/// already been told to commit (then the migration completes).
fn watch_for_cancel(shared: &Shared<'_>, cancel: &Cancel) {
    loop {
        if shared.finished.load(Ordering::Acquire) || shared.abort.is_raised() {
            return;
        }
        if cancel.is_cancelled() {
            // Refused once Commit is decided: the guest is the destination's then.
            let refused = shared.session.lock().unwrap_or_else(|p| p.into_inner()).handle_cancel(&cancel.reason());
            if let Err(failure) = refused {
                notify_and_abort(shared, &failure.to_string(), CANCEL_NOTICE_WAIT, true);
            }
            return;
        }
        std::thread::sleep(CANCEL_POLL);
    }
}

fn stop_workers(shared: &Shared<'_>, workers: &mut Vec<std::thread::ScopedJoinHandle<'_, ()>>) {
    for _ in 0..workers.len() {
        if shared.jobs.push(None, &shared.abort).is_err() {
            break;
        }
    }
    for worker in workers.drain(..) {
        let _ = worker.join();
    }
}

fn connection_writer(shared: &Shared<'_>, index: usize, mut writer: Box<dyn Write + Send>) {
    // The Hello was sequence 0.
    let mut seq = SeqCounter::default();
    seq.take();
    let mut pages_frames: u64 = 0;
    let mut send = |bytes: &[u8]| -> std::io::Result<()> {
        if let Some(limiter) = &shared.limiter {
            limiter.acquire(bytes.len());
        }
        // Counted before the write: the destination may answer a frame (VerifyResult to
        // VerifyDigest) before this thread runs again, and the totals read then must
        // include it. A failed write fails the session, so the count never lies.
        shared.wire_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        writer.write_all(bytes)
    };
    loop {
        if index == 0 {
            let notice = shared.notice.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(payload) = notice {
                let _ = send(&migration::frame::encode_frame(FrameKind::Abort, 0, seq.take(), &payload));
                shared.abort_sent.store(true, Ordering::Release);
                return;
            }
        }
        let item = match shared.outgoing[index].pop_timeout(&shared.abort, WRITER_NOTICE_POLL) {
            Ok(Some(item)) => item,
            Ok(None) => continue,
            Err(_) => return,
        };
        let result = match item {
            Outgoing::Pages { mut frame, epoch } => {
                frame.seal(FrameKind::Pages, epoch, seq.take());
                pages_frames += 1;
                let result = send(frame.as_bytes());
                shared.page_bytes_written.fetch_add(frame.as_bytes().len() as u64, Ordering::Relaxed);
                shared.frame_pool.give(frame);
                result
            }
            Outgoing::RoundEnd { epoch } => {
                let payload = pages_frames.to_le_bytes();
                pages_frames = 0;
                send(&migration::frame::encode_frame(FrameKind::RoundEnd, epoch, seq.take(), &payload))
            }
            Outgoing::Control { kind, epoch, payload } => {
                send(&migration::frame::encode_frame(kind, epoch, seq.take(), &payload))
            }
            Outgoing::Close => return,
        };
        if let Err(err) = result {
            shared.abort.raise(format!("connection {index}: write failed: {err}"));
            return;
        }
    }
}

/// Reads the destination's answers on connection 0 and feeds them to the session machine,
/// then wakes the scanner to do what it now asks.
fn control_reader_loop(shared: &Shared<'_>, mut reader: Box<dyn std::io::Read + Send>, wake: mpsc::Sender<()>) {
    let mut payload = Vec::new();
    loop {
        let header = match read_frame(&mut *reader, &mut payload, |_| CONTROL_FRAME_LIMIT_BYTES) {
            Ok(header) => header,
            Err(err) => {
                // After a successful session the socket is shut under us: not an error.
                if !shared.finished.load(Ordering::Acquire) {
                    shared.abort.raise(match err {
                        ReadError::Closed => "the destination closed connection 0".to_string(),
                        err => format!("destination connection 0: {err}"),
                    });
                }
                return;
            }
        };
        let now = shared.clock.elapsed();
        let fed = shared.session.lock().unwrap_or_else(|p| p.into_inner()).handle_answer(&header, &payload, now);
        if let Err(failure) = fed {
            // The session machine has failed; the scanner finds the abort and ends.
            shared.abort.raise(failure.to_string());
            return;
        }
        if wake.send(()).is_err() {
            return;
        }
    }
}

fn compression_worker(shared: &Shared<'_>, index: usize) {
    if shared.config.pin_workers {
        pin::pin_current(index);
    }
    let codecs = match shared.config.codec {
        Codec::Adaptive => Codec::ADAPTIVE_CHOICES.to_vec(),
        codec => vec![codec],
    };
    let mut encoder = BatchEncoder {
        compressors: codecs.into_iter().map(PageCompressor::new).collect(),
        page: vec![0u8; PAGE_SIZE_BYTES],
        delta: vec![0u8; PAGE_SIZE_BYTES - 1],
        counters: EncodeCounters::default(),
        measured: Vec::with_capacity(MAX_ENTRIES_PER_BATCH),
    };
    while let Ok(Some(job)) = shared.jobs.pop(&shared.abort) {
        let frame = encoder.encode(shared, &job);
        let pushed = match frame {
            Some(frame) => {
                shared.outgoing[job.connection].push(Outgoing::Pages { frame, epoch: job.epoch }, &shared.abort)
            }
            None => Ok(()),
        };
        shared.round_counters.lock().unwrap_or_else(|p| p.into_inner()).merge(&encoder.counters);
        encoder.counters = EncodeCounters::default();
        let mut pages = job.pages;
        pages.clear();
        shared.job_pool.give(pages);
        shared.jobs_in_flight.fetch_sub(1, Ordering::AcqRel);
        if pushed.is_err() {
            return;
        }
    }
}

/// A compression worker's reusable state.
struct BatchEncoder {
    /// One per codec this worker may use (several with `Codec::Adaptive`).
    compressors: Vec<PageCompressor>,
    page: Vec<u8>,
    delta: Vec<u8>,
    counters: EncodeCounters,
    /// Pages of a batch the adaptive policy measures its choices on.
    measured: Vec<u32>,
}

impl BatchEncoder {
    /// Encodes one job into a page-batch frame; `None` if nothing needs sending (every
    /// page unchanged since the copy the destination holds).
    fn encode(&mut self, shared: &Shared<'_>, job: &Job) -> Option<FrameBuf> {
        let mut frame = shared.frame_pool.take(|| FrameBuf::with_capacity(MAX_BATCH_BYTES));
        let choice = match &shared.adaptive {
            Some(policy) => {
                let pipeline =
                    Pipeline { link_full: shared.link_full(job.connection), scanner_ahead: !shared.jobs.is_empty() };
                policy.choose(pipeline, &|| shared.delivered_bytes())
            }
            None => Choice { codec: self.compressors[0].codec(), measure: false },
        };
        let codec = choice.codec;
        let chosen = self
            .compressors
            .iter()
            .position(|c| c.codec() == codec)
            .expect("a compressor for every codec the policy chooses");
        // The batch's CPU time, for the adaptive policy (measured only for it).
        let started = shared.adaptive.is_some().then(|| (adaptive::cpu::thread_time(), Instant::now()));
        let bulk = job.epoch == FIRST_EPOCH;
        let use_cache = !bulk || shared.cache_bulk.load(Ordering::Relaxed);
        // Pages that go raw and need no snapshot for the XBZRLE cache are read from guest
        // memory straight into the frame: one copy, not two.
        let direct = codec == Codec::None && !(shared.cache.is_some() && use_cache);
        let entries = {
            let mut batch = BatchWriter::new(frame.begin(), job.region);
            let mut zero_runs = ZeroRuns::default();
            for &page in &job.pages {
                let (region, index) = (usize::from(job.region), u64::from(page));
                if direct {
                    let kept = batch.raw_in_place(page, |slot| {
                        shared.memory.read_page(region, index, slot);
                        !(shared.config.zero_detect && zero::is_zero(slot))
                    });
                    if kept {
                        self.counters.raw_pages += 1;
                    } else {
                        self.zero_page(shared, job, page, &mut zero_runs, &mut batch);
                    }
                    continue;
                }
                shared.memory.read_page(region, index, &mut self.page);
                if shared.config.zero_detect && zero::is_zero(&self.page) {
                    self.zero_page(shared, job, page, &mut zero_runs, &mut batch);
                    continue;
                }
                if let (Some(cache), true) = (&shared.cache, use_cache) {
                    match cache.encode(job.region, index, job.epoch, &self.page, &mut self.delta, true) {
                        XbzrleOutcome::Unchanged => {
                            self.counters.xbzrle_unchanged += 1;
                            continue;
                        }
                        XbzrleOutcome::Delta { len, base_epoch } => {
                            batch.xbzrle(page, base_epoch, &self.delta[..len]);
                            self.counters.xbzrle_pages += 1;
                            self.counters.xbzrle_bytes += len as u64;
                            continue;
                        }
                        // Every bulk page misses (first sight); QEMU counts none of them.
                        XbzrleOutcome::Miss if bulk => {}
                        XbzrleOutcome::Miss => self.counters.xbzrle_cache_miss += 1,
                        XbzrleOutcome::Overflow => self.counters.xbzrle_overflow += 1,
                    }
                }
                if codec == Codec::None {
                    batch.raw(page, &self.page);
                    self.counters.raw_pages += 1;
                    continue;
                }
                self.counters.codec_input_pages += 1;
                // The compressor writes into the frame itself, which goes to the socket as it is.
                let compressor = &mut self.compressors[chosen];
                let packed = batch.compressed_in_place(page, codec, compressor.room(), |out| {
                    compressor.compress_into(&self.page, out)
                });
                if let Some(len) = packed {
                    self.counters.compressed_pages += 1;
                    self.counters.compressed_bytes += len as u64;
                } else {
                    batch.raw(page, &self.page);
                    self.counters.raw_pages += 1;
                }
            }
            zero_runs.flush(&mut batch);
            batch.entries()
        };
        let frame = if entries == 0 {
            shared.frame_pool.give(frame);
            None
        } else {
            frame.checksum_payload();
            self.counters.wire_bytes += (HEADER_BYTES + frame.payload_len()) as u64;
            Some(frame)
        };
        if let (Some(policy), Some((cpu_start, wall_start))) = (&shared.adaptive, started) {
            if choice.measure {
                self.measure_choices(shared, job, policy);
            }
            // The counters hold this batch alone (the worker merges and resets them per job).
            let input = (self.counters.raw_pages + self.counters.compressed_pages) * PAGE_SIZE_BYTES as u64;
            policy.account(input, adaptive::cpu::thread_time() - cpu_start, wall_start.elapsed());
        }
        frame
    }

    /// Compresses the batch's non-zero pages with every choice the adaptive policy has, and
    /// tells it what each made of them and at what CPU cost: all measured on the same pages.
    fn measure_choices(&mut self, shared: &Shared<'_>, job: &Job, policy: &AdaptivePolicy) {
        let region = usize::from(job.region);
        self.measured.clear();
        for &page in &job.pages {
            shared.memory.read_page(region, u64::from(page), &mut self.page);
            if !zero::is_zero(&self.page) {
                self.measured.push(page);
            }
        }
        for compressor in &mut self.compressors {
            let start = adaptive::cpu::thread_time();
            let mut output = 0;
            for &page in &self.measured {
                shared.memory.read_page(region, u64::from(page), &mut self.page);
                output += match compressor.compress(&self.page) {
                    Compressed::Packed { len } => len,
                    Compressed::Raw => PAGE_SIZE_BYTES,
                } as u64;
            }
            let input = (self.measured.len() * PAGE_SIZE_BYTES) as u64;
            policy.measure(compressor.codec(), input, output, adaptive::cpu::thread_time() - start);
        }
    }

    /// A page found zero: the destination's copy becomes zero through a run entry, and the
    /// XBZRLE cache forgets the page (its next version is sent whole).
    fn zero_page<O: BatchOut>(
        &mut self,
        shared: &Shared<'_>,
        job: &Job,
        page: u32,
        runs: &mut ZeroRuns,
        batch: &mut BatchWriter<'_, O>,
    ) {
        if let Some(cache) = &shared.cache {
            cache.forget(job.region, u64::from(page));
        }
        self.counters.zero_pages += 1;
        runs.add(page, batch);
    }
}

/// Zero pages of a batch gathered into runs of consecutive pages, one entry per run.
#[derive(Default)]
struct ZeroRuns {
    open: Option<(u32, u32)>,
}

impl ZeroRuns {
    /// Adds `page`, extending the open run or writing it out and starting another.
    fn add<O: BatchOut>(&mut self, page: u32, batch: &mut BatchWriter<'_, O>) {
        self.open = match self.open {
            Some((first, count)) if first + count == page => Some((first, count + 1)),
            previous => {
                if let Some((first, count)) = previous {
                    batch.zero_run(first, count);
                }
                Some((page, 1))
            }
        };
    }

    /// Writes out the open run.
    fn flush<O: BatchOut>(&mut self, batch: &mut BatchWriter<'_, O>) {
        if let Some((first, count)) = self.open.take() {
            batch.zero_run(first, count);
        }
    }
}

/// Moments of the switchover, for the statistics.
#[derive(Default)]
struct Switchover {
    /// Bytes written before the guest stopped.
    precopy_bytes: u64,
    downtime_start: Option<Instant>,
    /// When the destination's `Resumed` had come (the scanner's first action after it).
    resumed_at: Option<Instant>,
    /// Bytes written from the guest's stop until then.
    downtime_bytes: u64,
}

impl Switchover {
    fn resumed(&mut self, wire_bytes: u64) {
        if self.resumed_at.is_none() {
            self.resumed_at = Some(Instant::now());
            self.downtime_bytes = wire_bytes.saturating_sub(self.precopy_bytes);
        }
    }
}

/// The scanner: runs the rounds on the calling thread.
struct Scanner<'s, 'a> {
    shared: &'s Shared<'a>,
    vm: &'s dyn SourceVm,
    hello: &'s Hello,
    started: Instant,
    setup_time: Duration,
    progress: &'s mut dyn FnMut(&Progress),
    bitmaps: Vec<Vec<u64>>,
    scratch: Vec<Vec<u64>>,
    next_connection: usize,
    /// The round being sent (or last sent): control frames carry it.
    epoch: u32,
    stats: MigrationStats,
    totals: EncodeCounters,
    last_progress: Instant,
    cleaned_up: bool,
}

impl<'s, 'a> Scanner<'s, 'a> {
    fn new(
        shared: &'s Shared<'a>,
        vm: &'s dyn SourceVm,
        hello: &'s Hello,
        started: Instant,
        setup_time: Duration,
        progress: &'s mut dyn FnMut(&Progress),
    ) -> Self {
        let bitmaps: Vec<Vec<u64>> =
            hello.region_bytes.iter().map(|&b| vec![0u64; bitmap_words(pages_of(b))]).collect();
        let scratch = bitmaps.clone();
        Scanner {
            shared,
            vm,
            hello,
            started,
            setup_time,
            progress,
            bitmaps,
            scratch,
            next_connection: 0,
            epoch: 0,
            stats: MigrationStats::default(),
            totals: EncodeCounters::default(),
            last_progress: Instant::now(),
            cleaned_up: false,
        }
    }

    fn check_abort(&self) -> Result<(), MigrationError> {
        if self.shared.abort.is_raised() {
            return Err(self.aborted());
        }
        Ok(())
    }

    /// Takes the dirty log into the bitmaps: replacing them, or adding to them.
    fn sync(&mut self, merge: bool) -> u64 {
        self.stats.ram.dirty_sync_count += 1;
        let log = self.vm.dirty_log();
        let mut dirty = 0;
        for (region, (bitmap, scratch)) in self.bitmaps.iter_mut().zip(&mut self.scratch).enumerate() {
            if merge {
                log.take_dirty(region, scratch);
                for (word, extra) in bitmap.iter_mut().zip(scratch.iter()) {
                    *word |= extra;
                }
            } else {
                log.take_dirty(region, bitmap);
            }
            dirty += bitmap.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        dirty
    }

    /// Hands out the pages set in the bitmaps as jobs of `epoch`, then waits until every job
    /// is encoded and queued, and closes the round on every connection.
    fn send_round(&mut self, epoch: u32, stage: &'static str, pages: u64) -> Result<(), MigrationError> {
        let shared = self.shared;
        let mut remaining = pages;
        for region in 0..self.bitmaps.len() {
            let mut batch = shared.job_pool.take(|| Vec::with_capacity(MAX_ENTRIES_PER_BATCH));
            let mut failed = Ok(());
            let bitmap = std::mem::take(&mut self.bitmaps[region]);
            for_each_set_bit(&bitmap, |page| {
                if failed.is_err() {
                    return;
                }
                batch.push(page as u32);
                if batch.len() == MAX_ENTRIES_PER_BATCH {
                    remaining -= batch.len() as u64;
                    let full = std::mem::replace(
                        &mut batch,
                        shared.job_pool.take(|| Vec::with_capacity(MAX_ENTRIES_PER_BATCH)),
                    );
                    failed = self.dispatch(epoch, region as u16, full);
                    self.maybe_report(epoch, stage, remaining);
                }
            });
            self.bitmaps[region] = bitmap;
            failed?;
            if batch.is_empty() {
                shared.job_pool.give(batch);
            } else {
                remaining -= batch.len() as u64;
                self.dispatch(epoch, region as u16, batch)?;
            }
        }
        // Round barrier, source side: all of this round's batches are queued before any
        // connection gets its RoundEnd.
        while shared.jobs_in_flight.load(Ordering::Acquire) > 0 {
            self.check_abort()?;
            std::thread::sleep(Duration::from_micros(100));
        }
        self.check_abort()
    }

    /// Puts `RoundEnd` on every connection (the session machine already counts the round
    /// as closed, so its `RoundApplied` is never early).
    fn close_round(&self, epoch: u32) -> Result<(), MigrationError> {
        for ring in &self.shared.outgoing {
            ring.push(Outgoing::RoundEnd { epoch }, &self.shared.abort).map_err(|_| self.aborted())?;
        }
        Ok(())
    }

    fn aborted(&self) -> MigrationError {
        MigrationError::Aborted(self.shared.abort.reason().unwrap_or_else(|| "aborted".into()))
    }

    fn dispatch(&mut self, epoch: u32, region: u16, pages: Vec<u32>) -> Result<(), MigrationError> {
        let connection = self.next_connection;
        self.next_connection = (self.next_connection + 1) % self.shared.outgoing.len();
        self.shared.jobs_in_flight.fetch_add(1, Ordering::AcqRel);
        if self.shared.jobs.push(Some(Job { epoch, region, pages, connection }), &self.shared.abort).is_err() {
            self.shared.jobs_in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(self.aborted());
        }
        Ok(())
    }

    fn maybe_report(&mut self, round: u32, stage: &'static str, remaining_pages: u64) {
        if self.last_progress.elapsed() < PROGRESS_INTERVAL {
            return;
        }
        self.last_progress = Instant::now();
        let elapsed = self.started.elapsed();
        let transferred_bytes = self.shared.wire_bytes.load(Ordering::Relaxed);
        (self.progress)(&Progress {
            round,
            stage,
            remaining_pages,
            transferred_bytes,
            mbps: mbps(transferred_bytes, elapsed.as_secs_f64()),
            elapsed,
        });
    }

    fn take_round_counters(&mut self) -> EncodeCounters {
        let counters = std::mem::take(&mut *self.shared.round_counters.lock().unwrap_or_else(|p| p.into_inner()));
        self.totals.merge(&counters);
        counters
    }

    fn record_round(
        &mut self,
        round: u32,
        stage: &'static str,
        duration: Duration,
        counters: &EncodeCounters,
        dirty_after: u64,
        precopy: Option<&Precopy>,
    ) {
        self.stats.rounds.push(RoundStats {
            round,
            stage,
            duration_ms: duration.as_secs_f64() * 1e3,
            pages: counters.pages(),
            transferred: counters.wire_bytes,
            zero_pages: counters.zero_pages,
            xbzrle_pages: counters.xbzrle_pages,
            compressed_pages: counters.compressed_pages,
            raw_pages: counters.raw_pages,
            dirty_pages_after: dirty_after,
            mbps: mbps(counters.wire_bytes, duration.as_secs_f64()),
            expected_downtime_ms: precopy.map_or(0.0, |p| p.expected_downtime().as_secs_f64() * 1e3),
            throttle_pct: precopy.map_or(0, |p| p.throttle_pct()),
        });
    }

    fn now(&self) -> Duration {
        self.shared.clock.elapsed()
    }

    fn session(&self) -> std::sync::MutexGuard<'_, SourceSession> {
        self.shared.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the session machine may have something to do: an answer came, or it is
    /// time to check its deadline.
    fn wait_for_session(&self, wake: &mpsc::Receiver<()>) -> Result<(), MigrationError> {
        // The channel before the abort flag: the destination closes its end right after its
        // last answer, and the reader may report that closing before we have acted on it.
        match wake.recv_timeout(Duration::from_millis(20)) {
            Ok(()) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.check_abort()?;
                Ok(self.session().handle_timeout(self.now())?)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The reader has raised the abort with its reason (or is about to).
                std::thread::sleep(Duration::from_millis(5));
                self.check_abort()?;
                Err(MigrationError::Io {
                    connection: 0,
                    source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the destination's answers stopped"),
                })
            }
        }
    }

    fn control(&self, kind: FrameKind, epoch: u32, payload: Vec<u8>) -> Result<(), MigrationError> {
        self.shared.outgoing[0]
            .push(Outgoing::Control { kind, epoch, payload }, &self.shared.abort)
            .map_err(|_| self.aborted())
    }

    /// Drives the session machine (`migration::source_session`) to its end: does each
    /// thing it asks, and feeds it what came of it.
    fn run(
        &mut self,
        paused: &mut bool,
        wake: &mpsc::Receiver<()>,
        workers: &mut Vec<std::thread::ScopedJoinHandle<'_, ()>>,
    ) -> Result<MigrationStats, MigrationError> {
        let mut pages = self.bulk_pages();
        let mut switchover = Switchover::default();
        loop {
            let action = self.session().poll_action();
            let Some(action) = action else {
                self.wait_for_session(wake)?;
                continue;
            };
            match action {
                SourceAction::SendRound { epoch, stage } => pages = self.precopy_round(epoch, stage, pages)?,
                SourceAction::SetThrottle { pct } => self.vm.set_throttle(pct),
                SourceAction::StopAndCopy { epoch } => {
                    switchover.precopy_bytes = self.shared.wire_bytes.load(Ordering::Relaxed);
                    // The downtime window starts here.
                    switchover.downtime_start = Some(Instant::now());
                    *paused = true;
                    self.stop_and_copy(epoch, workers)?;
                }
                SourceAction::Send(message) => self.control(message.kind(), self.epoch, message.payload())?,
                SourceAction::HashMemory => {
                    switchover.resumed(self.shared.wire_bytes.load(Ordering::Relaxed));
                    // The source's paused memory is hashed only now: hashing it while the
                    // destination hashes its own would compete for the same cores and
                    // lengthen the downtime.
                    let digest = memory_digest(self.shared.memory, pin::core_count());
                    let now = self.now();
                    self.session().handle_digest(digest, now);
                }
                SourceAction::Finish(outcome) => {
                    switchover.resumed(self.shared.wire_bytes.load(Ordering::Relaxed));
                    // Teardown, after the switchover.
                    self.cleanup(workers, false);
                    return Ok(self.final_stats(outcome, &switchover));
                }
            }
        }
    }

    /// The bulk stage's pages: those written since logging started, or every page.
    fn bulk_pages(&mut self) -> u64 {
        let config = self.shared.config;
        let total_pages: u64 = self.hello.region_bytes.iter().map(|&b| pages_of(b)).sum();
        let used = self.sync(false);
        let bulk_pages = if config.skip_unused {
            used
        } else {
            for bitmap in &mut self.bitmaps {
                bitmap.fill(u64::MAX);
            }
            for (bitmap, &bytes) in self.bitmaps.iter_mut().zip(&self.hello.region_bytes) {
                let pages = pages_of(bytes);
                if !pages.is_multiple_of(64) {
                    if let Some(last) = bitmap.last_mut() {
                        *last = (1u64 << (pages % 64)) - 1;
                    }
                }
            }
            total_pages
        };
        self.stats.ram.skipped = total_pages - bulk_pages;
        // QEMU keeps the bulk stage out of the XBZRLE cache, so a cache smaller than the
        // guest is not flushed by pages that may never change again. When the cache holds
        // every bulk page there is nothing to flush: cache them, and the first re-sent
        // pages already go as deltas.
        if let Some(cache) = &self.shared.cache {
            let fits = cache.size_bytes() >= bulk_pages * PAGE_SIZE_BYTES as u64;
            self.shared.cache_bulk.store(fits, Ordering::Relaxed);
        }
        bulk_pages
    }

    /// Sends `pages` (set in the bitmaps) as round `epoch`, closes it, syncs the dirty log
    /// and tells the session machine what the round measured. Returns the next round's
    /// pages.
    fn precopy_round(&mut self, epoch: u32, stage: Stage, pages: u64) -> Result<u64, MigrationError> {
        self.epoch = epoch;
        let stage = stage.name();
        let round_start = Instant::now();
        let written_before = self.shared.wire_bytes.load(Ordering::Relaxed);
        self.send_round(epoch, stage, pages)?;
        self.close_round(epoch)?;
        let counters = self.take_round_counters();
        let dirty = self.sync(false);
        let duration = round_start.elapsed();
        self.stats.ram.dirty_pages_rate = (dirty as f64 / duration.as_secs_f64().max(1e-6)) as u64;
        let backlog_bytes =
            self.totals.wire_bytes.saturating_sub(self.shared.page_bytes_written.load(Ordering::Relaxed));
        let report = RoundReport {
            duration,
            bytes_sent: self.shared.wire_bytes.load(Ordering::Relaxed) - written_before,
            pages_sent: counters.pages(),
            bytes_encoded: counters.wire_bytes,
            dirty_pages: dirty,
            backlog_bytes,
        };
        let now = self.now();
        let precopy = {
            let mut session = self.session();
            session.handle_round_sent(report, now)?;
            session.precopy().clone()
        };
        log::debug!(
            round = epoch, stage, pages_sent = report.pages_sent, dirty_pages = dirty,
            ms = duration.as_millis() as u64; "round finished, expected downtime {:?}", precopy.expected_downtime()
        );
        self.record_round(epoch, stage, duration, &counters, dirty, Some(&precopy));
        self.maybe_report(epoch, stage, dirty);
        Ok(dirty)
    }

    /// Stop-and-copy, inside the downtime window: the guest stops, the last dirty pages and
    /// the device state go out as round `epoch`, and the round is closed.
    fn stop_and_copy(
        &mut self,
        epoch: u32,
        workers: &mut Vec<std::thread::ScopedJoinHandle<'_, ()>>,
    ) -> Result<(), MigrationError> {
        self.epoch = epoch;
        log::debug!(round = epoch; "stop-and-copy: pausing the guest");
        self.vm.pause();
        let final_pages = self.sync(true);
        let round_start = Instant::now();
        self.send_round(epoch, "stop-and-copy", final_pages)?;
        let device_state = self.vm.device_state();
        if device_state.len() > MAX_PAYLOAD_BYTES as usize {
            return Err(LimitExceeded::DeviceStateTooLarge {
                bytes: device_state.len(),
                limit: MAX_PAYLOAD_BYTES as usize,
            }
            .into());
        }
        if !self.shared.config.deferred_cleanup {
            self.cleanup(workers, true);
        }
        self.control(FrameKind::DeviceState, epoch, device_state)?;
        self.close_round(epoch)?;
        let now = self.now();
        self.session().handle_final_round_sent(now);
        let counters = self.take_round_counters();
        self.record_round(epoch, "stop-and-copy", round_start.elapsed(), &counters, 0, None);
        Ok(())
    }

    /// The statistics of a completed migration, under QEMU's names.
    fn final_stats(&mut self, outcome: SourceOutcome, switchover: &Switchover) -> MigrationStats {
        let config = self.shared.config;
        let verify_time = Duration::from_millis(outcome.destination_verify_ms);
        let resumed_at = switchover.resumed_at.unwrap_or_else(Instant::now);
        let downtime = switchover
            .downtime_start
            .map_or(Duration::ZERO, |start| resumed_at.duration_since(start))
            .saturating_sub(verify_time);
        let total_time = resumed_at.duration_since(self.started).saturating_sub(verify_time);
        let precopy = self.session().precopy().clone();
        if config.verify {
            self.stats.verified = outcome.verified;
            self.stats.verify_time = Some(outcome.destination_verify_ms);
        }

        let stats = &mut self.stats;
        let t = &self.totals;
        stats.status = "completed".into();
        stats.total_time = total_time.as_millis() as u64;
        stats.setup_time = self.setup_time.as_millis() as u64;
        stats.downtime = downtime.as_millis() as u64;
        stats.expected_downtime = precopy.expected_downtime().as_millis().min(u128::from(u64::MAX)) as u64;
        stats.throttle_pct = precopy.throttle_pct();
        let transferred = self.shared.wire_bytes.load(Ordering::Relaxed);
        stats.ram.total = self.hello.total_bytes();
        stats.ram.transferred = transferred;
        stats.ram.remaining = 0;
        stats.ram.duplicate = t.zero_pages;
        stats.ram.normal = t.raw_pages + t.compressed_pages;
        stats.ram.normal_bytes = stats.ram.normal * PAGE_SIZE_BYTES as u64;
        stats.ram.mbps = mbps(transferred, total_time.as_secs_f64());
        stats.ram.pages_per_second = (t.pages() as f64 / total_time.as_secs_f64().max(1e-6)) as u64;
        stats.ram.precopy_bytes = switchover.precopy_bytes;
        stats.ram.downtime_bytes = switchover.downtime_bytes;
        if let Some(cache) = &self.shared.cache {
            let x = &mut stats.xbzrle_cache;
            x.cache_size = cache.size_bytes();
            x.bytes = t.xbzrle_bytes;
            x.pages = t.xbzrle_pages;
            x.cache_miss = t.xbzrle_cache_miss;
            let lookups = t.xbzrle_pages + t.xbzrle_cache_miss + t.xbzrle_overflow + t.xbzrle_unchanged;
            x.cache_miss_rate = if lookups > 0 { t.xbzrle_cache_miss as f64 / lookups as f64 } else { 0.0 };
            x.encoding_rate = if t.xbzrle_bytes > 0 {
                (t.xbzrle_pages * PAGE_SIZE_BYTES as u64) as f64 / t.xbzrle_bytes as f64
            } else {
                0.0
            };
            x.overflow = t.xbzrle_overflow;
        }
        stats.compression.pages = t.compressed_pages;
        stats.compression.compressed_size = t.compressed_bytes;
        stats.compression.compression_rate = if t.compressed_bytes > 0 {
            (t.compressed_pages * PAGE_SIZE_BYTES as u64) as f64 / t.compressed_bytes as f64
        } else {
            0.0
        };
        stats.codec = config.codec.to_string();
        stats.connections = self.hello.connection_count;
        stats.compress_threads = config.compress_threads;
        stats.encode = *t;
        std::mem::take(stats)
    }

    /// Stops the compression workers and frees the XBZRLE cache; records how long that
    /// took and whether it ran inside the downtime window. Runs once.
    fn cleanup(&mut self, workers: &mut Vec<std::thread::ScopedJoinHandle<'_, ()>>, in_downtime: bool) {
        if self.cleaned_up {
            return;
        }
        let start = Instant::now();
        stop_workers(self.shared, workers);
        if let Some(cache) = &self.shared.cache {
            cache.release();
        }
        self.cleaned_up = true;
        self.stats.cleanup_time_us = start.elapsed().as_micros() as u64;
        self.stats.cleanup_in_downtime = in_downtime;
    }
}
