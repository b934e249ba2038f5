//! The source's view of the destination's answers, as a state machine: it checks every
//! frame the destination sends on connection 0 (sequence, kind allowed in this phase,
//! payload size) and keeps the deadlines of the completion exchange, on a clock the caller
//! passes in.
//!
//! The caller tells it what the source sent (`round_closed`, `complete_sent`,
//! `commit_sent`, `digest_sent`) *before* putting the frame on the wire, so an answer can
//! never arrive ahead of the state that allows it.

use crate::frame::{le_u32, le_u64, FrameError, FrameHeader, FrameKind, SeqCounter};
use crate::handshake::decode_reason;
use std::time::Duration;
use thiserror::Error;

/// A checked answer from the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Every page of `epoch` is applied on the destination.
    RoundApplied {
        epoch: u32,
    },
    /// All state received and checked: the destination is ready to resume.
    Ready,
    /// The guest runs on the destination; hashing (`--verify`) took this long there.
    Resumed {
        destination_verify_ms: u64,
    },
    VerifyResult {
        matched: bool,
    },
    Abort {
        reason: String,
    },
}

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

#[derive(Debug)]
pub struct SourceSession {
    seq: SeqCounter,
    phase: Phase,
    verify: bool,
    answer_timeout: Duration,
    deadline: Option<Duration>,
    closed_epoch: u32,
    applied_epoch: u32,
}

impl SourceSession {
    /// `answer_timeout` bounds each wait of the completion exchange.
    pub fn new(verify: bool, answer_timeout: Duration) -> Self {
        let mut seq = SeqCounter::default();
        seq.take(); // the HelloAck
        SourceSession {
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
    pub fn applied_epoch(&self) -> u32 {
        self.applied_epoch
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The source is about to put `RoundEnd(epoch)` on every connection.
    pub fn round_closed(&mut self, epoch: u32) {
        self.closed_epoch = self.closed_epoch.max(epoch);
    }

    /// The source is about to send `Complete`.
    pub fn complete_sent(&mut self, now: Duration) {
        self.await_answer(Phase::AwaitingReady, now);
    }

    /// The source is about to send `Commit`: from here the guest is the destination's.
    pub fn commit_sent(&mut self, now: Duration) {
        self.await_answer(Phase::AwaitingResumed, now);
    }

    /// The source is about to send its memory digest.
    pub fn digest_sent(&mut self, now: Duration) {
        self.await_answer(Phase::AwaitingVerifyResult, now);
    }

    fn await_answer(&mut self, phase: Phase, now: Duration) {
        self.phase = phase;
        self.deadline = Some(now + self.answer_timeout);
    }

    /// When the current wait expires, if the source is waiting for an answer.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.deadline
    }

    /// An error once the current wait has expired at `now`.
    pub fn handle_timeout(&self, now: Duration) -> Result<(), AnswerError> {
        match self.deadline {
            Some(deadline) if now >= deadline => {
                Err(AnswerError::Timeout { phase: self.phase.describe(), timeout: self.answer_timeout })
            }
            _ => Ok(()),
        }
    }

    /// Checks a frame (already checksummed) from the destination and advances.
    pub fn handle_answer(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<Answer, AnswerError> {
        self.seq.accept(header.seq)?;
        let sized = |len: usize| {
            if payload.len() == len {
                Ok(())
            } else {
                Err(AnswerError::Malformed { kind: header.kind, len: payload.len() })
            }
        };
        let answer = match (self.phase, header.kind) {
            (_, FrameKind::Abort) => return Ok(Answer::Abort { reason: decode_reason(payload) }),
            (phase, FrameKind::RoundApplied) if phase != Phase::Done => {
                sized(4)?;
                let epoch = le_u32(payload);
                if epoch > self.closed_epoch {
                    return Err(AnswerError::FutureRound { epoch, closed: self.closed_epoch });
                }
                self.applied_epoch = self.applied_epoch.max(epoch);
                return Ok(Answer::RoundApplied { epoch });
            }
            (Phase::AwaitingReady, FrameKind::Ready) => {
                sized(0)?;
                Answer::Ready
            }
            (Phase::AwaitingResumed, FrameKind::Resumed) => {
                sized(8)?;
                Answer::Resumed { destination_verify_ms: le_u64(payload) }
            }
            (Phase::AwaitingVerifyResult, FrameKind::VerifyResult) => {
                sized(1)?;
                match payload[0] {
                    0 => Answer::VerifyResult { matched: false },
                    1 => Answer::VerifyResult { matched: true },
                    _ => return Err(AnswerError::Malformed { kind: header.kind, len: payload.len() }),
                }
            }
            (phase, kind) => return Err(AnswerError::Unexpected { kind, phase: phase.describe() }),
        };
        self.deadline = None;
        if matches!(answer, Answer::VerifyResult { .. }) || (matches!(answer, Answer::Resumed { .. }) && !self.verify) {
            self.phase = Phase::Done;
        }
        Ok(answer)
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
        let mut session = SourceSession::new(true, TIMEOUT);
        session.round_closed(1);
        assert_eq!(
            session.handle_answer(&frame(FrameKind::RoundApplied, 1), &1u32.to_le_bytes()),
            Ok(Answer::RoundApplied { epoch: 1 })
        );
        assert_eq!(session.applied_epoch(), 1);
        session.round_closed(2);
        session.complete_sent(Duration::from_secs(10));
        assert_eq!(session.handle_answer(&frame(FrameKind::Ready, 2), &[]), Ok(Answer::Ready));
        // The final round's report may come after Ready.
        assert!(session.handle_answer(&frame(FrameKind::RoundApplied, 3), &2u32.to_le_bytes()).is_ok());
        session.commit_sent(Duration::from_secs(11));
        assert_eq!(
            session.handle_answer(&frame(FrameKind::Resumed, 4), &7u64.to_le_bytes()),
            Ok(Answer::Resumed { destination_verify_ms: 7 })
        );
        assert!(!session.is_done());
        session.digest_sent(Duration::from_secs(12));
        assert_eq!(
            session.handle_answer(&frame(FrameKind::VerifyResult, 5), &[1]),
            Ok(Answer::VerifyResult { matched: true })
        );
        assert!(session.is_done());
    }

    #[test]
    fn answers_out_of_phase_are_refused() {
        let mut session = SourceSession::new(false, TIMEOUT);
        let err = session.handle_answer(&frame(FrameKind::Ready, 1), &[]).unwrap_err();
        assert_eq!(err.to_string(), "destination sent Ready while the source was streaming pages");
        let mut session = SourceSession::new(false, TIMEOUT);
        assert!(matches!(
            session.handle_answer(&frame(FrameKind::RoundApplied, 1), &3u32.to_le_bytes()),
            Err(AnswerError::FutureRound { epoch: 3, closed: 0 })
        ));
        let mut session = SourceSession::new(false, TIMEOUT);
        session.complete_sent(Duration::ZERO);
        assert!(matches!(session.handle_answer(&frame(FrameKind::Ready, 1), &[0]), Err(AnswerError::Malformed { .. })));
        let mut session = SourceSession::new(false, TIMEOUT);
        assert!(matches!(
            session.handle_answer(&frame(FrameKind::Ready, 5), &[]),
            Err(AnswerError::Frame(FrameError::Sequence { .. }))
        ));
    }

    #[test]
    fn resumed_ends_the_session_without_verify() {
        let mut session = SourceSession::new(false, TIMEOUT);
        session.complete_sent(Duration::ZERO);
        session.handle_answer(&frame(FrameKind::Ready, 1), &[]).unwrap();
        session.commit_sent(Duration::ZERO);
        session.handle_answer(&frame(FrameKind::Resumed, 2), &0u64.to_le_bytes()).unwrap();
        assert!(session.is_done());
        assert!(session.handle_answer(&frame(FrameKind::RoundApplied, 3), &0u32.to_le_bytes()).is_err());
    }

    #[test]
    fn waits_expire_on_the_virtual_clock() {
        let mut session = SourceSession::new(false, TIMEOUT);
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
    fn abort_is_taken_in_any_phase() {
        let mut session = SourceSession::new(false, TIMEOUT);
        assert_eq!(
            session.handle_answer(&frame(FrameKind::Abort, 1), b"no room"),
            Ok(Answer::Abort { reason: "no room".into() })
        );
    }
}
