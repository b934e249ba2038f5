//! The session thread: drives `migration::destination_session` with what the readers
//! report and does what it asks, on connection 0 and with the VM.

use crate::config::DestinationConfig;
use crate::error::ProtocolViolation;
use crate::verify::memory_digest;
use crate::vm::DestinationVm;
use crate::MigrationError;
use migration::control::Control;
use migration::destination_session::{DestinationAction, DestinationSession};
use migration::frame::{FrameKind, SeqCounter};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use transport::framed::write_frame;
use transport::pin;

use super::{stop_workers, DestinationControls, DestinationProgress, DestinationReport, Shared, WATCH_EVERY};

/// How often the session thread looks for an abort while it waits for events.
const ABORT_POLL: Duration = Duration::from_millis(20);

/// What the connection readers tell the session thread, in the order connection 0's
/// frames arrived.
pub(super) enum Event {
    /// Every connection ended this round and all its pages are applied.
    RoundApplied(u32),
    /// The device state arrived (the reader keeps it in `Shared::device_state`).
    DeviceState,
    /// A control frame from the source, to be parsed by the session.
    Control(FrameKind, Vec<u8>),
}

/// The session thread: drives `migration::destination_session` with what the readers
/// report and does what it asks, on connection 0 and with the VM.
pub(super) struct Session<'s, 'scope> {
    shared: &'s Shared,
    events: &'s mpsc::Receiver<Event>,
    control: &'s mut (dyn Write + Send),
    seq: SeqCounter,
    workers: &'s mut Vec<std::thread::ScopedJoinHandle<'scope, ()>>,
    machine: DestinationSession,
    clock: Instant,
    /// The caller's hold on the migration, and when it was last looked at.
    controls: Option<DestinationControls>,
    watched: Option<Instant>,
}

impl<'s, 'scope> Session<'s, 'scope> {
    /// `wait_timeout` bounds each wait for the source in the completion exchange.
    pub(super) fn new(
        shared: &'s Shared,
        events: &'s mpsc::Receiver<Event>,
        control: &'s mut (dyn Write + Send),
        workers: &'s mut Vec<std::thread::ScopedJoinHandle<'scope, ()>>,
        wait_timeout: Duration,
        controls: Option<DestinationControls>,
    ) -> Self {
        let mut seq = SeqCounter::default();
        seq.take(); // the HelloAck
        Session {
            shared,
            events,
            control,
            seq,
            workers,
            machine: DestinationSession::new(wait_timeout, Duration::ZERO),
            clock: Instant::now(),
            controls,
            watched: None,
        }
    }

    pub(super) fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), MigrationError> {
        write_frame(&mut *self.control, kind, 0, &mut self.seq, payload)
            .map_err(|source| MigrationError::Io { connection: 0, source })
    }

    /// Runs the completion exchange; once the guest was resumed here, a failure comes
    /// back as `FailedAfterResume` (the guest runs on and must be kept).
    pub(super) fn run(
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
            copied_pages: counters.copied_pages,
            device_inflated_pages: counters.device_pages,
            device_fallback_pages: counters.device_fallback_pages,
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
                    DestinationAction::Send(message) => {
                        // The machine's last answer (it is done): the source may close its
                        // connections the moment it has it, which then ends nothing.
                        if self.machine.is_done() {
                            self.shared.finished.store(true, Ordering::Release);
                        }
                        self.send(message.kind(), &message.payload())?
                    }
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

    /// Waits for the readers' next event (or the machine's next timeout) and feeds it.
    fn next_event(&mut self) -> Result<(), MigrationError> {
        if self.shared.abort.is_raised() {
            return Err(self.shared.failure());
        }
        let wait = match self.machine.poll_timeout() {
            Some(due) => due.saturating_sub(self.clock.elapsed()).min(ABORT_POLL),
            None => ABORT_POLL,
        };
        let event = self.events.recv_timeout(wait);
        let now = self.clock.elapsed();
        match event {
            Ok(Event::RoundApplied(epoch)) => self.machine.handle_round_applied(epoch, now),
            Ok(Event::DeviceState) => self.machine.handle_device_state()?,
            Ok(Event::Control(kind, payload)) => {
                let message = Control::parse(kind, &payload).map_err(ProtocolViolation::from)?;
                self.machine.handle_control(message, now)?;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
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
        self.watch(now)?;
        // Deadlines and heartbeats, whatever woke us: a steady stream of events must not
        // hold a heartbeat back.
        Ok(self.machine.handle_timeout(now)?)
    }

    /// Every [`WATCH_EVERY`]: tells the caller how the migration stands, and does what it
    /// asked meanwhile (a cancel, changes for the source).
    fn watch(&mut self, now: Duration) -> Result<(), MigrationError> {
        let Some(controls) = &self.controls else { return Ok(()) };
        if self.watched.is_some_and(|at| at.elapsed() < WATCH_EVERY) {
            return Ok(());
        }
        self.watched = Some(Instant::now());
        if let Some(progress) = &controls.progress {
            progress(&DestinationProgress {
                ram_total: self.shared.hello.total_bytes(),
                received_bytes: self.shared.received_bytes.load(Ordering::Relaxed),
                rounds: self.shared.rounds.load(Ordering::Relaxed) as u32,
                elapsed: self.clock.elapsed(),
            });
        }
        if controls.cancel.is_cancelled() {
            if self.machine.may_cancel() {
                return Err(MigrationError::Cancelled(controls.cancel.reason()));
            }
            log::warn!("too late to cancel: the source may have let go of the guest already");
            if let Some(controls) = self.controls.as_mut() {
                // Said once: the caller's later cancels no longer reach this session.
                controls.cancel = Default::default();
            }
            return Ok(());
        }
        let tune = controls.take_tune();
        if !tune.is_empty() && !self.machine.request_tune(tune, now) {
            log::warn!("too late to change the migration ({tune:?}): pre-copy is over");
        }
        Ok(())
    }
}
