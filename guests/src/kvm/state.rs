//! A vCPU's architectural state, saved on the source at stop-and-copy and restored into
//! the destination's vCPU before it first runs, in the order KVM wants it (as Firecracker
//! and Cloud Hypervisor restore theirs).

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// The MSRs a long-mode guest's state needs: the TSC (so that the guest's clock goes on
/// from where it was), the SYSCALL and SYSENTER targets, the swapped GS base, PAT and
/// MISC_ENABLE. Only those this KVM reports saveable are carried.
const CARRIED_MSRS: [u32; 11] = [
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
    msrs: Vec<kvm_msr_entry>,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
}

/// The MSRs of `CARRIED_MSRS` that this KVM can save and restore.
pub fn carried_msrs(kvm: &Kvm) -> Result<Vec<u32>, String> {
    let saveable = kvm.get_msr_index_list().map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
    Ok(CARRIED_MSRS.iter().copied().filter(|msr| saveable.as_slice().contains(msr)).collect())
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, String> {
        let context = |what: &'static str| move |e: kvm_ioctls::Error| format!("saving the vCPU: {what}: {e}");
        let entries: Vec<kvm_msr_entry> =
            msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("saving the vCPU: MSR list: {e:?}"))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(context("KVM_GET_MSRS"))?;
        if read != entries.len() {
            return Err(format!("saving the vCPU: KVM_GET_MSRS read {read} of {} MSRs", entries.len()));
        }
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(context("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(context("KVM_GET_SREGS"))?,
            // The legacy 4 KiB area: this guest never enables AMX's larger state.
            xsave: vcpu.get_xsave().map_err(context("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(context("KVM_GET_XCRS"))?,
            debug_regs: vcpu.get_debug_regs().map_err(context("KVM_GET_DEBUGREGS"))?,
            msrs: msrs.as_slice().to_vec(),
            lapic: vcpu.get_lapic().map_err(context("KVM_GET_LAPIC"))?,
            events: vcpu.get_vcpu_events().map_err(context("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(context("KVM_GET_MP_STATE"))?,
        })
    }

    /// Writes the state into a fresh vCPU (CPUID already set).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), String> {
        let context = |what: &'static str| move |e: kvm_ioctls::Error| format!("restoring the vCPU: {what}: {e}");
        vcpu.set_regs(&self.regs).map_err(context("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(context("KVM_SET_SREGS"))?;
        // SAFETY: the buffer is a whole `kvm_xsave` saved from a vCPU with the same
        // (legacy-sized) XSAVE area; KVM checks its header itself.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(context("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(context("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs).map_err(context("KVM_SET_DEBUGREGS"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|e| format!("restoring the vCPU: MSR list: {e:?}"))?;
        let written = vcpu.set_msrs(&msrs).map_err(context("KVM_SET_MSRS"))?;
        if written != self.msrs.len() {
            let refused = self.msrs.get(written).map(|m| m.index).unwrap_or_default();
            return Err(format!(
                "restoring the vCPU: KVM_SET_MSRS took {written} of {} MSRs (refused {refused:#x})",
                self.msrs.len()
            ));
        }
        vcpu.set_lapic(&self.lapic).map_err(context("KVM_SET_LAPIC"))?;
        vcpu.set_mp_state(self.mp_state).map_err(context("KVM_SET_MP_STATE"))?;
        vcpu.set_vcpu_events(&self.events).map_err(context("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
