//! The micro-VM itself: a KVM VM with an in-kernel interrupt controller, one memory slot
//! per RAM region, and one vCPU, either booted into the guest program or restored from a
//! migrated vCPU state.

use super::dirty::{self, DirtyRing, DirtyTracking, KvmDirtyLog, Mode};
use super::layout::{self, CODE_SELECTOR, DATA_SELECTOR, PML4, PROGRAM, STACK_TOP};
use super::memory::KvmMemory;
use super::state::VcpuState;
use super::vcpu::Vcpu;
use kvm_bindings::{kvm_cpuid_entry2, kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use migration::memory::GuestMemory;
use std::sync::Arc;

/// KVM's TSS for real-mode emulation: three pages in the hole below 4 GiB, where no RAM is.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// What this VMM needs of KVM, checked before anything is built (on the destination,
/// before the source pauses).
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
];

/// The KVM device: /dev/kvm, or the path in `VMIGRATE_KVM_DEVICE` (a container's own
/// node, or a path that does not exist to see the refusal).
fn kvm_device() -> std::ffi::CString {
    let path = std::env::var_os("VMIGRATE_KVM_DEVICE").unwrap_or_else(|| "/dev/kvm".into());
    std::ffi::CString::new(std::os::unix::ffi::OsStringExt::into_vec(path)).unwrap_or_else(|_| c"/dev/kvm".into())
}

/// Opens the KVM device and checks the capabilities this VMM uses.
pub fn open_kvm() -> Result<Kvm, String> {
    let device = kvm_device();
    let kvm = Kvm::new_with_path(&device).map_err(|e| format!("opening {}: {e}", device.to_string_lossy()))?;
    let missing: Vec<&str> =
        REQUIRED_CAPS.iter().filter(|(cap, _)| !kvm.check_extension(*cap)).map(|&(_, name)| name).collect();
    if !missing.is_empty() {
        return Err(format!("this KVM lacks {}", missing.join(", ")));
    }
    Ok(kvm)
}

/// Whether this machine can run the KVM guest at all (for tests that skip without it).
pub fn available() -> Result<(), String> {
    open_kvm().map(drop)
}

/// A VM whose vCPU has not run yet. Fields drop in order: vCPU, VM, then the memory
/// the VM's slots point at.
pub struct Machine {
    pub vcpu: VcpuFd,
    pub vm: Arc<VmFd>,
    pub kvm: Kvm,
    pub memory: Arc<KvmMemory>,
    pub msrs: Vec<u32>,
    dirty_mode: Mode,
    ring: Option<Arc<DirtyRing>>,
    cpuid: Vec<kvm_cpuid_entry2>,
}

impl Machine {
    /// Creates the VM over `memory` with one vCPU that sees `cpuid` (the host's supported
    /// set on the source; the source's on the destination), its writes recorded by
    /// `tracking`.
    pub fn create(
        kvm: Kvm,
        memory: Arc<KvmMemory>,
        cpuid: Option<&[kvm_cpuid_entry2]>,
        tracking: DirtyTracking,
    ) -> Result<Self, String> {
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        vm.set_tss_address(TSS_ADDRESS).map_err(|e| format!("KVM_SET_TSS_ADDR: {e}"))?;
        vm.create_irq_chip().map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
        let dirty_mode = dirty::enable(&kvm, &vm, tracking)?;
        memory.register_slots(&vm)?;
        let vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let vm = Arc::new(vm);
        let ring = match dirty_mode {
            Mode::Ring { bytes } => Some(Arc::new(DirtyRing::map(&vcpu, bytes, vm.clone(), &memory.region_bytes())?)),
            Mode::Log { .. } => None,
        };
        let cpuid = match cpuid {
            Some(entries) => CpuId::from_entries(entries).map_err(|e| format!("the source's CPUID: {e:?}"))?,
            None => {
                kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?
            }
        };
        vcpu.set_cpuid2(&cpuid).map_err(|e| format!("KVM_SET_CPUID2 (the guest's CPU model): {e}"))?;
        let msrs = super::state::carried_msrs(&kvm)?;
        let cpuid = cpuid.as_slice().to_vec();
        Ok(Machine { vcpu, vm, kvm, memory, msrs, dirty_mode, ring, cpuid })
    }

    /// The engine's view of the guest's writes; `written_by_vmm`: the flat pages the VMM
    /// wrote itself before the first run.
    pub fn dirty_log(&self, written_by_vmm: &[u64]) -> Result<KvmDirtyLog, String> {
        KvmDirtyLog::new(
            self.vm.clone(),
            self.memory.region_bytes(),
            self.dirty_mode,
            self.ring.clone(),
            written_by_vmm,
        )
    }

    /// The CPUID the vCPU was given, to carry to the destination. (What KVM_GET_CPUID2
    /// reads back is not it under this machine's PVM, which reports the host's features.)
    pub fn cpuid(&self) -> Vec<kvm_cpuid_entry2> {
        self.cpuid.clone()
    }

    /// Puts the vCPU at the guest program's first instruction, in long mode, at CPL 3 for
    /// `user` (the busy workloads: see asm/kvm_guest.S) or CPL 0.
    pub fn set_boot_state(&self, user: bool) -> Result<(), String> {
        let mut sregs = self.vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: CODE_SELECTOR,
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1, // 64-bit
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let (code, data_selector) = if user {
            (kvm_segment { selector: layout::USER_CODE_SELECTOR, dpl: 3, ..code }, layout::USER_DATA_SELECTOR)
        } else {
            (code, DATA_SELECTOR)
        };
        let data = kvm_segment { selector: data_selector, type_: 0x3, db: 1, l: 0, ..code };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        // Long mode wants a 64-bit busy TSS in TR; the guest never switches tasks.
        sregs.tr =
            kvm_segment { selector: layout::TSS_SELECTOR, type_: 0xb, s: 0, l: 0, g: 0, dpl: 0, limit: 0x67, ..code };
        sregs.gdt.base = layout::GDT;
        sregs.gdt.limit = 5 * 8 - 1;
        sregs.cr3 = PML4;
        sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10); // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = 0x8001_0033; // PG, WP, NE, ET, MP, PE
        sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
        self.vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        let mut regs = self.vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        regs.rip = PROGRAM;
        regs.rsp = STACK_TOP;
        regs.rflags = 2;
        self.vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        Ok(())
    }

    /// Restores a migrated vCPU state.
    pub fn restore(&self, state: &VcpuState) -> Result<(), String> {
        state.restore(&self.vcpu)
    }

    /// The guest's TSC ticks per second.
    pub fn tsc_hz(&self) -> Result<u64, String> {
        let khz = self.vcpu.get_tsc_khz().map_err(|e| format!("KVM_GET_TSC_KHZ: {e}"))?;
        Ok(u64::from(khz) * 1000)
    }

    /// Starts the vCPU on its thread; what stays is what the running guest needs.
    pub fn run(self) -> Result<Running, String> {
        // A full ring stops the vCPU until it is harvested: the vCPU harvests it itself.
        let on_ring_full = self.ring.clone().map(|ring| -> super::vcpu::RingFull { Box::new(move || ring.harvest()) });
        let reaper = self.ring.clone().map(dirty::Reaper::start).transpose()?;
        let vcpu = Vcpu::start(self.vcpu, on_ring_full)?;
        Ok(Running { _reaper: reaper, vcpu, _vm: self.vm, _kvm: self.kvm, memory: self.memory, msrs: self.msrs })
    }
}

/// A VM whose vCPU runs. Fields drop in order: the ring's reaper, the vCPU (its thread
/// joined), the VM, the memory.
pub struct Running {
    /// Harvests the dirty ring while the guest runs (ring mode only).
    _reaper: Option<dirty::Reaper>,
    pub vcpu: Vcpu,
    /// Held so that the VM outlives its vCPU (the dirty log holds it too).
    _vm: Arc<VmFd>,
    _kvm: Kvm,
    pub memory: Arc<KvmMemory>,
    pub msrs: Vec<u32>,
}
