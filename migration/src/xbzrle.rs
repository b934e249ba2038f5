//! XBZRLE page deltas in QEMU's wire format (QEMU `migration/xbzrle.c`).
//!
//! A page the guest keeps rewriting is sent again in every pre-copy round; when only a few
//! bytes changed since the copy the receiver already holds, the delta is much smaller than the
//! page. The delta is computed on `old XOR new` as alternating runs:
//!
//! ```text
//! delta := { unchanged_len:ULEB128  changed_len:ULEB128  changed_bytes[changed_len] }*
//! ```
//!
//! Runs are maximal, only the first unchanged run may be empty, a changed run is never empty,
//! and a trailing unchanged run is not encoded. Equal pages encode to nothing. For pages up to
//! 16 KiB every length fits QEMU's two-byte ULEB128 limit and the output is byte-for-byte
//! what QEMU produces; the decoder also accepts longer ULEB128 lengths, bounded by the page.
//!
//! Both directions are pure functions over slices, and the decoder is fed bytes from the
//! network: every length is checked against the page and the delta, and it never panics.

/// Why a page could not be encoded, or why a delta is corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XbzrleError {
    /// The delta would not fit in the destination buffer, which callers size below one page:
    /// the page changed too much for a delta to pay off, so send it whole.
    #[error("the delta does not fit in the {capacity_bytes}-byte destination; send the page whole")]
    Overflow { capacity_bytes: usize },
    #[error("old and new pages differ in length ({old_len} and {new_len} bytes)")]
    LengthMismatch { old_len: usize, new_len: usize },
    /// The delta ends inside a length or inside a changed run's bytes.
    #[error("the delta ends inside a run at delta offset {delta_offset}")]
    Truncated { delta_offset: usize },
    /// A length is longer than ten ULEB128 bytes or does not fit in 64 bits.
    #[error("malformed ULEB128 length at delta offset {delta_offset}")]
    BadLength { delta_offset: usize },
    /// A changed run of length zero, or an empty unchanged run that is not the first: the
    /// encoder never writes either, so the delta is corrupt.
    #[error("empty run at delta offset {delta_offset}")]
    EmptyRun { delta_offset: usize },
    /// A run extends beyond the end of the page.
    #[error("a run of {run_len} bytes at page offset {page_offset} passes the end of the {page_len}-byte page")]
    RunPastEnd { page_offset: usize, run_len: u64, page_len: usize },
}

/// Encodes `new` against `old` (same length) into `dst` and returns the bytes written.
///
/// Returns `Ok(0)` when the pages are equal, and [`XbzrleError::Overflow`] when the encoding
/// would not fit in `dst.len()`: callers pass a `dst` smaller than a page so that a delta that
/// does not pay off is abandoned as soon as it grows too long. On error `dst` holds garbage.
pub fn encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Result<usize, XbzrleError> {
    if old.len() != new.len() {
        return Err(XbzrleError::LengthMismatch { old_len: old.len(), new_len: new.len() });
    }
    let mut at = 0;
    let mut written = 0;
    loop {
        let unchanged_start = at;
        at = skip_unchanged(old, new, at);
        if at == new.len() {
            // The trailing unchanged run is implied; for equal pages this returns 0.
            return Ok(written);
        }
        let changed_start = at;
        at = skip_changed(old, new, at);
        written = put_uleb128(dst, written, changed_start - unchanged_start)?;
        written = put_uleb128(dst, written, at - changed_start)?;
        let run = &new[changed_start..at];
        let capacity_bytes = dst.len();
        dst.get_mut(written..written + run.len()).ok_or(XbzrleError::Overflow { capacity_bytes })?.copy_from_slice(run);
        written += run.len();
    }
}

/// Applies `delta` to `page`, which holds the old version, turning it into the new one.
///
/// Every length is checked against the page and the delta, so corrupt input returns an error
/// and never panics. The delta is validated completely before the first byte is written: on
/// error `page` is unchanged.
pub fn decode(delta: &[u8], page: &mut [u8]) -> Result<(), XbzrleError> {
    for run in Runs::new(delta, page.len()) {
        run?;
    }
    for run in Runs::new(delta, page.len()) {
        let ChangedRun { page_offset, bytes } = run?;
        page[page_offset..page_offset + bytes.len()].copy_from_slice(bytes);
    }
    Ok(())
}

/// Bytes compared per step. QEMU compares a `long` at a time; a u64 is the same on x86-64.
const WORD_BYTES: usize = 8;
const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

fn word_at(buf: &[u8], at: usize) -> u64 {
    // Little-endian whatever the host, so the lowest set bit belongs to the first byte.
    u64::from_le_bytes(buf[at..at + WORD_BYTES].try_into().expect("8-byte slice"))
}

/// Returns the offset of the first byte at or after `at` where the pages differ, or the
/// length when they agree to the end.
fn skip_unchanged(old: &[u8], new: &[u8], mut at: usize) -> usize {
    while at + WORD_BYTES <= new.len() {
        let diff = word_at(old, at) ^ word_at(new, at);
        if diff != 0 {
            return at + diff.trailing_zeros() as usize / 8;
        }
        at += WORD_BYTES;
    }
    while at < new.len() && old[at] == new[at] {
        at += 1;
    }
    at
}

/// Returns the offset of the first byte at or after `at` where the pages agree, or the
/// length when they differ to the end.
fn skip_changed(old: &[u8], new: &[u8], mut at: usize) -> usize {
    while at + WORD_BYTES <= new.len() {
        let diff = word_at(old, at) ^ word_at(new, at);
        // Flags the zero bytes of `diff`. A borrow can also flag a byte above a real zero
        // byte, never below one, so the lowest flag is exact (the trick QEMU uses too).
        let equal_bytes = diff.wrapping_sub(LOW_BITS) & !diff & HIGH_BITS;
        if equal_bytes != 0 {
            return at + equal_bytes.trailing_zeros() as usize / 8;
        }
        at += WORD_BYTES;
    }
    while at < new.len() && old[at] != new[at] {
        at += 1;
    }
    at
}

fn put_uleb128(dst: &mut [u8], mut at: usize, mut value: usize) -> Result<usize, XbzrleError> {
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        let capacity_bytes = dst.len();
        let slot = dst.get_mut(at).ok_or(XbzrleError::Overflow { capacity_bytes })?;
        *slot = if value == 0 { low } else { low | 0x80 };
        at += 1;
        if value == 0 {
            return Ok(at);
        }
    }
}

/// Longest ULEB128 accepted: ten bytes hold any u64.
const MAX_ULEB128_BYTES: usize = 10;

/// Reads a ULEB128 at `at`; returns the value and the offset just past it.
fn get_uleb128(src: &[u8], at: usize) -> Result<(u64, usize), XbzrleError> {
    let mut value = 0u64;
    for i in 0..MAX_ULEB128_BYTES {
        let byte = *src.get(at + i).ok_or(XbzrleError::Truncated { delta_offset: at })?;
        let bits = u64::from(byte & 0x7f);
        // The tenth byte may only contribute the 64th bit.
        if i == MAX_ULEB128_BYTES - 1 && bits > 1 {
            return Err(XbzrleError::BadLength { delta_offset: at });
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, at + i + 1));
        }
    }
    Err(XbzrleError::BadLength { delta_offset: at })
}

/// One changed run of a validated delta: where it goes in the page, and its bytes.
struct ChangedRun<'a> {
    page_offset: usize,
    bytes: &'a [u8],
}

/// Parses a delta into its changed runs, checking each against the page length. Stops after
/// the first error.
struct Runs<'a> {
    delta: &'a [u8],
    delta_offset: usize,
    page_offset: usize,
    page_len: usize,
    failed: bool,
}

impl<'a> Runs<'a> {
    fn new(delta: &'a [u8], page_len: usize) -> Self {
        Self { delta, delta_offset: 0, page_offset: 0, page_len, failed: false }
    }

    /// Converts a decoded run length to usize if the run fits in the rest of the page.
    fn bounded(&self, run_len: u64) -> Result<usize, XbzrleError> {
        usize::try_from(run_len)
            .ok()
            .filter(|&len| len <= self.page_len - self.page_offset)
            .ok_or(XbzrleError::RunPastEnd { page_offset: self.page_offset, run_len, page_len: self.page_len })
    }

    fn next_run(&mut self) -> Result<ChangedRun<'a>, XbzrleError> {
        let unchanged_at = self.delta_offset;
        let (unchanged_len, next) = get_uleb128(self.delta, unchanged_at)?;
        if unchanged_len == 0 && unchanged_at != 0 {
            return Err(XbzrleError::EmptyRun { delta_offset: unchanged_at });
        }
        self.page_offset += self.bounded(unchanged_len)?;
        self.delta_offset = next;

        let changed_at = self.delta_offset;
        let (changed_len, next) = get_uleb128(self.delta, changed_at)?;
        if changed_len == 0 {
            return Err(XbzrleError::EmptyRun { delta_offset: changed_at });
        }
        let changed_len = self.bounded(changed_len)?;
        let bytes = next
            .checked_add(changed_len)
            .and_then(|end| self.delta.get(next..end))
            .ok_or(XbzrleError::Truncated { delta_offset: changed_at })?;
        let run = ChangedRun { page_offset: self.page_offset, bytes };
        self.page_offset += changed_len;
        self.delta_offset = next + changed_len;
        Ok(run)
    }
}

impl<'a> Iterator for Runs<'a> {
    type Item = Result<ChangedRun<'a>, XbzrleError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.delta_offset >= self.delta.len() {
            return None;
        }
        let run = self.next_run();
        self.failed = run.is_err();
        Some(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE_BYTES: usize = 4096;

    /// Byte-at-a-time transcription of QEMU's xbzrle_encode_buffer semantics, without the
    /// word tricks: the oracle for the fast encoder.
    fn naive_encode(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < new.len() {
            let unchanged_start = at;
            while at < new.len() && old[at] == new[at] {
                at += 1;
            }
            if at == new.len() {
                break;
            }
            let changed_start = at;
            while at < new.len() && old[at] != new[at] {
                at += 1;
            }
            for len in [changed_start - unchanged_start, at - changed_start] {
                let mut len = len;
                loop {
                    let low = (len & 0x7f) as u8;
                    len >>= 7;
                    out.push(if len == 0 { low } else { low | 0x80 });
                    if len == 0 {
                        break;
                    }
                }
            }
            out.extend_from_slice(&new[changed_start..at]);
        }
        out
    }

    fn encode_vec(old: &[u8], new: &[u8]) -> Vec<u8> {
        // Worst case is 3 bytes per 2 page bytes (alternating runs of one byte).
        let mut dst = vec![0u8; 2 * new.len() + 16];
        let len = encode(old, new, &mut dst).unwrap();
        dst.truncate(len);
        dst
    }

    #[test]
    fn equal_pages_encode_to_nothing() {
        let page = vec![7u8; PAGE_BYTES];
        assert_eq!(encode(&page, &page, &mut []), Ok(0));
        assert_eq!(encode(&page, &page, &mut [0u8; 100]), Ok(0));
        assert_eq!(encode(&[], &[], &mut []), Ok(0));
        let mut copy = page.clone();
        decode(&[], &mut copy).unwrap();
        assert_eq!(copy, page);
    }

    #[test]
    fn known_encoding() {
        let old = [0u8; 16];
        let mut new = old;
        new[3..5].copy_from_slice(&[1, 2]);
        new[15] = 9;
        // (3 unchanged, 2 changed: 1 2), (10 unchanged, 1 changed: 9); no trailing run.
        assert_eq!(encode_vec(&old, &new), [3, 2, 1, 2, 10, 1, 9]);
        // A change at offset 0 starts with the one empty unchanged run allowed.
        new = old;
        new[0] = 5;
        assert_eq!(encode_vec(&old, &new), [0, 1, 5]);
    }

    #[test]
    fn long_runs_use_multi_byte_lengths() {
        let old = vec![0u8; 20_000];
        let mut new = old.clone();
        new[16_500] = 1;
        // 16500 = 0x4074 -> f4 80 01: three bytes, beyond QEMU's two-byte limit.
        assert_eq!(encode_vec(&old, &new), [0xf4, 0x80, 0x01, 1, 1]);
        let mut page = old.clone();
        decode(&[0xf4, 0x80, 0x01, 1, 1], &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn every_other_byte_changed_overflows() {
        let old = vec![0u8; PAGE_BYTES];
        let new: Vec<u8> = (0..PAGE_BYTES).map(|i| (i % 2) as u8).collect();
        // The delta takes 3 bytes per 2 page bytes: 6144 bytes for a 4 KiB page.
        let capacity_bytes = PAGE_BYTES - PAGE_BYTES / 8;
        let mut dst = vec![0u8; capacity_bytes];
        assert_eq!(encode(&old, &new, &mut dst), Err(XbzrleError::Overflow { capacity_bytes }));
        assert_eq!(
            encode(&old, &new, &mut vec![0u8; PAGE_BYTES]),
            Err(XbzrleError::Overflow { capacity_bytes: PAGE_BYTES })
        );
        let delta = encode_vec(&old, &new);
        assert_eq!(delta.len(), 3 * PAGE_BYTES / 2);
        let mut page = old.clone();
        decode(&delta, &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        assert_eq!(encode(&[0; 4], &[0; 5], &mut [0; 16]), Err(XbzrleError::LengthMismatch { old_len: 4, new_len: 5 }));
    }

    #[test]
    fn corrupt_deltas_are_described() {
        let mut page = [0u8; 16];
        let cases: &[(&[u8], XbzrleError)] = &[
            (&[3], XbzrleError::Truncated { delta_offset: 1 }),
            (&[3, 2, 1], XbzrleError::Truncated { delta_offset: 1 }),
            (&[0x83], XbzrleError::Truncated { delta_offset: 0 }),
            (&[3, 0], XbzrleError::EmptyRun { delta_offset: 1 }),
            (&[0, 1, 5, 0, 1, 6], XbzrleError::EmptyRun { delta_offset: 3 }),
            (&[17, 1, 0], XbzrleError::RunPastEnd { page_offset: 0, run_len: 17, page_len: 16 }),
            (&[15, 2, 1, 1], XbzrleError::RunPastEnd { page_offset: 15, run_len: 2, page_len: 16 }),
            (&[0xff; 11], XbzrleError::BadLength { delta_offset: 0 }),
            (&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], XbzrleError::BadLength { delta_offset: 0 }),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
                XbzrleError::RunPastEnd { page_offset: 0, run_len: u64::MAX, page_len: 16 },
            ),
        ];
        for &(delta, expected) in cases {
            assert_eq!(decode(delta, &mut page), Err(expected), "{delta:?}");
            assert_eq!(page, [0u8; 16], "page touched by failed decode of {delta:?}");
        }
    }

    /// A random page and a copy with sparse random changes: a few spans of random bytes,
    /// some of which may coincide with the old bytes.
    fn page_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (1usize..=2 * PAGE_BYTES).prop_flat_map(|len| {
            (
                prop::collection::vec(any::<u8>(), len),
                prop::collection::vec((0..len, 1usize..64, prop::collection::vec(any::<u8>(), 64)), 0..24),
            )
                .prop_map(|(old, spans)| {
                    let mut new = old.clone();
                    for (start, span_len, bytes) in spans {
                        let end = (start + span_len).min(new.len());
                        new[start..end].copy_from_slice(&bytes[..end - start]);
                    }
                    (old, new)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn round_trip_matches_qemu_encoding((old, new) in page_pair()) {
            let delta = encode_vec(&old, &new);
            prop_assert_eq!(&delta, &naive_encode(&old, &new));
            prop_assert_eq!(delta.is_empty(), old == new);
            let mut page = old.clone();
            decode(&delta, &mut page).unwrap();
            prop_assert_eq!(page, new);
        }

        #[test]
        fn small_destination_overflows_or_agrees(
            (old, new) in page_pair(),
            capacity_bytes in 0usize..512,
        ) {
            let full = encode_vec(&old, &new);
            let mut dst = vec![0u8; capacity_bytes];
            match encode(&old, &new, &mut dst) {
                Ok(len) => prop_assert_eq!(&dst[..len], &full[..]),
                Err(e) => {
                    prop_assert_eq!(e, XbzrleError::Overflow { capacity_bytes });
                    prop_assert!(full.len() > capacity_bytes);
                }
            }
        }

        #[test]
        fn arbitrary_deltas_never_panic(
            // Small bytes are plausible lengths, so they get past the first check more often.
            delta in prop::collection::vec(prop_oneof![any::<u8>(), 0u8..24], 0..256),
            page_len in 0usize..300,
        ) {
            let mut page = vec![0x5au8; page_len];
            if decode(&delta, &mut page).is_err() {
                prop_assert!(page.iter().all(|&b| b == 0x5a), "failed decode wrote the page");
            }
        }

        #[test]
        fn truncated_deltas_fail_or_stay_in_bounds((old, new) in page_pair()) {
            let delta = encode_vec(&old, &new);
            for cut in 0..delta.len() {
                let mut page = old.clone();
                // A cut on a run boundary is a valid shorter delta; anywhere else is an error.
                // Neither may panic, and an error leaves the page as it was.
                if decode(&delta[..cut], &mut page).is_err() {
                    prop_assert_eq!(&page, &old);
                }
            }
        }
    }
}
