//! The XBZRLE page cache of a relay session, one for all its streams: QEMU's multifd sends a
//! page on whichever channel is free, so a page's next version often travels on another
//! stream than the copy it could be a delta against. A cache per stream missed it.
//!
//! Both relays keep the same direct-mapped cache (a page's slot follows from its key), and
//! a delta only ever applies to the copy it was made against if the destination applies
//! every operation on a slot in the order the source made them. Within a stream the order
//! holds by itself; across streams it does not (each stream is decoded by a thread of its
//! own). So every operation on a slot (a copy stored, read for a delta, or dropped) records
//! its origin, the stream and its page-aware chunk, and the source lets an item operate on
//! a slot only when the slot's last operation came from the same stream or from a chunk
//! the destination has said it decoded (`StreamDecoded`, `relay.rs`). An item that may not
//! goes as it is and leaves the cache alone, on both sides ("uncached").
//!
//! Why that is enough: on the source, one slot's operations form a chain, each one's
//! predecessor either earlier on its own stream or already decoded at the destination when
//! it was made. Either way the destination applies the predecessor first, so it applies
//! every chain in the source's order, and each operation finds the slot as the source did.
//! Nothing at the destination ever waits for another stream.

use crate::qemu_stream::PageKey;
use crate::PAGE_SIZE_BYTES;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use xxhash_rust::xxh3::xxh3_64;

/// Where a cache operation came from: a stream, and the index of its page-aware chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub stream: u16,
    pub chunk: u64,
}

/// The copies of the pages carried last, shared by a session's streams.
pub struct SharedPageCache {
    slots: Mutex<Slots>,
    /// Per stream: how many of its page-aware chunks the destination has decoded (kept on
    /// the source; `StreamDecoded` frames raise it).
    decoded: Vec<AtomicU64>,
}

/// The slots themselves, under the cache's lock.
pub struct Slots {
    keys: Vec<Option<PageKey>>,
    /// The last operation on each slot.
    origins: Vec<Option<Origin>>,
    pages: Vec<u8>,
    /// Each held page's content hash, and the slot holding a page of each content, so
    /// that a page carried again under another key can go as a reference.
    hashes: Vec<u64>,
    by_content: HashMap<u64, usize>,
}

impl SharedPageCache {
    /// A cache of `pages` pages (at least one) for up to `streams` streams.
    pub fn new(pages: usize, streams: u16) -> SharedPageCache {
        let pages = pages.max(1);
        SharedPageCache {
            slots: Mutex::new(Slots {
                keys: vec![None; pages],
                origins: vec![None; pages],
                pages: vec![0; pages * PAGE_SIZE_BYTES],
                hashes: vec![0; pages],
                by_content: HashMap::new(),
            }),
            decoded: (0..streams).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The destination has decoded `chunks` page-aware chunks of `stream`.
    pub fn peer_decoded(&self, stream: u16, chunks: u64) {
        if let Some(decoded) = self.decoded.get(usize::from(stream)) {
            decoded.fetch_max(chunks, Ordering::AcqRel);
        }
    }

    /// Whether an item of `origin` may operate on `key`'s slot (source side): the slot's
    /// last operation came from the same stream, or from a chunk the destination decoded.
    pub fn may_operate(&self, slots: &Slots, key: PageKey, origin: Origin) -> bool {
        match slots.origins[slots.slot(key)] {
            None => true,
            Some(last) if last.stream == origin.stream => true,
            Some(last) => self
                .decoded
                .get(usize::from(last.stream))
                .is_some_and(|decoded| last.chunk < decoded.load(Ordering::Acquire)),
        }
    }
}

impl Slots {
    fn slot(&self, key: PageKey) -> usize {
        // Neighbouring pages take neighbouring slots; each block starts at a scattered slot.
        let page = key.offset / PAGE_SIZE_BYTES as u64;
        let block = u64::from(key.block).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (page.wrapping_add(block) % self.keys.len() as u64) as usize
    }

    /// The copy of `key`, if its slot holds it; the read is an operation of `origin`.
    pub fn get(&mut self, key: PageKey, origin: Origin) -> Option<&[u8]> {
        let slot = self.slot(key);
        self.origins[slot] = Some(origin);
        (self.keys[slot] == Some(key)).then(|| &self.pages[slot * PAGE_SIZE_BYTES..(slot + 1) * PAGE_SIZE_BYTES])
    }

    /// Stores `page` as `key`'s copy, evicting whatever held the slot.
    pub fn put(&mut self, key: PageKey, page: &[u8], origin: Origin) {
        let slot = self.slot(key);
        self.evict(slot);
        self.keys[slot] = Some(key);
        self.origins[slot] = Some(origin);
        self.pages[slot * PAGE_SIZE_BYTES..(slot + 1) * PAGE_SIZE_BYTES].copy_from_slice(page);
        let hash = xxh3_64(page);
        self.hashes[slot] = hash;
        self.by_content.insert(hash, slot);
    }

    /// Drops `key`'s copy (the page went zero), if its slot holds it.
    pub fn forget(&mut self, key: PageKey, origin: Origin) {
        let slot = self.slot(key);
        self.origins[slot] = Some(origin);
        if self.keys[slot] == Some(key) {
            self.evict(slot);
        }
    }

    /// The key of a copy equal to `page` held under another key than `key`, if any (the
    /// source looks before it stores `page`). Not an operation on any slot.
    pub fn find_equal(&self, key: PageKey, page: &[u8]) -> Option<PageKey> {
        let slot = *self.by_content.get(&xxh3_64(page))?;
        let held = self.keys[slot].filter(|&held| held != key)?;
        (self.pages[slot * PAGE_SIZE_BYTES..(slot + 1) * PAGE_SIZE_BYTES] == *page).then_some(held)
    }

    /// Empties `slot`, and its entry in the content index.
    fn evict(&mut self, slot: usize) {
        if self.keys[slot].take().is_some() && self.by_content.get(&self.hashes[slot]) == Some(&slot) {
            self.by_content.remove(&self.hashes[slot]);
        }
    }
}
