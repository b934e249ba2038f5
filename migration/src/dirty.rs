//! Dirty-page tracking in the shape of KVM's dirty log: the guest side marks pages as it
//! writes them, the migration side takes the marks and clears them in one step
//! (`KVM_GET_DIRTY_LOG` with manual protect off), one bit per 4 KiB page.

use std::sync::atomic::{AtomicU64, Ordering};

/// A source of dirty-page bits, per memory region. Implemented by the synthetic guest's
/// [`AtomicBitmap`] and by whatever a VMM has (a KVM dirty log, a dirty ring drained into
/// a bitmap).
pub trait DirtyLog: Send + Sync {
    /// Moves the dirty bits of `region` into `out` (bit `p % 64` of word `p / 64` for page
    /// `p`), replacing its contents, and clears them in the log. Returns the number of
    /// dirty pages. `out` has `bitmap_words(pages)` words.
    fn take_dirty(&self, region: usize, out: &mut [u64]) -> u64;
}

/// Words needed for a bitmap of `pages` bits.
pub fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// Calls `visit` with every set bit's index, in ascending order.
pub fn for_each_set_bit(words: &[u64], mut visit: impl FnMut(u64)) {
    for (index, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = bits.trailing_zeros() as u64;
            visit(index as u64 * 64 + bit);
            bits &= bits - 1;
        }
    }
}

/// A dirty bitmap with one atomic bit per page, written by guest threads and taken by the
/// migration scanner without locks.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl AtomicBitmap {
    pub fn new(pages: u64) -> Self {
        AtomicBitmap { words: (0..bitmap_words(pages)).map(|_| AtomicU64::new(0)).collect(), pages }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks `page` dirty. A writer must mark *after* its store to the page: the scanner
    /// clears the bit before it copies the page, so a store that the copy missed always
    /// leaves its mark for the next round.
    pub fn mark(&self, page: u64) {
        assert!(page < self.pages, "page {page} outside a bitmap of {} pages", self.pages);
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::SeqCst);
    }

    /// Marks pages `first..first + count` dirty.
    pub fn mark_range(&self, first: u64, count: u64) {
        let end = first + count;
        assert!(end <= self.pages, "pages {first}..{end} outside a bitmap of {} pages", self.pages);
        let mut page = first;
        while page < end {
            let bit = page % 64;
            let span = (64 - bit).min(end - page);
            let mask = if span == 64 { u64::MAX } else { ((1u64 << span) - 1) << bit };
            self.words[(page / 64) as usize].fetch_or(mask, Ordering::SeqCst);
            page += span;
        }
    }

    /// Takes and clears all bits into `out`; returns how many were set.
    pub fn take_into(&self, out: &mut [u64]) -> u64 {
        assert_eq!(out.len(), self.words.len(), "bitmap size mismatch");
        let mut count = 0;
        for (word, slot) in self.words.iter().zip(out.iter_mut()) {
            // A load first skips the (common) clean words without a locked write.
            *slot = if word.load(Ordering::Relaxed) == 0 { 0 } else { word.swap(0, Ordering::SeqCst) };
            count += u64::from(slot.count_ones());
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_take_clear() {
        let bitmap = AtomicBitmap::new(200);
        bitmap.mark(0);
        bitmap.mark(63);
        bitmap.mark(64);
        bitmap.mark_range(100, 70);
        let mut out = vec![0; bitmap_words(200)];
        assert_eq!(bitmap.take_into(&mut out), 73);
        let mut seen = Vec::new();
        for_each_set_bit(&out, |p| seen.push(p));
        let mut expected = vec![0, 63, 64];
        expected.extend(100..170);
        assert_eq!(seen, expected);
        assert_eq!(bitmap.take_into(&mut out), 0);
        assert!(out.iter().all(|&w| w == 0));
    }

    #[test]
    fn mark_range_matches_single_marks() {
        for first in 0..130u64 {
            for count in [0u64, 1, 2, 63, 64, 65, 129] {
                if first + count > 260 {
                    continue;
                }
                let range = AtomicBitmap::new(260);
                let single = AtomicBitmap::new(260);
                range.mark_range(first, count);
                (first..first + count).for_each(|p| single.mark(p));
                let (mut a, mut b) = (vec![0; 5], vec![0; 5]);
                range.take_into(&mut a);
                single.take_into(&mut b);
                assert_eq!(a, b, "first {first} count {count}");
            }
        }
    }
}
