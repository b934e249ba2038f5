//! A synthetic guest that really runs: a workload thread writes into guest memory and
//! marks the dirty log, like a vCPU under KVM's dirty logging, until the source pauses it;
//! on the destination the same workload resumes from the migrated memory and state.
//!
//! Workloads:
//! - `idle`: a booted-OS-like image written once at boot (kernel-like code and data,
//!   text, some zeroed pages, most pages never touched), then no writes.
//! - `dirty:AREA:PAGES_PER_S:BITS`: fills AREA with random BITS-bit numbers stored as
//!   32-bit words, then writes one random BITS-bit number into PAGES_PER_S random pages of
//!   the area each second (the 2015 KVM live-migration talk's "writes random numbers to a 1 GB area").
//! - `seq[:PAGES_PER_S]`: every page holds a counter (QEMU's migration-test pattern) and
//!   its own number; a sweep increments the counters page after page, so every page's
//!   counter equals its neighbour's except where the sweep has reached. The destination
//!   checks every page. (The numbers keep pages apart: no page goes as a copy of another.)
//! - `clones:AREA:DISTINCT:PAGES_PER_S`: AREA filled with copies of DISTINCT pages of
//!   random bytes (the same library or file loaded by many processes, one image in many
//!   buffers), then PAGES_PER_S random pages of the area each second overwritten with one
//!   of them: no codec shrinks a page, but most pages equal another.

use crate::guest::GuestRam;
use crate::idle_image::write_idle_image;
use engine::vm::{DestinationVm, GuestLayout, LogCoverage, SourceVm};
use engine::VmError;
use migration::dirty::DirtyLog;
use migration::memory::GuestMemory;
use migration::PAGE_SIZE_BYTES;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The seq sweep's default speed: 20k pages/s (80 MB/s of dirtying) converges on any
/// link we test over, yet moves visibly during a migration.
pub const DEFAULT_SEQ_PAGES_PER_S: u64 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadSpec {
    Idle,
    Dirty { area_bytes: u64, pages_per_s: u64, bits: u32 },
    Seq { pages_per_s: u64 },
    Clones { area_bytes: u64, distinct: u64, pages_per_s: u64 },
}

/// Parses sizes such as `4096`, `64MiB`, `1GiB`, `4G`, `512M`, `2k` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| format!("bad size {text:?}"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("bad size unit in {text:?}: use K, M, G or T (KiB, MiB, GiB, TiB)")),
    };
    value.checked_mul(1 << shift).ok_or_else(|| format!("size {text:?} overflows"))
}

impl FromStr for WorkloadSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        match parts.as_slice() {
            ["idle"] => Ok(WorkloadSpec::Idle),
            ["seq"] => Ok(WorkloadSpec::Seq { pages_per_s: DEFAULT_SEQ_PAGES_PER_S }),
            ["seq", rate] => {
                Ok(WorkloadSpec::Seq { pages_per_s: rate.parse().map_err(|_| format!("bad seq rate {rate:?}"))? })
            }
            ["dirty", area, rate, bits] => {
                let area_bytes = parse_size(area)?;
                let pages_per_s = rate.parse().map_err(|_| format!("bad dirty rate {rate:?}"))?;
                let bits: u32 = bits.parse().map_err(|_| format!("bad bit count {bits:?}"))?;
                if !(1..=32).contains(&bits) {
                    return Err(format!("dirty BITS must be 1..=32, got {bits}"));
                }
                if area_bytes < PAGE_SIZE_BYTES as u64 {
                    return Err(format!("dirty AREA must be at least one page, got {area}"));
                }
                Ok(WorkloadSpec::Dirty { area_bytes, pages_per_s, bits })
            }
            ["clones", area, distinct, rate] => {
                let area_bytes = parse_size(area)?;
                let distinct = distinct.parse().map_err(|_| format!("bad count of distinct pages {distinct:?}"))?;
                let pages_per_s = rate.parse().map_err(|_| format!("bad clones rate {rate:?}"))?;
                if area_bytes < PAGE_SIZE_BYTES as u64 || distinct == 0 {
                    return Err(format!("clones needs an AREA of a page or more and DISTINCT of 1 or more: {text:?}"));
                }
                Ok(WorkloadSpec::Clones { area_bytes, distinct, pages_per_s })
            }
            _ => Err(format!(
                "unknown workload {text:?}: expected idle, seq[:PAGES_PER_S], dirty:AREA:PAGES_PER_S:BITS or \
                 clones:AREA:DISTINCT:PAGES_PER_S"
            )),
        }
    }
}

impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadSpec::Idle => write!(f, "idle"),
            WorkloadSpec::Seq { pages_per_s } => write!(f, "seq:{pages_per_s}"),
            WorkloadSpec::Dirty { area_bytes, pages_per_s, bits } => {
                write!(f, "dirty:{area_bytes}:{pages_per_s}:{bits}")
            }
            WorkloadSpec::Clones { area_bytes, distinct, pages_per_s } => {
                write!(f, "clones:{area_bytes}:{distinct}:{pages_per_s}")
            }
        }
    }
}

/// Pause, resume, throttle and stop for the workload threads, like vCPU run control.
struct VcpuControl {
    pause_requested: AtomicBool,
    stop: AtomicBool,
    throttle_pct: AtomicU8,
    running_threads: AtomicUsize,
    parked: Mutex<usize>,
    changed: Condvar,
}

impl VcpuControl {
    fn new() -> Self {
        VcpuControl {
            pause_requested: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            throttle_pct: AtomicU8::new(0),
            running_threads: AtomicUsize::new(0),
            parked: Mutex::new(0),
            changed: Condvar::new(),
        }
    }

    /// Called by a workload thread between guest stores: parks while paused. Returns false
    /// when the thread should exit.
    fn checkpoint(&self) -> bool {
        if self.pause_requested.load(Ordering::Acquire) {
            let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
            *parked += 1;
            self.changed.notify_all();
            while self.pause_requested.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
                parked = self.changed.wait(parked).unwrap_or_else(|p| p.into_inner());
            }
            *parked -= 1;
        }
        !self.stop.load(Ordering::Acquire)
    }

    /// Sleeps up to `duration` in slices, staying responsive to pause and stop.
    fn nap(&self, duration: Duration) -> bool {
        let end = Instant::now() + duration;
        loop {
            if !self.checkpoint() {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(1)));
        }
    }

    fn pause(&self) {
        self.pause_requested.store(true, Ordering::Release);
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        while *parked < self.running_threads.load(Ordering::Acquire) {
            parked = self.changed.wait_timeout(parked, Duration::from_millis(1)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn resume(&self) {
        self.pause_requested.store(false, Ordering::Release);
        let _parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }
}

/// Workload progress that travels in the device state.
#[derive(Debug, Default)]
struct Progress {
    /// seq: the lap value of pages not yet reached in this sweep.
    lap: AtomicU64,
    /// seq: the next page the sweep increments.
    position: AtomicU64,
    /// Guest stores made by the workload thread since boot (all sides).
    writes: AtomicU64,
}

/// The device state of the synthetic guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceState {
    pub workload: WorkloadSpec,
    pub lap: u64,
    pub position: u64,
    pub writes: u64,
}

pub struct SyntheticGuest {
    ram: Arc<GuestRam>,
    spec: WorkloadSpec,
    control: Arc<VcpuControl>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
}

impl SyntheticGuest {
    /// Boots a guest: writes its initial image (through the dirty log, which is on from
    /// allocation) and starts the workload thread.
    pub fn boot(ram: Arc<GuestRam>, spec: WorkloadSpec, seed: u64) -> Result<Self, String> {
        let progress = Arc::new(Progress::default());
        let mut rng = SmallRng::seed_from_u64(seed);
        match spec {
            WorkloadSpec::Idle => {
                write_idle_image(ram.total_pages(), &mut rng, |flat, page| ram.write_flat_page(flat, page))
            }
            WorkloadSpec::Dirty { area_bytes, bits, .. } => {
                let area_pages = dirty_area_pages(&ram, area_bytes)?;
                let mut page = vec![0u8; PAGE_SIZE_BYTES];
                for flat in 0..area_pages {
                    for word in page.chunks_exact_mut(4) {
                        word.copy_from_slice(&random_bits(&mut rng, bits).to_le_bytes());
                    }
                    ram.write_flat_page(flat, &page);
                }
            }
            WorkloadSpec::Clones { area_bytes, distinct, .. } => {
                let mut page = vec![0u8; PAGE_SIZE_BYTES];
                for flat in 0..dirty_area_pages(&ram, area_bytes)? {
                    clone_page(rng.gen_range(0..distinct), &mut page);
                    ram.write_flat_page(flat, &page);
                }
            }
            WorkloadSpec::Seq { .. } => {
                // Lap 1 everywhere: the sweep then raises pages to 2, 3, ...
                for flat in 0..ram.total_pages() {
                    ram.write_u64(flat, SEQ_NUMBER_AT, flat);
                    write_seq_page(&ram, flat, 1);
                }
                progress.lap.store(1, Ordering::Relaxed);
            }
        }
        let mut guest = SyntheticGuest { ram, spec, control: Arc::new(VcpuControl::new()), progress, thread: None };
        guest.start(rng.gen());
        Ok(guest)
    }

    /// Boots an idle guest whose memory is an image of a real guest's (a raw dump of its
    /// guest-physical RAM, as `scripts/guest-image` makes): the image's non-zero pages are
    /// written, the rest of memory stays zero. An image larger than the RAM is refused.
    pub fn boot_image(ram: Arc<GuestRam>, image: &mut dyn std::io::Read, seed: u64) -> Result<Self, String> {
        let mut page = vec![0u8; PAGE_SIZE_BYTES];
        let mut flat = 0u64;
        loop {
            let mut filled = 0;
            while filled < PAGE_SIZE_BYTES {
                match image.read(&mut page[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading the memory image: {e}")),
                }
            }
            if filled == 0 {
                break;
            }
            if flat >= ram.total_pages() {
                return Err(format!("the memory image is larger than the guest's {} bytes", ram.total_bytes()));
            }
            page[filled..].fill(0);
            if !migration::zero::is_zero(&page) {
                ram.write_flat_page(flat, &page);
            }
            flat += 1;
        }
        let mut guest = SyntheticGuest {
            ram,
            spec: WorkloadSpec::Idle,
            control: Arc::new(VcpuControl::new()),
            progress: Arc::new(Progress::default()),
            thread: None,
        };
        guest.start(seed);
        Ok(guest)
    }

    /// Rebuilds the guest on the destination from migrated memory and device state, checks
    /// the memory where the workload can (seq), and starts the workload again.
    pub fn resume_from(ram: Arc<GuestRam>, device_state: &[u8]) -> Result<Self, String> {
        let state: DeviceState = serde_json::from_slice(device_state)
            .map_err(|e| format!("device state is not a synthetic guest's: {e}"))?;
        let progress = Arc::new(Progress::default());
        progress.lap.store(state.lap, Ordering::Relaxed);
        progress.position.store(state.position, Ordering::Relaxed);
        progress.writes.store(state.writes, Ordering::Relaxed);
        if let WorkloadSpec::Dirty { area_bytes, .. } = state.workload {
            dirty_area_pages(&ram, area_bytes)?;
        }
        ram.clear_dirty();
        let mut guest =
            SyntheticGuest { ram, spec: state.workload, control: Arc::new(VcpuControl::new()), progress, thread: None };
        guest.check()?;
        guest.start(state.writes ^ 0x5eed);
        Ok(guest)
    }

    fn start(&mut self, seed: u64) {
        let (ram, control, progress, spec) = (self.ram.clone(), self.control.clone(), self.progress.clone(), self.spec);
        control.running_threads.fetch_add(1, Ordering::AcqRel);
        self.thread = Some(
            std::thread::Builder::new()
                .name("guest-vcpu".into())
                .spawn(move || {
                    run_workload(&ram, spec, &control, &progress, seed);
                    control.running_threads.fetch_sub(1, Ordering::AcqRel);
                    let _parked = control.parked.lock().unwrap_or_else(|p| p.into_inner());
                    control.changed.notify_all();
                })
                .expect("spawn guest workload thread"),
        );
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    pub fn spec(&self) -> WorkloadSpec {
        self.spec
    }

    /// Guest stores made by the workload so far (grows while the guest runs).
    pub fn writes(&self) -> u64 {
        self.progress.writes.load(Ordering::Relaxed)
    }

    /// The seq sweep's position as (lap, next page).
    pub fn seq_position(&self) -> (u64, u64) {
        (self.progress.lap.load(Ordering::Relaxed), self.progress.position.load(Ordering::Relaxed))
    }

    /// Checks the memory's self-consistency where the workload defines it (seq): pages
    /// before the sweep position hold lap+1, the rest hold lap, at both ends of each page.
    /// The guest must be paused (or not yet started).
    pub fn check(&self) -> Result<(), String> {
        let WorkloadSpec::Seq { .. } = self.spec else {
            return Ok(());
        };
        let (lap, position) = self.seq_position();
        let pages = self.ram.total_pages();
        if position >= pages {
            return Err(format!("seq position {position} beyond {pages} pages"));
        }
        for flat in 0..pages {
            let expected = if flat < position { lap + 1 } else { lap };
            let head = self.ram.read_u64(flat, 0);
            let tail = self.ram.read_u64(flat, PAGE_SIZE_BYTES - 8);
            let number = self.ram.read_u64(flat, SEQ_NUMBER_AT);
            if number != flat {
                return Err(format!("seq check failed at page {flat}: holds page {number}'s number"));
            }
            if head != expected || tail != expected {
                return Err(format!(
                    "seq check failed at page {flat}: holds {head}/{tail}, expected {expected} (sweep at page {position} of lap {lap})"
                ));
            }
        }
        Ok(())
    }

    /// Stops the workload thread for good.
    pub fn shutdown(&mut self) {
        self.control.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl SourceVm for SyntheticGuest {
    fn memory(&self) -> &dyn GuestMemory {
        &*self.ram
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        &*self.ram
    }
    fn log_coverage(&self) -> LogCoverage {
        // Its bitmaps mark every store from allocation on, the boot image's included.
        LogCoverage::SinceBoot
    }
    fn pause(&self) {
        self.control.pause();
    }
    fn resume(&self) {
        self.control.resume();
    }
    fn device_state(&self) -> Vec<u8> {
        let state = DeviceState {
            workload: self.spec,
            lap: self.progress.lap.load(Ordering::Relaxed),
            position: self.progress.position.load(Ordering::Relaxed),
            writes: self.progress.writes.load(Ordering::Relaxed),
        };
        serde_json::to_vec(&state).expect("device state serialises")
    }
    fn set_throttle(&self, pct: u8) {
        self.control.throttle_pct.store(pct.min(99), Ordering::Relaxed);
    }
}

/// The destination side of a synthetic guest: allocates memory for the source's layout
/// within a limit, and resumes the workload from the device state.
pub struct SyntheticDestination {
    pub max_memory_bytes: u64,
    pub policy: hugepages::HugePolicy,
    ram: Option<Arc<GuestRam>>,
    guest: Option<SyntheticGuest>,
}

impl SyntheticDestination {
    pub fn new(max_memory_bytes: u64, policy: hugepages::HugePolicy) -> Self {
        SyntheticDestination { max_memory_bytes, policy, ram: None, guest: None }
    }

    pub fn ram(&self) -> Option<&Arc<GuestRam>> {
        self.ram.as_ref()
    }

    /// The resumed guest, once the migration completed.
    pub fn guest(&mut self) -> Option<&mut SyntheticGuest> {
        self.guest.as_mut()
    }

    /// Takes the resumed guest (to migrate it on, say).
    pub fn take_guest(&mut self) -> Option<SyntheticGuest> {
        self.guest.take()
    }
}

impl DestinationVm for SyntheticDestination {
    fn prepare(&mut self, layout: &GuestLayout) -> Result<Arc<dyn GuestMemory>, VmError> {
        layout.check_fits(self.max_memory_bytes)?;
        let ram = Arc::new(GuestRam::allocate_at(&layout.regions, self.policy)?);
        // Received pages arrive scattered over the guest (an idle guest's 200 MiB over
        // 4 GiB): on transparent huge pages each would fault in, and zero, a whole 2 MiB.
        // Base pages while receiving; at resume, huge pages again, and the extents written
        // densely merged into them at once (`collapse_in_background`).
        ram.advise_huge(false);
        self.ram = Some(ram.clone());
        Ok(ram)
    }

    fn resume(&mut self, device_state: &[u8]) -> Result<(), VmError> {
        let ram = self.ram.clone().ok_or_else(|| VmError::Resume("resume before memory was prepared".into()))?;
        ram.advise_huge(true);
        let merging = ram.clone();
        crate::guest::collapse_in_background(move || merging.collapse_dense());
        self.guest = Some(SyntheticGuest::resume_from(ram, device_state).map_err(VmError::Resume)?);
        Ok(())
    }

    fn discard(&mut self) {
        self.guest = None;
        if let Some(ram) = self.ram.take() {
            ram.discard_all();
        }
    }
}

fn random_bits(rng: &mut SmallRng, bits: u32) -> u32 {
    let value: u32 = rng.gen();
    if bits >= 32 {
        value
    } else {
        value & ((1u32 << bits) - 1)
    }
}

fn dirty_area_pages(ram: &GuestRam, area_bytes: u64) -> Result<u64, String> {
    let pages = area_bytes / PAGE_SIZE_BYTES as u64;
    if pages == 0 || pages > ram.total_pages() {
        return Err(format!("dirty area of {area_bytes} bytes does not fit a guest of {} bytes", ram.total_bytes()));
    }
    Ok(pages)
}

/// Fills `page` with the clones workload's page number `which`: random bytes, the same
/// for the same number in every guest.
fn clone_page(which: u64, page: &mut [u8]) {
    SmallRng::seed_from_u64(which ^ 0x636c_6f6e_6573).fill(page);
}

/// Where a seq page holds its own number.
const SEQ_NUMBER_AT: usize = 8;

fn write_seq_page(ram: &GuestRam, flat: u64, value: u64) {
    // Head then tail: a page caught between the two stores is re-sent anyway (the mark
    // follows the second store), and the check reads both ends.
    ram.write_u64(flat, 0, value);
    ram.write_u64(flat, PAGE_SIZE_BYTES - 8, value);
}

/// Runs `pages_per_s` (less the throttle) steps per second, `step` returning false to stop.
fn paced(control: &VcpuControl, pages_per_s: u64, mut step: impl FnMut() -> bool) {
    const TICK: Duration = Duration::from_millis(1);
    let mut done = 0f64;
    let mut last = Instant::now();
    loop {
        let now = Instant::now();
        let throttle = f64::from(control.throttle_pct.load(Ordering::Relaxed)) / 100.0;
        done -= now.duration_since(last).as_secs_f64() * pages_per_s as f64 * (1.0 - throttle);
        last = now;
        while done < 0.0 {
            if !control.checkpoint() || !step() {
                return;
            }
            done += 1.0;
        }
        if !control.nap(TICK) {
            return;
        }
    }
}

fn run_workload(ram: &GuestRam, spec: WorkloadSpec, control: &VcpuControl, progress: &Progress, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    match spec {
        WorkloadSpec::Idle => while control.nap(Duration::from_millis(10)) {},
        WorkloadSpec::Dirty { area_bytes, pages_per_s, bits } => {
            let area_pages = area_bytes / PAGE_SIZE_BYTES as u64;
            paced(control, pages_per_s, || {
                let page = rng.gen_range(0..area_pages);
                let word = rng.gen_range(0..PAGE_SIZE_BYTES / 4);
                ram.write_u32(page, word, random_bits(&mut rng, bits));
                progress.writes.fetch_add(1, Ordering::Relaxed);
                true
            });
        }
        WorkloadSpec::Clones { area_bytes, distinct, pages_per_s } => {
            let area_pages = area_bytes / PAGE_SIZE_BYTES as u64;
            let mut page = vec![0u8; PAGE_SIZE_BYTES];
            paced(control, pages_per_s, || {
                clone_page(rng.gen_range(0..distinct), &mut page);
                ram.write_flat_page(rng.gen_range(0..area_pages), &page);
                progress.writes.fetch_add(1, Ordering::Relaxed);
                true
            });
        }
        WorkloadSpec::Seq { pages_per_s } => {
            let pages = ram.total_pages();
            paced(control, pages_per_s, || {
                let lap = progress.lap.load(Ordering::Relaxed);
                let position = progress.position.load(Ordering::Relaxed);
                write_seq_page(ram, position, lap + 1);
                if position + 1 == pages {
                    progress.position.store(0, Ordering::Relaxed);
                    progress.lap.store(lap + 1, Ordering::Relaxed);
                } else {
                    progress.position.store(position + 1, Ordering::Relaxed);
                }
                progress.writes.fetch_add(1, Ordering::Relaxed);
                true
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hugepages::HugePolicy;

    fn ram(bytes: u64) -> Arc<GuestRam> {
        Arc::new(GuestRam::allocate(&[bytes], HugePolicy::Never).unwrap())
    }

    #[test]
    fn workload_specs_parse() {
        assert_eq!("idle".parse(), Ok(WorkloadSpec::Idle));
        assert_eq!(
            "dirty:1GiB:5000:16".parse(),
            Ok(WorkloadSpec::Dirty { area_bytes: 1 << 30, pages_per_s: 5000, bits: 16 })
        );
        assert_eq!("seq:100".parse(), Ok(WorkloadSpec::Seq { pages_per_s: 100 }));
        assert!("dirty:1GiB:5000:33".parse::<WorkloadSpec>().is_err());
        let clones = WorkloadSpec::Clones { area_bytes: 64 << 20, distinct: 100, pages_per_s: 10 };
        assert_eq!("clones:64MiB:100:10".parse(), Ok(clones));
        assert_eq!(clones.to_string().parse(), Ok(clones));
        assert!("clones:64MiB:0:10".parse::<WorkloadSpec>().is_err());
        assert!("busy".parse::<WorkloadSpec>().is_err());
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert!(parse_size("4X").is_err());
    }

    #[test]
    fn seq_guest_pauses_and_stays_consistent() {
        let guest = SyntheticGuest::boot(ram(4 << 20), WorkloadSpec::Seq { pages_per_s: 50_000 }, 1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        guest.pause();
        let writes = guest.writes();
        assert!(writes > 0, "the workload ran");
        guest.check().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(guest.writes(), writes, "no store while paused");
        guest.resume();
        std::thread::sleep(Duration::from_millis(20));
        assert!(guest.writes() > writes, "the workload resumed");
    }

    #[test]
    fn seq_check_catches_a_stale_page() {
        let guest = SyntheticGuest::boot(ram(1 << 20), WorkloadSpec::Seq { pages_per_s: 1 }, 1).unwrap();
        guest.pause();
        guest.check().unwrap();
        guest.ram().write_u64(200, 0, 7);
        assert!(guest.check().unwrap_err().contains("page 200"));
    }

    #[test]
    fn seq_check_catches_another_pages_contents() {
        let guest = SyntheticGuest::boot(ram(1 << 20), WorkloadSpec::Seq { pages_per_s: 1 }, 1).unwrap();
        guest.pause();
        let mut page = vec![0u8; PAGE_SIZE_BYTES];
        guest.ram().read_flat_page(3, &mut page);
        guest.ram().write_flat_page(100, &page);
        assert!(guest.check().unwrap_err().contains("page 100"));
    }

    #[test]
    fn clones_fill_their_area_with_copies_of_few_pages() {
        let spec = WorkloadSpec::Clones { area_bytes: 512 << 10, distinct: 4, pages_per_s: 1 };
        let guest = SyntheticGuest::boot(ram(1 << 20), spec, 1).unwrap();
        guest.pause();
        let mut contents = std::collections::HashSet::new();
        let mut page = vec![0u8; PAGE_SIZE_BYTES];
        for flat in 0..128 {
            guest.ram().read_flat_page(flat, &mut page);
            assert!(page.iter().any(|&b| b != 0), "page {flat} is filled");
            contents.insert(page.clone());
        }
        assert!(contents.len() <= 4 && contents.len() > 1, "{} distinct pages", contents.len());
    }

    #[test]
    fn idle_image_uses_a_small_share_of_pages() {
        let ram = ram(256 << 20);
        let _guest = SyntheticGuest::boot(ram.clone(), WorkloadSpec::Idle, 3).unwrap();
        let used = {
            let mut bitmap = vec![0u64; migration::dirty::bitmap_words(ram.total_pages())];
            ram.take_dirty(0, &mut bitmap)
        };
        let share = used as f64 / ram.total_pages() as f64;
        assert!((0.03..0.15).contains(&share), "{share}");
    }
}
