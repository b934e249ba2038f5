//! KVM's record of the pages the guest wrote, in either of its forms, seen by the engine as
//! a `DirtyLog`:
//! - the dirty log: a bitmap per memory slot, fetched with KVM_GET_DIRTY_LOG. Where the
//!   kernel offers manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), fetching no
//!   longer clears and write-protects the whole slot under KVM's lock; KVM_CLEAR_DIRTY_LOG
//!   then re-protects only the pages fetched.
//! - the dirty ring (KVM_CAP_DIRTY_LOG_RING): each vCPU pushes the pages it dirties into a
//!   ring shared with us; we harvest it into bitmaps and hand the entries back
//!   (KVM_RESET_DIRTY_RINGS). A full ring stops the vCPU until it is harvested.
//!
//! Both see only the guest's writes: the pages the VMM wrote before the guest ran (its
//! program, page tables, initial image) are added with the first take.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migration::dirty::{bitmap_words, DirtyLog};
use migration::memory::pages_of;
use migration::PAGE_SIZE_BYTES;
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// A ring entry's flags: KVM set it (the page is dirty), we have taken it.
const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;
/// The ring we ask for: 64 Ki entries (1 MiB), or less where the kernel caps it.
const RING_BYTES: u64 = 1 << 20;

/// Which of KVM's mechanisms records the guest's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// KVM_GET_DIRTY_LOG (with KVM_CLEAR_DIRTY_LOG where offered).
    #[default]
    Log,
    /// The per-vCPU dirty ring.
    Ring,
}

impl FromStr for DirtyTracking {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "log" => Ok(DirtyTracking::Log),
            "ring" => Ok(DirtyTracking::Ring),
            other => Err(format!("dirty tracking must be log or ring, not {other:?}")),
        }
    }
}

/// The mechanism as set up on one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Log { manual_protect: bool },
    Ring { bytes: u64 },
}

/// Turns the chosen mechanism on: before the memory slots (manual protection) and before
/// the vCPUs (the ring) exist.
pub fn enable(kvm: &Kvm, vm: &VmFd, tracking: DirtyTracking) -> Result<Mode, String> {
    match tracking {
        DirtyTracking::Log => {
            let offered = kvm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
            if offered & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 == 0 {
                return Ok(Mode::Log { manual_protect: false });
            }
            // Without KVM_DIRTY_LOG_INITIALLY_SET: the log starts empty, so that the pages
            // the guest never touched stay out of the first round.
            let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
            cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
            vm.enable_cap(&cap).map_err(|e| format!("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: {e}"))?;
            Ok(Mode::Log { manual_protect: true })
        }
        DirtyTracking::Ring => {
            // The acquire/release flavour where offered (required on weakly ordered CPUs).
            let (cap, name) = match kvm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into()) {
                max if max > 0 => (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"),
                _ => (KVM_CAP_DIRTY_LOG_RING, "KVM_CAP_DIRTY_LOG_RING"),
            };
            let max = kvm.check_extension_raw(cap.into());
            if max <= 0 {
                return Err("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING): use the dirty log".into());
            }
            let bytes = RING_BYTES.min(max as u64);
            let mut enable = kvm_enable_cap { cap, ..Default::default() };
            enable.args[0] = bytes;
            vm.enable_cap(&enable).map_err(|e| format!("enabling {name} with {bytes} bytes: {e}"))?;
            Ok(Mode::Ring { bytes })
        }
    }
}

/// One vCPU's dirty ring, mapped from its fd, and the bitmaps harvested from it.
pub struct DirtyRing {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    bytes: usize,
    vm: Arc<VmFd>,
    state: Mutex<RingState>,
}

struct RingState {
    /// The next entry to look at (free-running; the slot is `next % count`).
    next: u32,
    bitmaps: Vec<Vec<u64>>,
    /// Regions to send whole at their next take: the ring was found full, so entries may
    /// have been overwritten before we saw them.
    overflowed: Vec<bool>,
}

// SAFETY: the ring mapping lives as long as `self`; every access to it goes through
// `harvest`, under `state`'s lock, with atomic loads and stores of the flags KVM shares.
unsafe impl Send for DirtyRing {}
// SAFETY: as above.
unsafe impl Sync for DirtyRing {}

impl DirtyRing {
    /// Maps `vcpu`'s ring of `bytes` (the ring mode's size).
    pub fn map(vcpu: &VcpuFd, bytes: u64, vm: Arc<VmFd>, region_bytes: &[u64]) -> Result<Self, String> {
        let page = PAGE_SIZE_BYTES as libc::off_t;
        // SAFETY: a new shared mapping of the vCPU fd at the offset KVM defines for the
        // dirty ring; the kernel checks the size against the ring it allocated.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * page,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(format!("mapping the vCPU's dirty ring: {}", std::io::Error::last_os_error()));
        }
        let bitmaps = region_bytes.iter().map(|&b| vec![0; bitmap_words(pages_of(b))]).collect();
        Ok(DirtyRing {
            entries: address.cast(),
            count: (bytes / std::mem::size_of::<kvm_dirty_gfn>() as u64) as u32,
            bytes: bytes as usize,
            vm,
            state: Mutex::new(RingState { next: 0, bitmaps, overflowed: vec![false; region_bytes.len()] }),
        })
    }

    /// Moves every entry KVM has pushed into the bitmaps and hands the entries back.
    /// Called by the migration on each take, and by the vCPU when its ring is full.
    pub fn harvest(&self) -> Result<u64, String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken = 0u64;
        loop {
            // SAFETY: in bounds (index modulo count) of the live mapping.
            let entry = unsafe { self.entries.add((state.next % self.count) as usize) };
            // SAFETY: `flags` is the first u32 of the entry, 16-byte aligned; KVM writes it
            // with release semantics after the slot and offset (the ACQ_REL protocol).
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is ours until we set RESET (the acquire load above).
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            // Slots are numbered as the regions (address space 0 in the upper half).
            let region = (slot & 0xffff) as usize;
            if let Some(bitmap) = state.bitmaps.get_mut(region) {
                if let Some(word) = bitmap.get_mut(offset as usize / 64) {
                    *word |= 1 << (offset % 64);
                }
            }
            flags.store(GFN_RESET, Ordering::Release);
            state.next = state.next.wrapping_add(1);
            taken += 1;
        }
        if taken >= u64::from(self.count) {
            // KVM should have stopped the vCPU well before (at its soft limit); this
            // machine's PVM does not while it emulates the guest. What was overwritten is
            // unknown: every page goes again.
            log::warn!("the KVM dirty ring overflowed ({taken} entries at once): sending every page again");
            state.overflowed.fill(true);
        }
        if taken > 0 {
            // SAFETY: a VM ioctl without arguments on a live VM fd.
            let ret = unsafe { ioctl(&*self.vm, KVM_RESET_DIRTY_RINGS()) };
            if ret < 0 {
                return Err(format!("KVM_RESET_DIRTY_RINGS: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(taken)
    }

    /// Moves region `region`'s harvested bits into `out`, clearing them.
    fn take(&self, region: usize, out: &mut [u64]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if std::mem::take(&mut state.overflowed[region]) {
            out.fill(!0);
        } else {
            out.copy_from_slice(&state.bitmaps[region]);
        }
        state.bitmaps[region].fill(0);
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.entries.cast(), self.bytes) };
    }
}

/// How often the reaper harvests the ring while the guest runs.
const REAP_PERIOD: std::time::Duration = std::time::Duration::from_millis(10);

/// A thread that harvests the ring every few milliseconds, as QEMU's dirty-ring reaper
/// does: KVM is meant to stop a vCPU whose ring is nearly full, but a kernel that does not
/// (this machine's PVM) would overwrite entries of a ring nobody empties.
pub struct Reaper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reaper {
    pub fn start(ring: Arc<DirtyRing>) -> Result<Self, String> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("kvm-dirty-reaper".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(REAP_PERIOD);
                        if let Err(e) = ring.harvest() {
                            log::error!("harvesting the dirty ring: {e}");
                            return;
                        }
                    }
                })
                .map_err(|e| format!("starting the dirty ring's reaper: {e}"))?
        };
        Ok(Reaper { stop, thread: Some(thread) })
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The engine's view of KVM's record, plus the VMM's own writes before boot.
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    region_bytes: Vec<u64>,
    source: Source,
    written_by_vmm: Mutex<Vec<Vec<u64>>>,
}

enum Source {
    Log { manual_protect: bool },
    Ring(Arc<DirtyRing>),
}

impl KvmDirtyLog {
    /// `written_by_vmm`: flat page numbers the VMM wrote (boot memory).
    pub fn new(
        vm: Arc<VmFd>,
        region_bytes: Vec<u64>,
        mode: Mode,
        ring: Option<Arc<DirtyRing>>,
        written_by_vmm: &[u64],
    ) -> Result<Self, String> {
        let source = match (mode, ring) {
            (Mode::Log { manual_protect }, _) => Source::Log { manual_protect },
            (Mode::Ring { .. }, Some(ring)) => Source::Ring(ring),
            (Mode::Ring { .. }, None) => return Err("the dirty ring is on but no vCPU ring is mapped".into()),
        };
        let mut bitmaps: Vec<Vec<u64>> = region_bytes.iter().map(|&b| vec![0; bitmap_words(pages_of(b))]).collect();
        for &flat in written_by_vmm {
            let mut page = flat;
            for (region, &bytes) in region_bytes.iter().enumerate() {
                if page < pages_of(bytes) {
                    bitmaps[region][page as usize / 64] |= 1 << (page % 64);
                    break;
                }
                page -= pages_of(bytes);
            }
        }
        Ok(KvmDirtyLog { vm, region_bytes, source, written_by_vmm: Mutex::new(bitmaps) })
    }

    /// Marks every page as written by the VMM (a destination's memory, all received):
    /// the first take reports them all.
    pub fn mark_all_written(&self) {
        let mut vmm = self.written_by_vmm.lock().unwrap_or_else(|p| p.into_inner());
        for (bitmap, &bytes) in vmm.iter_mut().zip(&self.region_bytes) {
            bitmap.fill(!0);
            let pages = pages_of(bytes);
            if let Some(last) = bitmap.last_mut().filter(|_| !pages.is_multiple_of(64)) {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
    }

    /// Which mechanism it reads, for reports.
    pub fn describe(&self) -> &'static str {
        match self.source {
            Source::Log { manual_protect: true } => "dirty log, manual protect",
            Source::Log { manual_protect: false } => "dirty log",
            Source::Ring(_) => "dirty ring",
        }
    }

    /// KVM's bits for `region` into `out`: fetched (and re-protected) from the log, or
    /// harvested from the ring.
    fn take_from_kvm(&self, region: usize, out: &mut [u64]) -> Result<(), String> {
        match &self.source {
            Source::Log { manual_protect } => {
                let bytes = self.region_bytes[region] as usize;
                let log = self
                    .vm
                    .get_dirty_log(region as u32, bytes)
                    .map_err(|e| format!("KVM_GET_DIRTY_LOG on slot {region}: {e}"))?;
                out.fill(0);
                let n = out.len().min(log.len());
                out[..n].copy_from_slice(&log[..n]);
                if *manual_protect && out.iter().any(|&w| w != 0) {
                    let clear = kvm_clear_dirty_log {
                        slot: region as u32,
                        num_pages: pages_of(self.region_bytes[region]) as u32,
                        first_page: 0,
                        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 { dirty_bitmap: out.as_mut_ptr().cast() },
                    };
                    // SAFETY: the bitmap covers the whole slot (`out` has a bit per page)
                    // and outlives the call; KVM only reads it.
                    let ret = unsafe { ioctl_with_ref(&*self.vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
                    if ret < 0 {
                        return Err(format!(
                            "KVM_CLEAR_DIRTY_LOG on slot {region}: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                }
                Ok(())
            }
            Source::Ring(ring) => {
                ring.harvest()?;
                ring.take(region, out);
                Ok(())
            }
        }
    }
}

impl DirtyLog for KvmDirtyLog {
    fn take_dirty(&self, region: usize, out: &mut [u64]) -> u64 {
        if let Err(e) = self.take_from_kvm(region, out) {
            // Without KVM's record nothing can be skipped safely: every page goes again.
            log::error!("{e}; sending every page of region {region} again");
            out.fill(!0);
        }
        let mut vmm = self.written_by_vmm.lock().unwrap_or_else(|p| p.into_inner());
        let extra = std::mem::take(&mut vmm[region]);
        let pages = pages_of(self.region_bytes[region]);
        let mut count = 0;
        for (index, word) in out.iter_mut().enumerate() {
            let first_page = index as u64 * 64;
            *word |= extra.get(index).copied().unwrap_or(0);
            if first_page + 64 > pages {
                *word &= (1u64 << (pages - first_page)) - 1;
            }
            count += u64::from(word.count_ones());
        }
        count
    }
}
