//! The session's control messages, parsed: the payloads of the control frames on
//! connection 0 (`Complete`, `Ready`, `Commit`, `Resumed`, `VerifyDigest`, `VerifyResult`,
//! `RoundApplied`, `Heartbeat`, `Tune`, `Abort`), as a `Repr` beside the frame views. Every length is checked
//! once in [`Control::parse`]; nothing else reads these payloads.

use crate::frame::{le_u32, le_u64, FrameKind};
use crate::handshake::{decode_reason, encode_reason};
use thiserror::Error;

/// A control message of the migration session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Source: the final round `epoch` and the device state have been sent.
    Complete { epoch: u32 },
    /// Destination: all state received and checked; ready to resume.
    Ready,
    /// Source: it has let go of the guest; resume it, hashing memory first if `verify`.
    Commit { verify: bool },
    /// Destination: the guest runs; hashing its memory took this long.
    Resumed { destination_verify_ms: u64 },
    /// Source: the digest of its guest memory (`--verify`).
    VerifyDigest { digest: u128 },
    /// Destination: whether the digests matched.
    VerifyResult { matched: bool },
    /// Destination: every page of round `epoch` is applied.
    RoundApplied { epoch: u32 },
    /// Destination: nothing to say, but alive. Connection 0 is otherwise silent while a
    /// long round arrives, and the source reads it with the connections' io timeout.
    Heartbeat,
    /// Destination: the operator changed the migration there; the source applies it.
    Tune(Tune),
    /// Either side: the session is abandoned, and why.
    Abort { reason: String },
}

/// An operator's change to a running migration, made on the destination's control socket
/// and carried to the source, which alone can apply it. Payload: flags u8 (1: a downtime
/// limit, 2: a bandwidth cap, 4: switch over now; no other bit), the limit in ms u64, the
/// cap in bytes per second u64 (0: none); a field whose flag is clear is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tune {
    pub downtime_limit_ms: Option<u64>,
    /// Bytes per second; `Some(0)` lifts the cap.
    pub max_bandwidth: Option<u64>,
    pub switchover: bool,
}

const TUNE_DOWNTIME: u8 = 1;
const TUNE_BANDWIDTH: u8 = 2;
const TUNE_SWITCHOVER: u8 = 4;
const TUNE_BYTES: usize = 17;

impl Tune {
    /// Whether it asks for anything.
    pub fn is_empty(&self) -> bool {
        *self == Tune::default()
    }

    pub fn payload(&self) -> Vec<u8> {
        let flags = self.downtime_limit_ms.map_or(0, |_| TUNE_DOWNTIME)
            | self.max_bandwidth.map_or(0, |_| TUNE_BANDWIDTH)
            | if self.switchover { TUNE_SWITCHOVER } else { 0 };
        let mut out = vec![flags];
        out.extend_from_slice(&self.downtime_limit_ms.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.max_bandwidth.unwrap_or(0).to_le_bytes());
        out
    }

    /// The payload's fields, or None where its length or flags are wrong.
    pub fn parse(payload: &[u8]) -> Option<Tune> {
        if payload.len() != TUNE_BYTES || payload[0] & !(TUNE_DOWNTIME | TUNE_BANDWIDTH | TUNE_SWITCHOVER) != 0 {
            return None;
        }
        let flags = payload[0];
        let field = |flag: u8, at: usize| (flags & flag != 0).then(|| le_u64(&payload[at..at + 8]));
        Some(Tune {
            downtime_limit_ms: field(TUNE_DOWNTIME, 1),
            max_bandwidth: field(TUNE_BANDWIDTH, 9),
            switchover: flags & TUNE_SWITCHOVER != 0,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ControlError {
    #[error("{kind:?} is not a control message")]
    NotControl { kind: FrameKind },
    #[error("a {kind:?} frame with a {len}-byte payload")]
    Malformed { kind: FrameKind, len: usize },
}

impl Control {
    pub fn kind(&self) -> FrameKind {
        match self {
            Control::Complete { .. } => FrameKind::Complete,
            Control::Ready => FrameKind::Ready,
            Control::Commit { .. } => FrameKind::Commit,
            Control::Resumed { .. } => FrameKind::Resumed,
            Control::VerifyDigest { .. } => FrameKind::VerifyDigest,
            Control::VerifyResult { .. } => FrameKind::VerifyResult,
            Control::RoundApplied { .. } => FrameKind::RoundApplied,
            Control::Heartbeat => FrameKind::Heartbeat,
            Control::Tune(_) => FrameKind::Tune,
            Control::Abort { .. } => FrameKind::Abort,
        }
    }

    /// Parses the payload of a frame of `kind`, checking its length.
    pub fn parse(kind: FrameKind, payload: &[u8]) -> Result<Control, ControlError> {
        let malformed = ControlError::Malformed { kind, len: payload.len() };
        let sized = |len: usize| if payload.len() == len { Ok(payload) } else { Err(malformed.clone()) };
        let flag = |byte: u8| match byte {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(malformed.clone()),
        };
        Ok(match kind {
            FrameKind::Complete => Control::Complete { epoch: le_u32(sized(4)?) },
            FrameKind::Ready => {
                sized(0)?;
                Control::Ready
            }
            FrameKind::Commit => Control::Commit { verify: flag(sized(1)?[0])? },
            FrameKind::Resumed => Control::Resumed { destination_verify_ms: le_u64(sized(8)?) },
            FrameKind::VerifyDigest => {
                let bytes: [u8; 16] = sized(16)?.try_into().map_err(|_| malformed.clone())?;
                Control::VerifyDigest { digest: u128::from_le_bytes(bytes) }
            }
            FrameKind::VerifyResult => Control::VerifyResult { matched: flag(sized(1)?[0])? },
            FrameKind::RoundApplied => Control::RoundApplied { epoch: le_u32(sized(4)?) },
            FrameKind::Heartbeat => {
                sized(0)?;
                Control::Heartbeat
            }
            FrameKind::Tune => Control::Tune(Tune::parse(payload).ok_or(malformed)?),
            FrameKind::Abort => Control::Abort { reason: decode_reason(payload) },
            kind => return Err(ControlError::NotControl { kind }),
        })
    }

    /// The payload of this message's frame.
    pub fn payload(&self) -> Vec<u8> {
        match self {
            Control::Complete { epoch } | Control::RoundApplied { epoch } => epoch.to_le_bytes().to_vec(),
            Control::Ready | Control::Heartbeat => Vec::new(),
            Control::Commit { verify: flag } | Control::VerifyResult { matched: flag } => vec![u8::from(*flag)],
            Control::Resumed { destination_verify_ms } => destination_verify_ms.to_le_bytes().to_vec(),
            Control::VerifyDigest { digest } => digest.to_le_bytes().to_vec(),
            Control::Tune(tune) => tune.payload(),
            Control::Abort { reason } => encode_reason(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_message() -> Vec<Control> {
        vec![
            Control::Complete { epoch: 7 },
            Control::Ready,
            Control::Commit { verify: true },
            Control::Commit { verify: false },
            Control::Resumed { destination_verify_ms: 1234 },
            Control::VerifyDigest { digest: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210 },
            Control::VerifyResult { matched: true },
            Control::VerifyResult { matched: false },
            Control::RoundApplied { epoch: 3 },
            Control::Heartbeat,
            Control::Tune(Tune { downtime_limit_ms: Some(300), max_bandwidth: None, switchover: false }),
            Control::Tune(Tune { downtime_limit_ms: None, max_bandwidth: Some(0), switchover: true }),
            Control::Abort { reason: "disk on fire".into() },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for message in every_message() {
            assert_eq!(Control::parse(message.kind(), &message.payload()), Ok(message.clone()), "{message:?}");
        }
    }

    #[test]
    fn fixtures_match_the_wire() {
        assert_eq!(Control::Complete { epoch: 0x0102_0304 }.payload(), [4, 3, 2, 1]);
        assert_eq!(Control::Commit { verify: true }.payload(), [1]);
        assert_eq!(Control::Resumed { destination_verify_ms: 2 }.payload(), [2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Control::VerifyDigest { digest: 1 }.payload(), [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn every_wrong_length_and_flag_is_refused() {
        for message in every_message().into_iter().filter(|m| m.kind() != FrameKind::Abort) {
            let payload = message.payload();
            for len in [0, 1, 3, 4, 5, 8, 9, 15, 16, 17].into_iter().filter(|&len| len != payload.len()) {
                let mut wrong = payload.clone();
                wrong.resize(len, 0);
                assert_eq!(
                    Control::parse(message.kind(), &wrong),
                    Err(ControlError::Malformed { kind: message.kind(), len }),
                    "{message:?} with {len} bytes"
                );
            }
        }
        for kind in [FrameKind::Commit, FrameKind::VerifyResult] {
            assert_eq!(Control::parse(kind, &[2]), Err(ControlError::Malformed { kind, len: 1 }));
        }
        let mut unknown_flag = Tune { switchover: true, ..Tune::default() }.payload();
        unknown_flag[0] |= 8;
        let kind = FrameKind::Tune;
        assert_eq!(Control::parse(kind, &unknown_flag), Err(ControlError::Malformed { kind, len: 17 }));
        assert_eq!(Control::parse(FrameKind::Pages, &[]), Err(ControlError::NotControl { kind: FrameKind::Pages }));
    }
}
