//! The source engine: iterative pre-copy over N connections.
//!
//! ```text
//! scanner (calling thread) --jobs--> compression workers (pinned) --frames--> ring per
//! connection --> our stack: the polling core pulls them (links::LinkWriter as Outbound)
//!                kernel TCP, TLS: a connection writer thread --> byte pipe
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

use crate::adaptive::AdaptivePolicy;
use crate::cancel::Cancel;
use crate::config::SourceConfig;
use crate::error::ProtocolViolation;
use crate::offload::OffloadQueue;
use crate::rate::RateLimiter;
use crate::vm::SourceVm;
use crate::MigrationError;
use migration::codec::Codec;
use migration::frame::{FrameBuf, FrameKind, SeqCounter};
use migration::handshake::{encode_preamble, HandshakeError, Hello, HelloAck};
use migration::memory::GuestMemory;
use migration::seen_pages::{SeenPages, SLOT_BYTES};
use migration::source_session::SourceSession;
use migration::stats::{EncodeCounters, MigrationStats};
use migration::xbzrle_cache::XbzrleCache;
use migration::PAGE_SIZE_BYTES;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use transport::abort::AbortKind;
use transport::abort::SessionAbort;
use transport::framed::{read_frame, write_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};
use transport::pipe::{Connection, Connector, SendProbe};
use transport::ring::{Pool, Ring};

mod encoder;
mod links;
mod scanner;

use encoder::compression_worker;
use links::{connection_writer, control_reader_loop, LinkWriter, Links};
use scanner::Scanner;

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
/// How often a completed session looks whether every connection's writer took its Close.
const CLOSE_POLL: Duration = Duration::from_micros(200);
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
    /// What the encoders did with the pages so far (all rounds, this one included).
    pub encoded: EncodeCounters,
    /// The downtime the last round's figures predict for a switchover now, and the limit.
    pub expected_downtime: Duration,
    pub downtime_limit: Duration,
    /// Pages the guest dirtied per second over the last round.
    pub dirty_pages_rate: u64,
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
    abort: Arc<SessionAbort>,
    config: &'a SourceConfig,
    memory: &'a dyn GuestMemory,
    jobs: Ring<Option<Job>>,
    job_pool: Pool<Vec<u32>>,
    /// The connections' write sides, and what they count.
    links: Arc<Links>,
    jobs_in_flight: AtomicU64,
    round_counters: Mutex<EncodeCounters>,
    cache: Option<XbzrleCache>,
    /// The pages sent in the round, by contents, where pages may go as copies.
    seen: Option<SeenPages>,
    /// Set once the session completed: the connections are then shut under the reader.
    finished: AtomicBool,
    /// The session's state machine: fed by the scanner (rounds), the control reader (the
    /// destination's answers) and the cancel watcher; the scanner does what it asks.
    session: Mutex<SourceSession>,
    /// The session's clock: `now` for the state machines is time since this instant.
    clock: Instant,
    /// Whether the bulk round fills the XBZRLE cache (only when the cache holds it all).
    cache_bulk: AtomicBool,
    /// With `Codec::Adaptive`: what chooses each batch's codec.
    adaptive: Option<AdaptivePolicy>,
    /// The compression device's queues, one per worker, each taken by its worker.
    offload: Mutex<Vec<Option<Box<dyn OffloadQueue>>>>,
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
                self.links.limiter.as_ref().is_some_and(|limiter| limiter.holding_back())
                    || probes.iter().all(|p| p.full())
            }
            None => !self.links.outgoing[connection].is_empty(),
        }
    }

    /// Whether every connection's receiver, not the link, has held its sender back lately
    /// (the destination is the slower end); false where a stack cannot tell.
    fn receiver_bound(&self) -> bool {
        self.probes.as_ref().is_some_and(|probes| probes.iter().all(|p| p.receiver_limited()))
    }

    /// Bytes the destination has acknowledged; where a stack cannot tell, bytes written.
    fn delivered_bytes(&self) -> u64 {
        match &self.probes {
            Some(probes) => probes.iter().map(|p| p.acknowledged()).sum(),
            None => self.links.wire_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The index of pages by contents: `bytes` at most, and no more slots than the guest has
/// pages. Seeded afresh for each migration, so that a guest cannot craft a collision.
fn copy_index(bytes: u64, memory: &dyn GuestMemory) -> SeenPages {
    let pages: u64 = memory.region_bytes().iter().map(|&b| b / PAGE_SIZE_BYTES as u64).sum();
    SeenPages::new(bytes.min(pages.max(1) * SLOT_BYTES), rand::random())
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
    let addresses = vm.memory().region_addresses();
    assert_eq!(addresses.len(), layout.len(), "GuestMemory gives an address per region");
    let hello = Hello {
        session_id: rand::random(),
        connection_index: 0,
        connection_count: config.connections.max(1),
        page_size: PAGE_SIZE_BYTES as u32,
        codec: config.codec,
        xbzrle: config.xbzrle_cache_bytes.is_some(),
        copies: config.copy_index_bytes.is_some(),
        region_bytes: layout.clone(),
        region_addresses: addresses,
        vm_requirements: vm.requirements(),
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
            Err(ProtocolViolation::UnexpectedFrame { connection: index, expected: "HelloAck", got, seq }.into())
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
    let offload = open_offload(config)?;
    let abort = Arc::new(SessionAbort::new());
    let mut links = Links::new(abort.clone(), count, FRAME_RING_CAPACITY, 2 * config.compress_threads);
    // With a tuning handle the cap may be set or changed later: a limiter from the start.
    links.limiter = match &config.tuning {
        Some(_) => Some(RateLimiter::with_rate(config.max_bandwidth_bytes_per_s)),
        None => config.max_bandwidth_bytes_per_s.map(RateLimiter::new),
    };
    let shared = Shared {
        abort,
        config,
        memory: vm.memory(),
        jobs: Ring::new(JOB_RING_CAPACITY),
        job_pool: Pool::new(JOB_RING_CAPACITY + config.compress_threads),
        links: Arc::new(links),
        jobs_in_flight: AtomicU64::new(0),
        round_counters: Mutex::new(EncodeCounters::default()),
        cache: config.xbzrle_cache_bytes.map(XbzrleCache::new),
        seen: config.copy_index_bytes.map(|bytes| copy_index(bytes, vm.memory())),
        finished: AtomicBool::new(false),
        session: Mutex::new(SourceSession::new(
            config.precopy.clone(),
            config.verify,
            config.answer_timeout,
            Duration::ZERO,
        )),
        clock: Instant::now(),
        cache_bulk: AtomicBool::new(false),
        adaptive: (config.codec == Codec::Adaptive).then(|| adaptive_policy(config, !offload.is_empty())),
        offload: Mutex::new(offload),
        probes,
    };
    let (wake_tx, wake) = mpsc::channel::<()>();

    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for index in 0..config.compress_threads.max(1) {
            let shared = &shared;
            let body = move || compression_worker(shared, index);
            workers.push(shared.abort.spawn_guarded(scope, format!("compress-{index}"), "compression", body));
        }
        let writers = spawn_connection_threads(scope, &shared, connections, wake_tx);
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
                // Writers send what is queued and stop at Close; then the sockets are shut
                // so that the control reader, blocked in a read, returns too.
                for ring in &shared.links.outgoing {
                    let _ = ring.push(Outgoing::Close, &shared.abort);
                }
                for writer in writers {
                    let _ = writer.join();
                }
                // Writers a polling core drives have no thread to join: wait until each
                // has taken its Close (or the session failed).
                while shared.links.closed_writers() < count && !shared.abort.is_raised() {
                    std::thread::sleep(CLOSE_POLL);
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

/// The compression device's queues, one per worker, where the codec uses it (`deflate`,
/// or `adaptive` with `deflate` among its choices); none otherwise.
fn open_offload(config: &SourceConfig) -> Result<Vec<Option<Box<dyn OffloadQueue>>>, MigrationError> {
    let Some(device) = config.offload.as_ref().filter(|_| matches!(config.codec, Codec::Deflate | Codec::Adaptive))
    else {
        return Ok(Vec::new());
    };
    let queues = device
        .open(config.compress_threads.max(1))
        .map_err(|reason| MigrationError::Offload { device: device.name().to_string(), reason })?;
    Ok(queues.into_iter().map(Some).collect())
}

/// The adaptive policy for `config`'s workers; `deflate` among its choices where a
/// compression device does it.
fn adaptive_policy(config: &SourceConfig, device: bool) -> AdaptivePolicy {
    let mut choices = Codec::ADAPTIVE_CHOICES.to_vec();
    if device {
        choices.push(Codec::Deflate);
    }
    AdaptivePolicy::with_choices(config.compress_threads, choices)
}

/// A write side per connection (handed to the stack where it can pull, a writer thread
/// otherwise), and connection 0's reader (which wakes the scanner through `wake` after
/// each answer it fed the session machine). Returns the writer threads.
fn spawn_connection_threads<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    shared: &'scope Shared<'env>,
    connections: Vec<Connection>,
    wake: mpsc::Sender<()>,
) -> Vec<std::thread::ScopedJoinHandle<'scope, ()>> {
    let mut writers = Vec::new();
    for (index, connection) in connections.into_iter().enumerate() {
        let Connection { reader, writer, closer, direct_send, .. } = connection;
        shared.abort.on_raise(closer);
        if index == 0 {
            let wake = wake.clone();
            let body = move || control_reader_loop(shared, reader, wake);
            shared.abort.spawn_guarded(scope, "control-reader".into(), "control reader", body);
        }
        let link = LinkWriter::new(shared.links.clone(), index);
        match direct_send {
            Some(attach) if shared.config.direct_send => attach(Box::new(link)),
            _ => {
                let body = move || connection_writer(link, writer);
                let name = format!("conn-writer-{index}");
                writers.push(shared.abort.spawn_guarded(scope, name, "connection writer", body));
            }
        }
    }
    writers
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
        shared.links.post_notice(|| migration::handshake::encode_reason(reason));
        while !shared.links.abort_sent.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if cancelled && shared.links.abort_sent.load(Ordering::Acquire) {
            std::thread::sleep(CANCEL_GRACE.min(deadline.saturating_duration_since(Instant::now())));
        }
    }
    shared.abort.raise_as(if cancelled { AbortKind::Cancelled } else { AbortKind::Local }, reason);
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
