//! CRC32C (Castagnoli), the checksum of every frame and of a relayed stream's digest.
//!
//! `crc-fast` folds with carry-less multiplies (VPCLMULQDQ where the CPU has it), where the
//! `crc32c` crate chains the SSE4.2 `crc32` instruction: 2.25x the rate on 64 KiB payloads
//! here (`scripts/micro-bench frame_checksum`), where CRC32C was 7-17% of a relay's or a
//! migration's CPU (docs/PERFORMANCE.md). Same polynomial, same values: frames from either
//! implementation check out.

use crc_fast::{CrcAlgorithm, Digest};

/// CRC32C's final XOR; undone to carry on from a finished value.
const XOR_OUT: u32 = 0xffff_ffff;

/// The CRC32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c_append(0, bytes)
}

/// The CRC32C of the bytes that gave `crc`, followed by `bytes`.
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    let mut digest = Digest::new_with_init_state(CrcAlgorithm::Crc32Iscsi, u64::from(crc ^ XOR_OUT));
    digest.update(bytes);
    digest.finalize() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_check_value_is_castagnolis() {
        // The catalogue's check value for CRC-32/ISCSI.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    proptest! {
        #[test]
        fn agrees_with_the_crc32c_crate_whole_and_appended(
            bytes in proptest::collection::vec(any::<u8>(), 0..10_000),
            cut in any::<prop::sample::Index>(),
        ) {
            prop_assert_eq!(crc32c(&bytes), ::crc32c::crc32c(&bytes));
            let cut = cut.index(bytes.len() + 1);
            prop_assert_eq!(crc32c_append(crc32c(&bytes[..cut]), &bytes[cut..]), ::crc32c::crc32c(&bytes));
        }
    }
}
