//! In-process migrations of a synthetic guest over loopback kernel TCP: the source and the
//! destination engines run in one test process, as an embedding VMM would run them.

use hugepages::HugePolicy;
use migration::stats::MigrationStats;
use std::sync::Arc;
use std::time::Duration;
use transport::config::{DestinationConfig, SourceConfig};
use transport::destination::{receive, DestinationReport};
use transport::guest::GuestRam;
use transport::pipe::{TcpAcceptor, TcpConnector, Timeouts};
use transport::source::migrate;
use transport::synthetic::{SyntheticDestination, SyntheticGuest, WorkloadSpec};
use transport::vm::SourceVm;

pub struct Outcome {
    pub source: Result<MigrationStats, String>,
    pub destination: Result<DestinationReport, String>,
    /// Stores the resumed destination guest made in its first 200 ms.
    pub writes_after_resume: u64,
    /// The destination guest's own memory check, after it ran.
    pub destination_check: Result<(), String>,
    /// Stores the source guest made in 100 ms after the migration returned.
    pub source_writes_after: u64,
}

/// Boots a synthetic guest of `mem_bytes` running `workload`, migrates it with `config`,
/// lets the destination guest run briefly, and reports what both sides saw.
pub fn migrate_synthetic(mem_bytes: u64, workload: WorkloadSpec, config: &SourceConfig) -> Outcome {
    let ram = Arc::new(GuestRam::allocate(&GuestRam::pc_layout(mem_bytes), HugePolicy::Never).expect("guest memory"));
    let guest = SyntheticGuest::boot(ram, workload, 7).expect("boot guest");
    std::thread::sleep(Duration::from_millis(50));
    let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(20) };
    let mut acceptor = TcpAcceptor::bind("127.0.0.1:0", timeouts).expect("bind");
    let address = acceptor.local_socket_addr().expect("address");
    let dest_config = DestinationConfig {
        decompress_threads: 2,
        max_memory_bytes: mem_bytes,
        accept_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let destination = std::thread::spawn(move || {
        let mut vm = SyntheticDestination::new(dest_config.max_memory_bytes, HugePolicy::Never);
        let report = receive(&mut acceptor, &mut vm, &dest_config).map_err(|e| e.to_string());
        let (writes, check) = match vm.guest() {
            Some(guest) => {
                let before = guest.writes();
                std::thread::sleep(Duration::from_millis(200));
                guest.pause();
                let writes = guest.writes() - before;
                let check = guest.check();
                guest.shutdown();
                (writes, check)
            }
            None => (0, Err("no guest resumed".to_string())),
        };
        (report, writes, check)
    });
    let connector = TcpConnector::new(address, timeouts).expect("connector");
    let source = migrate(&guest, &connector, config, &mut |_| {}).map_err(|e| e.to_string());
    let before = guest.writes();
    std::thread::sleep(Duration::from_millis(100));
    let source_writes_after = guest.writes() - before;
    let (destination, writes_after_resume, destination_check) = destination.join().expect("destination thread");
    // A failure message names both ends' view.
    let source = source.map_err(|e| match &destination {
        Err(d) => format!("{e} (destination: {d})"),
        Ok(_) => e,
    });
    Outcome { source, destination, writes_after_resume, destination_check, source_writes_after }
}
