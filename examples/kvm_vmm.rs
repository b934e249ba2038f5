//! Embedding vmigrate in a KVM VMM built on rust-vmm's crates, as a Cloud Hypervisor or
//! Firecracker author would: guest memory is vm-memory's `GuestMemoryMmap`, the dirty log
//! is KVM's (`KVM_GET_DIRTY_LOG` on a slot made with `KVM_MEM_LOG_DIRTY_PAGES`), the device
//! state is the vCPU's registers, all through the engine's public traits. The guest is 12
//! bytes of real-mode code that adds one to a byte of every 4 KiB page of its first 64 KiB,
//! forever, with an `out` per page so that the vCPU returns to us often (a real VMM kicks
//! its vCPUs out of KVM_RUN with a signal instead: see `guests/src/kvm/vcpu.rs`).
//! Run with `cargo run --example kvm_vmm` (needs /dev/kvm).

use engine::config::{DestinationConfig, SourceConfig};
use engine::vm::{DestinationVm, GuestLayout, LogCoverage, SourceVm};
use engine::VmError;
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migration::dirty::DirtyLog;
use migration::memory::{GuestMemory, Region};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: usize = 16 << 20;
/// mov bx, 0x2000 | l: inc byte [bx] | add bx, 0x1000 | out 0x80, al | jmp l
const CODE: [u8; 13] = [0xbb, 0x00, 0x20, 0xfe, 0x07, 0x81, 0xc3, 0x00, 0x10, 0xe6, 0x80, 0xeb, 0xf6];
const CODE_AT: u64 = 0x1000;

/// Guest memory for the engine: vm-memory does the bounds checks and the copies.
struct Memory(GuestMemoryMmap);

impl GuestMemory for Memory {
    fn region_bytes(&self) -> Vec<u64> {
        vec![MEM as u64]
    }
    fn region_addresses(&self) -> Vec<u64> {
        vec![0]
    }
    fn read_page(&self, _region: usize, page: u64, dst: &mut [u8]) {
        self.0.read_slice(dst, GuestAddress(page * 4096)).expect("page in guest memory");
    }
    fn write_page(&self, _region: usize, page: u64, src: &[u8]) {
        self.0.write_slice(src, GuestAddress(page * 4096)).expect("page in guest memory");
    }
}

/// A VM with one slot over `memory` (dirty logging on) and one vCPU.
fn create_vm(kvm: &Kvm, memory: &GuestMemoryMmap) -> (VmFd, VcpuFd) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let host = memory.get_host_address(GuestAddress(0)).expect("mapped");
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: host as u64,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
    };
    // SAFETY: the mapping is MEM bytes long and outlives the VM (both live until exit).
    unsafe { vm.set_user_memory_region(slot) }.expect("KVM_SET_USER_MEMORY_REGION");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    (vm, vcpu)
}

/// The vCPU's state: all this guest has (a VMM adds FPU, MSRs, LAPIC, events...).
fn save(vcpu: &VcpuFd) -> Vec<u8> {
    serde_json::to_vec(&(vcpu.get_regs().unwrap(), vcpu.get_sregs().unwrap())).unwrap()
}

/// The source VMM.
struct Source {
    memory: Memory,
    vm: VmFd,
    vcpu: Mutex<VcpuFd>,
    paused: AtomicBool,
    stop: AtomicBool,
}

impl Source {
    /// The vCPU's loop: holds the fd while it runs, lets go of it while paused.
    fn run_vcpu(&self) {
        while !self.stop.load(SeqCst) {
            let mut vcpu = self.vcpu.lock().unwrap();
            while !self.paused.load(SeqCst) && !self.stop.load(SeqCst) {
                match vcpu.run().expect("KVM_RUN") {
                    VcpuExit::IoOut(0x80, _) => {}
                    exit => panic!("unexpected exit {exit:?}"),
                }
            }
            drop(vcpu); // paused: the state can be read now
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl DirtyLog for Source {
    fn take_dirty(&self, _region: usize, out: &mut [u64]) -> u64 {
        let log = self.vm.get_dirty_log(0, MEM).expect("KVM_GET_DIRTY_LOG");
        out.copy_from_slice(&log);
        out.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

impl SourceVm for Source {
    fn memory(&self) -> &dyn GuestMemory {
        &self.memory
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }
    fn log_coverage(&self) -> LogCoverage {
        // The code was written by us before the slot logged: say so, and every page goes.
        LogCoverage::SinceMigrationStart
    }
    fn pause(&self) {
        self.paused.store(true, SeqCst);
        drop(self.vcpu.lock().unwrap()); // returns once the vCPU is out of KVM_RUN
    }
    fn resume(&self) {
        self.paused.store(false, SeqCst);
    }
    fn device_state(&self) -> Vec<u8> {
        save(&self.vcpu.lock().unwrap())
    }
}

/// The destination VMM: memory at the source's addresses, then a VM around it.
struct Destination {
    kvm: Kvm,
    memory: Option<Arc<Memory>>,
    running: Option<(VmFd, VcpuFd)>,
}

impl DestinationVm for Destination {
    fn prepare(&mut self, layout: &GuestLayout) -> Result<Arc<dyn GuestMemory>, VmError> {
        if layout.regions != [Region { guest_address: 0, bytes: MEM as u64 }] {
            return Err(VmError::Unfit(format!("this VMM runs {MEM} bytes at 0, not {:?}", layout.regions)));
        }
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)])
            .map_err(|e| VmError::Unfit(format!("guest memory: {e}")))?;
        let memory = Arc::new(Memory(mmap));
        self.memory = Some(memory.clone());
        Ok(memory)
    }
    fn resume(&mut self, device_state: &[u8]) -> Result<(), VmError> {
        let (regs, sregs): (kvm_regs, kvm_sregs) =
            serde_json::from_slice(device_state).map_err(|e| VmError::Resume(format!("vCPU state: {e}")))?;
        let memory = self.memory.as_ref().ok_or_else(|| VmError::Resume("no memory".into()))?;
        let (vm, vcpu) = create_vm(&self.kvm, &memory.0);
        vcpu.set_sregs(&sregs).map_err(|e| VmError::Resume(format!("KVM_SET_SREGS: {e}")))?;
        vcpu.set_regs(&regs).map_err(|e| VmError::Resume(format!("KVM_SET_REGS: {e}")))?;
        self.running = Some((vm, vcpu));
        Ok(())
    }
    fn discard(&mut self) {
        self.memory = None;
    }
}

fn main() {
    let Ok(kvm) = Kvm::new() else {
        println!("SKIPPED: no /dev/kvm");
        return;
    };
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mmap.write_slice(&CODE, GuestAddress(CODE_AT)).unwrap();
    let (vm, vcpu) = create_vm(&kvm, &mmap);
    let mut sregs = vcpu.get_sregs().unwrap();
    (sregs.cs.base, sregs.cs.selector) = (0, 0); // real mode, code segment 0
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_regs { rip: CODE_AT, rflags: 2, ..Default::default() }).unwrap();
    let (paused, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let source = Arc::new(Source { memory: Memory(mmap), vm, vcpu: Mutex::new(vcpu), paused, stop });
    let vcpu_source = source.clone();
    let vcpu_thread = std::thread::spawn(move || vcpu_source.run_vcpu());
    std::thread::sleep(std::time::Duration::from_millis(200));

    let timeouts = transport::pipe::Timeouts::default();
    let mut acceptor = transport::pipe::TcpAcceptor::bind("127.0.0.1:0", timeouts).unwrap();
    let connector = transport::pipe::TcpConnector::new(acceptor.local_socket_addr().unwrap(), timeouts).unwrap();
    let destination = std::thread::spawn(move || {
        let mut vm = Destination { kvm, memory: None, running: None };
        let report = engine::destination::receive(&mut acceptor, &mut vm, &DestinationConfig::default());
        (report.map(|r| r.verified), vm)
    });
    let config = SourceConfig { verify: true, ..SourceConfig::default() };
    let stats = engine::source::migrate(&*source, &connector, &config, &mut |_| {}).expect("migration");
    let (verified, mut vm) = destination.join().unwrap();
    source.stop.store(true, SeqCst);
    vcpu_thread.join().unwrap();
    println!("migrated in {} ms, downtime {} ms, verified {:?}", stats.total_time, stats.downtime, verified);

    let (_vm, vcpu) = vm.running.as_mut().expect("resumed");
    let before = vcpu.get_regs().unwrap().rbx;
    for _ in 0..5 {
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::IoOut(0x80, _)));
    }
    let after = vcpu.get_regs().unwrap().rbx;
    assert_ne!(before, after, "the destination's vCPU runs");
    println!("destination vCPU ran on from the source's registers: bx {before:#x} -> {after:#x}");
}
