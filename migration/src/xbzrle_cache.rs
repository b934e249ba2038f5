//! The XBZRLE cache: a bounded, direct-mapped store of the version of each page last sent,
//! and the epoch it was sent in. A re-sent page is delta-encoded against its cached copy;
//! the epoch travels with the delta so the destination can check it holds that exact
//! version.
//!
//! Every send of a page, whatever its encoding, must go through [`XbzrleCache::encode`]
//! or [`XbzrleCache::forget`], so the cache never holds a version the destination does
//! not. Compression workers share the cache; each slot has its own lock, and within one
//! round each page is sent once, so two workers meet only on a slot collision.

use crate::xbzrle::{self, XbzrleError};
use crate::PAGE_SIZE_BYTES;
use std::sync::Mutex;

/// QEMU's default `xbzrle-cache-size`.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

const EMPTY: u64 = u64::MAX;

struct Slot {
    key: u64,
    epoch: u32,
    data: Box<[u8]>,
}

/// What to send for a page, decided against the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XbzrleOutcome {
    /// Not cached (or caching is off for this round): send it another way.
    Miss,
    /// Identical to the copy the destination holds: nothing needs sending.
    Unchanged,
    /// A delta of `len` bytes is in the caller's buffer; it applies to the page of
    /// `base_epoch`.
    Delta { len: usize, base_epoch: u32 },
    /// The delta would not fit: send the page another way.
    Overflow,
}

pub struct XbzrleCache {
    slots: Vec<Mutex<Slot>>,
}

fn key(region: u16, page: u64) -> u64 {
    (u64::from(region) << 48) | page
}

impl XbzrleCache {
    /// A cache of `size_bytes` (rounded down to whole pages, at least one page).
    pub fn new(size_bytes: u64) -> Self {
        let slots = (size_bytes / PAGE_SIZE_BYTES as u64).max(1) as usize;
        XbzrleCache {
            slots: (0..slots)
                .map(|_| Mutex::new(Slot { key: EMPTY, epoch: 0, data: vec![0u8; PAGE_SIZE_BYTES].into_boxed_slice() }))
                .collect(),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        (self.slots.len() * PAGE_SIZE_BYTES) as u64
    }

    fn slot(&self, key: u64) -> std::sync::MutexGuard<'_, Slot> {
        // Like QEMU, neighbouring pages take neighbouring slots: a run of pages no longer
        // than the cache never collides with itself. Each region starts at a scattered
        // offset so that regions do not all pile onto the first slots.
        let region = key >> 48;
        let page = key & ((1 << 48) - 1);
        let index = page.wrapping_add(region.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % self.slots.len() as u64;
        // A poisoned slot only means a worker panicked mid-copy; the session is failing
        // anyway, and the data is overwritten before it is trusted again.
        self.slots[index as usize].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides how to send `new` (the copy of `page` about to be sent in `epoch`), writing
    /// a delta into `delta_out` when one fits, and records `new` as the destination's
    /// version unless the page is unchanged. With `insert` false a miss is not cached.
    pub fn encode(
        &self,
        region: u16,
        page: u64,
        epoch: u32,
        new: &[u8],
        delta_out: &mut [u8],
        insert: bool,
    ) -> XbzrleOutcome {
        let key = key(region, page);
        let mut slot = self.slot(key);
        if slot.key != key {
            if insert {
                if slot.data.len() != PAGE_SIZE_BYTES {
                    slot.data = vec![0u8; PAGE_SIZE_BYTES].into_boxed_slice();
                }
                slot.key = key;
                slot.epoch = epoch;
                slot.data.copy_from_slice(new);
            }
            return XbzrleOutcome::Miss;
        }
        let outcome = match xbzrle::encode(&slot.data, new, delta_out) {
            Ok(0) => return XbzrleOutcome::Unchanged,
            Ok(len) => XbzrleOutcome::Delta { len, base_epoch: slot.epoch },
            Err(XbzrleError::Overflow { .. }) => XbzrleOutcome::Overflow,
            // Encoding only fails by overflow; treat anything else the same way.
            Err(_) => XbzrleOutcome::Overflow,
        };
        slot.epoch = epoch;
        slot.data.copy_from_slice(new);
        outcome
    }

    /// Frees the cached pages (the cache stays usable, empty, and allocates again on
    /// insert). Freeing tens of megabytes is teardown work that belongs after the
    /// switchover, not in the downtime window.
    pub fn release(&self) {
        for slot in &self.slots {
            let mut slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            slot.key = EMPTY;
            slot.data = Box::new([]);
        }
    }

    /// The page goes to the destination without the cache's help (a zero page): drop any
    /// cached copy, which is no longer what the destination holds.
    pub fn forget(&self, region: u16, page: u64) {
        let key = key(region, page);
        let mut slot = self.slot(key);
        if slot.key == key {
            slot.key = EMPTY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn miss_then_delta_then_unchanged() {
        let cache = XbzrleCache::new(16 * PAGE_SIZE_BYTES as u64);
        let mut page = vec![3u8; PAGE_SIZE_BYTES];
        let mut delta = vec![0u8; PAGE_SIZE_BYTES - 1];
        assert_eq!(cache.encode(0, 5, 2, &page, &mut delta, true), XbzrleOutcome::Miss);
        page[7] = 4;
        let XbzrleOutcome::Delta { len, base_epoch: 2 } = cache.encode(0, 5, 3, &page, &mut delta, true) else {
            panic!("expected a delta against round 2");
        };
        let mut rebuilt = vec![3u8; PAGE_SIZE_BYTES];
        xbzrle::decode(&delta[..len], &mut rebuilt).unwrap();
        assert_eq!(rebuilt, page);
        assert_eq!(cache.encode(0, 5, 4, &page, &mut delta, true), XbzrleOutcome::Unchanged);
        // Unchanged keeps the epoch the destination holds (3), not 4.
        page[8] = 1;
        assert!(matches!(cache.encode(0, 5, 5, &page, &mut delta, true), XbzrleOutcome::Delta { base_epoch: 3, .. }));
    }

    #[test]
    fn forget_and_no_insert() {
        let cache = XbzrleCache::new(PAGE_SIZE_BYTES as u64);
        let page = vec![1u8; PAGE_SIZE_BYTES];
        let mut delta = vec![0u8; 100];
        assert_eq!(cache.encode(1, 9, 1, &page, &mut delta, false), XbzrleOutcome::Miss);
        assert_eq!(cache.encode(1, 9, 2, &page, &mut delta, false), XbzrleOutcome::Miss);
        cache.encode(1, 9, 2, &page, &mut delta, true);
        cache.forget(1, 9);
        assert_eq!(cache.encode(1, 9, 3, &page, &mut delta, true), XbzrleOutcome::Miss);
    }

    #[test]
    fn a_run_of_pages_as_long_as_the_cache_never_collides() {
        let cache = XbzrleCache::new(64 * PAGE_SIZE_BYTES as u64);
        let mut delta = vec![0u8; PAGE_SIZE_BYTES - 1];
        for page in 100..164 {
            let data = vec![page as u8; PAGE_SIZE_BYTES];
            assert_eq!(cache.encode(1, page, 1, &data, &mut delta, true), XbzrleOutcome::Miss);
        }
        for page in 100..164 {
            let data = vec![page as u8; PAGE_SIZE_BYTES];
            assert_eq!(cache.encode(1, page, 2, &data, &mut delta, true), XbzrleOutcome::Unchanged, "page {page}");
        }
    }

    #[test]
    fn big_change_overflows() {
        let cache = XbzrleCache::new(PAGE_SIZE_BYTES as u64);
        let old = vec![0u8; PAGE_SIZE_BYTES];
        let new: Vec<u8> = (0..PAGE_SIZE_BYTES).map(|i| (i % 2) as u8).collect();
        let mut delta = vec![0u8; PAGE_SIZE_BYTES - 1];
        cache.encode(0, 0, 1, &old, &mut delta, true);
        assert_eq!(cache.encode(0, 0, 2, &new, &mut delta, true), XbzrleOutcome::Overflow);
    }
}
