//! The vCPU thread: KVM_RUN in a loop, the serial port's output collected in lines, and
//! run control from other threads (pause, resume, throttle, stop) by kicking the vCPU out
//! of KVM_RUN with `immediate_exit` and a signal, as QEMU and Cloud Hypervisor do.

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// The first serial port (COM1), where the guest writes its reports.
const SERIAL_PORT: u16 = 0x3f8;
/// The serial page the guest program writes to (its stores exit to us at any CPL).
const SERIAL_MMIO: u64 = super::layout::SERIAL_MMIO;
/// Its line status register: reads "transmitter empty" so that a polling guest goes on.
const SERIAL_LINE_STATUS: u16 = 0x3fd;
/// Auto-converge's period: the vCPU sleeps its throttled share of each (QEMU's is 10 ms).
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick signal's handler once per process: it does nothing, its only effect
/// is that KVM_RUN returns EINTR.
fn install_kick_handler() -> Result<(), String> {
    static ONCE: Once = Once::new();
    static mut RESULT: Option<String> = None;
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            // SAFETY: written once, inside call_once, before any reader (below) runs.
            unsafe { RESULT = Some(format!("installing the vCPU kick signal's handler: {e}")) };
        }
    });
    // SAFETY: call_once has returned, so the write above (if any) happened before.
    match unsafe { (*std::ptr::addr_of!(RESULT)).clone() } {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What other threads ask of the vCPU, and what it reports.
#[derive(Default)]
struct RunState {
    pause_requested: bool,
    paused: bool,
    stop: bool,
    /// A throttle nap to take before the next KVM_RUN.
    nap: Option<Duration>,
    /// Why the guest stopped for good (a triple fault, an exit we cannot handle).
    failed: Option<String>,
    /// Finished lines the guest wrote on its serial port.
    serial_lines: Vec<String>,
    serial_partial: Vec<u8>,
}

struct Shared {
    state: Mutex<RunState>,
    changed: Condvar,
    throttle_pct: AtomicU8,
    /// The vCPU's `kvm_run.immediate_exit` byte.
    immediate_exit: ImmediateExit,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The address of the `immediate_exit` byte in the vCPU's mapped `kvm_run` structure.
struct ImmediateExit(*mut u8);

// SAFETY: the byte lives in the vCPU's `kvm_run` mapping, which outlives every thread that
// holds this (the vCPU fd is dropped after they are joined); KVM defines it as a flag that
// userspace writes from any thread while the vCPU runs.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above; only single-byte volatile stores go through it.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn set(&self, value: u8) {
        // SAFETY: a valid, live byte (see the Send impl); a volatile store, as KVM reads it.
        unsafe { std::ptr::write_volatile(self.0, value) }
    }
}

/// One vCPU and the thread that runs it.
pub struct Vcpu {
    shared: Arc<Shared>,
    fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
    throttler: Mutex<Option<JoinHandle<()>>>,
}

impl Vcpu {
    /// Starts running `fd` (state already set) on a thread of its own. `on_ring_full`
    /// harvests the dirty ring when KVM stops the vCPU because it is full.
    pub fn start(mut fd: VcpuFd, on_ring_full: Option<RingFull>) -> Result<Self, String> {
        install_kick_handler()?;
        let immediate_exit = ImmediateExit(std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit));
        let shared = Arc::new(Shared {
            state: Mutex::new(RunState::default()),
            changed: Condvar::new(),
            throttle_pct: AtomicU8::new(0),
            immediate_exit,
        });
        let fd = Arc::new(Mutex::new(fd));
        let thread = {
            let (shared, fd) = (shared.clone(), fd.clone());
            std::thread::Builder::new()
                .name("kvm-vcpu0".into())
                .spawn(move || run_loop(&shared, &fd, on_ring_full.as_deref()))
                .map_err(|e| format!("starting the vCPU thread: {e}"))?
        };
        Ok(Vcpu { shared, fd, thread: Some(thread), throttler: Mutex::new(None) })
    }

    /// Stops the vCPU and returns once it is out of KVM_RUN for good until `resume` (its
    /// pending I/O completed, so that its state can be saved).
    pub fn pause(&self) {
        let mut state = self.shared.lock();
        state.pause_requested = true;
        self.kick(&state);
        while !state.paused && state.failed.is_none() && !self.finished() {
            state = self.shared.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn resume(&self) {
        let mut state = self.shared.lock();
        state.pause_requested = false;
        self.shared.changed.notify_all();
    }

    /// Runs `f` on the vCPU's fd; the vCPU must be paused (or not started).
    pub fn with_fd<T>(&self, f: impl FnOnce(&VcpuFd) -> T) -> T {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        f(&fd)
    }

    /// Keeps the vCPU out of KVM_RUN for `pct`% of each period (0: full speed).
    pub fn set_throttle(&self, pct: u8) {
        let pct = pct.min(99);
        self.shared.throttle_pct.store(pct, Ordering::Relaxed);
        let mut throttler = self.throttler.lock().unwrap_or_else(|p| p.into_inner());
        if pct > 0 && throttler.is_none() {
            let shared = self.shared.clone();
            let thread = self.thread.as_ref().map(|t| t.as_pthread_t());
            *throttler = std::thread::Builder::new()
                .name("kvm-throttle".into())
                .spawn(move || throttle_loop(&shared, thread))
                .map_err(|e| log::warn!("auto-converge: no throttle thread: {e}"))
                .ok();
        }
    }

    /// The serial lines the guest has written so far.
    pub fn serial_lines(&self) -> Vec<String> {
        self.shared.lock().serial_lines.clone()
    }

    /// Waits until the guest writes a line starting with `prefix` (after the first `skip`
    /// lines), or fails, or `timeout` passes.
    pub fn wait_for_line(&self, prefix: &str, skip: usize, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(line) = state.serial_lines.iter().skip(skip).find(|l| l.starts_with(prefix)) {
                return Ok(line.clone());
            }
            if let Some(why) = &state.failed {
                return Err(format!("the guest stopped: {why}"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("the guest wrote no {prefix:?} line within {timeout:?}"));
            }
            state = self.shared.changed.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Why the guest stopped for good, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Makes KVM_RUN return now, or at once the next time it is entered.
    fn kick(&self, _held: &RunState) {
        self.shared.immediate_exit.set(1);
        if let Some(thread) = &self.thread {
            // The thread may have just ended (a failed guest): nothing to kick then.
            let _ = thread.kill(kick_signal());
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stop = true;
            self.kick(&state);
            self.shared.changed.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(throttler) = self.throttler.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = throttler.join();
        }
    }
}

/// What the vCPU calls when its dirty ring is full: harvests it, and says how many
/// entries it took.
pub type RingFull = Box<dyn Fn() -> Result<u64, String> + Send>;

fn run_loop(shared: &Shared, vcpu_fd: &Mutex<VcpuFd>, on_ring_full: Option<&(dyn Fn() -> Result<u64, String> + Send)>) {
    let lock_fd = || vcpu_fd.lock().unwrap_or_else(|p| p.into_inner());
    let mut fd = lock_fd();
    // Whether the last KVM_RUN ended with nothing left for KVM to complete (an I/O exit
    // is completed only by the next entry: pausing right after one would lose it).
    let mut settled = true;
    loop {
        {
            let mut state = shared.lock();
            if state.stop {
                return;
            }
            if let Some(nap) = state.nap.take() {
                drop(state);
                std::thread::sleep(nap);
                continue;
            }
            if state.pause_requested && settled {
                state.paused = true;
                shared.changed.notify_all();
                // The fd is free for the state to be saved while paused.
                drop(fd);
                while state.pause_requested && !state.stop {
                    state = shared.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                state.paused = false;
                drop(state);
                fd = lock_fd();
                continue;
            }
            if state.pause_requested {
                // Enter once more with immediate_exit set: KVM completes the I/O, returns.
                shared.immediate_exit.set(1);
            }
        }
        match fd.run() {
            Ok(exit) => {
                settled = false;
                if let Err(why) = handle_exit(shared, exit, on_ring_full) {
                    let mut state = shared.lock();
                    log::error!("KVM guest stopped: {why}");
                    state.failed = Some(why);
                    shared.changed.notify_all();
                    return;
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                shared.immediate_exit.set(0);
                settled = true;
            }
            Err(e) => {
                let mut state = shared.lock();
                state.failed = Some(format!("KVM_RUN: {e}"));
                shared.changed.notify_all();
                return;
            }
        }
    }
}

fn handle_exit(
    shared: &Shared,
    exit: VcpuExit<'_>,
    on_ring_full: Option<&(dyn Fn() -> Result<u64, String> + Send)>,
) -> Result<(), String> {
    match exit {
        VcpuExit::IoOut(SERIAL_PORT, data) | VcpuExit::MmioWrite(SERIAL_MMIO, data) => {
            let mut state = shared.lock();
            for &byte in data {
                if byte == b'\n' {
                    let line = String::from_utf8_lossy(&state.serial_partial).into_owned();
                    state.serial_partial.clear();
                    log::info!("KVM guest serial: {line}");
                    state.serial_lines.push(line);
                    shared.changed.notify_all();
                } else {
                    state.serial_partial.push(byte);
                }
            }
            Ok(())
        }
        VcpuExit::IoOut(..) => Ok(()),
        VcpuExit::MmioRead(_, data) => {
            data.fill(0);
            Ok(())
        }
        VcpuExit::IoIn(port, data) => {
            data.fill(0);
            if port == SERIAL_LINE_STATUS {
                data[0] = 0x60;
            }
            Ok(())
        }
        VcpuExit::Hlt => {
            // Only without an in-kernel LAPIC: a halted vCPU waits for a tick.
            std::thread::sleep(Duration::from_millis(1));
            Ok(())
        }
        VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => match on_ring_full.map(|harvest| harvest()) {
            Some(Ok(0)) => Err("KVM says the dirty ring is full, but it holds no entry (KVM lost track of it)".into()),
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e),
            None => Err("the dirty ring is full and nothing harvests it".into()),
        },
        VcpuExit::Shutdown => Err("the vCPU shut down (a triple fault)".into()),
        VcpuExit::FailEntry(reason, cpu) => {
            Err(format!("KVM could not enter the vCPU (reason {reason:#x}, cpu {cpu})"))
        }
        VcpuExit::InternalError => Err("KVM internal error".into()),
        other => Err(format!("unexpected vCPU exit {other:?}")),
    }
}

/// Auto-converge: every period, asks the vCPU to nap for the throttled share of it.
fn throttle_loop(shared: &Shared, thread: Option<libc::pthread_t>) {
    loop {
        let pct = u32::from(shared.throttle_pct.load(Ordering::Relaxed));
        std::thread::sleep(THROTTLE_PERIOD * (100 - pct) / 100);
        let mut state = shared.lock();
        if state.stop || state.failed.is_some() {
            return;
        }
        if pct == 0 || state.pause_requested {
            continue;
        }
        state.nap = Some(THROTTLE_PERIOD * pct / 100);
        shared.immediate_exit.set(1);
        if let Some(thread) = thread {
            // SAFETY: the vCPU thread is joined only after `stop` is set, which this loop
            // checks under the same lock before every signal.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
        drop(state);
    }
}
