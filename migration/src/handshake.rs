//! The connection preamble and the session handshake.
//!
//! Every connection opens with a 16-byte preamble from the source (magic and the source's
//! protocol version window), then the source's `Hello` frame and the destination's
//! `HelloAck`. The preamble comes before any frame so that a foreign or future stream is
//! recognised from its first bytes, with a message that says what was wrong.
//!
//! ```text
//! preamble:  magic "VMIGRATE" (8) | version_min u16 | version_max u16 | reserved u32 (0)
//! Hello:     session_id u64 | connection_index u16 | connection_count u16 | page_size u32
//!            | codec u8 | zlib_level u8 | xbzrle u8 | copies u8
//!            | region_count u16 | region_count x (guest_address u64 | bytes u64)
//!            | requirements_len u32 | requirements (the source VM's, opaque to the engine)
//! HelloAck:  accepted u8 (1 yes, 2 no) | version u16 | reason_len u16 | reason (UTF-8)
//! ```

use crate::codec::Codec;
use crate::frame::{le_u16, le_u32, le_u64};
use crate::PAGE_SIZE_BYTES;
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"VMIGRATE";
pub const PREAMBLE_BYTES: usize = 16;

/// Protocol versions this build speaks. A peer's window must overlap ours; the highest
/// common version is used. Version 2 added the destination's `Heartbeat` on connection 0,
/// which a version-1 source would take for a protocol violation. Version 3 put each
/// region's guest-physical address and the source VM's requirements in the Hello, so that
/// a destination that cannot host the guest refuses before the source pauses it. Version 4
/// added the shuffle codecs (`shuffle.rs`) among adaptive's choices: a version-3
/// destination that agreed to adaptive would meet page encodings it does not know. Version
/// 5 added `Tune`, the destination's operator changing the migration, which a version-4
/// source would take for a protocol violation. Version 6 added `deflate`, its blocks and
/// `bitshuffle-lz4`; version 7 made the block entry carry its codec (zstd's pages go in
/// blocks), which a version-6 destination reads as a deflate block. Version 8 turned the
/// Hello's reserved byte into `copies` (pages sent as copies of others, `seen_pages.rs`).
pub const VERSION_MIN: u16 = 8;
pub const VERSION_MAX: u16 = 8;

/// More connections than this buy nothing on any link we target (8 saturate 100G) and
/// each costs the receiver a thread and buffers.
pub const MAX_CONNECTIONS: u16 = 64;
/// KVM has at most a few dozen memory slots in practice; 64 is ample.
pub const MAX_REGIONS: u16 = 64;
/// Rejection reasons are for humans; keep them short.
pub const MAX_REASON_BYTES: usize = 512;
/// A VM's requirements (a CPU model, capabilities): a few KiB for a KVM vCPU.
pub const MAX_REQUIREMENTS_BYTES: usize = 64 << 10;
/// The largest Hello frame a receiver reads: the fixed fields, the most regions, the
/// largest requirements.
pub const HELLO_FRAME_LIMIT_BYTES: u32 = (26 + 16 * MAX_REGIONS as usize + MAX_REQUIREMENTS_BYTES) as u32;

/// A TLS record starts with its content type (22, a handshake) and major version 3: a
/// source using TLS has met a destination that is not.
fn tls_hint(found: &[u8; 8]) -> &'static str {
    if found[0] == 0x16 && found[1] == 0x03 {
        " (a TLS handshake: the source uses --tls, this end does not)"
    } else {
        ""
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("not a vmigrate stream: bad magic {found:02x?}{}", tls_hint(found))]
    BadMagic { found: [u8; 8] },
    #[error("no common protocol version: peer speaks {peer_min}..={peer_max}, we speak {VERSION_MIN}..={VERSION_MAX}")]
    VersionMismatch { peer_min: u16, peer_max: u16 },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("peer refused the session: {reason}")]
    Refused { reason: String },
}

fn malformed(what: &'static str, detail: impl Into<String>) -> HandshakeError {
    HandshakeError::Malformed { what, detail: detail.into() }
}

pub fn encode_preamble() -> [u8; PREAMBLE_BYTES] {
    encode_preamble_of(&MAGIC, VERSION_MIN, VERSION_MAX)
}

/// Checks a source's preamble and returns the protocol version to use.
pub fn accept_preamble(bytes: &[u8; PREAMBLE_BYTES]) -> Result<u16, HandshakeError> {
    accept_preamble_of(bytes, &MAGIC, VERSION_MIN, VERSION_MAX)
}

/// A preamble of any of our protocols (the engine's, the relay's): `magic` and a version
/// window.
pub(crate) fn encode_preamble_of(magic: &[u8; 8], min: u16, max: u16) -> [u8; PREAMBLE_BYTES] {
    let mut out = [0u8; PREAMBLE_BYTES];
    out[..8].copy_from_slice(magic);
    out[8..10].copy_from_slice(&min.to_le_bytes());
    out[10..12].copy_from_slice(&max.to_le_bytes());
    out
}

/// Checks a preamble against `magic` and our version window `min..=max`; returns the
/// highest version both sides speak.
pub(crate) fn accept_preamble_of(
    bytes: &[u8; PREAMBLE_BYTES],
    magic: &[u8; 8],
    min: u16,
    max: u16,
) -> Result<u16, HandshakeError> {
    let found: [u8; 8] = bytes[..8].try_into().unwrap_or_default();
    if found != *magic {
        return Err(HandshakeError::BadMagic { found });
    }
    let peer_min = le_u16(&bytes[8..10]);
    let peer_max = le_u16(&bytes[10..12]);
    let version = peer_max.min(max);
    if peer_min > peer_max || version < peer_min.max(min) {
        return Err(HandshakeError::VersionMismatch { peer_min, peer_max });
    }
    if le_u32(&bytes[12..16]) != 0 {
        return Err(malformed("preamble", "reserved bytes are not zero"));
    }
    Ok(version)
}

/// What the source declares about the session on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub session_id: u64,
    pub connection_index: u16,
    pub connection_count: u16,
    pub page_size: u32,
    pub codec: Codec,
    pub xbzrle: bool,
    /// Pages may go as copies of pages sent in the same round (`PageEntry::Copy`).
    pub copies: bool,
    /// Size of each guest memory region, in bytes (a multiple of the page size).
    pub region_bytes: Vec<u64>,
    /// Where each region sits in the guest's physical address space (page aligned, no
    /// two overlapping).
    pub region_addresses: Vec<u64>,
    /// What the source VM needs of the destination's (`SourceVm::requirements`).
    pub vm_requirements: Vec<u8>,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(26 + 16 * self.region_bytes.len() + self.vm_requirements.len());
        out.extend_from_slice(&self.session_id.to_le_bytes());
        out.extend_from_slice(&self.connection_index.to_le_bytes());
        out.extend_from_slice(&self.connection_count.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        let (codec, level) = self.codec.to_wire();
        out.extend_from_slice(&[codec, level, self.xbzrle as u8, self.copies as u8]);
        out.extend_from_slice(&(self.region_bytes.len() as u16).to_le_bytes());
        for (address, bytes) in self.region_addresses.iter().zip(&self.region_bytes) {
            out.extend_from_slice(&address.to_le_bytes());
            out.extend_from_slice(&bytes.to_le_bytes());
        }
        out.extend_from_slice(&(self.vm_requirements.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.vm_requirements);
        out
    }

    /// Parses and validates a Hello: counts, page size and region sizes are bounded here,
    /// before anything is allocated from them. Whether the layout fits this receiver's
    /// memory limit is the caller's check.
    pub fn decode(payload: &[u8]) -> Result<Self, HandshakeError> {
        const FIXED: usize = 22;
        if payload.len() < FIXED {
            return Err(malformed("hello", format!("{} bytes, need at least {FIXED}", payload.len())));
        }
        let connection_index = le_u16(&payload[8..10]);
        let connection_count = le_u16(&payload[10..12]);
        if connection_count == 0 || connection_count > MAX_CONNECTIONS || connection_index >= connection_count {
            return Err(malformed(
                "hello",
                format!("connection {connection_index} of {connection_count} (limit {MAX_CONNECTIONS})"),
            ));
        }
        let page_size = le_u32(&payload[12..16]);
        if page_size as usize != PAGE_SIZE_BYTES {
            return Err(malformed("hello", format!("page size {page_size}, this build handles {PAGE_SIZE_BYTES}")));
        }
        let codec = Codec::from_wire(payload[16], payload[17])
            .ok_or_else(|| malformed("hello", format!("unknown codec {} level {}", payload[16], payload[17])))?;
        let flag = |name: &str, byte: u8| match byte {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(malformed("hello", format!("{name} flag {other}"))),
        };
        let (xbzrle, copies) = (flag("xbzrle", payload[18])?, flag("copies", payload[19])?);
        let region_count = le_u16(&payload[20..22]);
        if region_count == 0 || region_count > MAX_REGIONS {
            return Err(malformed("hello", format!("{region_count} regions (limit {MAX_REGIONS})")));
        }
        let regions_end = FIXED + 16 * region_count as usize;
        if payload.len() < regions_end + 4 {
            return Err(malformed(
                "hello",
                format!("{} bytes for {region_count} regions, expected at least {}", payload.len(), regions_end + 4),
            ));
        }
        let pairs: Vec<(u64, u64)> =
            payload[FIXED..regions_end].chunks_exact(16).map(|pair| (le_u64(&pair[..8]), le_u64(&pair[8..]))).collect();
        let requirements_len = le_u32(&payload[regions_end..regions_end + 4]) as usize;
        if requirements_len > MAX_REQUIREMENTS_BYTES || payload.len() != regions_end + 4 + requirements_len {
            return Err(malformed(
                "hello",
                format!(
                    "requirements of {requirements_len} bytes in {} bytes (limit {MAX_REQUIREMENTS_BYTES})",
                    payload.len()
                ),
            ));
        }
        let page = PAGE_SIZE_BYTES as u64;
        for (index, &(address, bytes)) in pairs.iter().enumerate() {
            if bytes == 0 || bytes % page != 0 {
                return Err(malformed(
                    "hello",
                    format!("region {index} is {bytes} bytes, not a positive multiple of the page size"),
                ));
            }
            if address % page != 0 || address.checked_add(bytes).is_none() {
                return Err(malformed("hello", format!("region {index} at {address:#x} is not a page-aligned range")));
            }
        }
        for (index, &(address, bytes)) in pairs.iter().enumerate() {
            if let Some(other) = pairs[..index].iter().position(|&(a, b)| address < a + b && a < address + bytes) {
                return Err(malformed("hello", format!("regions {other} and {index} overlap")));
            }
        }
        let region_bytes: Vec<u64> = pairs.iter().map(|&(_, bytes)| bytes).collect();
        // A total that wraps would pass the receiver's memory limit as a small number
        // (found by the `handshake` fuzz target).
        if region_bytes.iter().try_fold(0u64, |total, &bytes| total.checked_add(bytes)).is_none() {
            return Err(malformed("hello", "the regions add up to more than 2^64 bytes"));
        }
        Ok(Hello {
            session_id: le_u64(&payload[0..8]),
            connection_index,
            connection_count,
            page_size,
            codec,
            xbzrle,
            copies,
            region_bytes,
            region_addresses: pairs.iter().map(|&(address, _)| address).collect(),
            vm_requirements: payload[regions_end + 4..].to_vec(),
        })
    }

    /// The guest's size; saturates (a decoded Hello never needs to).
    pub fn total_bytes(&self) -> u64 {
        self.region_bytes.iter().fold(0u64, |total, &bytes| total.saturating_add(bytes))
    }

    /// True when `other` describes the same session (all fields but the connection index).
    pub fn same_session(&self, other: &Hello) -> bool {
        Hello { connection_index: 0, ..self.clone() } == Hello { connection_index: 0, ..other.clone() }
    }
}

/// The destination's answer to a Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloAck {
    Accepted { version: u16 },
    Refused { reason: String },
}

impl HelloAck {
    pub fn encode(&self) -> Vec<u8> {
        let (code, version, reason) = match self {
            HelloAck::Accepted { version } => (1u8, *version, ""),
            HelloAck::Refused { reason } => (2u8, 0, reason.as_str()),
        };
        let mut reason = reason.as_bytes();
        if reason.len() > MAX_REASON_BYTES {
            reason = &reason[..MAX_REASON_BYTES];
        }
        let mut out = vec![code];
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        out.extend_from_slice(reason);
        out
    }

    pub fn decode(payload: &[u8]) -> Result<Self, HandshakeError> {
        if payload.len() < 5 {
            return Err(malformed("hello-ack", format!("{} bytes", payload.len())));
        }
        let reason_len = le_u16(&payload[3..5]) as usize;
        if reason_len > MAX_REASON_BYTES || payload.len() != 5 + reason_len {
            return Err(malformed("hello-ack", format!("reason of {reason_len} bytes in {} bytes", payload.len())));
        }
        let reason = String::from_utf8_lossy(&payload[5..]).into_owned();
        match payload[0] {
            1 => Ok(HelloAck::Accepted { version: le_u16(&payload[1..3]) }),
            2 => Ok(HelloAck::Refused { reason }),
            other => Err(malformed("hello-ack", format!("status {other}"))),
        }
    }
}

/// A short text carried by `Abort` frames; bounded like rejection reasons.
pub fn encode_reason(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

pub fn decode_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(MAX_REASON_BYTES)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            session_id: 0xfeed,
            connection_index: 1,
            connection_count: 4,
            page_size: 4096,
            codec: Codec::Zlib { level: 1 },
            xbzrle: true,
            copies: true,
            region_bytes: vec![1 << 30, 4096 * 3],
            region_addresses: vec![0, 4 << 30],
            vm_requirements: b"cpu model".to_vec(),
        }
    }

    #[test]
    fn hello_round_trip() {
        let hello = hello();
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
    }

    #[test]
    fn hello_rejects_bad_fields() {
        let good = hello().encode();
        for (offset, value) in [(10usize, 0u8), (13, 0), (16, 9), (18, 2), (19, 2), (20, 0)] {
            let mut bad = good.clone();
            bad[offset] = value;
            assert!(Hello::decode(&bad).is_err(), "offset {offset} = {value} accepted");
        }
        assert!(Hello::decode(&good[..good.len() - 1]).is_err());
        let mut odd_region = hello();
        odd_region.region_bytes[0] = 4097;
        assert!(Hello::decode(&odd_region.encode()).is_err());
        let mut unaligned = hello();
        unaligned.region_addresses[1] = 4097;
        assert!(Hello::decode(&unaligned.encode()).is_err());
        let mut overlapping = hello();
        overlapping.region_addresses[1] = (1 << 30) - 4096;
        let err = Hello::decode(&overlapping.encode()).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        let mut huge = hello();
        huge.vm_requirements = vec![0; MAX_REQUIREMENTS_BYTES + 1];
        assert!(Hello::decode(&huge.encode()).is_err());
    }

    #[test]
    fn preamble_checks_magic_and_version() {
        assert_eq!(accept_preamble(&encode_preamble()), Ok(VERSION_MAX));
        let mut wrong = encode_preamble();
        wrong[0] = b'X';
        assert!(matches!(accept_preamble(&wrong), Err(HandshakeError::BadMagic { .. })));
        let mut newer = encode_preamble();
        newer[8..10].copy_from_slice(&(VERSION_MAX + 1).to_le_bytes());
        newer[10..12].copy_from_slice(&(VERSION_MAX + 2).to_le_bytes());
        let err = accept_preamble(&newer).unwrap_err();
        let (peer, ours) = (VERSION_MAX + 1, VERSION_MIN);
        let expected =
            format!("no common protocol version: peer speaks {peer}..={}, we speak {ours}..={ours}", peer + 1);
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn ack_round_trip() {
        for ack in [HelloAck::Accepted { version: 1 }, HelloAck::Refused { reason: "too big".into() }] {
            assert_eq!(HelloAck::decode(&ack.encode()).unwrap(), ack);
        }
        assert!(HelloAck::decode(&[3, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn regions_whose_sizes_wrap_past_2_pow_64_are_refused() {
        let hello = Hello {
            session_id: 1,
            connection_index: 0,
            connection_count: 1,
            page_size: PAGE_SIZE_BYTES as u32,
            codec: Codec::None,
            xbzrle: false,
            copies: false,
            // Each alone is a valid size; together they wrap to 4 KiB.
            region_bytes: vec![1 << 63, 1 << 63, PAGE_SIZE_BYTES as u64],
            region_addresses: vec![0, 1 << 63, 0],
            vm_requirements: Vec::new(),
        };
        // Regions that fit the address space side by side cannot add up past it: the
        // second reaches beyond 2^64.
        let err = Hello::decode(&hello.encode()).unwrap_err();
        assert!(err.to_string().contains("not a page-aligned range"), "{err}");
        assert_eq!(hello.total_bytes(), u64::MAX);
    }
}
