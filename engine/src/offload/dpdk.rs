//! A DPDK compression device (compressdev) as the workers' [`OffloadDevice`].

use super::{OffloadDevice, OffloadQueue, Offloaded};
use dpdk::compress::{Compressor, Direction, OpFailure};
use migration::PAGE_SIZE_BYTES;

/// Pages per operation. ISA-L's software device spends about as long setting up an
/// operation as compressing a page of the dirty guest: one page per operation moved 0.10
/// GB/s on one core, 8 pages 0.19, 14 pages 0.195.
const PAGES_PER_OPERATION: usize = 8;
/// Operations each worker's queue keeps in flight: a whole batch (64 pages) at once.
const DEPTH: u16 = 64;
/// Room for a block of pages and what deflate adds to data it cannot compress.
const ROOM: u16 = ((PAGES_PER_OPERATION + 1) * PAGE_SIZE_BYTES) as u16;

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
    fn compress_pages(&mut self, inputs: &[(&[u8], usize)], done: &mut dyn FnMut(usize, Offloaded<'_>)) {
        let data: Vec<&[u8]> = inputs.iter().map(|(data, _)| *data).collect();
        // Output past its room would go raw: the device stops there.
        let room = |index: usize| inputs[index].1;
        self.compressor.run_with(Direction::Compress, &data, room, |index, result| match result {
            Ok(packed) if !packed.is_empty() => done(index, Offloaded::Packed(packed)),
            Err(OpFailure::OutOfSpace(_)) => done(index, Offloaded::Raw),
            Ok(_) => done(index, Offloaded::Failed("the device produced nothing")),
            Err(failure) => done(index, Offloaded::Failed(&failure.to_string())),
        });
    }

    fn inflate_pages(&mut self, inputs: &[(&[u8], usize)], done: &mut dyn FnMut(usize, Option<&[u8]>)) {
        let data: Vec<&[u8]> = inputs.iter().map(|(data, _)| *data).collect();
        // Room for what it must inflate to: data that inflates to more is out of space.
        let room = |index: usize| inputs[index].1;
        self.compressor.run_with(Direction::Decompress, &data, room, |index, result| done(index, result.ok()));
    }

    fn pages_per_operation(&self) -> usize {
        PAGES_PER_OPERATION
    }
}
