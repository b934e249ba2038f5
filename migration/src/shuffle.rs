//! Byte shuffle, the filter Blosc puts in front of its codecs for numeric data: the bytes
//! of 4-byte elements regrouped by their place in the element (every element's byte 0,
//! then every byte 1, ...). Memory full of 32-bit numbers that use only their low bits
//! (counters, indices, the dirty guest's 16-bit values) has high bytes that are mostly
//! zero or alike; spread one per element they break every run a fast codec looks for,
//! gathered they make long runs that lz4 packs nearly to nothing: 16 random bits in each
//! 32-bit word go from lz4's 1.0x (zstd's 1.4x) to close to the data's 2x bound.
//!
//! A length that is not a multiple of 4 keeps its last bytes in place. [`bitshuffle`] goes
//! one step further, to bit planes.

/// Bytes per element.
pub const ELEMENT: usize = 4;

/// Elements transposed per step: 4 words of 4 bytes in, one word per byte place out.
const STEP: usize = 4;

/// Writes `src` shuffled into `dst` (the same length).
pub fn shuffle(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "shuffle keeps the length");
    let n = src.len() / ELEMENT;
    let whole = n - n % STEP;
    let (b0, rest) = dst.split_at_mut(n);
    let (b1, rest) = rest.split_at_mut(n);
    let (b2, rest) = rest.split_at_mut(n);
    let (b3, tail) = rest.split_at_mut(n);
    // Four elements at a time: a 4x4 byte transpose in registers, which the compiler turns
    // into vector shuffles (SSE2 is the x86-64 baseline).
    for (i, block) in src[..whole * ELEMENT].chunks_exact(ELEMENT * STEP).enumerate() {
        let word = |k: usize| u32::from_le_bytes(block[k * 4..k * 4 + 4].try_into().expect("4 bytes"));
        let (w0, w1, w2, w3) = (word(0), word(1), word(2), word(3));
        for (place, out) in [&mut *b0, &mut *b1, &mut *b2, &mut *b3].into_iter().enumerate() {
            let shift = 8 * place;
            let byte = |w: u32| (w >> shift) as u8;
            out[i * STEP..i * STEP + STEP].copy_from_slice(&[byte(w0), byte(w1), byte(w2), byte(w3)]);
        }
    }
    for e in whole..n {
        let element = &src[e * ELEMENT..e * ELEMENT + ELEMENT];
        (b0[e], b1[e], b2[e], b3[e]) = (element[0], element[1], element[2], element[3]);
    }
    tail.copy_from_slice(&src[n * ELEMENT..]);
}

/// Undoes [`shuffle`]: writes `src` (shuffled) back into its order in `dst`.
pub fn unshuffle(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "unshuffle keeps the length");
    let n = src.len() / ELEMENT;
    let (b0, rest) = src.split_at(n);
    let (b1, rest) = rest.split_at(n);
    let (b2, rest) = rest.split_at(n);
    let (b3, tail) = rest.split_at(n);
    let whole = n - n % STEP;
    let (elements, dst_tail) = dst.split_at_mut(n * ELEMENT);
    // Four elements at a time, the same 4x4 byte transpose as `shuffle`'s: one element
    // at a time this was most of the bit unshuffle's time.
    for (i, out) in elements[..whole * ELEMENT].chunks_exact_mut(ELEMENT * STEP).enumerate() {
        let word = |plane: &[u8]| u32::from_le_bytes(plane[i * STEP..i * STEP + STEP].try_into().expect("4 bytes"));
        let (w0, w1, w2, w3) = (word(b0), word(b1), word(b2), word(b3));
        for (e, element) in out.chunks_exact_mut(ELEMENT).enumerate() {
            let shift = 8 * e;
            let byte = |w: u32| (w >> shift) as u8;
            element.copy_from_slice(&[byte(w0), byte(w1), byte(w2), byte(w3)]);
        }
    }
    for e in whole..n {
        elements[e * ELEMENT..e * ELEMENT + ELEMENT].copy_from_slice(&[b0[e], b1[e], b2[e], b3[e]]);
    }
    dst_tail.copy_from_slice(tail);
}

/// Elements a bit shuffle transposes together: 8, so that each of a byte plane's bit
/// planes is whole bytes.
const BIT_GROUP: usize = 8;

/// Bit shuffle, Blosc's other filter (bitshuffle's, for 4-byte elements): the byte shuffle,
/// then each byte plane cut into its 8 bit planes (every element's bit 0 of that byte, then
/// every bit 1, ...). Numbers that use 12 of their 32 bits leave 20 bit planes all zero,
/// where the byte shuffle leaves half of their second byte plane's bits random. `scratch`
/// holds the byte-shuffled data on the way. A length that is not a multiple of 32 keeps
/// its last bytes in place.
pub fn bitshuffle(src: &[u8], dst: &mut [u8], scratch: &mut Vec<u8>) {
    bitshuffle_with(src, dst, scratch, Transpose::Vector);
}

/// Undoes [`bitshuffle`].
pub fn unbitshuffle(src: &[u8], dst: &mut [u8], scratch: &mut Vec<u8>) {
    unbitshuffle_with(src, dst, scratch, Transpose::Vector);
}

/// The bit shuffle without the vector instructions: the same output, for the benchmarks'
/// baseline (and the reference the vector code is tested against).
pub mod portable {
    use super::Transpose;

    pub fn bitshuffle(src: &[u8], dst: &mut [u8], scratch: &mut Vec<u8>) {
        super::bitshuffle_with(src, dst, scratch, Transpose::Portable);
    }

    pub fn unbitshuffle(src: &[u8], dst: &mut [u8], scratch: &mut Vec<u8>) {
        super::unbitshuffle_with(src, dst, scratch, Transpose::Portable);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transpose {
    Vector,
    Portable,
}

fn bitshuffle_with(src: &[u8], dst: &mut [u8], scratch: &mut Vec<u8>, transpose: Transpose) {
    assert_eq!(src.len(), dst.len(), "bitshuffle keeps the length");
    let whole = src.len() - src.len() % (ELEMENT * BIT_GROUP);
    scratch.resize(whole, 0);
    shuffle(&src[..whole], scratch);
    // Under 32 bytes there is no whole group: everything stays in place.
    let plane = (whole / ELEMENT).max(1);
    for (bytes, bits) in scratch.chunks_exact(plane).zip(dst[..whole].chunks_exact_mut(plane)) {
        let done = if transpose == Transpose::Vector { simd::bytes_to_bits(bytes, bits) } else { 0 };
        transpose_plane_from(bytes, bits, Direction::ToBits, done);
    }
    dst[whole..].copy_from_slice(&src[whole..]);
}

fn unbitshuffle_with(src: &[u8], dst: &mut [u8], scratch: &mut Vec<u8>, transpose: Transpose) {
    assert_eq!(src.len(), dst.len(), "unbitshuffle keeps the length");
    let whole = src.len() - src.len() % (ELEMENT * BIT_GROUP);
    scratch.resize(whole, 0);
    let plane = (whole / ELEMENT).max(1);
    for (bits, bytes) in src[..whole].chunks_exact(plane).zip(scratch.chunks_exact_mut(plane)) {
        let done = if transpose == Transpose::Vector { simd::bits_to_bytes(bits, bytes) } else { 0 };
        transpose_plane_from(bits, bytes, Direction::ToBytes, done);
    }
    unshuffle(scratch, &mut dst[..whole]);
    dst[whole..].copy_from_slice(&src[whole..]);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToBits,
    ToBytes,
}

/// One byte plane (a multiple of 8 bytes) to its 8 bit planes, or back: bit k of byte
/// 8g + j is bit j of byte g of bit plane k. Portable: eight groups at a time, so that each
/// bit plane gets 8 whole bytes per step: 8 words in, 8 transposed, and the bytes of the 8
/// results regrouped by bit (a byte transpose) into one word per bit plane.
#[cfg(test)]
fn transpose_plane(src: &[u8], dst: &mut [u8], direction: Direction) {
    transpose_plane_from(src, dst, direction, 0);
}

/// [`transpose_plane`] from group `first` on (the groups before it are done).
fn transpose_plane_from(src: &[u8], dst: &mut [u8], direction: Direction, first: usize) {
    let groups = src.len() / BIT_GROUP;
    let first = first.min(groups);
    let whole = first + (groups - first) - (groups - first) % BIT_GROUP;
    let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    for g in (first..whole).step_by(BIT_GROUP) {
        // The 8x8 block of bytes: for ToBits, row i is group g + i; for ToBytes, row k is
        // bit plane k's 8 bytes from group g.
        let rows: [u64; BIT_GROUP] = std::array::from_fn(|i| match direction {
            Direction::ToBits => word(&src[BIT_GROUP * (g + i)..BIT_GROUP * (g + i + 1)]),
            Direction::ToBytes => word(&src[i * groups + g..i * groups + g + BIT_GROUP]),
        });
        let rows = match direction {
            Direction::ToBits => transpose_bytes(rows.map(transpose8x8)),
            Direction::ToBytes => transpose_bytes(rows).map(transpose8x8),
        };
        for (i, row) in rows.into_iter().enumerate() {
            let at = match direction {
                Direction::ToBits => i * groups + g,
                Direction::ToBytes => BIT_GROUP * (g + i),
            };
            dst[at..at + BIT_GROUP].copy_from_slice(&row.to_le_bytes());
        }
    }
    for g in whole..groups {
        let gather = |at: &dyn Fn(usize) -> usize| u64::from_le_bytes(std::array::from_fn(|k| src[at(k)]));
        let word = match direction {
            Direction::ToBits => gather(&|j| BIT_GROUP * g + j),
            Direction::ToBytes => gather(&|k| k * groups + g),
        };
        for (k, byte) in transpose8x8(word).to_le_bytes().into_iter().enumerate() {
            match direction {
                Direction::ToBits => dst[k * groups + g] = byte,
                Direction::ToBytes => dst[BIT_GROUP * g + k] = byte,
            }
        }
    }
}

/// The 8x8 matrix of bytes in `rows` (byte c of row r) transposed.
fn transpose_bytes(rows: [u64; BIT_GROUP]) -> [u64; BIT_GROUP] {
    std::array::from_fn(|c| u64::from_le_bytes(std::array::from_fn(|r| (rows[r] >> (8 * c)) as u8)))
}

/// The 8x8 bit matrix in `x` (bit 8r + c is row r, column c) transposed, in three rounds of
/// masked swaps (Hacker's Delight, 7-3); its own inverse.
fn transpose8x8(mut x: u64) -> u64 {
    let mut t = (x ^ (x >> 7)) & 0x00AA_00AA_00AA_00AA;
    x ^= t ^ (t << 7);
    t = (x ^ (x >> 14)) & 0x0000_CCCC_0000_CCCC;
    x ^= t ^ (t << 14);
    t = (x ^ (x >> 28)) & 0x0000_0000_F0F0_F0F0;
    x ^= t ^ (t << 28);
    x
}

/// The bit transpose in SSE2 (the x86-64 baseline, so no detection at run time), 16 bytes
/// of a byte plane at a time, as bitshuffle does it: `movemask` gathers the top bit of each
/// of 16 bytes into 16 bits, which is two bytes of one bit plane; a doubling brings the next
/// bit to the top; the way back transposes 2-byte words in registers first. Each function
/// returns how many groups of 8 bytes it transposed (the rest is left to the portable
/// code); elsewhere they transpose none. The intrinsics come through `safe_arch`, which
/// offers them as safe functions where the target has the feature, so the zero scan stays
/// this crate's only unchecked code.
mod simd {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    use safe_arch::{
        add_i8_m128i, bitand_m128i, load_unaligned_m128i, m128i, move_mask_i8_m128i, pack_i16_to_u8_m128i,
        set_splat_i16_m128i, shr_imm_u16_m128i, store_unaligned_m128i, unpack_high_i16_m128i, unpack_high_i32_m128i,
        unpack_high_i64_m128i, unpack_low_i16_m128i, unpack_low_i32_m128i, unpack_low_i64_m128i,
    };

    /// Bytes of a plane per step: one 128-bit register.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    const LANE: usize = 16;

    /// Steps the way back takes together: 8 bit planes of 16 bytes each are an 8x8
    /// matrix of 2-byte words, transposed in registers.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    const STEPS_TOGETHER: usize = 8;

    /// The 16 bytes at the start of `bytes` in a register.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    fn load(bytes: &[u8]) -> m128i {
        load_unaligned_m128i(bytes[..LANE].try_into().expect("16 bytes"))
    }

    /// The low byte of each of `x`'s eight 2-byte words to bytes 0..8, the high byte to
    /// 8..16.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    fn split_words(x: m128i) -> m128i {
        pack_i16_to_u8_m128i(bitand_m128i(x, set_splat_i16_m128i(0xff)), shr_imm_u16_m128i::<8>(x))
    }

    /// Byte plane `src` to its 8 bit planes in `dst` (see `transpose_plane`).
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    pub(super) fn bytes_to_bits(src: &[u8], dst: &mut [u8]) -> usize {
        let steps = src.len() / LANE;
        let bits_per_plane = src.len() / super::BIT_GROUP;
        for step in 0..steps {
            let mut x = load(&src[step * LANE..]);
            for k in (0..super::BIT_GROUP).rev() {
                let mask = move_mask_i8_m128i(x) as u16;
                let out = k * bits_per_plane + 2 * step;
                dst[out..out + 2].copy_from_slice(&mask.to_le_bytes());
                // Doubling each byte shifts it left by one.
                x = add_i8_m128i(x, x);
            }
        }
        2 * steps
    }

    /// 8 bit planes in `src` back to their byte plane in `dst`, 128 bytes of it at a time:
    /// each bit plane's 16 bytes for them are loaded (2 per 16 output bytes), the 8x8
    /// matrix of 2-byte words transposed so that one register holds what 16 output bytes
    /// need (bit plane k's 2 bytes in word k), its low bytes packed to 0..8 and its high
    /// bytes to 8..16; then `movemask` with bit j on top gives output bytes j and 8 + j.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    pub(super) fn bits_to_bytes(src: &[u8], dst: &mut [u8]) -> usize {
        let bits_per_plane = dst.len() / super::BIT_GROUP;
        let rounds = dst.len() / (LANE * STEPS_TOGETHER);
        for round in 0..rounds {
            let first = round * STEPS_TOGETHER;
            // Row k: bit plane k's 2 bytes for each of the 8 steps.
            let rows: [m128i; 8] = std::array::from_fn(|k| load(&src[k * bits_per_plane + 2 * first..]));
            // a[2i] = lo(r[2i], r[2i + 1]), a[2i + 1] = hi(r[2i], r[2i + 1]).
            let a: [m128i; 8] = std::array::from_fn(|i| match i % 2 {
                0 => unpack_low_i16_m128i(rows[i], rows[i + 1]),
                _ => unpack_high_i16_m128i(rows[i - 1], rows[i]),
            });
            let b = [
                unpack_low_i32_m128i(a[0], a[2]),
                unpack_high_i32_m128i(a[0], a[2]),
                unpack_low_i32_m128i(a[1], a[3]),
                unpack_high_i32_m128i(a[1], a[3]),
                unpack_low_i32_m128i(a[4], a[6]),
                unpack_high_i32_m128i(a[4], a[6]),
                unpack_low_i32_m128i(a[5], a[7]),
                unpack_high_i32_m128i(a[5], a[7]),
            ];
            for t in 0..STEPS_TOGETHER {
                // Step first + t's words of the 8 bit planes.
                let words = match t % 2 {
                    0 => unpack_low_i64_m128i(b[t / 2], b[t / 2 + 4]),
                    _ => unpack_high_i64_m128i(b[t / 2], b[t / 2 + 4]),
                };
                let mut x = split_words(words);
                let mut masks = [0i16; super::BIT_GROUP];
                for j in (0..super::BIT_GROUP).rev() {
                    masks[j] = move_mask_i8_m128i(x) as i16;
                    x = add_i8_m128i(x, x);
                }
                let out = (first + t) * LANE;
                let slot: &mut [u8; LANE] = (&mut dst[out..out + LANE]).try_into().expect("16 bytes");
                store_unaligned_m128i(slot, split_words(m128i::from(masks)));
            }
        }
        2 * rounds * STEPS_TOGETHER
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    pub(super) fn bytes_to_bits(_src: &[u8], _dst: &mut [u8]) -> usize {
        0
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    pub(super) fn bits_to_bytes(_src: &[u8], _dst: &mut [u8]) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bytes_are_grouped_by_their_place_in_the_element() {
        let src: Vec<u8> = (0..18).collect();
        let mut dst = vec![0; 18];
        shuffle(&src, &mut dst);
        assert_eq!(dst, [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 16, 17]);
        let mut back = vec![0; 18];
        unshuffle(&dst, &mut back);
        assert_eq!(back, src);
    }

    #[test]
    fn small_numbers_leave_long_runs_of_zeros() {
        let src: Vec<u8> = (0..1024u32).flat_map(|i| (i * 37 % 65536).to_le_bytes()).collect();
        let mut dst = vec![0; src.len()];
        shuffle(&src, &mut dst);
        assert!(dst[2048..].iter().all(|&b| b == 0), "the high halves of 16-bit values");
    }

    #[test]
    fn the_bit_transpose_moves_bit_k_of_byte_j_to_bit_j_of_byte_k() {
        for (j, k) in [(0, 0), (0, 7), (3, 5), (7, 1), (7, 7)] {
            let x = 1u64 << (8 * j + k);
            assert_eq!(transpose8x8(x), 1u64 << (8 * k + j), "bit {k} of byte {j}");
        }
        assert_eq!(transpose8x8(transpose8x8(0x0123_4567_89ab_cdef)), 0x0123_4567_89ab_cdef);
    }

    #[test]
    fn numbers_of_few_bits_leave_whole_bit_planes_of_zeros() {
        // 12-bit numbers in 32-bit words: bits 12..32 of each are zero, so 20 of the 32 bit
        // planes are; the byte shuffle leaves only two whole byte planes (16 bits) zero.
        let src: Vec<u8> = (0..1024u32).flat_map(|i| (i.wrapping_mul(2_654_435_761) >> 20).to_le_bytes()).collect();
        let (mut dst, mut scratch) = (vec![0; src.len()], Vec::new());
        bitshuffle(&src, &mut dst, &mut scratch);
        let plane = src.len() / 32;
        let zero_planes = dst.chunks_exact(plane).filter(|p| p.iter().all(|&b| b == 0)).count();
        assert_eq!(zero_planes, 20);
        let mut back = vec![0; src.len()];
        unbitshuffle(&dst, &mut back, &mut scratch);
        assert_eq!(back, src);
    }

    proptest! {
        #[test]
        fn the_vector_transpose_matches_the_portable_one(plane in proptest::collection::vec(any::<u8>(), 0..600)) {
            let plane = &plane[..plane.len() / BIT_GROUP * BIT_GROUP];
            let (mut portable, mut vector) = (vec![0; plane.len()], vec![0; plane.len()]);
            transpose_plane(plane, &mut portable, Direction::ToBits);
            let done = simd::bytes_to_bits(plane, &mut vector);
            transpose_plane_from(plane, &mut vector, Direction::ToBits, done);
            prop_assert_eq!(&vector, &portable);
            let (mut back_portable, mut back_vector) = (vec![0; plane.len()], vec![0; plane.len()]);
            transpose_plane(&portable, &mut back_portable, Direction::ToBytes);
            let done = simd::bits_to_bytes(&portable, &mut back_vector);
            transpose_plane_from(&portable, &mut back_vector, Direction::ToBytes, done);
            prop_assert_eq!(&back_vector, &back_portable);
            prop_assert_eq!(back_vector.as_slice(), plane);
        }

        #[test]
        fn the_vector_bit_shuffle_writes_what_the_portable_one_does(src in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let (mut vector, mut portable, mut scratch) = (vec![0; src.len()], vec![0; src.len()], Vec::new());
            bitshuffle(&src, &mut vector, &mut scratch);
            super::portable::bitshuffle(&src, &mut portable, &mut scratch);
            prop_assert_eq!(&vector, &portable);
            let (mut back, mut back_portable) = (vec![0; src.len()], vec![0; src.len()]);
            unbitshuffle(&vector, &mut back, &mut scratch);
            super::portable::unbitshuffle(&vector, &mut back_portable, &mut scratch);
            prop_assert_eq!(&back, &back_portable);
            prop_assert_eq!(back, src);
        }

        #[test]
        fn unbitshuffle_undoes_bitshuffle(src in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let (mut shuffled, mut scratch) = (vec![0; src.len()], Vec::new());
            bitshuffle(&src, &mut shuffled, &mut scratch);
            let mut back = vec![0; src.len()];
            unbitshuffle(&shuffled, &mut back, &mut scratch);
            prop_assert_eq!(back, src);
        }

        #[test]
        fn unshuffle_undoes_shuffle(src in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let mut shuffled = vec![0; src.len()];
            shuffle(&src, &mut shuffled);
            let mut back = vec![0; src.len()];
            unshuffle(&shuffled, &mut back);
            prop_assert_eq!(back, src);
        }
    }
}
