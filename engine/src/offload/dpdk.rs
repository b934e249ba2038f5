//! A DPDK compression device (compressdev) as the workers' [`OffloadDevice`].

use super::{OffloadDevice, OffloadQueue, Offloaded};
use dpdk::compress::{Compressor, Direction, OpFailure};
use migration::PAGE_SIZE_BYTES;

/// Operations each worker's queue keeps in flight: a whole batch (64 pages) at once.
const DEPTH: u16 = 64;
/// Room for a page and what deflate adds to one it cannot compress.
const ROOM: u16 = 2 * PAGE_SIZE_BYTES as u16;

/// A compressdev device the EAL knows, by name.
pub struct DpdkDevice {
    eal: &'static dpdk::Eal,
    name: String,
}

impl DpdkDevice {
    /// The device `name` of the process's EAL (it must have been given to the EAL: `--vdev
    /// compress_isal0`, or a QAT device's PCI address). Checked here by opening it once,
    /// so that a wrong name is an error before the migration starts.
    pub fn new(eal: &'static dpdk::Eal, name: &str) -> Result<DpdkDevice, dpdk::DpdkError> {
        drop(Compressor::open(eal, name, DEPTH, ROOM)?);
        Ok(DpdkDevice { eal, name: name.to_string() })
    }
}

impl std::fmt::Debug for DpdkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpdkDevice").field("name", &self.name).finish()
    }
}

impl OffloadDevice for DpdkDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&self, count: usize) -> Result<Vec<Box<dyn OffloadQueue>>, String> {
        let count = u16::try_from(count).map_err(|_| format!("{count} queues of {}", self.name))?;
        let queues = Compressor::open_queues(self.eal, &self.name, count, DEPTH, ROOM).map_err(|e| e.to_string())?;
        Ok(queues.into_iter().map(|compressor| Box::new(DpdkQueue { compressor }) as Box<dyn OffloadQueue>).collect())
    }
}

struct DpdkQueue {
    compressor: Compressor,
}

impl OffloadQueue for DpdkQueue {
    fn compress_pages(&mut self, pages: &[&[u8]], done: &mut dyn FnMut(usize, Offloaded<'_>)) {
        // Output a page long or more would go raw: the device stops at one byte under.
        self.compressor.run_with(Direction::Compress, pages, PAGE_SIZE_BYTES - 1, |index, result| match result {
            Ok(packed) if !packed.is_empty() => done(index, Offloaded::Packed(packed)),
            Err(OpFailure::OutOfSpace(_)) => done(index, Offloaded::Raw),
            Ok(_) => done(index, Offloaded::Failed("the device produced nothing")),
            Err(failure) => done(index, Offloaded::Failed(&failure.to_string())),
        });
    }

    fn inflate_pages(&mut self, inputs: &[&[u8]], done: &mut dyn FnMut(usize, Option<&[u8]>)) {
        // Room for one page: data that inflates to more is out of space, a failure.
        self.compressor
            .run_with(Direction::Decompress, inputs, PAGE_SIZE_BYTES, |index, result| done(index, result.ok()));
    }
}
