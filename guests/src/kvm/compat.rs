//! What a KVM guest needs of the destination's KVM, sent in the handshake so that a
//! destination that cannot host it refuses before the source pauses: the CPU model the
//! guest saw (its CPUID) and the MSRs its state carries.

use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

/// The CPUID words that list CPU features, as (leaf, subleaf, register name): a guest that
/// saw a feature may use it at any instruction, so the destination must offer every one.
const FEATURE_WORDS: [(u32, u32, &str); 9] = [
    (0x1, 0, "ecx"),
    (0x1, 0, "edx"),
    (0x7, 0, "ebx"),
    (0x7, 0, "ecx"),
    (0x7, 0, "edx"),
    (0xd, 1, "eax"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
    (0x8000_0008, 0, "ebx"),
];

/// Bits KVM reports or sets per vCPU rather than per host: the APIC ID's neighbours in
/// leaf 1 (OSXSAVE follows CR4, the hypervisor bit is KVM's own).
fn per_vcpu_bits(leaf: u32, register: &str) -> u32 {
    match (leaf, register) {
        (0x1, "ecx") => (1 << 27) | (1 << 31), // OSXSAVE, hypervisor
        (0x7, "ecx") => 1 << 4,                // OSPKE
        _ => 0,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmRequirements {
    /// The source vCPU's CPUID.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs in the vCPU state.
    pub msrs: Vec<u32>,
}

impl KvmRequirements {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("requirements serialise")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("the source's requirements are not a KVM guest's ({e})"))
    }

    /// Whether `kvm` can host a guest with these requirements; the first thing it lacks.
    pub fn check(&self, kvm: &Kvm) -> Result<(), String> {
        let supported =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
        let find = |entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32| {
            entries.iter().find(|e| e.function == leaf && (e.index == subleaf || e.flags & 1 == 0)).copied()
        };
        for (leaf, subleaf, register) in FEATURE_WORDS {
            let Some(wanted) = find(&self.cpuid, leaf, subleaf) else { continue };
            let offered = find(supported.as_slice(), leaf, subleaf).unwrap_or_default();
            let word = |e: &kvm_cpuid_entry2| match register {
                "eax" => e.eax,
                "ebx" => e.ebx,
                "ecx" => e.ecx,
                _ => e.edx,
            };
            let missing = word(&wanted) & !word(&offered) & !per_vcpu_bits(leaf, register);
            if missing != 0 {
                return Err(format!(
                    "the guest's CPU has features this KVM cannot offer: CPUID leaf {leaf:#x}.{subleaf} {register} bits {missing:#010x}"
                ));
            }
        }
        let saveable = kvm.get_msr_index_list().map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
        if let Some(msr) = self.msrs.iter().find(|msr| !saveable.as_slice().contains(msr)) {
            return Err(format!("the guest's vCPU state holds MSR {msr:#x}, which this KVM cannot restore"));
        }
        Ok(())
    }
}
