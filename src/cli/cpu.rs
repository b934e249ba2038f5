//! CPU time spent migrating, as the 2015 KVM live-migration talk's tables report it: this process's CPU time over
//! a window, less what the guest's own vCPU thread used meanwhile (a real VMM's vCPUs are
//! not the migration's cost either).

use std::time::Duration;

/// USER_HZ ticks in /proc's stat files: 100 on every Linux architecture we run on.
const TICK: Duration = Duration::from_millis(10);

/// utime + stime from a /proc stat line (fields 14 and 15; the command name, which may
/// hold spaces, ends at the last ')').
fn ticks(stat: &str) -> u64 {
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// CPU time this process has used.
pub fn process_time() -> Duration {
    TICK * ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default()) as u32
}

/// CPU time used so far by this process's threads named `name`.
fn threads_time(name: &str) -> Duration {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            total += ticks(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default());
        }
    }
    TICK * total as u32
}

/// A starting point for measuring the migration's CPU time.
pub struct CpuWindow {
    process: Duration,
    guest: Duration,
}

/// The synthetic guest's vCPU thread (guests::synthetic).
const GUEST_THREAD: &str = "guest-vcpu";

impl CpuWindow {
    pub fn start() -> Self {
        CpuWindow { process: process_time(), guest: threads_time(GUEST_THREAD) }
    }

    /// CPU seconds the process used since `start`, without the guest's vCPU.
    pub fn seconds(&self) -> f64 {
        let process = process_time().saturating_sub(self.process);
        let guest = threads_time(GUEST_THREAD).saturating_sub(self.guest);
        process.saturating_sub(guest).as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins for 300 ms on a thread named `name`, then waits for the returned sender to
    /// drop (a thread's CPU is found only while it lives, as the guest's vCPU thread does).
    fn spin(name: &str) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>) {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let until = std::time::Instant::now() + Duration::from_millis(300);
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
                let _ = done_tx.send(());
                let _ = released.recv();
            })
            .unwrap();
        (release, handle, done)
    }

    #[test]
    fn a_busy_thread_counts_and_the_guest_thread_does_not() {
        let window = CpuWindow::start();
        let (guest, guest_thread, guest_done) = spin(GUEST_THREAD);
        guest_done.recv().unwrap();
        let guest_only = window.seconds();
        let (worker, worker_thread, worker_done) = spin("compress-0");
        worker_done.recv().unwrap();
        let with_worker = window.seconds();
        drop((guest, worker));
        guest_thread.join().unwrap();
        worker_thread.join().unwrap();
        // Ticks are 10 ms; a loaded machine may deschedule the spinners.
        assert!(guest_only < 0.1, "the guest's CPU counted: {guest_only}");
        assert!(with_worker > 0.1, "the worker's CPU did not count: {with_worker}");
    }
}
