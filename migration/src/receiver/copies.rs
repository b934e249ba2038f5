//! Pages that came as copies of others (`PageEntry::Copy`), held until the round's
//! barrier: only then is every page of the round written, so the original holds the
//! contents the source hashed, and nothing writes guest memory while they are copied.
//! A copy whose original does not hash to the digest it carries is the session's error:
//! the destination never copies contents it cannot vouch for.

use super::ReceiveError;
use crate::memory::GuestMemory;
use crate::seen_pages::copy_digest;
use crate::PAGE_SIZE_BYTES;
use std::sync::Mutex;

/// One page to fill from another at the barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCopy {
    pub from_region: u16,
    pub from_page: u32,
    pub region: u16,
    pub page: u32,
    pub digest: u64,
}

/// The copies of the round under way, from every decompression worker.
#[derive(Default)]
pub struct PendingCopies {
    pending: Mutex<Vec<PendingCopy>>,
}

impl PendingCopies {
    /// Takes a batch's copies (one lock per batch, not per page).
    pub(crate) fn hold(&self, copies: &mut Vec<PendingCopy>) {
        if !copies.is_empty() {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).append(copies);
        }
    }

    /// Takes the copies held, those of one original together (so that it is read and
    /// checked once), for [`fill`] at the round's barrier; any part of them may be filled
    /// apart from the rest (no copy's page is another's original).
    pub fn take(&self) -> Vec<PendingCopy> {
        let mut pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        pending.sort_unstable_by_key(|copy| (copy.from_region, copy.from_page));
        pending
    }

    /// Fills every page held from its original (`take`, then `fill`).
    pub fn apply(&self, memory: &dyn GuestMemory) -> Result<u64, ReceiveError> {
        fill(memory, &self.take())
    }
}

/// Fills `copies` from their originals, all pages of the round being written and none
/// being written meanwhile (the round's barrier). Returns how many it copied.
pub fn fill(memory: &dyn GuestMemory, copies: &[PendingCopy]) -> Result<u64, ReceiveError> {
    let mut original = vec![0u8; PAGE_SIZE_BYTES];
    let mut held: Option<(u16, u32, u64)> = None;
    for copy in copies {
        if held.is_none_or(|(region, page, _)| (region, page) != (copy.from_region, copy.from_page)) {
            memory.read_page(usize::from(copy.from_region), u64::from(copy.from_page), &mut original);
            held = Some((copy.from_region, copy.from_page, copy_digest(&original)));
        }
        if held.map(|(_, _, digest)| digest) != Some(copy.digest) {
            return Err(ReceiveError::CopyDigest {
                region: copy.region,
                page: u64::from(copy.page),
                from_region: copy.from_region,
                from_page: u64::from(copy.from_page),
            });
        }
        memory.write_page(usize::from(copy.region), u64::from(copy.page), &original);
    }
    Ok(copies.len() as u64)
}
