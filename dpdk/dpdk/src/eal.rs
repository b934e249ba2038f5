//! The EAL (DPDK's environment: memory, lcores, devices), initialised once per process from
//! the arguments given after `--` on the command line, as DPDK's own programs take them.

use crate::DpdkError;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Proof that the EAL is initialised; DPDK objects are made through it.
pub struct Eal {
    _private: (),
}

impl Eal {
    /// Initialises the EAL with `args` (without a program name: "vmigrate" is prepended).
    /// DPDK allows this once per process: a second call is an error, also after a failed
    /// first one.
    pub fn init<S: AsRef<str>>(args: &[S]) -> Result<Eal, DpdkError> {
        if INITIALISED.swap(true, Ordering::SeqCst) {
            return Err(DpdkError::AlreadyInitialised);
        }
        let mut owned = vec![CString::new("vmigrate").expect("no NUL")];
        for arg in args {
            let arg = arg.as_ref();
            owned.push(CString::new(arg).map_err(|_| DpdkError::BadArgument(arg.to_string()))?);
        }
        // rte_eal_init may permute argv (getopt); it gets its own array of pointers.
        let mut argv: Vec<*mut std::ffi::c_char> = owned.iter().map(|arg| arg.as_ptr().cast_mut()).collect();
        let affinity = Affinity::of_this_thread();
        // SAFETY: argv holds argc valid C strings that outlive the call (`owned`); EAL
        // initialisation runs once (guarded above).
        let parsed = unsafe { dpdk_sys::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
        if parsed < 0 {
            return Err(DpdkError::from_errno("rte_eal_init"));
        }
        // The EAL pins the calling thread to its main lcore (`-l 0`: CPU 0), and every
        // thread started from it afterwards would inherit that one CPU: our threads are
        // placed by our own rules (transport::pin), so the thread gets its CPUs back.
        if let Some(affinity) = affinity {
            affinity.restore();
        }
        Ok(Eal { _private: () })
    }
}

/// The CPUs a thread may run on.
struct Affinity(libc::cpu_set_t);

impl Affinity {
    fn of_this_thread() -> Option<Affinity> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a cpu_set_t of the size given; 0 is the calling thread.
        let got = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        (got == 0).then_some(Affinity(set))
    }

    fn restore(&self) {
        // SAFETY: a set read by sched_getaffinity, of the size given; 0 is the calling thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// The calling thread known to DPDK as an lcore of its own (`rte_thread_register`) until
/// dropped, on the same thread: a thread that is not one gets no per-lcore mempool cache,
/// and every mbuf it allocates or frees (GSO takes two per frame) goes through the pool's
/// shared ring.
pub struct LcoreRegistration {
    /// Unregistering must happen on the registered thread: not Send.
    _thread: std::marker::PhantomData<*const ()>,
}

impl LcoreRegistration {
    /// Registers the calling thread (the EAL is initialised: callers hold a port); an error
    /// where every lcore id is taken.
    pub(crate) fn register() -> Result<LcoreRegistration, DpdkError> {
        // SAFETY: the EAL is initialised; registering the calling thread has no other
        // precondition (a thread already registered keeps its id).
        if unsafe { dpdk_sys::rte_thread_register() } < 0 {
            return Err(DpdkError::from_errno("rte_thread_register"));
        }
        Ok(LcoreRegistration { _thread: std::marker::PhantomData })
    }
}

impl Drop for LcoreRegistration {
    fn drop(&mut self) {
        // SAFETY: called on the thread that registered (the type is not Send).
        unsafe { dpdk_sys::rte_thread_unregister() };
    }
}
