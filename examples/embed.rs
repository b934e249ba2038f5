//! Embedding vmigrate in a VMM: the VMM keeps its own guest memory, dirty log and vCPU
//! control, implements `SourceVm` and `DestinationVm` over them, and hands connections to
//! the engine. Run with `cargo run --example embed`.
//!
//! The "VMM" here is a toy: 16 MiB of guest memory held as atomic words, one vCPU thread
//! that stores a counter into random pages, and a device state that is that counter.

use engine::config::{DestinationConfig, SourceConfig};
use engine::vm::{DestinationVm, GuestLayout, LogCoverage, SourceVm};
use engine::VmError;
use migration::codec::Codec;
use migration::dirty::{AtomicBitmap, DirtyLog};
use migration::memory::{GuestMemory, Region};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use transport::pipe::{TcpAcceptor, TcpConnector, Timeouts};

const PAGE: usize = migration::PAGE_SIZE_BYTES;
const WORDS_PER_PAGE: usize = PAGE / 8;

/// The VMM's own guest memory: one region of atomic words.
struct ToyMemory {
    words: Vec<AtomicU64>,
}

impl ToyMemory {
    fn new(bytes: usize) -> Self {
        ToyMemory { words: (0..bytes / 8).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl GuestMemory for ToyMemory {
    fn region_bytes(&self) -> Vec<u64> {
        vec![(self.words.len() * 8) as u64]
    }
    fn region_addresses(&self) -> Vec<u64> {
        vec![0] // guest-physical address 0
    }
    fn read_page(&self, _region: usize, page: u64, dst: &mut [u8]) {
        let words = &self.words[page as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
        for (word, out) in words.iter().zip(dst.chunks_exact_mut(8)) {
            out.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
    }
    fn write_page(&self, _region: usize, page: u64, src: &[u8]) {
        let words = &self.words[page as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
        for (word, bytes) in words.iter().zip(src.chunks_exact(8)) {
            word.store(u64::from_le_bytes(bytes.try_into().unwrap()), Ordering::Relaxed);
        }
    }
}

/// The source VMM: memory, a dirty log, and one vCPU.
struct ToyVm {
    memory: ToyMemory,
    dirty: AtomicBitmap,
    paused: AtomicBool,
    in_store: AtomicBool,
    counter: AtomicU64,
}

impl ToyVm {
    fn run_vcpu(&self, stop: &AtomicBool) {
        let pages = self.dirty.pages();
        while !stop.load(Ordering::Acquire) {
            self.in_store.store(true, Ordering::SeqCst);
            if !self.paused.load(Ordering::SeqCst) {
                let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
                let page = n.wrapping_mul(2654435761) % pages;
                self.memory.words[page as usize * WORDS_PER_PAGE].store(n, Ordering::Relaxed);
                self.dirty.mark(page); // after the store, as KVM's log would see it
            }
            self.in_store.store(false, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl DirtyLog for ToyVm {
    fn take_dirty(&self, _region: usize, out: &mut [u64]) -> u64 {
        self.dirty.take_into(out)
    }
}

impl SourceVm for ToyVm {
    fn memory(&self) -> &dyn GuestMemory {
        &self.memory
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }
    fn log_coverage(&self) -> LogCoverage {
        // The bitmap exists before the vCPU's first store: untouched pages can be skipped.
        LogCoverage::SinceBoot
    }
    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        while self.in_store.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
    }
    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
    fn device_state(&self) -> Vec<u8> {
        self.counter.load(Ordering::Relaxed).to_le_bytes().to_vec()
    }
}

/// The destination VMM: allocates memory for the incoming layout, restores the counter.
#[derive(Default)]
struct ToyDestination {
    memory: Option<Arc<ToyMemory>>,
    restored_counter: Option<u64>,
}

impl DestinationVm for ToyDestination {
    fn prepare(&mut self, layout: &GuestLayout) -> Result<Arc<dyn GuestMemory>, VmError> {
        let [Region { guest_address: 0, bytes }] = layout.regions[..] else {
            return Err(VmError::Unfit("the toy VMM has one region, at address 0".into()));
        };
        let memory = Arc::new(ToyMemory::new(bytes as usize));
        self.memory = Some(memory.clone());
        Ok(memory)
    }
    fn resume(&mut self, device_state: &[u8]) -> Result<(), VmError> {
        let counter = device_state.try_into().map_err(|_| VmError::Resume("bad device state".into()))?;
        self.restored_counter = Some(u64::from_le_bytes(counter));
        Ok(())
    }
    fn discard(&mut self) {
        self.memory = None;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bytes = 16 << 20;
    let vm = ToyVm {
        memory: ToyMemory::new(bytes),
        dirty: AtomicBitmap::new((bytes / PAGE) as u64),
        paused: AtomicBool::new(false),
        in_store: AtomicBool::new(false),
        counter: AtomicU64::new(0),
    };
    let stop = AtomicBool::new(false);
    let mut acceptor = TcpAcceptor::bind("127.0.0.1:0", Timeouts::default())?;
    let connector = TcpConnector::new(acceptor.local_socket_addr()?, Timeouts::default())?;

    std::thread::scope(|scope| {
        scope.spawn(|| vm.run_vcpu(&stop));
        let destination = scope.spawn(move || {
            let mut toy = ToyDestination::default();
            let report = engine::destination::receive(&mut acceptor, &mut toy, &DestinationConfig::default());
            (report, toy)
        });
        std::thread::sleep(Duration::from_millis(100));
        let config = SourceConfig { codec: Codec::Lz4, connections: 2, verify: true, ..SourceConfig::default() };
        let stats = engine::source::migrate(&vm, &connector, &config, &mut |_| {});
        stop.store(true, Ordering::Release);
        let (report, toy) = destination.join().expect("destination thread");
        match (stats, report) {
            (Ok(stats), Ok(report)) => {
                println!(
                    "migrated {} bytes in {} ms (downtime {} ms, {} rounds); memory verified: {:?}",
                    stats.ram.total,
                    stats.total_time,
                    stats.downtime,
                    stats.rounds.len(),
                    report.verified
                );
                println!("vCPU counter restored on the destination: {:?}", toy.restored_counter);
                Ok(())
            }
            (Err(e), _) => Err(format!("source: {e}").into()),
            (_, Err(e)) => Err(format!("destination: {e}").into()),
        }
    })
}
