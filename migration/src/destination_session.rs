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
//! The guest is resumed only after `Commit`: until then the source holds it, and any
//! failure discards what was received. Once the guest runs here it is the only copy (the
//! source let go at `Commit`): a failure after that point is reported with
//! [`DestinationSession::guest_resumed`] true, and the guest must be kept.
//!
//! Call order for the engine: feed every input as it arrives, then drain `poll_action`
//! until it returns `None`, and wait for the next input no later than `poll_timeout`.

use crate::control::Control;
use crate::frame::FrameKind;
use std::collections::VecDeque;
use std::time::Duration;
use thiserror::Error;

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
    actions: VecDeque<DestinationAction>,
}

impl DestinationSession {
    /// `wait_timeout` bounds each wait for the source once the destination has answered
    /// (`Ready`, `Resumed`): the source's pages are bounded by the connections' own
    /// timeouts instead, since a round may take long.
    pub fn new(wait_timeout: Duration) -> Self {
        DestinationSession {
            phase: Phase::Receiving,
            device_state: false,
            verify: false,
            digest: None,
            resumed: false,
            wait_timeout,
            deadline: None,
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

    /// When the current wait for the source expires, if there is one.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.deadline
    }

    /// An error once the current wait has expired at `now`.
    pub fn handle_timeout(&mut self, now: Duration) -> Result<(), DestinationFailure> {
        match self.deadline {
            Some(deadline) if now >= deadline => {
                let phase = self.phase.describe();
                self.fail(DestinationFailure::Timeout { phase, timeout: self.wait_timeout })
            }
            _ => Ok(()),
        }
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
    pub fn handle_round_applied(&mut self, epoch: u32) {
        if !matches!(self.phase, Phase::Done | Phase::Failed) {
            self.actions.push_back(DestinationAction::Send(Control::RoundApplied { epoch }));
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
                self.actions.push_back(DestinationAction::Send(Control::Ready));
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
                self.actions.push_back(DestinationAction::Send(Control::VerifyResult { matched }));
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
        self.actions.push_back(DestinationAction::Send(Control::Resumed { destination_verify_ms }));
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
        let mut session = DestinationSession::new(WAIT);
        session.handle_round_applied(1);
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
        assert_eq!(session.poll_timeout(), Some(at(100) + WAIT));
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
            assert_eq!(session.poll_timeout(), Some(at(300) + WAIT));
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
        let mut session = DestinationSession::new(WAIT);
        assert_eq!(
            session.handle_control(Control::Complete { epoch: 1 }, at(0)),
            Err(DestinationFailure::MissingDeviceState)
        );
        assert_eq!(drain(&mut session), []);
    }

    #[test]
    fn device_state_twice_is_refused() {
        let mut session = DestinationSession::new(WAIT);
        session.handle_device_state().unwrap();
        assert_eq!(session.handle_device_state(), Err(DestinationFailure::DuplicateDeviceState));
    }

    #[test]
    fn a_source_that_lies_about_the_order_is_refused_in_every_phase() {
        // Commit before Ready: the destination must never resume a guest it was not given.
        let mut early = DestinationSession::new(WAIT);
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
        aborted(&mut DestinationSession::new(WAIT));
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
        let receiving = DestinationSession::new(WAIT);
        assert_eq!(receiving.poll_timeout(), None);
    }
}
