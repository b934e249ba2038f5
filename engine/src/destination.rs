//! The destination engine: accepts the source's connections, applies pages with pinned
//! decompression workers, and resumes the guest only once every round is applied, the
//! device state is in and the source has let go.
//!
//! ```text
//! byte pipe --> connection reader --(page batches)--> decode ring --> decompression
//!               (checks frames, holds at RoundEnd)                   workers -> memory
//!               connection 0 reader --(Complete, Commit, VerifyDigest)--> session thread
//! ```
//! Every connection stops at each `RoundEnd` until all connections have reached it and
//! every batch of that round is applied: a page of round k can never land after the same
//! page of round k+1, and a delta always finds the version it was made from (the page
//! epoch table checks both).

use crate::config::DestinationConfig;
use crate::error::{LimitExceeded, ProtocolViolation};
use crate::verify::memory_digest;
use crate::vm::DestinationVm;
use crate::MigrationError;
use migration::control::Control;
use migration::destination_session::{DestinationAction, DestinationSession};
use migration::frame::{FrameKind, SeqCounter, MAX_PAYLOAD_BYTES};
use migration::handshake::{accept_preamble, decode_reason, encode_reason, Hello, HelloAck, PREAMBLE_BYTES};
use migration::memory::{pages_of, GuestMemory};
use migration::page_batch::{BatchLimits, MAX_BATCH_BYTES};
use migration::receiver::{ApplyCounters, ApplyWorker, BatchApplier, ConnectionInbound, Inbound, PageEpochs};
use serde::Serialize;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use transport::abort::SessionAbort;
use transport::framed::{read_frame, write_frame, ReadError, CONTROL_FRAME_LIMIT_BYTES};
use transport::pin;
use transport::pipe::{Acceptor, Connection};
use transport::ring::{Pool, Ring};

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
        BatchLimits { region_pages: &self.region_pages, codec: self.hello.codec, xbzrle: self.hello.xbzrle }
    }

    fn failure(&self) -> MigrationError {
        MigrationError::Aborted(self.abort.reason().unwrap_or_else(|| "aborted".into()))
    }

    /// The round barrier: returns once every connection has ended the round and every
    /// batch of it is applied; `Ok(true)` for the caller that completed it.
    fn end_round(&self) -> Result<bool, MigrationError> {
        let connections = usize::from(self.hello.connection_count);
        let mut state = self.barrier.lock().unwrap_or_else(|p| p.into_inner());
        let generation = state.generation;
        state.arrived += 1;
        if state.arrived == connections {
            while self.in_flight.load(Ordering::Acquire) > 0 {
                if self.abort.is_raised() {
                    return Err(self.failure());
                }
                state = self
                    .barrier_changed
                    .wait_timeout(state, Duration::from_millis(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            state.arrived = 0;
            state.generation += 1;
            self.rounds.fetch_add(1, Ordering::Relaxed);
            self.barrier_changed.notify_all();
            return Ok(true);
        }
        while state.generation == generation {
            if self.abort.is_raised() {
                return Err(self.failure());
            }
            state =
                self.barrier_changed.wait_timeout(state, Duration::from_millis(1)).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(false)
    }

    fn batch_applied(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _state = self.barrier.lock().unwrap_or_else(|p| p.into_inner());
            self.barrier_changed.notify_all();
        }
    }
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

/// Why a connection from another source is refused while a session runs.
const BUSY: &str = "another migration session is in progress on this destination";
/// How often the doorman looks up from the listener to see whether the session ended.
const DOORMAN_POLL: Duration = Duration::from_millis(100);

/// Refuses every connection that arrives while the session runs. The refusal goes out at
/// once (the source reads it after its hello); the connection is then drained on a thread
/// of its own until the source hangs up, so that closing it with its hello unread does not
/// reset it before the refusal is read, and a silent stranger holds up nobody.
fn turn_away(acceptor: &mut dyn Acceptor, shared: &Shared) {
    while !shared.finished.load(Ordering::Acquire) && !shared.abort.is_raised() {
        if let Ok(mut connection) = acceptor.accept(DOORMAN_POLL) {
            refuse(&mut connection, BUSY);
            let _ = std::thread::Builder::new().name("turned-away".into()).spawn(move || {
                let mut sink = [0u8; 4096];
                while matches!(connection.reader.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    }
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

fn refuse(connection: &mut Connection, reason: &str) {
    let _ = write_frame(
        &mut *connection.writer,
        FrameKind::HelloAck,
        0,
        &mut SeqCounter::default(),
        &HelloAck::Refused { reason: reason.into() }.encode(),
    );
}

/// Reads a connection's preamble and Hello; returns the Hello and the protocol version
/// both ends speak.
fn read_hello(connection: &mut Connection) -> Result<(Hello, u16), MigrationError> {
    let mut preamble = [0u8; PREAMBLE_BYTES];
    connection
        .reader
        .read_exact(&mut preamble)
        .map_err(|e| ProtocolViolation::BadGreeting(format!("no preamble from {}: {e}", connection.peer)))?;
    let version = accept_preamble(&preamble).map_err(|err| {
        refuse(connection, &err.to_string());
        MigrationError::from(err)
    })?;
    let mut payload = Vec::new();
    let header = read_frame(&mut *connection.reader, &mut payload, |_| CONTROL_FRAME_LIMIT_BYTES)
        .map_err(|e| ProtocolViolation::BadGreeting(format!("bad Hello from {}: {e}", connection.peer)))?;
    if header.kind != FrameKind::Hello || header.seq != 0 {
        let reason = format!("expected Hello, got {:?} (seq {})", header.kind, header.seq);
        refuse(connection, &reason);
        return Err(ProtocolViolation::BadGreeting(reason).into());
    }
    let hello = Hello::decode(&payload).map_err(|err| {
        refuse(connection, &err.to_string());
        MigrationError::from(err)
    })?;
    Ok((hello, version))
}

fn accept_ack(connection: &mut Connection, version: u16) -> Result<(), MigrationError> {
    write_frame(
        &mut *connection.writer,
        FrameKind::HelloAck,
        0,
        &mut SeqCounter::default(),
        &HelloAck::Accepted { version }.encode(),
    )
    .map_err(|source| MigrationError::Io { connection: 0, source })
}

fn receive_session(
    acceptor: &mut dyn Acceptor,
    vm: &mut dyn DestinationVm,
    config: &DestinationConfig,
    prepared: &mut bool,
) -> Result<DestinationReport, MigrationError> {
    let accept = |acceptor: &mut dyn Acceptor| {
        acceptor.accept(config.accept_timeout).map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => MigrationError::TimedOut {
                waiting_for: format!("a connection from the source on {}", acceptor.local_addr()),
                after: config.accept_timeout,
            },
            _ => MigrationError::Io { connection: 0, source: e },
        })
    };
    let mut first = accept(acceptor)?;
    let (hello, version) = read_hello(&mut first)?;
    let started = Instant::now();
    if hello.connection_index != 0 {
        let err = ProtocolViolation::FirstConnectionNotZero { index: hello.connection_index };
        refuse(&mut first, &err.to_string());
        return Err(err.into());
    }
    if hello.total_bytes() > config.max_memory_bytes {
        let err = LimitExceeded::GuestTooLarge { bytes: hello.total_bytes(), limit: config.max_memory_bytes };
        refuse(&mut first, &err.to_string());
        return Err(err.into());
    }
    let memory = match vm.prepare(&hello.region_bytes) {
        Ok(memory) => memory,
        Err(err) => {
            refuse(&mut first, &err.to_string());
            return Err(err.into());
        }
    };
    *prepared = true;
    accept_ack(&mut first, version)?;
    let mut connections: Vec<Option<Connection>> = (0..hello.connection_count).map(|_| None).collect();
    connections[0] = Some(first);
    let mut missing = usize::from(hello.connection_count) - 1;
    while missing > 0 {
        let mut connection = accept(acceptor)?;
        let (other, version) = match read_hello(&mut connection) {
            Ok(answer) => answer,
            // A stranger (or a broken peer) does not end the session being set up.
            Err(_) => continue,
        };
        if other.session_id != hello.session_id {
            refuse(&mut connection, BUSY);
            continue;
        }
        let index = usize::from(other.connection_index);
        if !other.same_session(&hello) || connections[index].is_some() {
            let err =
                ProtocolViolation::ForeignConnection { index: other.connection_index, session_id: hello.session_id };
            refuse(&mut connection, &err.to_string());
            return Err(err.into());
        }
        accept_ack(&mut connection, version)?;
        connections[index] = Some(connection);
        missing -= 1;
    }
    let connections: Vec<Connection> = connections.into_iter().map(|c| c.expect("every index accepted")).collect();

    let region_pages: Vec<u64> = hello.region_bytes.iter().map(|&b| pages_of(b)).collect();
    let shared = Shared {
        abort: SessionAbort::new(),
        memory,
        epochs: PageEpochs::new(&region_pages),
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
    };
    let (events_tx, events) = mpsc::channel::<Event>();

    std::thread::scope(|scope| {
        let shared = &shared;
        let mut workers = Vec::new();
        for index in 0..config.decompress_threads.max(1) {
            let first_cpu = config.pin_workers.then_some(config.first_worker_cpu);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("decompress-{index}"))
                    .spawn_scoped(scope, move || {
                        shared.abort.guard("decompression", || decompression_worker(shared, index, first_cpu))
                    })
                    .expect("spawn decompression worker"),
            );
        }
        let mut control_writer = None;
        let mut closers: Vec<Arc<dyn Fn() + Send + Sync>> = Vec::new();
        for (index, connection) in connections.into_iter().enumerate() {
            let Connection { reader, writer, closer, .. } = connection;
            closers.push(Arc::from(closer));
            if index == 0 {
                control_writer = Some(writer);
            }
            let events_tx = events_tx.clone();
            std::thread::Builder::new()
                .name(format!("conn-reader-{index}"))
                .spawn_scoped(scope, move || {
                    shared
                        .abort
                        .guard("connection reader", || connection_reader(shared, index as u16, reader, events_tx))
                })
                .expect("spawn connection reader");
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
        let mut session = Session {
            shared,
            events: &events,
            control: &mut *control,
            seq: SeqCounter::default(),
            workers: &mut workers,
            machine: DestinationSession::new(config.accept_timeout),
            clock: Instant::now(),
        };
        session.seq.take(); // HelloAck
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

/// What the connection readers tell the session thread, in the order connection 0's
/// frames arrived.
enum Event {
    /// Every connection ended this round and all its pages are applied.
    RoundApplied(u32),
    /// The device state arrived (the reader keeps it in `Shared::device_state`).
    DeviceState,
    /// A control frame from the source, to be parsed by the session.
    Control(FrameKind, Vec<u8>),
}

/// The session thread: drives `migration::destination_session` with what the readers
/// report and does what it asks, on connection 0 and with the VM.
struct Session<'s, 'scope> {
    shared: &'s Shared,
    events: &'s mpsc::Receiver<Event>,
    control: &'s mut (dyn Write + Send),
    seq: SeqCounter,
    workers: &'s mut Vec<std::thread::ScopedJoinHandle<'scope, ()>>,
    machine: DestinationSession,
    clock: Instant,
}

impl Session<'_, '_> {
    fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), MigrationError> {
        write_frame(&mut *self.control, kind, 0, &mut self.seq, payload)
            .map_err(|source| MigrationError::Io { connection: 0, source })
    }

    /// Runs the completion exchange; once the guest was resumed here, a failure comes
    /// back as `FailedAfterResume` (the guest runs on and must be kept).
    fn run(
        &mut self,
        vm: &mut dyn DestinationVm,
        config: &DestinationConfig,
        started: Instant,
    ) -> Result<DestinationReport, MigrationError> {
        let mut verify_time = None;
        let result = self.exchange(vm, config, &mut verify_time);
        let verified = match result {
            Ok(verified) => verified,
            Err(err) if self.machine.guest_resumed() => return Err(MigrationError::FailedAfterResume(Box::new(err))),
            Err(err) => return Err(err),
        };
        let counters = *self.shared.counters.lock().unwrap_or_else(|p| p.into_inner());
        Ok(DestinationReport {
            session_id: self.shared.hello.session_id,
            connections: self.shared.hello.connection_count,
            ram_total: self.shared.hello.total_bytes(),
            received_bytes: self.shared.received_bytes.load(Ordering::Relaxed),
            rounds: self.shared.rounds.load(Ordering::Relaxed) as u32,
            zero_pages: counters.zero_pages,
            raw_pages: counters.raw_pages,
            compressed_pages: counters.compressed_pages,
            xbzrle_pages: counters.xbzrle_pages,
            total_time_ms: started.elapsed().saturating_sub(verify_time.unwrap_or_default()).as_millis() as u64,
            verify_time_ms: verify_time.map(|t| t.as_millis() as u64),
            verified,
            cpu_seconds: None,
        })
    }

    /// Feeds the machine until it finishes; returns the digests' verdict, if asked for.
    fn exchange(
        &mut self,
        vm: &mut dyn DestinationVm,
        config: &DestinationConfig,
        verify_time: &mut Option<Duration>,
    ) -> Result<Option<bool>, MigrationError> {
        loop {
            while let Some(action) = self.machine.poll_action() {
                match action {
                    DestinationAction::Send(message) => self.send(message.kind(), &message.payload())?,
                    DestinationAction::HashMemory => {
                        let start = Instant::now();
                        let digest = memory_digest(&*self.shared.memory, pin::core_count());
                        *verify_time = Some(start.elapsed());
                        self.machine.handle_digest(digest);
                    }
                    DestinationAction::ResumeGuest => {
                        if !config.deferred_cleanup {
                            stop_workers(self.shared, self.workers);
                        }
                        let device_state = self.shared.device_state.lock().unwrap_or_else(|p| p.into_inner()).take();
                        // The machine asks for a resume only once the device state came.
                        vm.resume(&device_state.unwrap_or_default())?;
                        let verify_ms = verify_time.map_or(0, |t| t.as_millis() as u64);
                        self.machine.handle_guest_resumed(verify_ms, self.clock.elapsed());
                    }
                    DestinationAction::Finish { verified } => return Ok(verified),
                }
            }
            self.next_event()?;
        }
    }

    /// Waits for the readers' next event (or the machine's deadline) and feeds it.
    fn next_event(&mut self) -> Result<(), MigrationError> {
        if self.shared.abort.is_raised() {
            return Err(self.shared.failure());
        }
        let now = self.clock.elapsed();
        match self.events.recv_timeout(Duration::from_millis(20)) {
            Ok(Event::RoundApplied(epoch)) => self.machine.handle_round_applied(epoch),
            Ok(Event::DeviceState) => self.machine.handle_device_state()?,
            Ok(Event::Control(kind, payload)) => {
                let message = Control::parse(kind, &payload).map_err(ProtocolViolation::from)?;
                self.machine.handle_control(message, now)?;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => self.machine.handle_timeout(now)?,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The readers raise the abort with their reason before they end.
                std::thread::sleep(Duration::from_millis(5));
                return Err(if self.shared.abort.is_raised() {
                    self.shared.failure()
                } else {
                    MigrationError::Io {
                        connection: 0,
                        source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the source went away"),
                    }
                });
            }
        }
        Ok(())
    }
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

fn frame_limit(kind: FrameKind) -> u32 {
    match kind {
        FrameKind::Pages => MAX_BATCH_BYTES as u32,
        FrameKind::DeviceState => MAX_PAYLOAD_BYTES,
        _ => CONTROL_FRAME_LIMIT_BYTES,
    }
}

fn connection_reader(shared: &Shared, index: u16, mut reader: Box<dyn Read + Send>, events: mpsc::Sender<Event>) {
    let mut inbound = ConnectionInbound::new(index, 1);
    let fail = |reason: String| shared.abort.raise(format!("connection {index}: {reason}"));
    loop {
        let mut buffer = shared.buffers.take(|| Vec::with_capacity(MAX_BATCH_BYTES));
        let header = match read_frame(&mut *reader, &mut buffer, frame_limit) {
            Ok(header) => header,
            Err(ReadError::Closed)
                if shared.finished.load(Ordering::Acquire)
                    || (index != 0 && shared.complete_seen.load(Ordering::Acquire)) =>
            {
                return
            }
            Err(_) if shared.finished.load(Ordering::Acquire) || shared.abort.is_raised() => return,
            Err(err) => return fail(err.to_string()),
        };
        shared.received_bytes.fetch_add((migration::frame::HEADER_BYTES + buffer.len()) as u64, Ordering::Relaxed);
        let event = match inbound.on_frame(&header, &buffer) {
            Ok(event) => event,
            Err(err) => return fail(err.to_string()),
        };
        match event {
            Inbound::Pages => {
                shared.in_flight.fetch_add(1, Ordering::AcqRel);
                if shared.decode.push(Some((header.epoch, buffer)), &shared.abort).is_err() {
                    return;
                }
                continue;
            }
            Inbound::RoundEnd { epoch } => match shared.end_round() {
                Ok(true) => {
                    let _ = events.send(Event::RoundApplied(epoch));
                }
                Ok(false) => {}
                Err(_) => return,
            },
            Inbound::DeviceState => {
                *shared.device_state.lock().unwrap_or_else(|p| p.into_inner()) = Some(buffer.clone());
                let _ = events.send(Event::DeviceState);
            }
            Inbound::Complete { .. } => {
                shared.complete_seen.store(true, Ordering::Release);
                let _ = events.send(Event::Control(FrameKind::Complete, buffer.clone()));
            }
            Inbound::Commit => {
                let _ = events.send(Event::Control(FrameKind::Commit, buffer.clone()));
            }
            Inbound::VerifyDigest => {
                let _ = events.send(Event::Control(FrameKind::VerifyDigest, buffer.clone()));
            }
            Inbound::Abort => return fail(format!("the source aborted: {}", decode_reason(&buffer))),
        }
        shared.buffers.give(buffer);
    }
}

/// Pinned to `first_cpu + index` when pinning (`DestinationConfig::first_worker_cpu`).
fn decompression_worker(shared: &Shared, index: usize, first_cpu: Option<usize>) {
    if let Some(first) = first_cpu {
        pin::pin_current(first + index);
    }
    let applier = BatchApplier { limits: shared.limits(), memory: &*shared.memory, epochs: &shared.epochs };
    let mut worker = ApplyWorker::new();
    while let Ok(Some((epoch, buffer))) = shared.decode.pop(&shared.abort) {
        if let Err(err) = applier.apply(&buffer, epoch, &mut worker) {
            shared.abort.raise(format!("round {epoch}: {err}"));
        }
        // Counted before the batch is reported applied, so the totals are complete when
        // the round barrier opens.
        shared.counters.lock().unwrap_or_else(|p| p.into_inner()).merge(&std::mem::take(&mut worker.counters));
        shared.buffers.give(buffer);
        shared.batch_applied();
    }
}
