//! The two session state machines against each other, on a virtual clock, with no
//! threads, sockets or sleeps: every phase, a cancel in every phase, an abort from either
//! side, every wait's timeout, and a destination that lies.
//!
//! The harness plays the engines' part: it does what each machine asks (rounds sent and
//! applied at once, the guest paused, memory hashed, the guest resumed) and carries their
//! control messages across, with hooks to cancel, drop, inject or stall at any point.

use std::time::Duration;
use vmigrate_migration::control::Control;
use vmigrate_migration::destination_session::{DestinationAction, DestinationFailure, DestinationSession};
use vmigrate_migration::frame::{FrameHeader, FrameKind};
use vmigrate_migration::precopy::{LimitAction, PrecopyConfig, RoundReport};
use vmigrate_migration::source_session::{
    AnswerError, SourceAction, SourceFailure, SourceOutcome, SourceSession, Stage,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const DIGEST: u128 = 0x5eed;
/// A round of this many pages takes 10 ms on the harness's link (1 GB/s).
const PAGES_PER_10_MS: u64 = 2_441;

/// Where the harness is, for hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// Round `n` (1 = bulk) was just sent.
    RoundSent(u32),
    /// The source was told to stop and copy (the guest is paused).
    Stopping,
    /// A message is about to reach the destination / the source.
    ToDestination(FrameKind),
    ToSource(FrameKind),
    /// The destination resumed its guest.
    DestinationResumed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Nothing,
    CancelSource,
    /// The message is lost (or the peer stalls): nothing more happens until a timeout.
    Drop,
    /// The destination fails (its VM refuses, say) and tells the source why.
    AbortDestination,
}

struct Harness {
    source: SourceSession,
    destination: DestinationSession,
    now: Duration,
    /// Dirty pages each round leaves (the last value repeats).
    dirty: Vec<u64>,
    rounds: Vec<(u32, Stage)>,
    throttle: Vec<u8>,
    paused: bool,
    destination_running: bool,
    to_destination: Vec<Control>,
    to_source: Vec<Control>,
    /// Frames from the destination so far (the HelloAck was number 0).
    destination_seq: u64,
    source_result: Option<Result<SourceOutcome, SourceFailure>>,
    destination_result: Option<Result<Option<bool>, DestinationFailure>>,
    /// Every message carried, but heartbeats (counted apart).
    wire: Vec<FrameKind>,
    heartbeats: usize,
    hook: Box<dyn FnMut(Point) -> Hook>,
    stalled: bool,
}

impl Harness {
    fn new(verify: bool, precopy: PrecopyConfig, dirty: &[u64]) -> Harness {
        Harness {
            source: SourceSession::new(precopy, verify, TIMEOUT, Duration::ZERO),
            destination: DestinationSession::new(TIMEOUT, Duration::ZERO),
            now: Duration::ZERO,
            dirty: dirty.to_vec(),
            rounds: Vec::new(),
            throttle: Vec::new(),
            paused: false,
            destination_running: false,
            to_destination: Vec::new(),
            to_source: Vec::new(),
            destination_seq: 0,
            source_result: None,
            destination_result: None,
            wire: Vec::new(),
            heartbeats: 0,
            hook: Box::new(|_| Hook::Nothing),
            stalled: false,
        }
    }

    /// Does `hook` when the harness reaches `point`, and nothing anywhere else.
    fn at(mut self, point: Point, hook: Hook) -> Harness {
        self.hook = Box::new(move |reached| if reached == point { hook } else { Hook::Nothing });
        self
    }

    fn source_failed(&mut self, failure: SourceFailure) {
        if self.source_result.is_none() {
            self.source_result = Some(Err(failure.clone()));
            // The engine tells the destination why, and resumes its own guest.
            self.to_destination.push(Control::Abort { reason: failure.to_string() });
            self.paused = false;
        }
    }

    fn destination_failed(&mut self, failure: DestinationFailure) {
        if self.destination_result.is_none() {
            self.destination_result = Some(Err(failure.clone()));
            self.to_source.push(Control::Abort { reason: failure.to_string() });
        }
    }

    fn hook(&mut self, point: Point) -> Hook {
        let hook = (self.hook)(point);
        match hook {
            Hook::CancelSource => match self.source.handle_cancel("test") {
                Ok(_) => {}
                Err(failure) => self.source_failed(failure),
            },
            Hook::AbortDestination => {
                self.destination_failed(DestinationFailure::SourceAborted { reason: "test".into() })
            }
            // A round's RoundApplied alone is lost; a message lost stalls its sender's peer.
            Hook::Drop if matches!(point, Point::RoundSent(_)) => {}
            Hook::Drop => self.stalled = true,
            Hook::Nothing => {}
        }
        hook
    }

    fn report(&self, epoch: u32) -> RoundReport {
        let dirty = self.dirty[(epoch as usize - 1).min(self.dirty.len() - 1)];
        RoundReport {
            duration: Duration::from_millis(10),
            bytes_sent: PAGES_PER_10_MS * 4096,
            pages_sent: PAGES_PER_10_MS,
            bytes_encoded: PAGES_PER_10_MS * 4096,
            dirty_pages: dirty,
            backlog_bytes: 0,
        }
    }

    /// One pass over both machines; false once neither had anything to do.
    fn step(&mut self) -> bool {
        let mut busy = false;
        while let Some(action) = self.source.poll_action() {
            busy = true;
            self.now += Duration::from_millis(10);
            match action {
                SourceAction::SendRound { epoch, stage } => {
                    self.rounds.push((epoch, stage));
                    let report = self.report(epoch);
                    let hook = self.hook(Point::RoundSent(epoch));
                    if let Err(failure) = self.source.handle_round_sent(report, self.now) {
                        self.source_failed(failure);
                    }
                    if hook != Hook::Drop && self.destination_result.is_none() {
                        self.destination.handle_round_applied(epoch, self.now);
                    }
                }
                SourceAction::SetThrottle { pct } => self.throttle.push(pct),
                SourceAction::StopAndCopy { epoch: _ } => {
                    self.paused = true;
                    self.hook(Point::Stopping);
                    if self.source_result.is_none() {
                        if let Err(failure) = self.destination.handle_device_state() {
                            self.destination_failed(failure);
                        }
                        self.source.handle_final_round_sent(self.now);
                    }
                }
                SourceAction::Send(message) => self.to_destination.push(message),
                SourceAction::HashMemory => self.source.handle_digest(DIGEST, self.now),
                SourceAction::Finish(outcome) => self.source_result = Some(Ok(outcome)),
            }
        }
        for message in std::mem::take(&mut self.to_destination) {
            busy = true;
            if self.stalled || self.destination_result.is_some() {
                continue;
            }
            self.wire.push(message.kind());
            if self.hook(Point::ToDestination(message.kind())) == Hook::Drop || self.destination_result.is_some() {
                continue;
            }
            if let Err(failure) = self.destination.handle_control(message, self.now) {
                self.destination_failed(failure);
            }
        }
        while let Some(action) = self.destination.poll_action() {
            busy = true;
            match action {
                DestinationAction::Send(message) => self.to_source.push(message),
                DestinationAction::HashMemory => self.destination.handle_digest(DIGEST),
                DestinationAction::ResumeGuest => {
                    self.destination_running = true;
                    self.destination.handle_guest_resumed(3, self.now);
                    self.hook(Point::DestinationResumed);
                }
                DestinationAction::Finish { verified } => self.destination_result = Some(Ok(verified)),
            }
        }
        for message in std::mem::take(&mut self.to_source) {
            busy = true;
            if self.stalled && !matches!(message, Control::Abort { .. }) {
                continue;
            }
            if message == Control::Heartbeat {
                self.heartbeats += 1;
            } else {
                self.wire.push(message.kind());
            }
            if self.hook(Point::ToSource(message.kind())) == Hook::Drop {
                continue;
            }
            self.deliver_to_source(message);
        }
        busy
    }

    /// A frame from the destination, with the next sequence number.
    fn deliver_to_source(&mut self, message: Control) {
        if self.source_result.is_some() {
            return;
        }
        self.destination_seq += 1;
        let header = FrameHeader { kind: message.kind(), epoch: 0, seq: self.destination_seq, length: 0, crc: 0 };
        if let Err(failure) = self.source.handle_answer(&header, &message.payload(), self.now) {
            self.source_failed(failure);
        }
    }

    /// Runs until both sides are idle; then lets time pass, a second at a time, until
    /// each side has finished, failed or given up waiting.
    fn run(mut self) -> Harness {
        let mut source_ended = None;
        for _ in 0..10_000 {
            while self.step() {}
            if self.source_result.is_some() && self.destination_result.is_some() {
                break;
            }
            self.now += Duration::from_secs(1);
            if self.source_result.is_none() {
                if let Err(failure) = self.source.handle_timeout(self.now) {
                    self.source_failed(failure);
                }
            }
            if self.destination_result.is_none() {
                if let Err(failure) = self.destination.handle_timeout(self.now) {
                    self.destination_failed(failure);
                }
            }
            // A destination waiting for rounds has no deadline of its own (the
            // connections' timeouts end it): once any deadline of its own would have
            // passed, the finished source has closed them.
            if self.source_result.is_some() && self.now > *source_ended.get_or_insert(self.now) + TIMEOUT {
                while self.step() {}
                break;
            }
        }
        self
    }
}

/// Converges after two iterative rounds (a 300 ms limit at 1 GB/s: under ~73k pages).
fn converging() -> Harness {
    Harness::new(false, PrecopyConfig::default(), &[500_000, 200_000, 1_000])
}

fn completed(harness: &Harness) {
    assert!(
        matches!(harness.source_result, Some(Ok(_))),
        "source: {:?}, destination: {:?}",
        harness.source_result,
        harness.destination_result
    );
    assert!(matches!(harness.destination_result, Some(Ok(_))), "destination: {:?}", harness.destination_result);
    assert!(harness.paused, "the source guest stays paused: it is the destination's");
    assert!(harness.destination_running, "the guest runs on the destination");
}

/// Failed before commit: the source guest runs on, the destination never started one.
fn failed_before_commit(harness: &Harness) {
    assert!(matches!(harness.source_result, Some(Err(_))), "source: {:?}", harness.source_result);
    assert!(!harness.paused, "the source guest runs on");
    assert!(!harness.destination_running, "the destination started a guest");
    assert!(!harness.wire.contains(&FrameKind::Commit), "{:?}", harness.wire);
}

#[test]
fn every_phase_in_order_without_verify() {
    let harness = converging().run();
    completed(&harness);
    assert_eq!(harness.rounds, [(1, Stage::Bulk), (2, Stage::Iterative), (3, Stage::Iterative)]);
    assert_eq!(harness.source_result, Some(Ok(SourceOutcome { verified: None, destination_verify_ms: 3 })));
    assert_eq!(harness.destination_result, Some(Ok(None)));
    let control: Vec<_> = harness.wire.iter().filter(|k| **k != FrameKind::RoundApplied).copied().collect();
    assert_eq!(control, [FrameKind::Complete, FrameKind::Ready, FrameKind::Commit, FrameKind::Resumed]);
}

#[test]
fn every_phase_in_order_with_verify() {
    let harness = Harness::new(true, PrecopyConfig::default(), &[1_000]).run();
    completed(&harness);
    assert_eq!(harness.source_result, Some(Ok(SourceOutcome { verified: Some(true), destination_verify_ms: 3 })));
    assert_eq!(harness.destination_result, Some(Ok(Some(true))));
    let control: Vec<_> = harness.wire.iter().filter(|k| **k != FrameKind::RoundApplied).copied().collect();
    assert_eq!(
        control,
        [
            FrameKind::Complete,
            FrameKind::Ready,
            FrameKind::Commit,
            FrameKind::Resumed,
            FrameKind::VerifyDigest,
            FrameKind::VerifyResult
        ]
    );
}

#[test]
fn stop_and_copy_waits_until_the_last_round_is_applied() {
    // The destination's RoundApplied for the last round (3) is lost: the source must not
    // stop the guest, and gives up after its answer timeout with the guest running.
    let harness = converging().at(Point::RoundSent(3), Hook::Drop);
    let harness = harness.run();
    assert_eq!(
        harness.source_result,
        Some(Err(SourceFailure::RoundNotApplied { epoch: 3, timeout: TIMEOUT })),
        "{:?}",
        harness.wire
    );
    failed_before_commit(&harness);
    // The destination lived on and said so: heartbeats do not put off the source's wait.
    // (The harness's clock steps a second at a time while both sides wait.)
    assert!(harness.heartbeats >= TIMEOUT.as_secs() as usize / 2, "{} heartbeats", harness.heartbeats);
}

#[test]
fn auto_converge_throttles_and_the_limit_switches_over() {
    let precopy = PrecopyConfig { auto_converge: true, max_rounds: 6, ..PrecopyConfig::default() };
    let harness = Harness::new(false, precopy, &[1_000_000]).run();
    completed(&harness);
    assert_eq!(harness.rounds.len(), 7, "bulk and six rounds, then the limit");
    assert_eq!(harness.throttle, [20, 30], "QEMU's steps, every second busy round");
}

#[test]
fn a_guest_that_never_converges_is_given_up_when_asked() {
    let precopy = PrecopyConfig { on_limit: LimitAction::Cancel, max_rounds: 3, ..PrecopyConfig::default() };
    let harness = Harness::new(false, precopy, &[1_000_000]).run();
    assert!(
        matches!(harness.source_result, Some(Err(SourceFailure::DidNotConverge { rounds: 4, .. }))),
        "{:?}",
        harness.source_result
    );
    failed_before_commit(&harness);
    assert!(
        matches!(harness.destination_result, Some(Err(DestinationFailure::SourceAborted { .. }))),
        "the destination is told why: {:?}",
        harness.destination_result
    );
}

#[test]
fn a_cancel_before_commit_keeps_the_source_guest_in_every_phase() {
    let points = [
        Point::RoundSent(1),
        Point::RoundSent(2),
        Point::Stopping,
        Point::ToDestination(FrameKind::Complete),
        Point::ToSource(FrameKind::Ready),
    ];
    for at in points {
        let harness = converging().at(at, Hook::CancelSource);
        let harness = harness.run();
        assert!(
            matches!(&harness.source_result, Some(Err(SourceFailure::Cancelled { .. }))),
            "cancel at {at:?}: {:?}",
            harness.source_result
        );
        failed_before_commit(&harness);
        assert!(
            matches!(harness.destination_result, Some(Err(DestinationFailure::SourceAborted { .. }))),
            "cancel at {at:?}: the destination was not told: {:?}",
            harness.destination_result
        );
    }
}

#[test]
fn a_cancel_after_commit_is_refused_and_the_migration_completes() {
    for at in [Point::ToDestination(FrameKind::Commit), Point::DestinationResumed, Point::ToSource(FrameKind::Resumed)]
    {
        let harness = converging().at(at, Hook::CancelSource);
        let harness = harness.run();
        completed(&harness);
    }
}

#[test]
fn an_abort_from_the_destination_in_every_phase_before_resume_keeps_the_source_guest() {
    let points = [Point::RoundSent(1), Point::RoundSent(3), Point::ToDestination(FrameKind::Complete)];
    for at in points {
        let harness = converging().at(at, Hook::AbortDestination);
        let harness = harness.run();
        assert!(
            matches!(&harness.source_result, Some(Err(SourceFailure::DestinationAborted { .. }))),
            "abort at {at:?}: {:?}",
            harness.source_result
        );
        failed_before_commit(&harness);
    }
}

#[test]
fn every_wait_for_the_destination_times_out_and_keeps_the_guest_where_it_belongs() {
    // No Ready: the source gives up, its guest runs on; the destination started none.
    let no_ready = converging().at(Point::ToSource(FrameKind::Ready), Hook::Drop);
    let no_ready = no_ready.run();
    assert!(
        matches!(&no_ready.source_result, Some(Err(SourceFailure::Answer(AnswerError::Timeout { .. })))),
        "{:?}",
        no_ready.source_result
    );
    failed_before_commit(&no_ready);

    // No Commit reaches the destination: it times out waiting and starts no guest.
    let no_commit = converging().at(Point::ToDestination(FrameKind::Commit), Hook::Drop);
    let no_commit = no_commit.run();
    assert!(
        matches!(&no_commit.destination_result, Some(Err(DestinationFailure::Timeout { .. }))),
        "{:?}",
        no_commit.destination_result
    );
    assert!(!no_commit.destination_running);

    // No Resumed: the source times out after Commit.
    let no_resumed = converging().at(Point::ToSource(FrameKind::Resumed), Hook::Drop);
    let no_resumed = no_resumed.run();
    assert!(
        matches!(&no_resumed.source_result, Some(Err(SourceFailure::Answer(AnswerError::Timeout { .. })))),
        "{:?}",
        no_resumed.source_result
    );

    // With verify, no VerifyResult comes back: the source times out (its guest, committed,
    // is the destination's, which runs on).
    let no_verdict =
        Harness::new(true, PrecopyConfig::default(), &[1_000]).at(Point::ToSource(FrameKind::VerifyResult), Hook::Drop);
    let no_verdict = no_verdict.run();
    assert!(
        matches!(&no_verdict.source_result, Some(Err(SourceFailure::Answer(AnswerError::Timeout { .. })))),
        "{:?}",
        no_verdict.source_result
    );
    assert!(no_verdict.destination_running && no_verdict.source.committed());

    // With verify, no digest reaches the destination: it times out, its guest runs on.
    let no_digest = Harness::new(true, PrecopyConfig::default(), &[1_000])
        .at(Point::ToDestination(FrameKind::VerifyDigest), Hook::Drop);
    let no_digest = no_digest.run();
    assert!(
        matches!(&no_digest.destination_result, Some(Err(DestinationFailure::Timeout { .. }))),
        "{:?}",
        no_digest.destination_result
    );
    assert!(no_digest.destination_running && no_digest.destination.guest_resumed(), "the resumed guest is kept");
}

/// A destination that lies: answers out of order, or about rounds never sent.
#[test]
fn a_lying_destination_ends_the_session_with_the_source_guest_running() {
    let lies = [
        ("Ready before Complete", Control::Ready),
        ("Resumed before Commit", Control::Resumed { destination_verify_ms: 0 }),
        ("a round never sent", Control::RoundApplied { epoch: 9 }),
        ("a verdict nobody asked for", Control::VerifyResult { matched: true }),
    ];
    for (lie, message) in lies {
        let mut harness = converging();
        harness.step();
        harness.deliver_to_source(message);
        let harness = harness.run();
        assert!(
            matches!(&harness.source_result, Some(Err(SourceFailure::Answer(_)))),
            "{lie}: {:?}",
            harness.source_result
        );
        failed_before_commit(&harness);
    }
}

#[test]
fn a_frame_after_the_end_is_refused() {
    let mut harness = converging().run();
    completed(&harness);
    let header = FrameHeader { kind: FrameKind::Ready, epoch: 0, seq: harness.destination_seq + 1, length: 0, crc: 0 };
    assert!(harness.source.handle_answer(&header, &[], harness.now).is_err());
    assert!(harness.destination.handle_control(Control::Commit { verify: false }, harness.now).is_err());
    assert!(harness.destination.guest_resumed(), "the guest is kept");
}
