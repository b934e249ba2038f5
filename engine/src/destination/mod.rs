//! The destination engine: accepts the source's connections, applies pages with pinned
//! decompression workers, and resumes the guest only once every round is applied, the
//! device state is in and the source has let go.
//!
//! ```text
//! byte pipe --> connection reader --(page batches)--> decode ring --> decompression
//!               (checks frames, holds at RoundEnd)                   workers -> memory
//!               connection 0 reader --(Complete, Commit, VerifyDigest)--> session thread
//! ```
//! Over kernel TCP and TLS the connection readers are threads (`reader.rs`); over our
//! stack the polling cores feed each connection's `inbound::FrameInbound` straight from
//! their sockets, with the same checks and no thread in between.
//! Every connection stops at each `RoundEnd` until all connections have reached it and
//! every batch of that round is applied: a page of round k can never land after the same
//! page of round k+1, and a delta always finds the version it was made from (the page
//! epoch table checks both).

use crate::config::DestinationConfig;
use crate::offload::Inflater;
use crate::vm::DestinationVm;
use crate::MigrationError;
use migration::codec::Codec;
use migration::frame::FrameKind;
use migration::handshake::{encode_reason, Hello};
use migration::memory::{pages_of, GuestMemory};
use migration::page_batch::BatchLimits;
use migration::receiver::ReceiveError;
use migration::receiver::{fill_copies, ApplyCounters, PageEpochs, PendingCopies, PendingCopy};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;
use transport::abort::{AbortKind, SessionAbort};
use transport::pipe::{Acceptor, Connection};
use transport::ring::{Pool, Ring};

mod greeting;
mod inbound;
mod reader;
mod session;

pub use crate::watch::{DestinationControls, DestinationProgress, WATCH_EVERY};
use greeting::{accept_session, turn_away, Greeted};
use inbound::FrameInbound;
use reader::{connection_reader, decompression_worker};
use session::{Event, Session};

/// Received batches waiting for a decompression worker: bounds the receive buffers to
/// ~17 MiB however fast the source sends.
const DECODE_RING_CAPACITY: usize = 64;

/// What the destination saw of a completed migration.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DestinationReport {
    pub session_id: u64,
    pub connections: u16,
    pub ram_total: u64,
    pub received_bytes: u64,
    pub rounds: u32,
    pub zero_pages: u64,
    pub raw_pages: u64,
    pub compressed_pages: u64,
    pub xbzrle_pages: u64,
    /// Pages that came as copies of others of the same round.
    pub copied_pages: u64,
    /// `deflate` pages a compression device inflated (`DestinationConfig::offload`).
    pub device_inflated_pages: u64,
    /// `deflate` pages the device failed, inflated on the CPU instead.
    pub device_fallback_pages: u64,
    pub total_time_ms: u64,
    pub verify_time_ms: Option<u64>,
    pub verified: Option<bool>,
    /// CPU seconds the receive used (filled in by whoever can measure it, as the CLI does).
    pub cpu_seconds: Option<f64>,
}

struct Shared {
    abort: SessionAbort,
    memory: Arc<dyn GuestMemory>,
    region_pages: Vec<u64>,
    hello: Hello,
    epochs: PageEpochs,
    /// Pages that came as copies of others, filled when the round's barrier opens.
    copies: PendingCopies,
    /// Threads that fill them (the decompression workers' count: they wait meanwhile).
    copy_fillers: usize,
    decode: Ring<Option<(u32, Vec<u8>)>>,
    buffers: Pool<Vec<u8>>,
    in_flight: AtomicU64,
    barrier: Mutex<BarrierState>,
    barrier_changed: Condvar,
    device_state: Mutex<Option<Vec<u8>>>,
    complete_seen: AtomicBool,
    finished: AtomicBool,
    counters: Mutex<ApplyCounters>,
    received_bytes: AtomicU64,
    rounds: AtomicU64,
}

#[derive(Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
}

impl Shared {
    fn limits(&self) -> BatchLimits<'_> {
        BatchLimits {
            region_pages: &self.region_pages,
            codec: self.hello.codec,
            xbzrle: self.hello.xbzrle,
            copies: self.hello.copies,
        }
    }

    fn failure(&self) -> MigrationError {
        MigrationError::Aborted {
            reason: self.abort.reason().unwrap_or_else(|| "aborted".into()),
            kind: self.abort.kind(),
        }
    }

    /// The round barrier: returns once every connection has ended the round and every
    /// batch of it is applied; `Ok(true)` for the caller that completed it.
    fn end_round(&self) -> Result<bool, MigrationError> {
        let generation = self.arrive_at_round_end();
        loop {
            if let Some(completed) = self.pass_round_end(generation)? {
                return Ok(completed);
            }
            let state = self.barrier.lock().unwrap_or_else(|p| p.into_inner());
            if state.generation == generation {
                let _ = self.barrier_changed.wait_timeout(state, Duration::from_millis(1));
            }
        }
    }

    /// A connection reached the end of a round: returns the barrier's generation to pass.
    fn arrive_at_round_end(&self) -> u64 {
        let mut state = self.barrier.lock().unwrap_or_else(|p| p.into_inner());
        state.arrived += 1;
        state.generation
    }

    /// Whether the barrier of `generation` is open, without waiting: `Some(true)` for the
    /// caller that opened it (every connection arrived, every batch applied), `None` while
    /// it stays shut.
    fn pass_round_end(&self, generation: u64) -> Result<Option<bool>, MigrationError> {
        if self.abort.is_raised() {
            return Err(self.failure());
        }
        let mut state = self.barrier.lock().unwrap_or_else(|p| p.into_inner());
        if state.generation != generation {
            return Ok(Some(false));
        }
        if state.arrived < usize::from(self.hello.connection_count) || self.in_flight.load(Ordering::Acquire) > 0 {
            return Ok(None);
        }
        // Every page of the round is written and nothing writes until the barrier opens:
        // the copies' originals hold what the source hashed.
        if let Err(err) = fill_copies_on(&*self.memory, &self.copies.take(), self.copy_fillers) {
            self.abort.raise_as(AbortKind::Damaged, format!("round end: {err}"));
            return Err(self.failure());
        }
        state.arrived = 0;
        state.generation += 1;
        self.rounds.fetch_add(1, Ordering::Relaxed);
        self.barrier_changed.notify_all();
        Ok(Some(true))
    }

    fn batch_applied(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _state = self.barrier.lock().unwrap_or_else(|p| p.into_inner());
            self.barrier_changed.notify_all();
        }
    }
}

/// Below this many copies at a barrier, one thread fills them: threads cost more.
const COPIES_PER_FILLER: usize = 4096;

/// Fills a round's copies (`PendingCopies::take`) on up to `threads` threads, a share of
/// them each: at the barrier nothing else writes guest memory, and the decompression
/// workers whose CPUs these take wait for the next round.
fn fill_copies_on(memory: &dyn GuestMemory, copies: &[PendingCopy], threads: usize) -> Result<u64, ReceiveError> {
    let threads = threads.min(copies.len() / COPIES_PER_FILLER).max(1);
    if threads == 1 {
        return fill_copies(memory, copies);
    }
    std::thread::scope(|scope| {
        let fillers: Vec<_> = copies
            .chunks(copies.len().div_ceil(threads))
            .map(|share| scope.spawn(move || fill_copies(memory, share)))
            .collect();
        fillers.into_iter().try_fold(0, |filled, filler| {
            Ok(filled + filler.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?)
        })
    })
}

/// Receives one migration into `vm`. On success the guest runs on this side. On any
/// failure before resume, everything received is discarded (`vm.discard()`), the source
/// is told why when possible, and the error is returned.
pub fn receive(
    acceptor: &mut dyn Acceptor,
    vm: &mut dyn DestinationVm,
    config: &DestinationConfig,
) -> Result<DestinationReport, MigrationError> {
    let mut prepared = false;
    let result = receive_session(acceptor, vm, config, &mut prepared);
    match &result {
        // The source let go of the guest and it runs here: the only copy.
        Err(err @ MigrationError::FailedAfterResume(_)) => log::warn!("{err}"),
        Err(err) => {
            log::debug!(prepared; "the migration failed, discarding what was received: {err}");
            if prepared {
                vm.discard();
            }
        }
        Ok(_) => {}
    }
    result
}

/// After an error the destination tells the source why (an `Abort` on connection 0) before
/// its connections close: closing them at once would reset them, and the source would see
/// a closed connection instead of the reason. So the session's abort closes them only after
/// this grace, unless the session thread, its notice sent, closes them first; a thread
/// blocked on a connection waits that long at most.
const ABORT_NOTICE_GRACE: Duration = Duration::from_millis(300);
/// How long the session thread lets its `Abort` travel before closing the connections.
const ABORT_NOTICE_LINGER: Duration = Duration::from_millis(50);

/// The session abort's closer: all connections, `ABORT_NOTICE_GRACE` after the first raise.
fn close_later(closers: Arc<Vec<Arc<dyn Fn() + Send + Sync>>>) -> impl Fn() + Send + Sync {
    let armed = AtomicBool::new(false);
    move || {
        if armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let closers = closers.clone();
        let _ = std::thread::Builder::new().name("abort-close".into()).spawn(move || {
            std::thread::sleep(ABORT_NOTICE_GRACE);
            closers.iter().for_each(|close| close());
        });
    }
}

/// The compression device's queues for the decompression workers, one each, where the
/// session's codec may send `deflate` and a device is configured. A device that cannot be
/// opened leaves the pages to the CPU, with a warning: the destination needs none.
fn open_inflaters(config: &DestinationConfig, codec: Codec) -> Vec<Inflater> {
    let Some(device) = config.offload.as_ref().filter(|_| matches!(codec, Codec::Deflate | Codec::Adaptive)) else {
        return Vec::new();
    };
    match device.open(config.decompress_threads.max(1)) {
        Ok(queues) => queues.into_iter().map(Inflater).collect(),
        Err(reason) => {
            log::warn!("compression device {}: {reason}; deflate pages are inflated on the CPU", device.name());
            Vec::new()
        }
    }
}

fn receive_session(
    acceptor: &mut dyn Acceptor,
    vm: &mut dyn DestinationVm,
    config: &DestinationConfig,
    prepared: &mut bool,
) -> Result<DestinationReport, MigrationError> {
    let Greeted { hello, connections, memory, started } = accept_session(acceptor, vm, config, prepared)?;
    let region_pages: Vec<u64> = hello.region_bytes.iter().map(|&b| pages_of(b)).collect();
    // Shared with the polling cores' `Inbound`s too, which outlive this scope.
    let shared = Arc::new(Shared {
        abort: SessionAbort::new(),
        memory,
        epochs: PageEpochs::new(&region_pages),
        copies: PendingCopies::default(),
        copy_fillers: config.decompress_threads.max(1),
        region_pages,
        hello: hello.clone(),
        decode: Ring::new(DECODE_RING_CAPACITY),
        buffers: Pool::new(DECODE_RING_CAPACITY + usize::from(hello.connection_count) + config.decompress_threads),
        in_flight: AtomicU64::new(0),
        barrier: Mutex::new(BarrierState::default()),
        barrier_changed: Condvar::new(),
        device_state: Mutex::new(None),
        complete_seen: AtomicBool::new(false),
        finished: AtomicBool::new(false),
        counters: Mutex::new(ApplyCounters::default()),
        received_bytes: AtomicU64::new(0),
        rounds: AtomicU64::new(0),
    });
    let (events_tx, events) = mpsc::channel::<Event>();

    std::thread::scope(|scope| {
        let shared_arc = &shared;
        let shared: &Shared = &shared;
        let mut workers = Vec::new();
        let mut inflaters = open_inflaters(config, hello.codec).into_iter();
        for index in 0..config.decompress_threads.max(1) {
            let first_cpu = config.pin_workers.then_some(config.first_worker_cpu);
            let inflater = inflaters.next();
            let body = move || decompression_worker(shared, index, first_cpu, inflater);
            workers.push(shared.abort.spawn_guarded(scope, format!("decompress-{index}"), "decompression", body));
        }
        let mut control_writer = None;
        let mut closers: Vec<Arc<dyn Fn() + Send + Sync>> = Vec::new();
        for (index, connection) in connections.into_iter().enumerate() {
            let Connection { reader, writer, closer, direct_receive, .. } = connection;
            closers.push(Arc::from(closer));
            if index == 0 {
                control_writer = Some(writer);
            }
            let events_tx = events_tx.clone();
            match direct_receive {
                // The polling core delivers what arrives itself: no reader thread.
                Some(attach) if config.direct_receive => {
                    attach(reader, Box::new(FrameInbound::new(shared_arc.clone(), index as u16, events_tx)))
                }
                _ => {
                    let body = move || connection_reader(shared, index as u16, reader, events_tx);
                    shared.abort.spawn_guarded(scope, format!("conn-reader-{index}"), "connection reader", body);
                }
            }
        }
        drop(events_tx);
        let closers = Arc::new(closers);
        let close_now = {
            let closers = closers.clone();
            move || closers.iter().for_each(|close| close())
        };
        shared.abort.on_raise(Box::new(close_later(closers)));
        // One session at a time: whoever else connects meanwhile is told so and let go.
        std::thread::Builder::new()
            .name("doorman".into())
            .spawn_scoped(scope, move || turn_away(acceptor, shared))
            .expect("spawn doorman");
        let mut control = control_writer.expect("connection 0 exists");
        let controls = config.controls.clone();
        let mut session = Session::new(shared, &events, &mut *control, &mut workers, config.accept_timeout, controls);
        let result = session.run(vm, config, started);
        if let Err(err) = &result {
            // Tell the source why, then stop everything.
            let reason = err.to_string();
            // In the control stream's sequence, or the source would refuse it as out of order.
            let told = session.send(FrameKind::Abort, &encode_reason(&reason));
            shared.abort.raise(reason);
            if told.is_ok() {
                // Let the notice land before the connections close under it.
                std::thread::sleep(ABORT_NOTICE_LINGER);
            }
        }
        shared.finished.store(true, Ordering::Release);
        stop_workers(shared, &mut workers);
        close_now();
        result
    })
}

fn stop_workers(shared: &Shared, workers: &mut Vec<std::thread::ScopedJoinHandle<'_, ()>>) {
    for _ in 0..workers.len() {
        if shared.decode.push(None, &shared.abort).is_err() {
            break;
        }
    }
    for worker in workers.drain(..) {
        let _ = worker.join();
    }
}
