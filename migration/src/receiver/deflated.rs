//! A batch's `deflate` entries at the destination: single pages and blocks of several
//! pages (a compression device's operation each), inflated on a device where the worker
//! has one ([`PageInflater`]), all of a batch's at once, or on the CPU; written into guest
//! memory page by page, each page's epoch claimed as any other entry's. Blocks of the
//! other codecs take the same CPU path.

use super::{ApplyCounters, PageEpochs, ReceiveError};
use crate::codec::{Codec, PageDecompressor};
use crate::memory::GuestMemory;
use crate::page_batch::PageEntry;
use crate::PAGE_SIZE_BYTES;

/// A device that inflates raw deflate (DPDK's compressdev; the engine provides it).
pub trait PageInflater: Send {
    /// Inflates each of `inputs` (raw deflate, and the bytes it must inflate to: a page, or
    /// a block's pages) and hands each result to `done` with its index, in the order the
    /// device finishes them: the bytes it made (checked here), or `None` where it failed
    /// the input, which is then inflated on the CPU. Every input gets exactly one result.
    fn inflate_pages(&mut self, inputs: &[(&[u8], usize)], done: &mut dyn FnMut(usize, Option<&[u8]>));
}

/// A compressed entry: one page (`others` empty), or a block's first page, the others'
/// numbers (u32 each) and the data of them all, compressed with `codec`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PackedEntry<'a> {
    pub page: u32,
    pub others: &'a [u8],
    pub codec: Codec,
    pub data: &'a [u8],
}

impl PackedEntry<'_> {
    fn len(&self) -> usize {
        (1 + self.others.len() / 4) * PAGE_SIZE_BYTES
    }
}

/// Where a batch's pages go: its region and round, the guest's memory and epoch table.
pub(crate) struct Target<'a> {
    pub region: u16,
    pub epoch: u32,
    pub memory: &'a dyn GuestMemory,
    pub epochs: &'a PageEpochs,
}

impl Target<'_> {
    /// Writes `bytes`, the pages of `entry` one after another, claiming each.
    fn write(&self, entry: PackedEntry<'_>, bytes: &[u8]) -> Result<(), ReceiveError> {
        let pages = PageEntry::block_pages(entry.page, entry.others);
        for (page, content) in pages.zip(bytes.chunks_exact(PAGE_SIZE_BYTES)) {
            self.epochs.claim(self.region, u64::from(page), self.epoch)?;
            self.memory.write_page(usize::from(self.region), u64::from(page), content);
        }
        Ok(())
    }
}

/// A decompression worker's state for `deflate` entries.
#[derive(Default)]
pub(crate) struct Deflated {
    inflater: Option<Box<dyn PageInflater>>,
    /// A block's pages as the CPU inflated them.
    block: Vec<u8>,
}

impl Deflated {
    pub fn with_inflater(inflater: Box<dyn PageInflater>) -> Self {
        Deflated { inflater: Some(inflater), block: Vec::new() }
    }

    pub fn has_device(&self) -> bool {
        self.inflater.is_some()
    }

    /// Decompresses `entry` on the CPU and writes its pages.
    pub fn apply_on_cpu(
        &mut self,
        target: &Target<'_>,
        entry: PackedEntry<'_>,
        cpu: &mut PageDecompressor,
        counters: &mut ApplyCounters,
    ) -> Result<(), ReceiveError> {
        inflate_on_cpu(&mut self.block, target, entry, cpu)?;
        counters.compressed_pages += (entry.len() / PAGE_SIZE_BYTES) as u64;
        Ok(())
    }

    /// Inflates `entries` on the device, all at once, and writes each entry's pages as it
    /// comes back; an entry the device fails (or returns at another size) is inflated on
    /// the CPU and counted. The first error (data that inflates to the wrong size on the
    /// device and then on the CPU; a stale epoch) is the batch's.
    pub fn apply_on_device(
        &mut self,
        target: &Target<'_>,
        entries: &[PackedEntry<'_>],
        cpu: &mut PageDecompressor,
        counters: &mut ApplyCounters,
    ) -> Result<(), ReceiveError> {
        let Some(inflater) = self.inflater.as_mut().filter(|_| !entries.is_empty()) else { return Ok(()) };
        let inputs: Vec<(&[u8], usize)> = entries.iter().map(|entry| (entry.data, entry.len())).collect();
        let block = &mut self.block;
        let mut first_error = None;
        inflater.inflate_pages(&inputs, &mut |index, inflated| {
            let entry = entries[index];
            let pages = (entry.len() / PAGE_SIZE_BYTES) as u64;
            let result = match inflated {
                Some(bytes) if bytes.len() == entry.len() => {
                    counters.device_pages += pages;
                    target.write(entry, bytes)
                }
                _ => {
                    counters.device_fallback_pages += pages;
                    inflate_on_cpu(block, target, entry, cpu)
                }
            };
            match result {
                Ok(()) => counters.compressed_pages += pages,
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        });
        first_error.map_or(Ok(()), Err)
    }
}

/// Decompresses `entry` on the CPU into `block` and writes its pages.
fn inflate_on_cpu(
    block: &mut Vec<u8>,
    target: &Target<'_>,
    entry: PackedEntry<'_>,
    cpu: &mut PageDecompressor,
) -> Result<(), ReceiveError> {
    block.resize(entry.len(), 0);
    let (region, page) = (target.region, u64::from(entry.page));
    cpu.decompress_block(entry.codec, entry.data, block).map_err(|source| ReceiveError::Decompress {
        region,
        page,
        source,
    })?;
    target.write(entry, block)
}
