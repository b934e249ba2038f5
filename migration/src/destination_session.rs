//! The destination's side of the session after the handshake, as a state machine in the
//! manner of quinn-proto: the engine feeds it what happened (`handle_*`: the source's
//! control messages, the device state arriving, a round applied, the memory hashed, the
//! guest resumed, the time) and asks it what to do next (`poll_action`) and until when it
//! may wait (`poll_timeout`). It does no IO and reads no clock.
//!
//! The order it enforces is the completion exchange:
//!
//! ```text
//! source                      destination
//! pages, RoundEnd ...   -->   RoundApplied(epoch) <-- every page of a round applied
//! DeviceState, Complete -->   Ready                   (device state must have come)
//! Commit(verify)        -->   [hash memory] resume the guest, Resumed(ms)
//! VerifyDigest          -->   VerifyResult            (only if verify)
//! ```
//!
//! While it waits (rounds arriving, `Commit`, the digest) and connection 0 has been quiet
//! for [`HEARTBEAT_INTERVAL`], it sends a `Heartbeat`: the source reads connection 0 with
//! the connections' io timeout, and a long round under loss would otherwise look like a
//! dead destination.
//!
//! The guest is resumed only after `Commit`: until then the source holds it, and any
//! failure discards what was received. Once the guest runs here it is the only copy (the
//! source let go at `Commit`): a failure after that point is reported with
//! [`DestinationSession::guest_resumed`] true, and the guest must be kept.
//!
//! Call order for the engine: feed every input as it arrives, then drain `poll_action`
//! until it returns `None`, and wait for the next input no later than `poll_timeout`.

use crate::control::{Control, Tune};
use crate::frame::FrameKind;
use std::collections::VecDeque;
use std::time::Duration;
use thiserror::Error;

/// How long connection 0 may stay quiet before a `Heartbeat` goes out: well under the
/// shortest io timeout the command line takes (one second).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// What the engine is to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationAction {
    /// Put this message on connection 0, in order.
    Send(Control),
    /// Hash the received memory, then call [`DestinationSession::handle_digest`].
    HashMemory,
    /// Start the guest with the device state received, then call
    /// [`DestinationSession::handle_guest_resumed`].
    ResumeGuest,
    /// The session is over; the guest runs here. `verified` is the digests' verdict when
    /// the source asked for one.
    Finish { verified: Option<bool> },
}

/// Why the session failed, from the destination's view.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DestinationFailure {
    #[error("the source aborted: {reason}")]
    SourceAborted { reason: String },
    #[error("the source sent {got:?} while the destination was {phase}")]
    Unexpected { got: FrameKind, phase: &'static str },
    #[error("the source completed without sending device state")]
    MissingDeviceState,
    #[error("the source sent its device state twice")]
    DuplicateDeviceState,
    #[error("the source did not go on within {timeout:?} while the destination was {phase}")]
    Timeout { phase: &'static str, timeout: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Rounds of pages arrive; the device state may come.
    Receiving,
    /// `Ready` sent; the source decides.
    AwaitingCommit,
    /// `Commit { verify: true }`: the engine hashes the received memory.
    Hashing,
    /// The engine starts the guest.
    Resuming,
    /// `Resumed` sent; the source's digest is due.
    AwaitingDigest,
    Done,
    Failed,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::Receiving => "receiving rounds",
            Phase::AwaitingCommit => "waiting for Commit",
            Phase::Hashing => "hashing memory",
            Phase::Resuming => "resuming the guest",
            Phase::AwaitingDigest => "waiting for the source's digest",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug)]
pub struct DestinationSession {
    phase: Phase,
    device_state: bool,
    verify: bool,
    digest: Option<u128>,
    resumed: bool,
    wait_timeout: Duration,
    deadline: Option<Duration>,
    /// When the last message went out on connection 0 (the session's start at first).
    last_sent: Duration,
    actions: VecDeque<DestinationAction>,
}

impl DestinationSession {
    /// `wait_timeout` bounds each wait for the source once the destination has answered
    /// (`Ready`, `Resumed`): the source's pages are bounded by the connections' own
    /// timeouts instead, since a round may take long. `now` is the session's start.
    pub fn new(wait_timeout: Duration, now: Duration) -> Self {
        DestinationSession {
            phase: Phase::Receiving,
            device_state: false,
            verify: false,
            digest: None,
            resumed: false,
            wait_timeout,
            deadline: None,
            last_sent: now,
            actions: VecDeque::new(),
        }
    }

    /// Whether the guest runs here: from then on it is the only copy and must be kept,
    /// even if the rest of the session fails.
    pub fn guest_resumed(&self) -> bool {
        self.resumed
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<DestinationAction> {
        self.actions.pop_front()
    }

    /// When [`Self::handle_timeout`] has something to do next: the current wait for the
    /// source expires, or a heartbeat is due.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let heartbeat = self.sends_heartbeats().then(|| self.last_sent + HEARTBEAT_INTERVAL);
        match (self.deadline, heartbeat) {
            (Some(deadline), Some(heartbeat)) => Some(deadline.min(heartbeat)),
            (deadline, heartbeat) => deadline.or(heartbeat),
        }
    }

    /// An error once the current wait has expired at `now`; a heartbeat if one is due.
    pub fn handle_timeout(&mut self, now: Duration) -> Result<(), DestinationFailure> {
        match self.deadline {
            Some(deadline) if now >= deadline => {
                let phase = self.phase.describe();
                self.fail(DestinationFailure::Timeout { phase, timeout: self.wait_timeout })
            }
            _ => {
                if self.sends_heartbeats() && now >= self.last_sent + HEARTBEAT_INTERVAL {
                    self.send(Control::Heartbeat, now);
                }
                Ok(())
            }
        }
    }

    /// Whether the operator may still cancel here: until `Ready` goes out. From then on the
    /// source may have let go of the guest (it commits when `Ready` arrives).
    pub fn may_cancel(&self) -> bool {
        self.phase == Phase::Receiving
    }

    /// The operator changed the migration here (`recv`'s control socket): the change goes
    /// to the source, which alone applies it. False, with nothing sent, once pre-copy is
    /// over (the source no longer takes changes).
    pub fn request_tune(&mut self, tune: Tune, now: Duration) -> bool {
        if self.phase != Phase::Receiving || tune.is_empty() {
            return false;
        }
        self.send(Control::Tune(tune), now);
        true
    }

    /// Whether the destination is waiting on the source (and so keeps connection 0 alive).
    /// Not while the engine hashes or resumes (it does nothing else then), nor once done.
    fn sends_heartbeats(&self) -> bool {
        matches!(self.phase, Phase::Receiving | Phase::AwaitingCommit | Phase::AwaitingDigest)
    }

    fn send(&mut self, message: Control, now: Duration) {
        self.last_sent = now;
        self.actions.push_back(DestinationAction::Send(message));
    }

    /// The source's device state arrived (it comes once, in the final round).
    pub fn handle_device_state(&mut self) -> Result<(), DestinationFailure> {
        match self.phase {
            Phase::Receiving if !self.device_state => {
                self.device_state = true;
                Ok(())
            }
            Phase::Receiving => self.fail(DestinationFailure::DuplicateDeviceState),
            phase => self.fail(DestinationFailure::Unexpected { got: FrameKind::DeviceState, phase: phase.describe() }),
        }
    }

    /// Every connection ended round `epoch` and all its pages are applied: the source may
    /// go on (it waits for this before stopping the guest).
    pub fn handle_round_applied(&mut self, epoch: u32, now: Duration) {
        if !matches!(self.phase, Phase::Done | Phase::Failed) {
            self.send(Control::RoundApplied { epoch }, now);
        }
    }

    /// A control message from the source on connection 0.
    pub fn handle_control(&mut self, message: Control, now: Duration) -> Result<(), DestinationFailure> {
        match (self.phase, message) {
            (Phase::Done | Phase::Failed, message) => {
                let phase = self.phase.describe();
                self.fail(DestinationFailure::Unexpected { got: message.kind(), phase })
            }
            (_, Control::Abort { reason }) => self.fail(DestinationFailure::SourceAborted { reason }),
            (Phase::Receiving, Control::Complete { .. }) => {
                if !self.device_state {
                    return self.fail(DestinationFailure::MissingDeviceState);
                }
                self.send(Control::Ready, now);
                self.wait(Phase::AwaitingCommit, now);
                Ok(())
            }
            (Phase::AwaitingCommit, Control::Commit { verify }) => {
                self.verify = verify;
                self.deadline = None;
                if verify {
                    self.phase = Phase::Hashing;
                    self.actions.push_back(DestinationAction::HashMemory);
                } else {
                    self.phase = Phase::Resuming;
                    self.actions.push_back(DestinationAction::ResumeGuest);
                }
                Ok(())
            }
            (Phase::AwaitingDigest, Control::VerifyDigest { digest }) => {
                let matched = Some(digest) == self.digest;
                self.send(Control::VerifyResult { matched }, now);
                self.actions.push_back(DestinationAction::Finish { verified: Some(matched) });
                self.phase = Phase::Done;
                self.deadline = None;
                Ok(())
            }
            (phase, message) => {
                self.fail(DestinationFailure::Unexpected { got: message.kind(), phase: phase.describe() })
            }
        }
    }

    /// The received memory's digest, after [`DestinationAction::HashMemory`].
    pub fn handle_digest(&mut self, digest: u128) {
        debug_assert_eq!(self.phase, Phase::Hashing, "a digest nobody asked for");
        if self.phase == Phase::Hashing {
            self.digest = Some(digest);
            self.phase = Phase::Resuming;
            self.actions.push_back(DestinationAction::ResumeGuest);
        }
    }

    /// The guest runs, after [`DestinationAction::ResumeGuest`]; hashing took
    /// `destination_verify_ms` (0 without verify).
    pub fn handle_guest_resumed(&mut self, destination_verify_ms: u64, now: Duration) {
        debug_assert_eq!(self.phase, Phase::Resuming, "a resume nobody asked for");
        if self.phase != Phase::Resuming {
            return;
        }
        self.resumed = true;
        self.send(Control::Resumed { destination_verify_ms }, now);
        if self.verify {
            self.wait(Phase::AwaitingDigest, now);
        } else {
            self.phase = Phase::Done;
            self.actions.push_back(DestinationAction::Finish { verified: None });
        }
    }

    fn wait(&mut self, phase: Phase, now: Duration) {
        self.phase = phase;
        self.deadline = Some(now + self.wait_timeout);
    }

    fn fail(&mut self, failure: DestinationFailure) -> Result<(), DestinationFailure> {
        self.phase = Phase::Failed;
        self.deadline = None;
        self.actions.clear();
        Err(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn drain(session: &mut DestinationSession) -> Vec<DestinationAction> {
        std::iter::from_fn(|| session.poll_action()).collect()
    }

    /// Brings a session to where it has sent `Ready`.
    fn ready() -> DestinationSession {
        let mut session = DestinationSession::new(WAIT, at(0));
        session.handle_round_applied(1, at(50));
        session.handle_device_state().unwrap();
        session.handle_control(Control::Complete { epoch: 2 }, at(100)).unwrap();
        assert_eq!(
            drain(&mut session),
            [DestinationAction::Send(Control::RoundApplied { epoch: 1 }), DestinationAction::Send(Control::Ready)]
        );
        session
    }

    #[test]
    fn without_verify_commit_resumes_and_finishes() {
        let mut session = ready();
        session.handle_control(Control::Commit { verify: false }, at(200)).unwrap();
        assert_eq!(drain(&mut session), [DestinationAction::ResumeGuest]);
        assert!(!session.guest_resumed(), "not before the engine says so");
        session.handle_guest_resumed(0, at(210));
        assert!(session.guest_resumed());
        assert_eq!(
            drain(&mut session),
            [
                DestinationAction::Send(Control::Resumed { destination_verify_ms: 0 }),
                DestinationAction::Finish { verified: None }
            ]
        );
        assert!(session.is_done());
        assert_eq!(session.poll_timeout(), None);
    }

    #[test]
    fn with_verify_memory_is_hashed_before_resume_and_digests_compared() {
        for (theirs, matched) in [(42u128, true), (43, false)] {
            let mut session = ready();
            session.handle_control(Control::Commit { verify: true }, at(200)).unwrap();
            assert_eq!(drain(&mut session), [DestinationAction::HashMemory]);
            session.handle_digest(42);
            assert_eq!(drain(&mut session), [DestinationAction::ResumeGuest]);
            session.handle_guest_resumed(35, at(300));
            assert_eq!(drain(&mut session), [DestinationAction::Send(Control::Resumed { destination_verify_ms: 35 })]);
            session.handle_control(Control::VerifyDigest { digest: theirs }, at(310)).unwrap();
            assert_eq!(
                drain(&mut session),
                [
                    DestinationAction::Send(Control::VerifyResult { matched }),
                    DestinationAction::Finish { verified: Some(matched) }
                ]
            );
        }
    }

    #[test]
    fn complete_without_device_state_is_refused() {
        let mut session = DestinationSession::new(WAIT, at(0));
        assert_eq!(
            session.handle_control(Control::Complete { epoch: 1 }, at(0)),
            Err(DestinationFailure::MissingDeviceState)
        );
        assert_eq!(drain(&mut session), []);
    }

    #[test]
    fn device_state_twice_is_refused() {
        let mut session = DestinationSession::new(WAIT, at(0));
        session.handle_device_state().unwrap();
        assert_eq!(session.handle_device_state(), Err(DestinationFailure::DuplicateDeviceState));
    }

    #[test]
    fn a_source_that_lies_about_the_order_is_refused_in_every_phase() {
        // Commit before Ready: the destination must never resume a guest it was not given.
        let mut early = DestinationSession::new(WAIT, at(0));
        early.handle_device_state().unwrap();
        assert!(matches!(
            early.handle_control(Control::Commit { verify: false }, at(0)),
            Err(DestinationFailure::Unexpected { got: FrameKind::Commit, .. })
        ));
        assert_eq!(drain(&mut early), [], "nothing resumed");

        // A duplicate Commit while resuming.
        let mut twice = ready();
        twice.handle_control(Control::Commit { verify: false }, at(200)).unwrap();
        assert!(twice.handle_control(Control::Commit { verify: false }, at(201)).is_err());
        assert_eq!(drain(&mut twice), [], "the resume it asked for is withdrawn");

        // A second Complete, a digest without verify, and a frame after the end.
        let mut again = ready();
        assert!(again.handle_control(Control::Complete { epoch: 3 }, at(150)).is_err());
        let mut unasked = ready();
        unasked.handle_control(Control::Commit { verify: false }, at(200)).unwrap();
        unasked.handle_guest_resumed(0, at(210));
        drain(&mut unasked);
        assert!(matches!(
            unasked.handle_control(Control::VerifyDigest { digest: 1 }, at(220)),
            Err(DestinationFailure::Unexpected { got: FrameKind::VerifyDigest, phase: "done" })
        ));
        assert!(unasked.guest_resumed(), "the guest runs on: the source let go of it");

        // Device state after Complete.
        let mut late = ready();
        assert!(late.handle_device_state().is_err());
    }

    #[test]
    fn an_abort_from_the_source_ends_any_phase_with_its_reason() {
        let aborted = |session: &mut DestinationSession| {
            let result = session.handle_control(Control::Abort { reason: "cancelled".into() }, at(500));
            assert_eq!(result, Err(DestinationFailure::SourceAborted { reason: "cancelled".into() }));
            assert_eq!(drain(session), []);
        };
        aborted(&mut DestinationSession::new(WAIT, at(0)));
        aborted(&mut ready());
        let mut hashing = ready();
        hashing.handle_control(Control::Commit { verify: true }, at(200)).unwrap();
        aborted(&mut hashing);
    }

    #[test]
    fn every_wait_for_the_source_times_out() {
        let mut waiting_commit = ready();
        assert_eq!(waiting_commit.handle_timeout(at(100) + WAIT - at(1)), Ok(()));
        assert_eq!(
            waiting_commit.handle_timeout(at(100) + WAIT),
            Err(DestinationFailure::Timeout { phase: "waiting for Commit", timeout: WAIT })
        );

        let mut waiting_digest = ready();
        waiting_digest.handle_control(Control::Commit { verify: true }, at(200)).unwrap();
        waiting_digest.handle_digest(1);
        waiting_digest.handle_guest_resumed(1, at(300));
        assert_eq!(
            waiting_digest.handle_timeout(at(300) + WAIT),
            Err(DestinationFailure::Timeout { phase: "waiting for the source's digest", timeout: WAIT })
        );
        assert!(waiting_digest.guest_resumed(), "a timeout after resume keeps the guest");

        // While rounds arrive the connections' own timeouts apply, not this one.
        let mut receiving = DestinationSession::new(WAIT, at(0));
        assert_eq!(receiving.handle_timeout(at(0) + WAIT * 10), Ok(()));
    }

    /// Connection 0 is never quiet for longer than the heartbeat interval while the
    /// destination waits on the source, and heartbeats stop once it is done.
    #[test]
    fn heartbeats_go_out_while_waiting_and_stop_when_done() {
        let beat = HEARTBEAT_INTERVAL;
        let mut session = DestinationSession::new(WAIT, at(0));
        assert_eq!(session.poll_timeout(), Some(beat), "receiving: no deadline, a heartbeat due");
        session.handle_timeout(beat - at(1)).unwrap();
        assert_eq!(drain(&mut session), [], "not yet");
        session.handle_timeout(beat).unwrap();
        assert_eq!(drain(&mut session), [DestinationAction::Send(Control::Heartbeat)]);
        assert_eq!(session.poll_timeout(), Some(beat * 2));

        // Any message counts: a RoundApplied puts the next heartbeat off.
        session.handle_round_applied(1, beat + at(100));
        drain(&mut session);
        session.handle_timeout(beat * 2).unwrap();
        assert_eq!(drain(&mut session), []);
        assert_eq!(session.poll_timeout(), Some(beat * 2 + at(100)));

        // Waiting for Commit: heartbeats before the deadline, which still fails the wait.
        session.handle_device_state().unwrap();
        session.handle_control(Control::Complete { epoch: 2 }, at(1000)).unwrap();
        drain(&mut session);
        assert_eq!(session.poll_timeout(), Some(at(1000) + beat));
        session.handle_timeout(at(1000) + beat).unwrap();
        assert_eq!(drain(&mut session), [DestinationAction::Send(Control::Heartbeat)]);

        // Resumed without verify: done, and silent from then on.
        session.handle_control(Control::Commit { verify: false }, at(1300)).unwrap();
        assert_eq!(session.poll_timeout(), None, "resuming: the engine is busy with the guest");
        drain(&mut session);
        session.handle_guest_resumed(0, at(1400));
        drain(&mut session);
        session.handle_timeout(at(1400) + beat * 10).unwrap();
        assert_eq!(drain(&mut session), []);
        assert_eq!(session.poll_timeout(), None);
    }

    /// An operator's change goes to the source while rounds arrive, and not after.
    #[test]
    fn changes_go_to_the_source_only_during_pre_copy() {
        let tune = Tune { max_bandwidth: Some(1000), ..Tune::default() };
        let mut session = DestinationSession::new(WAIT, at(0));
        assert!(!session.request_tune(Tune::default(), at(1)), "nothing asked, nothing sent");
        assert!(session.request_tune(tune, at(1)) && session.may_cancel());
        assert_eq!(drain(&mut session), [DestinationAction::Send(Control::Tune(tune))]);
        session.handle_device_state().unwrap();
        session.handle_control(Control::Complete { epoch: 1 }, at(10)).unwrap();
        drain(&mut session);
        assert!(!session.request_tune(tune, at(20)), "the source has switched over");
        assert!(!session.may_cancel(), "Ready went out: the source may have let go");
        assert_eq!(drain(&mut session), []);
    }

    #[test]
    fn the_deadline_comes_first_when_it_is_nearer_than_a_heartbeat() {
        let short = Duration::from_millis(100);
        let mut session = DestinationSession::new(short, at(0));
        session.handle_device_state().unwrap();
        session.handle_control(Control::Complete { epoch: 1 }, at(10)).unwrap();
        assert_eq!(session.poll_timeout(), Some(at(110)));
    }
}
