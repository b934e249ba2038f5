//! Endurance: a `dirty` guest migrated back and forth twenty times in one process (A to B,
//! then B to A: each time the guest that resumed becomes the next source), every migration
//! verified. At the end the process holds as many file descriptors and threads as at the
//! start, the hugepages it used are free again, and its memory is back within a margin.

use engine::config::{DestinationConfig, SourceConfig};
use engine::destination::receive;
use engine::source::migrate;
use guests::guest::GuestRam;
use guests::synthetic::{SyntheticDestination, SyntheticGuest, WorkloadSpec};
use hugepages::HugePolicy;
use std::sync::Arc;
use std::time::Duration;
use transport::pipe::{TcpAcceptor, TcpConnector, Timeouts};

const GUEST_BYTES: u64 = 64 << 20;
const MIGRATIONS: usize = 20;

/// What the process holds: open descriptors, threads, resident memory, free hugepages.
#[derive(Debug, Clone, Copy)]
struct Held {
    fds: usize,
    threads: usize,
    rss_kib: u64,
    free_hugepages: u64,
}

fn status_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

fn held() -> Held {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Held {
        fds: std::fs::read_dir("/proc/self/fd").map(|dir| dir.count()).unwrap_or(0),
        threads: status_field(&status, "Threads:") as usize,
        rss_kib: status_field(&status, "VmRSS:"),
        free_hugepages: status_field(&meminfo, "HugePages_Free:"),
    }
}

/// The names of this process's threads, to say which one is left.
fn thread_names() -> Vec<String> {
    let tasks = std::fs::read_dir("/proc/self/task").map(|dir| dir.flatten().collect()).unwrap_or_else(|_| Vec::new());
    tasks
        .iter()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|n| n.trim().into())
        .collect()
}

/// What this process's descriptors point at, to say which one is left.
fn descriptors() -> Vec<String> {
    let fds = std::fs::read_dir("/proc/self/fd").map(|dir| dir.flatten().collect()).unwrap_or_else(|_| Vec::new());
    fds.iter().filter_map(|fd| std::fs::read_link(fd.path()).ok()).map(|target| target.display().to_string()).collect()
}

/// Migrates `guest` to a fresh destination in this process; returns the resumed guest.
fn migrate_once(guest: &SyntheticGuest, index: usize) -> SyntheticGuest {
    let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(20) };
    let mut acceptor = TcpAcceptor::bind("127.0.0.1:0", timeouts).expect("bind");
    let connector = TcpConnector::new(acceptor.local_socket_addr().expect("address"), timeouts).expect("connector");
    let destination = std::thread::spawn(move || {
        let config = DestinationConfig {
            max_memory_bytes: GUEST_BYTES,
            accept_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let mut vm = SyntheticDestination::new(GUEST_BYTES, HugePolicy::Auto);
        let report = receive(&mut acceptor, &mut vm, &config);
        (report, vm.take_guest())
    });
    // A guest that resumed here has been logging only since then: every page goes in bulk.
    let config = SourceConfig { verify: true, skip_unused: false, ..SourceConfig::default() };
    let stats =
        migrate(guest, &connector, &config, &mut |_| {}).unwrap_or_else(|err| panic!("migration {index}: {err}"));
    assert_eq!(stats.verified, Some(true), "migration {index} did not verify");
    let (report, resumed) = destination.join().expect("destination thread");
    report.unwrap_or_else(|err| panic!("migration {index}, destination: {err}"));
    resumed.unwrap_or_else(|| panic!("migration {index}: no guest resumed"))
}

#[test]
fn twenty_migrations_back_and_forth_leave_nothing_behind() {
    // Warm up what a process keeps for good once used (the allocator's arenas, the pinning
    // claims' temp files, thread-local state) before taking the baseline.
    let boot = |seed| {
        let ram = GuestRam::allocate(&GuestRam::pc_layout(GUEST_BYTES), HugePolicy::Auto).expect("memory");
        let workload = WorkloadSpec::Dirty { area_bytes: 32 << 20, pages_per_s: 5000, bits: 16 };
        SyntheticGuest::boot(Arc::new(ram), workload, seed).expect("boot")
    };
    let mut warm = migrate_once(&boot(1), usize::MAX);
    warm.shutdown();
    drop(warm);
    std::thread::sleep(Duration::from_millis(200));
    let before = held();

    let mut guest = boot(2);
    for index in 0..MIGRATIONS {
        let resumed = migrate_once(&guest, index);
        guest.shutdown();
        guest = resumed;
        guest.check().unwrap_or_else(|err| panic!("migration {index}: the resumed guest's check: {err}"));
    }
    guest.shutdown();
    drop(guest);
    std::thread::sleep(Duration::from_millis(200));
    let after = held();
    eprintln!("before {before:?}, after {after:?}");
    eprintln!("threads now: {:?}; descriptors now: {:?}", thread_names(), descriptors());
    assert_eq!(after.fds, before.fds, "file descriptors leaked");
    assert_eq!(after.threads, before.threads, "threads left running");
    assert_eq!(after.free_hugepages, before.free_hugepages, "hugepages not given back");
    // Freed memory need not go back to the kernel at once; a leak of a guest per migration
    // would be 20 x 64 MiB.
    assert!(after.rss_kib < before.rss_kib + 96 * 1024, "memory grew from {} to {} KiB", before.rss_kib, after.rss_kib);
}
