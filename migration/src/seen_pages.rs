//! The pages sent so far in a round, by content: a page whose contents equal one already
//! sent in the same round goes as a copy of it (`PageEntry::Copy`), a few bytes instead of
//! a page, whatever the codec would have made of it.
//!
//! Only pages sent in the *current* round are offered as originals: within a round each
//! page is sent once, so the destination's copy of the original cannot change again before
//! the round's barrier, where it applies copies. Across rounds the original may be re-sent
//! in the same round as the copy, and the destination would copy the wrong version.
//!
//! A bounded, 4-way set-associative table keyed by a 128-bit hash of the contents, seeded
//! per migration so that a guest cannot craft pages that collide. A slot from an earlier
//! round is empty for this one: nothing is cleared between rounds. Compression workers
//! share the table; each bucket of four slots has its own lock. (Direct-mapped, one slot
//! a bucket, two originals that met in a slot evicted each other: a guest of 16,384
//! distinct pages in 262,144 sent 23% more of them whole than it had.) Losing an original to a collision only costs a copy
//! not made; a match is confirmed byte for byte by the caller before it is trusted.

use crate::PAGE_SIZE_BYTES;
use std::sync::Mutex;
use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64};

/// The default bound on the table: 1 Mi slots, enough for every page of a 4 GiB guest to
/// be an original.
pub const DEFAULT_INDEX_BYTES: u64 = (1 << 20) * SLOT_BYTES;

const WAYS: usize = 4;

/// What one slot costs, its share of its bucket's lock included (36 bytes on 64-bit Linux).
pub const SLOT_BYTES: u64 = (std::mem::size_of::<Mutex<Bucket>>() / WAYS) as u64;

#[derive(Default)]
struct Bucket {
    slots: [Slot; WAYS],
    /// The slot a new original takes when none is free.
    next: u8,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The contents' hash, in two halves (a `u128` would pad the slot to 48 bytes).
    hash: [u64; 2],
    /// The round the original was sent in; 0 (no round) for an empty slot.
    epoch: u32,
    region: u16,
    page: u32,
}

/// Where few pages turn out to be copies, a worker looks up one page's contents in this
/// many.
pub const SPARSE_ONE_IN: u64 = 16;
/// Sightings over which a worker measures how many pages were copies.
const SAMPLING_WINDOW: u32 = 1024;
/// Below one copy in this many sightings, a worker samples.
const SAMPLING_BELOW_ONE_IN: u32 = 100;

/// Which pages a compression worker looks up. Hashing a page that is no copy costs about
/// two copies of it (`scripts/micro-bench`, "copy index"): a tenth of what sending it raw
/// costs. So a worker that finds under 1% of the pages it looked up to be copies looks up
/// only one page's contents in 16 from then on, chosen by the hash of its first 64 bytes:
/// every copy of a chosen page is chosen with it, so the share of copies among the chosen
/// is the guest's, and once it is 1% or more the worker looks every page up again.
#[derive(Debug, Clone)]
pub struct Sampling {
    every_page: bool,
    looked: u32,
    found: u32,
}

impl Default for Sampling {
    /// Every page looked up at first: a guest made of copies shows it from the start.
    fn default() -> Self {
        Sampling { every_page: true, looked: 0, found: 0 }
    }
}

impl Sampling {
    /// Whether to look up a page with these contents.
    pub fn wants(&self, contents: &[u8]) -> bool {
        self.every_page || xxh3_64(&contents[..64]).is_multiple_of(SPARSE_ONE_IN)
    }

    /// A page looked up was (`copy`) or was not a copy.
    pub fn record(&mut self, copy: bool) {
        self.looked += 1;
        self.found += u32::from(copy);
        if self.looked == SAMPLING_WINDOW {
            self.every_page = self.found * SAMPLING_BELOW_ONE_IN >= self.looked;
            (self.looked, self.found) = (0, 0);
        }
    }

    pub fn every_page(&self) -> bool {
        self.every_page
    }
}

/// A page already sent in this round with the same contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Original {
    pub region: u16,
    pub page: u32,
}

pub struct SeenPages {
    buckets: Vec<Mutex<Bucket>>,
    seed: u64,
}

/// The digest a copy carries, for the destination to check the original it holds:
/// unseeded, so that the destination computes it without knowing the source's seed.
pub fn copy_digest(contents: &[u8]) -> u64 {
    xxh3_64(contents)
}

impl SeenPages {
    /// A table of `bytes` (at least one bucket), hashing with `seed`.
    pub fn new(bytes: u64, seed: u64) -> Self {
        let buckets = (bytes / SLOT_BYTES / WAYS as u64).max(1) as usize;
        SeenPages { buckets: (0..buckets).map(|_| Mutex::new(Bucket::default())).collect(), seed }
    }

    pub fn size_bytes(&self) -> u64 {
        (self.buckets.len() * WAYS) as u64 * SLOT_BYTES
    }

    /// Page `page` of `region`, whose contents are `contents`, is about to be sent in
    /// `epoch`. Returns the page it may go as a copy of, if one with the same hash was sent
    /// in this round and `same` (given that page) confirms its contents are equal; else
    /// records this page as the original of its contents and returns `None`.
    pub fn sight(
        &self,
        region: u16,
        page: u32,
        epoch: u32,
        contents: &[u8],
        same: impl FnOnce(Original) -> bool,
    ) -> Option<Original> {
        debug_assert_eq!(contents.len(), PAGE_SIZE_BYTES);
        let full = xxh3_128_with_seed(contents, self.seed);
        let hash = [full as u64, (full >> 64) as u64];
        let bucket = &self.buckets[(hash[0] % self.buckets.len() as u64) as usize];
        let lock = || bucket.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let found = lock()
            .slots
            .iter()
            .find(|held| held.epoch == epoch && held.hash == hash)
            .map(|held| Original { region: held.region, page: held.page });
        // Compared outside the lock: reading the original's page is the slow part.
        if let Some(original) = found.filter(|&original| same(original)) {
            return Some(original);
        }
        let mut bucket = lock();
        // A slot of an earlier round, or the one these contents held (unconfirmed), or
        // else the bucket's next in turn.
        let way = match bucket.slots.iter().position(|held| held.epoch != epoch || held.hash == hash) {
            Some(way) => way,
            None => {
                let way = usize::from(bucket.next);
                bucket.next = ((way + 1) % WAYS) as u8;
                way
            }
        };
        bucket.slots[way] = Slot { hash, epoch, region, page };
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; PAGE_SIZE_BYTES]
    }

    #[test]
    fn a_page_seen_in_this_round_is_the_original_of_its_copies() {
        let seen = SeenPages::new(1 << 20, 7);
        assert_eq!(seen.sight(0, 10, 1, &page(3), |_| true), None);
        assert_eq!(seen.sight(1, 20, 1, &page(3), |_| true), Some(Original { region: 0, page: 10 }));
        assert_eq!(seen.sight(0, 11, 1, &page(4), |_| true), None, "other contents");
    }

    #[test]
    fn an_original_of_an_earlier_round_is_not_offered() {
        let seen = SeenPages::new(1 << 20, 7);
        assert_eq!(seen.sight(0, 10, 1, &page(3), |_| true), None);
        // The next round: page 10 may be re-sent in it, so 20 becomes the original.
        assert_eq!(seen.sight(0, 20, 2, &page(3), |_| true), None);
        assert_eq!(seen.sight(0, 30, 2, &page(3), |_| true), Some(Original { region: 0, page: 20 }));
    }

    #[test]
    fn an_unconfirmed_match_makes_the_new_page_the_original() {
        let seen = SeenPages::new(1 << 20, 7);
        seen.sight(0, 10, 1, &page(3), |_| true);
        let mut asked = None;
        assert_eq!(
            seen.sight(0, 20, 1, &page(3), |original| {
                asked = Some(original);
                false
            }),
            None
        );
        assert_eq!(asked, Some(Original { region: 0, page: 10 }));
        assert_eq!(seen.sight(0, 30, 1, &page(3), |_| true), Some(Original { region: 0, page: 20 }));
    }

    #[test]
    fn a_worker_that_finds_few_copies_samples_and_one_that_finds_some_looks_again() {
        let mut sampling = Sampling::default();
        assert!(sampling.every_page());
        for _ in 0..SAMPLING_WINDOW {
            sampling.record(false);
        }
        assert!(!sampling.every_page());
        // About one page's contents in 16 are chosen, by contents alone.
        let pages: Vec<Vec<u8>> = (0..4096u32).map(|n| n.to_le_bytes().repeat(1024)).collect();
        let sampled = pages.iter().filter(|page| sampling.wants(page)).count();
        assert!((4096 / 32..4096 / 8).contains(&sampled), "{sampled} of 4096 chosen");
        for n in 0..SAMPLING_WINDOW {
            sampling.record(n % 50 == 0);
        }
        assert!(sampling.every_page(), "2% copies among the sampled");
    }

    #[test]
    fn one_bucket_keeps_the_last_four_originals() {
        let seen = SeenPages::new(1, 7);
        assert_eq!(seen.size_bytes(), WAYS as u64 * SLOT_BYTES);
        for n in 1..=5u8 {
            assert_eq!(seen.sight(0, u32::from(n), 1, &page(n), |_| true), None);
        }
        assert_eq!(seen.sight(0, 6, 1, &page(1), |_| true), None, "the first evicted by the fifth");
        for n in 3..=5u8 {
            assert_eq!(seen.sight(0, 10, 1, &page(n), |_| true), Some(Original { region: 0, page: u32::from(n) }));
        }
        // A new round: every slot is free again.
        assert_eq!(seen.sight(0, 20, 2, &page(5), |_| true), None);
        assert_eq!(seen.sight(0, 21, 2, &page(5), |_| true), Some(Original { region: 0, page: 20 }));
    }
}
