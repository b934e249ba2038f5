//! The source's side of the migration session, as a state machine in the manner of
//! quinn-proto: the engine feeds it what happened (`handle_*`: a round sent and measured,
//! the destination's answers, the final round sent, the memory hashed, a cancel, the time)
//! and asks it what to do next (`poll_action`) and until when it may wait
//! (`poll_timeout`). It does no IO and reads no clock.
//!
//! ```text
//! bulk round, iterative rounds ... (precopy decides after each)
//!   switchover: wait until the destination applied the last round (RoundApplied)
//! stop the guest, final round, device state   --> Complete
//!                                             <-- Ready
//! Commit(verify)  (from here a cancel is refused: the guest is the destination's)
//!                                             <-- Resumed(ms)
//! [hash memory] VerifyDigest                  <-- VerifyResult   (only with verify)
//! ```
//!
//! Every answer is checked on the way in (sequence, kind allowed in this phase, payload
//! size) by the answer checker below, which also keeps the deadlines of each wait.
//!
//! Call order for the engine: feed every input as it arrives, then drain `poll_action`
//! until it returns `None`, and wait for the next input no later than `poll_timeout`.
//! A `handle_*` that returns an error has ended the session: the engine aborts it, and
//! the source guest, never committed, runs on.

use crate::control::{Control, ControlError, Tune};
use crate::frame::{FrameError, FrameHeader, FrameKind, SeqCounter};
use crate::precopy::{Decision, Precopy, PrecopyConfig, RoundReport};
use std::collections::VecDeque;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnswerError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("destination sent {kind:?} while the source was {phase}")]
    Unexpected { kind: FrameKind, phase: &'static str },
    #[error("destination sent a {kind:?} frame with a {len}-byte payload")]
    Malformed { kind: FrameKind, len: usize },
    #[error("destination reported round {epoch} applied, but only rounds up to {closed} were sent")]
    FutureRound { epoch: u32, closed: u32 },
    #[error("destination did not answer within {timeout:?} while the source was {phase}")]
    Timeout { phase: &'static str, timeout: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Streaming,
    AwaitingReady,
    AwaitingResumed,
    AwaitingVerifyResult,
    Done,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::Streaming => "streaming pages",
            Phase::AwaitingReady => "waiting for Ready",
            Phase::AwaitingResumed => "waiting for Resumed",
            Phase::AwaitingVerifyResult => "waiting for VerifyResult",
            Phase::Done => "done",
        }
    }
}

/// Checks the destination's answers and keeps the deadlines of the completion exchange.
#[derive(Debug)]
struct AnswerChecker {
    seq: SeqCounter,
    phase: Phase,
    verify: bool,
    answer_timeout: Duration,
    deadline: Option<Duration>,
    closed_epoch: u32,
    applied_epoch: u32,
}

impl AnswerChecker {
    /// `answer_timeout` bounds each wait of the completion exchange.
    fn new(verify: bool, answer_timeout: Duration) -> Self {
        let mut seq = SeqCounter::default();
        seq.take(); // the HelloAck
        AnswerChecker {
            seq,
            phase: Phase::Streaming,
            verify,
            answer_timeout,
            deadline: None,
            closed_epoch: 0,
            applied_epoch: 0,
        }
    }

    /// The last round the destination reported fully applied.
    fn applied_epoch(&self) -> u32 {
        self.applied_epoch
    }

    #[cfg(test)]
    fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The source is about to put `RoundEnd(epoch)` on every connection.
    fn round_closed(&mut self, epoch: u32) {
        self.closed_epoch = self.closed_epoch.max(epoch);
    }

    /// The source is about to send `Complete`.
    fn complete_sent(&mut self, now: Duration) {
        self.await_answer(Phase::AwaitingReady, now);
    }

    /// The source is about to send `Commit`: from here the guest is the destination's.
    fn commit_sent(&mut self, now: Duration) {
        self.await_answer(Phase::AwaitingResumed, now);
    }

    /// The source is about to send its memory digest.
    fn digest_sent(&mut self, now: Duration) {
        self.await_answer(Phase::AwaitingVerifyResult, now);
    }

    fn await_answer(&mut self, phase: Phase, now: Duration) {
        self.phase = phase;
        self.deadline = Some(now + self.answer_timeout);
    }

    /// When the current wait expires, if the source is waiting for an answer.
    fn poll_timeout(&self) -> Option<Duration> {
        self.deadline
    }

    /// An error once the current wait has expired at `now`.
    fn handle_timeout(&self, now: Duration) -> Result<(), AnswerError> {
        match self.deadline {
            Some(deadline) if now >= deadline => {
                Err(AnswerError::Timeout { phase: self.phase.describe(), timeout: self.answer_timeout })
            }
            _ => Ok(()),
        }
    }

    /// Checks a frame (already checksummed) from the destination and advances.
    fn handle_answer(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<Control, AnswerError> {
        self.seq.accept(header.seq)?;
        let answer = Control::parse(header.kind, payload).map_err(|err| match err {
            ControlError::Malformed { kind, len } => AnswerError::Malformed { kind, len },
            ControlError::NotControl { kind } => AnswerError::Unexpected { kind, phase: self.phase.describe() },
        })?;
        match (self.phase, &answer) {
            (_, Control::Abort { .. }) => return Ok(answer),
            // Only says the destination lives; the connection's read timeout is what it resets.
            (phase, Control::Heartbeat) if phase != Phase::Done => return Ok(answer),
            // An operator's change, asked for at the destination: the session applies it
            // while it lasts (too late once done).
            (phase, Control::Tune(_)) if phase != Phase::Done => return Ok(answer),
            (phase, Control::RoundApplied { epoch }) if phase != Phase::Done => {
                if *epoch > self.closed_epoch {
                    return Err(AnswerError::FutureRound { epoch: *epoch, closed: self.closed_epoch });
                }
                self.applied_epoch = self.applied_epoch.max(*epoch);
                return Ok(answer);
            }
            (Phase::AwaitingReady, Control::Ready)
            | (Phase::AwaitingResumed, Control::Resumed { .. })
            | (Phase::AwaitingVerifyResult, Control::VerifyResult { .. }) => {}
            (phase, answer) => return Err(AnswerError::Unexpected { kind: answer.kind(), phase: phase.describe() }),
        }
        self.deadline = None;
        if matches!(answer, Control::VerifyResult { .. }) || (matches!(answer, Control::Resumed { .. }) && !self.verify)
        {
            self.phase = Phase::Done;
        }
        Ok(answer)
    }
}

/// Which kind of pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The first round: every page written since logging started (or every page).
    Bulk,
    /// The pages dirtied during the round before.
    Iterative,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Bulk => "bulk",
            Stage::Iterative => "iterative",
        }
    }
}

/// What the engine is to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction {
    /// Send the pages the last dirty sync found as round `epoch`, close the round on every
    /// connection, sync the dirty log, and report with [`SourceSession::handle_round_sent`].
    SendRound { epoch: u32, stage: Stage },
    /// Slow the guest's vCPUs to `(100 - pct)`% (auto-converge).
    SetThrottle { pct: u8 },
    /// The downtime starts: stop the guest, sync the last dirty pages, send them and the
    /// device state as round `epoch`, close it, and call
    /// [`SourceSession::handle_final_round_sent`].
    StopAndCopy { epoch: u32 },
    /// Put this message on connection 0, in order.
    Send(Control),
    /// Hash the (paused) guest memory, then call [`SourceSession::handle_digest`].
    HashMemory,
    /// The guest is the destination's now; the session is over.
    Finish(SourceOutcome),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceOutcome {
    /// The digests' verdict, when verification was asked for.
    pub verified: Option<bool>,
    /// How long the destination spent hashing inside the downtime window.
    pub destination_verify_ms: u64,
}

/// Why the session failed, from the source's view. The source guest runs on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SourceFailure {
    #[error(transparent)]
    Answer(#[from] AnswerError),
    #[error("the destination aborted: {reason}")]
    DestinationAborted { reason: String },
    #[error(
        "did not converge in {rounds} rounds (expected downtime {} ms, limit {} ms); the source guest keeps running",
        expected_downtime.as_millis(),
        limit.as_millis()
    )]
    DidNotConverge { rounds: u32, expected_downtime: Duration, limit: Duration },
    #[error("migration cancelled: {reason}")]
    Cancelled { reason: String },
    #[error("destination did not confirm round {epoch} within {timeout:?}")]
    RoundNotApplied { epoch: u32, timeout: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Rounds run; the engine reports each.
    Rounds,
    /// Switchover decided: waiting until the destination applied round `epoch`.
    AwaitingApplied {
        epoch: u32,
        deadline: Duration,
    },
    /// The final round is being sent.
    StopAndCopy,
    /// The completion exchange: the answer checker knows what is due.
    Completing,
    /// `Resumed` came with verify: the engine hashes.
    Hashing,
    Done,
    Failed,
}

#[derive(Debug)]
pub struct SourceSession {
    answers: AnswerChecker,
    precopy: Precopy,
    step: Step,
    epoch: u32,
    verify: bool,
    answer_timeout: Duration,
    throttle_pct: u8,
    committed: bool,
    destination_verify_ms: u64,
    actions: VecDeque<SourceAction>,
    /// Changes the destination's operator asked for, not yet taken ([`Self::take_tune`]).
    tune: Option<Tune>,
}

impl SourceSession {
    /// The first round is due at once (`poll_action`). `answer_timeout` bounds each wait
    /// for the destination.
    pub fn new(precopy: PrecopyConfig, verify: bool, answer_timeout: Duration, now: Duration) -> Self {
        let mut session = SourceSession {
            answers: AnswerChecker::new(verify, answer_timeout),
            precopy: Precopy::new(precopy, now),
            step: Step::Rounds,
            epoch: 0,
            verify,
            answer_timeout,
            throttle_pct: 0,
            committed: false,
            destination_verify_ms: 0,
            actions: VecDeque::new(),
            tune: None,
        };
        session.next_round(Stage::Bulk);
        session
    }

    /// The pre-copy controller: expected downtime, throttle, rounds so far.
    pub fn precopy(&self) -> &Precopy {
        &self.precopy
    }

    /// The pre-copy controller, for an operator's changes (downtime limit, switchover).
    pub fn precopy_mut(&mut self) -> &mut Precopy {
        &mut self.precopy
    }

    /// The last round the destination reported fully applied.
    pub fn applied_epoch(&self) -> u32 {
        self.answers.applied_epoch()
    }

    /// Whether `Commit` is decided: from then on the guest is the destination's and a
    /// cancel is refused.
    pub fn committed(&self) -> bool {
        self.committed
    }

    pub fn is_done(&self) -> bool {
        self.step == Step::Done
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// When the current wait for the destination expires, if there is one.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.step {
            Step::AwaitingApplied { deadline, .. } => Some(deadline),
            _ => self.answers.poll_timeout(),
        }
    }

    /// An error once the current wait has expired at `now`.
    pub fn handle_timeout(&mut self, now: Duration) -> Result<(), SourceFailure> {
        if let Step::AwaitingApplied { epoch, deadline } = self.step {
            if now >= deadline {
                return self.fail(SourceFailure::RoundNotApplied { epoch, timeout: self.answer_timeout });
            }
        }
        match self.answers.handle_timeout(now) {
            Ok(()) => Ok(()),
            Err(err) => self.fail(err.into()),
        }
    }

    /// Round `self.epoch` was sent and closed; `report` measured it (its `dirty_pages`
    /// are the next round's work).
    pub fn handle_round_sent(&mut self, report: RoundReport, now: Duration) -> Result<(), SourceFailure> {
        if self.step != Step::Rounds {
            return Ok(());
        }
        match self.precopy.round_finished(now, report) {
            Decision::NextRound { throttle_pct } => {
                if throttle_pct != self.throttle_pct {
                    self.throttle_pct = throttle_pct;
                    self.actions.push_back(SourceAction::SetThrottle { pct: throttle_pct });
                }
                self.next_round(Stage::Iterative);
                Ok(())
            }
            Decision::StopAndCopy { .. } => {
                // The destination must have applied every earlier round before the guest
                // stops: otherwise its backlog lands in the downtime.
                self.step = Step::AwaitingApplied { epoch: self.epoch, deadline: now + self.answer_timeout };
                self.stop_if_applied();
                Ok(())
            }
            Decision::Cancel { rounds } => self.fail(SourceFailure::DidNotConverge {
                rounds,
                expected_downtime: self.precopy.expected_downtime(),
                limit: self.precopy.downtime_limit(),
            }),
        }
    }

    /// The final round and the device state were sent and the round closed: `Complete`
    /// is due.
    pub fn handle_final_round_sent(&mut self, now: Duration) {
        if self.step == Step::StopAndCopy {
            self.step = Step::Completing;
            self.answers.complete_sent(now);
            self.actions.push_back(SourceAction::Send(Control::Complete { epoch: self.epoch }));
        }
    }

    /// A frame (already checksummed) from the destination on connection 0.
    pub fn handle_answer(&mut self, header: &FrameHeader, payload: &[u8], now: Duration) -> Result<(), SourceFailure> {
        if matches!(self.step, Step::Done | Step::Failed) {
            let err = AnswerError::Unexpected { kind: header.kind, phase: "done" };
            return self.fail(err.into());
        }
        let answer = match self.answers.handle_answer(header, payload) {
            Ok(answer) => answer,
            Err(err) => return self.fail(err.into()),
        };
        match answer {
            Control::Abort { reason } => return self.fail(SourceFailure::DestinationAborted { reason }),
            Control::RoundApplied { .. } => self.stop_if_applied(),
            Control::Ready => {
                // The point of no return: decided here, under whatever serializes this
                // with `handle_cancel`.
                self.committed = true;
                self.answers.commit_sent(now);
                self.actions.push_back(SourceAction::Send(Control::Commit { verify: self.verify }));
            }
            Control::Resumed { destination_verify_ms } => {
                self.destination_verify_ms = destination_verify_ms;
                if self.verify {
                    self.step = Step::Hashing;
                    self.actions.push_back(SourceAction::HashMemory);
                } else {
                    self.finish(None);
                }
            }
            Control::VerifyResult { matched } => self.finish(Some(matched)),
            Control::Tune(asked) => {
                // Later values win; a switchover asked for stays asked.
                let tune = self.tune.get_or_insert_with(Tune::default);
                tune.downtime_limit_ms = asked.downtime_limit_ms.or(tune.downtime_limit_ms);
                tune.max_bandwidth = asked.max_bandwidth.or(tune.max_bandwidth);
                tune.switchover |= asked.switchover;
            }
            // Heartbeats need nothing; the checker lets nothing else through.
            _ => {}
        }
        Ok(())
    }

    /// What the destination's operator asked to change since the last call: the engine
    /// applies it at once, as a control socket's command on this side.
    pub fn take_tune(&mut self) -> Option<Tune> {
        self.tune.take()
    }

    /// The paused guest's memory digest, after [`SourceAction::HashMemory`].
    pub fn handle_digest(&mut self, digest: u128, now: Duration) {
        if self.step == Step::Hashing {
            self.step = Step::Completing;
            self.answers.digest_sent(now);
            self.actions.push_back(SourceAction::Send(Control::VerifyDigest { digest }));
        }
    }

    /// The user cancelled. Before `Commit` the session fails (and the guest runs on here);
    /// after it the cancel is refused and `Ok(false)` returned: the guest is the
    /// destination's.
    pub fn handle_cancel(&mut self, reason: &str) -> Result<bool, SourceFailure> {
        if self.committed || matches!(self.step, Step::Done | Step::Failed) {
            return Ok(false);
        }
        self.fail(SourceFailure::Cancelled { reason: reason.to_string() }).map(|()| true)
    }

    fn next_round(&mut self, stage: Stage) {
        self.epoch += 1;
        // Told before the engine closes the round, so its RoundApplied is never early.
        self.answers.round_closed(self.epoch);
        self.actions.push_back(SourceAction::SendRound { epoch: self.epoch, stage });
    }

    fn stop_if_applied(&mut self) {
        if let Step::AwaitingApplied { epoch, .. } = self.step {
            if self.answers.applied_epoch() >= epoch {
                self.epoch += 1;
                self.answers.round_closed(self.epoch);
                self.step = Step::StopAndCopy;
                self.actions.push_back(SourceAction::StopAndCopy { epoch: self.epoch });
            }
        }
    }

    fn finish(&mut self, verified: Option<bool>) {
        self.step = Step::Done;
        let outcome = SourceOutcome { verified, destination_verify_ms: self.destination_verify_ms };
        self.actions.push_back(SourceAction::Finish(outcome));
    }

    fn fail(&mut self, failure: SourceFailure) -> Result<(), SourceFailure> {
        self.step = Step::Failed;
        self.actions.clear();
        Err(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn frame(kind: FrameKind, seq: u64) -> FrameHeader {
        FrameHeader { kind, epoch: 0, seq, length: 0, crc: 0 }
    }

    #[test]
    fn full_exchange_with_verify() {
        let mut session = AnswerChecker::new(true, TIMEOUT);
        session.round_closed(1);
        assert_eq!(
            session.handle_answer(&frame(FrameKind::RoundApplied, 1), &1u32.to_le_bytes()),
            Ok(Control::RoundApplied { epoch: 1 })
        );
        assert_eq!(session.applied_epoch(), 1);
        session.round_closed(2);
        session.complete_sent(Duration::from_secs(10));
        assert_eq!(session.handle_answer(&frame(FrameKind::Ready, 2), &[]), Ok(Control::Ready));
        // The final round's report may come after Ready.
        assert!(session.handle_answer(&frame(FrameKind::RoundApplied, 3), &2u32.to_le_bytes()).is_ok());
        session.commit_sent(Duration::from_secs(11));
        assert_eq!(
            session.handle_answer(&frame(FrameKind::Resumed, 4), &7u64.to_le_bytes()),
            Ok(Control::Resumed { destination_verify_ms: 7 })
        );
        assert!(!session.is_done());
        session.digest_sent(Duration::from_secs(12));
        assert_eq!(
            session.handle_answer(&frame(FrameKind::VerifyResult, 5), &[1]),
            Ok(Control::VerifyResult { matched: true })
        );
        assert!(session.is_done());
    }

    #[test]
    fn answers_out_of_phase_are_refused() {
        let mut session = AnswerChecker::new(false, TIMEOUT);
        let err = session.handle_answer(&frame(FrameKind::Ready, 1), &[]).unwrap_err();
        assert_eq!(err.to_string(), "destination sent Ready while the source was streaming pages");
        let mut session = AnswerChecker::new(false, TIMEOUT);
        assert!(matches!(
            session.handle_answer(&frame(FrameKind::RoundApplied, 1), &3u32.to_le_bytes()),
            Err(AnswerError::FutureRound { epoch: 3, closed: 0 })
        ));
        let mut session = AnswerChecker::new(false, TIMEOUT);
        session.complete_sent(Duration::ZERO);
        assert!(matches!(session.handle_answer(&frame(FrameKind::Ready, 1), &[0]), Err(AnswerError::Malformed { .. })));
        let mut session = AnswerChecker::new(false, TIMEOUT);
        assert!(matches!(
            session.handle_answer(&frame(FrameKind::Ready, 5), &[]),
            Err(AnswerError::Frame(FrameError::Sequence { .. }))
        ));
    }

    #[test]
    fn resumed_ends_the_session_without_verify() {
        let mut session = AnswerChecker::new(false, TIMEOUT);
        session.complete_sent(Duration::ZERO);
        session.handle_answer(&frame(FrameKind::Ready, 1), &[]).unwrap();
        session.commit_sent(Duration::ZERO);
        session.handle_answer(&frame(FrameKind::Resumed, 2), &0u64.to_le_bytes()).unwrap();
        assert!(session.is_done());
        assert!(session.handle_answer(&frame(FrameKind::RoundApplied, 3), &0u32.to_le_bytes()).is_err());
    }

    #[test]
    fn waits_expire_on_the_virtual_clock() {
        let mut session = AnswerChecker::new(false, TIMEOUT);
        assert_eq!(session.poll_timeout(), None);
        session.complete_sent(Duration::from_secs(100));
        assert_eq!(session.poll_timeout(), Some(Duration::from_secs(105)));
        assert!(session.handle_timeout(Duration::from_secs(104)).is_ok());
        let err = session.handle_timeout(Duration::from_secs(105)).unwrap_err();
        assert_eq!(err.to_string(), "destination did not answer within 5s while the source was waiting for Ready");
        session.handle_answer(&frame(FrameKind::Ready, 1), &[]).unwrap();
        assert_eq!(session.poll_timeout(), None);
    }

    #[test]
    fn the_destinations_changes_are_taken_once_the_later_values_winning() {
        let mut session = SourceSession::new(PrecopyConfig::default(), false, TIMEOUT, Duration::ZERO);
        let tune = |tune: Tune| Control::Tune(tune).payload();
        let first = Tune { downtime_limit_ms: Some(100), max_bandwidth: Some(5), switchover: true };
        session.handle_answer(&frame(FrameKind::Tune, 1), &tune(first), Duration::ZERO).unwrap();
        let second = Tune { downtime_limit_ms: Some(200), ..Tune::default() };
        session.handle_answer(&frame(FrameKind::Tune, 2), &tune(second), Duration::ZERO).unwrap();
        assert_eq!(
            session.take_tune(),
            Some(Tune { downtime_limit_ms: Some(200), max_bandwidth: Some(5), switchover: true })
        );
        assert_eq!(session.take_tune(), None);
    }

    #[test]
    fn abort_is_taken_in_any_phase() {
        let mut session = AnswerChecker::new(false, TIMEOUT);
        assert_eq!(
            session.handle_answer(&frame(FrameKind::Abort, 1), b"no room"),
            Ok(Control::Abort { reason: "no room".into() })
        );
    }
}
