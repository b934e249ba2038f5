//! Pinning threads to cores. Polling cores and compression and decompression workers are
//! pinned so that each keeps its caches and the scheduler does not stack two of them on one
//! core while another idles; each claims its CPU across the host (`CpuClaim`), so that two
//! vmigrate processes on one host do not stack theirs either. Where the CPUs run out, the
//! rest run unpinned.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

fn cores() -> &'static [core_affinity::CoreId] {
    static CORES: OnceLock<Vec<core_affinity::CoreId>> = OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

/// Cores this process may run on.
pub fn core_count() -> usize {
    cores().len().max(1)
}

/// Most workers a pool gets unless asked for more: QEMU's default number of compression
/// threads. A migration shares its host with running guests; more is a choice to make.
pub const MAX_DEFAULT_WORKERS: usize = 8;

/// The size of a compression or decompression pool when none is asked for: one worker per
/// core this process may use, less the `dataplane_cores` its polling cores hold, shared
/// among `pools` pools in this process (two when both ends run in it); at least one, at
/// most [`MAX_DEFAULT_WORKERS`].
pub fn default_workers(dataplane_cores: usize, pools: usize) -> usize {
    workers_from(core_count(), dataplane_cores, pools)
}

fn workers_from(cores: usize, dataplane_cores: usize, pools: usize) -> usize {
    (cores.saturating_sub(dataplane_cores) / pools.max(1)).clamp(1, MAX_DEFAULT_WORKERS)
}

/// A CPU a polling core or a worker holds for itself, across every vmigrate process on the
/// host: an exclusive `flock` on a per-CPU file, released when the claim drops or the
/// process dies. Two processes on one host (the test harness, a benchmark with both ends)
/// would otherwise pin their threads to the same CPUs and take turns on them while other
/// CPUs idle.
pub struct CpuClaim {
    pub index: usize,
    _lock: std::fs::File,
}

/// Claims the first free CPU among `preferred`, `preferred - 1`, ... (wrapping), so that
/// polling cores spread from the last CPU down. None when every CPU is claimed: the caller
/// then runs unpinned rather than stack on a CPU another polling core holds.
pub fn claim_cpu(preferred: usize) -> Option<CpuClaim> {
    claim_cpu_in(&std::env::temp_dir(), downward(preferred))
}

/// Pins the calling worker (compression, decompression) to the first free CPU among
/// `preferred`, `preferred + 1`, ... (wrapping): workers spread from the first CPU up,
/// polling cores from the last down, and none takes a CPU another thread of any vmigrate
/// on the host holds. None when all are held (more threads than CPUs): the worker then
/// runs unpinned, where the scheduler can share the CPUs out, rather than stack on one.
/// The claim lasts as long as the returned value.
pub fn claim_worker_cpu(preferred: usize) -> Option<CpuClaim> {
    claim_cpu_in(&std::env::temp_dir(), upward(preferred))
}

/// Every CPU once, from `preferred` down, wrapping.
fn downward(preferred: usize) -> impl Iterator<Item = usize> {
    let count = cores().len();
    (0..count).map(move |step| (preferred % count.max(1) + count - step) % count)
}

/// Every CPU once, from `preferred` up, wrapping.
fn upward(preferred: usize) -> impl Iterator<Item = usize> {
    let count = cores().len();
    (0..count).map(move |step| (preferred + step) % count)
}

fn claim_cpu_in(directory: &std::path::Path, mut order: impl Iterator<Item = usize>) -> Option<CpuClaim> {
    use std::os::fd::AsRawFd;
    let cores = cores();
    order.find_map(|index| {
        let path = directory.join(format!("vmigrate-cpu-{}.lock", cores[index].id));
        let file = open_lock_file(&path).ok()?;
        // SAFETY: flock on a descriptor we own; the lock lives as long as the file.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        (locked && core_affinity::set_for_current(cores[index])).then_some(CpuClaim { index, _lock: file })
    })
}

/// Opens (creating it if need be) a CPU's lock file for `flock`, which needs no write
/// access: read-only, so a file another user's vmigrate created (mode 0644) can still be
/// locked, and nobody else can write to ours. A symbolic link in its place is refused
/// (O_NOFOLLOW), never followed: in a shared temp directory it could point anywhere.
fn open_lock_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o644)
        .open(path)
}

/// Polling dataplane cores running in this process.
static POLLERS: AtomicUsize = AtomicUsize::new(0);

/// A polling core's registration: counts the core as running while held.
pub struct PollingCore(());

impl PollingCore {
    pub fn register() -> Self {
        POLLERS.fetch_add(1, Ordering::Relaxed);
        PollingCore(())
    }
}

impl Drop for PollingCore {
    fn drop(&mut self) {
        POLLERS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Polling cores running in this process.
pub fn pollers() -> usize {
    POLLERS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pools_take_the_cores_the_polling_cores_leave() {
        assert_eq!(workers_from(2, 0, 1), 2);
        assert_eq!(workers_from(2, 1, 1), 1);
        assert_eq!(workers_from(2, 2, 2), 1, "never none");
        assert_eq!(workers_from(16, 2, 2), 7);
        assert_eq!(workers_from(96, 4, 1), MAX_DEFAULT_WORKERS);
    }

    /// A fresh directory of this test's own for the lock files, so that claims by other
    /// tests and processes do not interfere.
    fn lock_directory(test: &str) -> std::path::PathBuf {
        let directory = std::env::temp_dir().join(format!("vmigrate-pin-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        directory
    }

    #[test]
    fn a_claimed_cpu_is_not_claimed_again_until_released() {
        let directory = lock_directory("test");
        let last = core_count() - 1;
        let first = claim_cpu_in(&directory, downward(last)).expect("a free CPU can be claimed");
        assert_eq!(first.index, last, "claims start from the preferred CPU");
        // Another claim (as another process would make) takes a different CPU, or none.
        let second = claim_cpu_in(&directory, downward(last));
        assert!(second.as_ref().is_none_or(|second| second.index != last));
        drop(first);
        drop(second);
        let again = claim_cpu_in(&directory, downward(last)).expect("a released CPU can be claimed again");
        assert_eq!(again.index, last);
        drop(again);
        let _ = std::fs::remove_dir_all(&directory);
    }

    #[test]
    fn workers_take_the_cpus_no_one_holds_and_float_when_none_is_left() {
        let directory = lock_directory("workers");
        let last = core_count() - 1;
        // A polling core (of this process or another) holds the last CPU.
        let polling = claim_cpu_in(&directory, downward(last)).expect("a free CPU can be claimed");
        // Workers preferring it move on, up from there and round to the first.
        let mut workers = Vec::new();
        while let Some(worker) = claim_cpu_in(&directory, upward(last)) {
            assert_ne!(worker.index, polling.index, "a worker stacked on a polling core's CPU");
            assert!(workers.iter().all(|other: &CpuClaim| other.index != worker.index), "two workers on one CPU");
            workers.push(worker);
        }
        // Every CPU is held now: the next worker runs unpinned, on whatever CPU is idle.
        assert_eq!(workers.len(), core_count() - 1);
        drop(workers);
        drop(polling);
        let _ = std::fs::remove_dir_all(&directory);
    }

    #[test]
    fn polling_cores_are_counted_while_registered() {
        let core = PollingCore::register();
        // Other tests' cores may come and go; this one is counted until dropped.
        assert!(pollers() >= 1);
        drop(core);
    }

    #[test]
    fn lock_files_are_not_writable_by_others_and_links_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let directory = lock_directory("links");
        let last = core_count() - 1;
        // Someone planted a link where the preferred CPU's lock file goes.
        let target = directory.join("victim");
        let planted = directory.join(format!("vmigrate-cpu-{}.lock", cores()[last].id));
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        let claim = claim_cpu_in(&directory, downward(last));
        assert!(!target.exists(), "the link was followed and its target created");
        assert!(claim.as_ref().is_none_or(|claim| claim.index != last), "a CPU behind a link was claimed");
        drop(claim);
        // A lock file we create is writable by its owner alone (or nobody).
        let file = directory.join("vmigrate-cpu-test.lock");
        drop(open_lock_file(&file).unwrap());
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o022, 0, "lock file mode {mode:o} lets others write");
        let _ = std::fs::remove_dir_all(&directory);
    }
}
