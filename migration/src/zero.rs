//! Zero-page detection. A freshly booted or ballooned guest is mostly zero pages, and a
//! zero page goes on the wire as a header alone, so the sender scans every page it is about
//! to send: the scan must run near memory bandwidth. This is the only module of `migration`
//! with `unsafe`, confined to the SIMD kernels below; everything else in the crate stays
//! free of it.

// The SIMD intrinsics need unsafe; this allow keeps the module compiling if the crate
// ever denies unsafe_code, and marks it as the one exception.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// A zero-scan implementation. [`selected_kernel`] picks the fastest one the CPU supports;
/// tests and benchmarks name one with [`is_zero_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroScanKernel {
    /// 512-bit loads (avx512f), with masked loads (avx512bw) for buffers shorter than one
    /// vector.
    Avx512,
    /// 256-bit loads.
    Avx2,
    /// Portable u64 loop.
    Scalar,
}

/// True when every byte of `buf` is zero. Uses AVX-512 (avx512f and avx512bw) where present,
/// else AVX2, else a scalar u64 loop; any length and alignment.
pub fn is_zero(buf: &[u8]) -> bool {
    is_zero_with(selected_kernel(), buf)
}

/// The kernel [`is_zero`] uses on this CPU, detected once.
pub fn selected_kernel() -> ZeroScanKernel {
    static KERNEL: OnceLock<ZeroScanKernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        if has_avx512() {
            ZeroScanKernel::Avx512
        } else if has_avx2() {
            ZeroScanKernel::Avx2
        } else {
            ZeroScanKernel::Scalar
        }
    })
}

/// [`is_zero`] with a chosen kernel, for tests and benchmarks. Falls back to the scalar
/// kernel when the CPU lacks the requested kernel's features, so it is always safe to call.
pub fn is_zero_with(kernel: ZeroScanKernel, buf: &[u8]) -> bool {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        ZeroScanKernel::Avx512 if has_avx512() => {
            // SAFETY: has_avx512() confirmed avx512f and avx512bw at runtime.
            unsafe { x86::is_zero_avx512(buf) }
        }
        #[cfg(target_arch = "x86_64")]
        ZeroScanKernel::Avx2 if has_avx2() => {
            // SAFETY: has_avx2() confirmed avx2 at runtime.
            unsafe { x86::is_zero_avx2(buf) }
        }
        _ => is_zero_scalar(buf),
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Bytes the scalar kernel ORs together before testing: four words keep several loads in
/// flight while still exiting early on the first non-zero block.
const SCALAR_BLOCK_BYTES: usize = 32;

fn is_zero_scalar(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(SCALAR_BLOCK_BYTES);
    for block in &mut blocks {
        let acc = block
            .chunks_exact(8)
            .map(|word| u64::from_ne_bytes(word.try_into().expect("8-byte chunk")))
            .fold(0, |acc, word| acc | word);
        if acc != 0 {
            return false;
        }
    }
    let tail = blocks.remainder();
    let mut words = tail.chunks_exact(8);
    for word in &mut words {
        if u64::from_ne_bytes(word.try_into().expect("8-byte chunk")) != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| b == 0)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Vectors ORed together per loop iteration: enough independent loads to keep both load
    /// ports busy, one branch per 128 (AVX2) or 256 (AVX-512) bytes.
    const UNROLL: usize = 4;

    /// # Safety
    ///
    /// The CPU must support avx2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn is_zero_avx2(buf: &[u8]) -> bool {
        const VECTOR_BYTES: usize = 32;
        let len = buf.len();
        if len < VECTOR_BYTES {
            return super::is_zero_scalar(buf);
        }
        let base = buf.as_ptr();
        // Macros rather than closures, so the code is certainly compiled with this function's
        // target features instead of depending on closures inheriting them.
        macro_rules! load {
            ($at:expr) => {{
                let at: usize = $at;
                debug_assert!(at + VECTOR_BYTES <= len);
                // SAFETY: every call site ensures `at + 32 <= len`, so the 32 bytes lie inside
                // `buf`; loadu has no alignment requirement.
                unsafe { _mm256_loadu_si256(base.add(at).cast::<__m256i>()) }
            }};
        }
        macro_rules! is_zero_vec {
            ($v:expr) => {{
                let v = $v;
                _mm256_testz_si256(v, v) != 0
            }};
        }

        // Head: one unaligned vector, then continue from the first 32-byte boundary after the
        // start, so the main loop's loads never split a cache line. An unaligned start
        // re-reads a few bytes; an aligned one (every guest page) re-reads none.
        if !is_zero_vec!(load!(0)) {
            return false;
        }
        let mut at = (VECTOR_BYTES - base as usize % VECTOR_BYTES).min(len);
        while at + UNROLL * VECTOR_BYTES <= len {
            let a = _mm256_or_si256(load!(at), load!(at + VECTOR_BYTES));
            let b = _mm256_or_si256(load!(at + 2 * VECTOR_BYTES), load!(at + 3 * VECTOR_BYTES));
            if !is_zero_vec!(_mm256_or_si256(a, b)) {
                return false;
            }
            at += UNROLL * VECTOR_BYTES;
        }
        while at + VECTOR_BYTES <= len {
            if !is_zero_vec!(load!(at)) {
                return false;
            }
            at += VECTOR_BYTES;
        }
        // Tail: the last vector of the buffer, overlapping bytes already checked.
        at >= len || is_zero_vec!(load!(len - VECTOR_BYTES))
    }

    /// # Safety
    ///
    /// The CPU must support avx512f and avx512bw.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn is_zero_avx512(buf: &[u8]) -> bool {
        const VECTOR_BYTES: usize = 64;
        let len = buf.len();
        let base = buf.as_ptr();
        macro_rules! load {
            ($at:expr) => {{
                let at: usize = $at;
                debug_assert!(at + VECTOR_BYTES <= len);
                // SAFETY: every call site ensures `at + 64 <= len`, so the 64 bytes lie inside
                // `buf`; loadu has no alignment requirement.
                unsafe { _mm512_loadu_si512(base.add(at).cast::<__m512i>()) }
            }};
        }
        macro_rules! is_zero_vec {
            ($v:expr) => {{
                let v = $v;
                _mm512_test_epi64_mask(v, v) == 0
            }};
        }
        if len < VECTOR_BYTES {
            // Lanes outside the mask are neither read nor able to fault, so a short buffer
            // needs no scalar path.
            let mask: __mmask64 = (1u64 << len) - 1;
            // SAFETY: only the first `len` bytes are loaded (masked-off lanes are suppressed,
            // faults included), and those lie inside `buf`.
            let v = unsafe { _mm512_maskz_loadu_epi8(mask, base.cast::<i8>()) };
            return is_zero_vec!(v);
        }

        // Same shape as the AVX2 kernel: unaligned head, aligned body, overlapping tail.
        if !is_zero_vec!(load!(0)) {
            return false;
        }
        let mut at = (VECTOR_BYTES - base as usize % VECTOR_BYTES).min(len);
        while at + UNROLL * VECTOR_BYTES <= len {
            let a = _mm512_or_si512(load!(at), load!(at + VECTOR_BYTES));
            let b = _mm512_or_si512(load!(at + 2 * VECTOR_BYTES), load!(at + 3 * VECTOR_BYTES));
            if !is_zero_vec!(_mm512_or_si512(a, b)) {
                return false;
            }
            at += UNROLL * VECTOR_BYTES;
        }
        while at + VECTOR_BYTES <= len {
            if !is_zero_vec!(load!(at)) {
                return false;
            }
            at += VECTOR_BYTES;
        }
        at >= len || is_zero_vec!(load!(len - VECTOR_BYTES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KERNELS: [ZeroScanKernel; 3] = [ZeroScanKernel::Avx512, ZeroScanKernel::Avx2, ZeroScanKernel::Scalar];
    /// Room for any 0..10000-byte window at any of 64 alignments.
    const ARENA_BYTES: usize = 10_000 + 64;

    fn oracle(buf: &[u8]) -> bool {
        buf.iter().all(|&b| b == 0)
    }

    fn check_all_kernels(buf: &[u8]) -> Result<(), TestCaseError> {
        let expected = oracle(buf);
        for kernel in KERNELS {
            prop_assert_eq!(
                is_zero_with(kernel, buf),
                expected,
                "{:?} on {} bytes at address mod 64 = {}",
                kernel,
                buf.len(),
                buf.as_ptr() as usize % 64
            );
        }
        prop_assert_eq!(is_zero(buf), expected);
        Ok(())
    }

    #[test]
    fn reports_which_kernel_runs() {
        let kernel = selected_kernel();
        println!("selected zero-scan kernel: {kernel:?}");
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            assert_ne!(kernel, ZeroScanKernel::Scalar);
        }
    }

    #[test]
    fn every_small_length_and_alignment() {
        // Exhaustive over lengths and alignments where the kernels switch strategy: below,
        // at and just past one vector and one unrolled block. The non-zero byte goes to the
        // ends, the middle and one scattered spot for every case, and to every position
        // for short windows at a few alignments.
        let mut arena = vec![0u8; 700];
        for offset in 0..64 {
            for len in 0..600 {
                let window = offset..offset + len;
                check_all_kernels(&arena[window.clone()]).unwrap();
                let every_position = len <= 160 && [0, 1, 31, 63].contains(&offset);
                let hot_spots: Vec<usize> = if every_position {
                    (0..len).collect()
                } else if len == 0 {
                    Vec::new()
                } else {
                    vec![0, len - 1, len / 2, (offset * 13 + len * 7) % len]
                };
                for hot in hot_spots {
                    arena[offset + hot] = 0x80;
                    check_all_kernels(&arena[window.clone()]).unwrap();
                    arena[offset + hot] = 0;
                }
            }
        }
    }

    #[test]
    fn bytes_outside_the_window_are_ignored() {
        let mut arena = vec![0xffu8; 256];
        arena[64..192].fill(0);
        for kernel in KERNELS {
            for start in 64..192 {
                for end in start..=192 {
                    assert!(is_zero_with(kernel, &arena[start..end]), "{kernel:?} {start}..{end}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn zero_window_is_zero(offset in 0usize..64, len in 0usize..10_000) {
            // Non-zero bytes around the window catch kernels that read past either end.
            let mut arena = vec![0xa5u8; ARENA_BYTES];
            arena[offset..offset + len].fill(0);
            check_all_kernels(&arena[offset..offset + len])?;
        }

        #[test]
        fn one_nonzero_byte_is_found(
            offset in 0usize..64,
            len in 1usize..10_000,
            position in any::<prop::sample::Index>(),
            edge in 0u8..4,
            value in 1u8..=255,
        ) {
            let mut arena = vec![0u8; ARENA_BYTES];
            // Bias towards the first and last byte, where head and tail handling lives.
            let hot = match edge {
                0 => 0,
                1 => len - 1,
                _ => position.index(len),
            };
            arena[offset + hot] = value;
            check_all_kernels(&arena[offset..offset + len])?;
        }
    }

    proptest! {
        // Generating mostly-zero random bytes is the slow part; fewer cases suffice.
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn random_bytes_match_oracle(
            offset in 0usize..64,
            bytes in prop::collection::vec(prop_oneof![9 => Just(0u8), 1 => any::<u8>()], 0..2_000),
        ) {
            let mut arena = vec![0u8; offset + bytes.len()];
            arena[offset..].copy_from_slice(&bytes);
            check_all_kernels(&arena[offset..])?;
        }
    }
}
