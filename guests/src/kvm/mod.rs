//! The KVM guest (`--guest kvm`): a micro-VM on rust-vmm's crates (kvm-ioctls,
//! kvm-bindings, vm-memory) that runs a program of our own (asm/kvm_guest.S) in long mode
//! on one vCPU, migrated with KVM's own dirty log and vCPU state. The workloads are the
//! synthetic guest's, run inside the guest, which checks its own memory on request and
//! reports on its serial port (`check ok N` or `check BAD page P`).
//!
//! It implements the engine's `SourceVm` and `DestinationVm` through their public API
//! only, as a VMM that embeds the engine would.

mod compat;
mod dirty;
mod layout;
mod machine;
mod memory;
mod state;
mod vcpu;

use crate::synthetic::WorkloadSpec;
use dirty::KvmDirtyLog;
use engine::vm::{DestinationVm, GuestLayout, LogCoverage, SourceVm};
use engine::VmError;
use kvm_bindings::kvm_cpuid_entry2;
use layout::{config, config_field, ProgramConfig};
use machine::{Machine, Running};
use memory::KvmMemory;
use migration::dirty::DirtyLog;
use migration::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use state::VcpuState;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use compat::KvmRequirements;
pub use dirty::DirtyTracking;
pub use machine::available;

/// The guest program, assembled by build.rs (empty where binutils were missing).
const PROGRAM_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvm_guest.bin"));

/// How long a check of the whole area may take (the guest reads every page once).
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// What crosses with the final round: the vCPU as the source left it, the CPU model the
/// guest saw, and the workload (for reports).
#[derive(Serialize, Deserialize)]
struct KvmDeviceState {
    workload: WorkloadSpec,
    cpuid: Vec<kvm_cpuid_entry2>,
    vcpu: VcpuState,
}

/// Where the KVM guest's part of a switchover went: the source's pause and state save,
/// the destination's VM build (VM, slots, vCPU, state restored, thread started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SwitchoverTimes {
    /// Kick to the vCPU parked out of KVM_RUN (its pending I/O completed).
    pub pause_us: u64,
    /// Reading the vCPU's state and encoding it.
    pub state_save_us: u64,
    pub state_bytes: u64,
    /// On the destination: the vCPU state restored into the VM (built before the
    /// switchover) and the vCPU started.
    pub vm_build_us: u64,
}

/// The running KVM guest, on the source (booted here) or on the destination (resumed).
pub struct KvmGuest {
    running: Running,
    dirty: KvmDirtyLog,
    cpuid: Vec<kvm_cpuid_entry2>,
    spec: WorkloadSpec,
    times: std::sync::Mutex<SwitchoverTimes>,
}

impl KvmGuest {
    /// Boots a guest of `memory_bytes` running `spec`'s workload, its writes in KVM's
    /// dirty log.
    pub fn boot(memory_bytes: u64, spec: WorkloadSpec, seed: u64) -> Result<Self, String> {
        Self::boot_with(memory_bytes, spec, seed, DirtyTracking::Log)
    }

    /// As `boot`, its writes recorded by `tracking`.
    pub fn boot_with(
        memory_bytes: u64,
        spec: WorkloadSpec,
        seed: u64,
        tracking: DirtyTracking,
    ) -> Result<Self, String> {
        if PROGRAM_IMAGE.is_empty() {
            return Err("this build has no KVM guest program: install binutils (as, ld) and rebuild".into());
        }
        layout::check_size(memory_bytes)?;
        let kvm = machine::open_kvm()?;
        let memory = Arc::new(KvmMemory::map(&layout::regions(memory_bytes))?);
        memory.advise_huge();
        let machine = Machine::create(kvm, memory.clone(), None, tracking)?;
        let program = program_config(spec, memory_bytes, machine.tsc_hz()?, seed)?;
        let mut written = layout::write_boot_memory(memory.mmap(), memory_bytes, PROGRAM_IMAGE, program)?;
        if program.kind == layout::KIND_DIRTY {
            let area =
                layout::fill_dirty_area(memory.mmap(), memory_bytes, program.area_pages, program.word_mask, seed)?;
            written.extend(area);
        }
        if program.kind == layout::KIND_IDLE {
            // The synthetic idle guest's booted-OS-like image (kernel, data, text, zeroed
            // pages over mostly untouched memory), loaded as a VMM loads a kernel.
            let mut rng = rand::SeedableRng::seed_from_u64(seed);
            let mut failed = None;
            crate::idle_image::write_idle_image(layout::max_area_pages(memory_bytes), &mut rng, |index, page| {
                match layout::write_area_page(memory.mmap(), memory_bytes, index, page) {
                    Ok(flat) => written.push(flat),
                    Err(e) => failed = Some(e),
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
        }
        machine.set_boot_state(program.kind != layout::KIND_IDLE)?;
        let cpuid = machine.cpuid();
        let dirty = machine.dirty_log(&written)?;
        log::debug!("KVM guest: {} MiB, {spec}, {}", memory_bytes >> 20, dirty.describe());
        Ok(KvmGuest { running: machine.run()?, dirty, cpuid, spec, times: Default::default() })
    }

    /// What the last switchover cost this guest's VMM (source or destination side).
    pub fn switchover_times(&self) -> SwitchoverTimes {
        *self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, update: impl FnOnce(&mut SwitchoverTimes)) {
        update(&mut self.times.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn spec(&self) -> WorkloadSpec {
        self.spec
    }

    /// Pages the guest has written since boot (its own counter, in its memory).
    pub fn writes(&self) -> u64 {
        self.running.memory.read_u64(config_field(config::WRITES))
    }

    /// Timer ticks the idle guest has taken (its own counter).
    pub fn ticks(&self) -> u64 {
        self.running.memory.read_u64(config_field(config::TICKS))
    }

    pub fn memory_bytes(&self) -> u64 {
        self.running.memory.total_bytes()
    }

    /// Asks the guest to check its memory and waits for its verdict: `Ok(pages checked)`,
    /// or the guest's report of a bad page, or why it did not answer.
    pub fn check(&self) -> Result<u64, String> {
        let memory = &self.running.memory;
        let requests = memory.read_u64(config_field(config::CHECK_REQUESTS));
        let lines_before = self.running.vcpu.serial_lines().len();
        memory.write_u64(config_field(config::CHECK_REQUESTS), requests + 1)?;
        let line = self.running.vcpu.wait_for_line("check ", lines_before, CHECK_TIMEOUT)?;
        match line.strip_prefix("check ok ") {
            Some(pages) => pages.trim().parse().map_err(|_| format!("the guest's report {line:?} is garbled")),
            None => Err(format!("the guest's own check failed: {line}")),
        }
    }

    /// Why the guest stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        self.running.vcpu.failure()
    }

    /// Which of KVM's mechanisms records the guest's writes.
    pub fn dirty_tracking(&self) -> &'static str {
        self.dirty.describe()
    }

    /// Everything the guest wrote on its serial port.
    pub fn serial_lines(&self) -> Vec<String> {
        self.running.vcpu.serial_lines()
    }

    fn save_device_state(&self) -> Result<Vec<u8>, String> {
        let started = Instant::now();
        let vcpu = self.running.vcpu.with_fd(|fd| VcpuState::save(fd, &self.running.msrs))?;
        let state = KvmDeviceState { workload: self.spec, cpuid: self.cpuid.clone(), vcpu };
        let bytes = serde_json::to_vec(&state).map_err(|e| format!("encoding the vCPU state: {e}"))?;
        self.record(|t| {
            t.state_save_us = started.elapsed().as_micros() as u64;
            t.state_bytes = bytes.len() as u64;
        });
        Ok(bytes)
    }
}

/// The guest program's configuration for a workload.
fn program_config(spec: WorkloadSpec, memory_bytes: u64, tsc_hz: u64, seed: u64) -> Result<ProgramConfig, String> {
    let max_area = layout::max_area_pages(memory_bytes);
    let pacing = |pages_per_s: u64| tsc_hz.checked_div(pages_per_s).map_or(0, |ticks| ticks.max(1));
    let seed = seed | 1;
    Ok(match spec {
        WorkloadSpec::Idle => {
            ProgramConfig { kind: layout::KIND_IDLE, area_pages: 0, tsc_per_page: 0, word_mask: 0, seed }
        }
        WorkloadSpec::Seq { pages_per_s } => ProgramConfig {
            kind: layout::KIND_SWEEP,
            area_pages: max_area,
            tsc_per_page: pacing(pages_per_s),
            word_mask: 0,
            seed,
        },
        WorkloadSpec::Dirty { area_bytes, pages_per_s, bits } => {
            let area_pages = area_bytes / migration::PAGE_SIZE_BYTES as u64;
            if area_pages > max_area {
                return Err(format!(
                    "the dirty area of {area_bytes} bytes does not fit a KVM guest of {memory_bytes} bytes (at most {} bytes past its first 4 MiB)",
                    max_area * migration::PAGE_SIZE_BYTES as u64
                ));
            }
            let word_mask = if bits >= 32 { u32::MAX } else { (1u32 << bits) - 1 };
            ProgramConfig { kind: layout::KIND_DIRTY, area_pages, tsc_per_page: pacing(pages_per_s), word_mask, seed }
        }
        WorkloadSpec::Clones { .. } => {
            return Err(format!("the KVM guest runs idle, seq and dirty workloads, not {spec}: use --guest synthetic"))
        }
    })
}

impl SourceVm for KvmGuest {
    fn memory(&self) -> &dyn GuestMemory {
        &*self.running.memory
    }

    fn dirty_log(&self) -> &dyn DirtyLog {
        &self.dirty
    }

    fn log_coverage(&self) -> LogCoverage {
        // The slots log from their creation, before the first KVM_RUN, and the first
        // take adds the pages this VMM wrote itself (program, tables, initial image).
        LogCoverage::SinceBoot
    }

    fn pause(&self) {
        let started = Instant::now();
        self.running.vcpu.pause();
        self.record(|t| t.pause_us = started.elapsed().as_micros() as u64);
    }

    fn resume(&self) {
        self.running.vcpu.resume();
    }

    fn requirements(&self) -> Vec<u8> {
        KvmRequirements { cpuid: self.cpuid.clone(), msrs: self.running.msrs.clone() }.encode()
    }

    fn device_state(&self) -> Vec<u8> {
        match self.save_device_state() {
            Ok(state) => state,
            Err(e) => {
                // An empty state fails the destination's resume, and the source runs on.
                log::error!("KVM guest: {e}");
                Vec::new()
            }
        }
    }

    fn set_throttle(&self, pct: u8) {
        self.running.vcpu.set_throttle(pct);
    }
}

/// The destination of a KVM guest: memory for the source's layout within a limit, then a
/// VM built around it and the vCPU restored from the migrated state.
pub struct KvmDestination {
    max_memory_bytes: u64,
    /// The VM over the memory being received, built when memory is prepared (its vCPU given the source's CPUID), so that
    /// only the vCPU state's restore falls in the downtime.
    machine: Option<Machine>,
    cpuid: Vec<kvm_cpuid_entry2>,
    guest: Option<KvmGuest>,
}

impl KvmDestination {
    /// Checks, before any page arrives, that this machine can host a KVM guest.
    pub fn new(max_memory_bytes: u64) -> Result<Self, String> {
        machine::available()?;
        Ok(KvmDestination { max_memory_bytes, machine: None, cpuid: Vec::new(), guest: None })
    }

    /// The resumed guest, once the migration completed.
    pub fn guest(&self) -> Option<&KvmGuest> {
        self.guest.as_ref()
    }

    pub fn take_guest(&mut self) -> Option<KvmGuest> {
        self.guest.take()
    }

    /// Restores the vCPU state into the prepared VM and starts it.
    fn start(&mut self, device_state: &[u8]) -> Result<KvmGuest, String> {
        let started = Instant::now();
        let machine = self.machine.take().ok_or("resume before memory and the VM were prepared")?;
        let memory = machine.memory.clone();
        let state: KvmDeviceState =
            serde_json::from_slice(device_state).map_err(|e| format!("the device state is not a KVM guest's ({e})"))?;
        if state.cpuid != self.cpuid {
            return Err("the vCPU state names another CPU model than the handshake did".into());
        }
        if memory.read_u64(config_field(config::MAGIC)) != config::MAGIC_VALUE {
            return Err("the memory received holds no KVM guest program".into());
        }
        machine.restore(&state.vcpu)?;
        let dirty = machine.dirty_log(&[])?;
        // Every page came from the source, written by us: all of them are the next
        // migration's to send.
        dirty.mark_all_written();
        let running = machine.run()?;
        let times = SwitchoverTimes { vm_build_us: started.elapsed().as_micros() as u64, ..Default::default() };
        // Huge pages again, as the source had, once the guest runs.
        memory.advise_huge();
        crate::guest::collapse_in_background(move || memory.collapse_dense());
        Ok(KvmGuest { running, dirty, cpuid: state.cpuid, spec: state.workload, times: std::sync::Mutex::new(times) })
    }
}

impl DestinationVm for KvmDestination {
    fn prepare(&mut self, layout: &GuestLayout) -> Result<Arc<dyn GuestMemory>, VmError> {
        layout.check_fits(self.max_memory_bytes)?;
        let source: Vec<(u64, u64)> = layout.regions.iter().map(|r| (r.guest_address, r.bytes)).collect();
        let regions = layout::regions_for(&source).map_err(VmError::Unfit)?;
        if layout.requirements.is_empty() {
            return Err(VmError::Incompatible("the source is not a KVM guest (it states no CPU model)".into()));
        }
        let kvm = machine::open_kvm().map_err(VmError::Incompatible)?;
        let requirements = KvmRequirements::decode(&layout.requirements)
            .and_then(|requirements| requirements.check(&kvm).map(|()| requirements))
            .map_err(VmError::Incompatible)?;
        let memory = Arc::new(KvmMemory::map(&regions).map_err(VmError::Unfit)?);
        // The VM now, outside the downtime: slots over the memory being received, the
        // vCPU with the source's CPU model.
        let machine = Machine::create(kvm, memory.clone(), Some(&requirements.cpuid), DirtyTracking::Log)
            .map_err(VmError::Incompatible)?;
        self.cpuid = requirements.cpuid;
        self.machine = Some(machine);
        Ok(memory)
    }

    fn resume(&mut self, device_state: &[u8]) -> Result<(), VmError> {
        self.guest = Some(self.start(device_state).map_err(VmError::Resume)?);
        Ok(())
    }

    fn discard(&mut self) {
        self.guest = None;
        self.machine = None;
    }
}
