//! Byte shuffle, the filter Blosc puts in front of its codecs for numeric data: the bytes
//! of 4-byte elements regrouped by their place in the element (every element's byte 0,
//! then every byte 1, ...). Memory full of 32-bit numbers that use only their low bits
//! (counters, indices, the dirty guest's 16-bit values) has high bytes that are mostly
//! zero or alike; spread one per element they break every run a fast codec looks for,
//! gathered they make long runs that lz4 packs nearly to nothing: 16 random bits in each
//! 32-bit word go from lz4's 1.0x (zstd's 1.4x) to close to the data's 2x bound.
//!
//! A length that is not a multiple of 4 keeps its last bytes in place.

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
    let (elements, dst_tail) = dst.split_at_mut(n * ELEMENT);
    for (e, out) in elements.chunks_exact_mut(ELEMENT).enumerate() {
        out.copy_from_slice(&[b0[e], b1[e], b2[e], b3[e]]);
    }
    dst_tail.copy_from_slice(tail);
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

    proptest! {
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
