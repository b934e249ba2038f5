//! In-process migrations of a synthetic guest over loopback kernel TCP: the source and the
//! destination engines run in one test process, as an embedding VMM would run them.

use dataplane::core::DeviceWrappers;
use dataplane::stack::{LoopbackOptions, LoopbackStack};
use hugepages::HugePolicy;
use migration::stats::MigrationStats;
use std::sync::Arc;
use std::time::Duration;
use transport::config::{DestinationConfig, SourceConfig};
use transport::destination::{receive, DestinationReport};
use transport::guest::GuestRam;
use transport::pipe::{Acceptor, Connector, TcpAcceptor, TcpConnector, Timeouts};
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

/// What carries the migration between the two engines.
#[derive(Debug, Clone)]
pub enum Link {
    /// The kernel's TCP over 127.0.0.1.
    Kernel,
    /// smoltcp on dataplane cores joined by the in-process wire, at this IP MTU, with
    /// `cores` cores per side.
    Loopback { mtu: usize, cores: usize },
    /// The same with fault injection (and capture) around both ends of the wire.
    LossyLoopback { mtu: usize, wrappers: DeviceWrappers },
}

/// Boots a synthetic guest of `mem_bytes` running `workload`, migrates it with `config`
/// over the kernel's TCP, lets the destination guest run briefly, and reports what both
/// sides saw.
pub fn migrate_synthetic(mem_bytes: u64, workload: WorkloadSpec, config: &SourceConfig) -> Outcome {
    migrate_synthetic_on(Link::Kernel, mem_bytes, workload, config)
}

/// As [`migrate_synthetic`], over `link`.
pub fn migrate_synthetic_on(link: Link, mem_bytes: u64, workload: WorkloadSpec, config: &SourceConfig) -> Outcome {
    let ram = Arc::new(GuestRam::allocate(&GuestRam::pc_layout(mem_bytes), HugePolicy::Never).expect("guest memory"));
    let guest = SyntheticGuest::boot(ram, workload, 7).expect("boot guest");
    std::thread::sleep(Duration::from_millis(50));
    let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(20) };
    let (connector, mut acceptor, _stack): (Box<dyn Connector>, Box<dyn Acceptor + Send>, _) = match link {
        Link::Kernel => {
            let acceptor = TcpAcceptor::bind("127.0.0.1:0", timeouts).expect("bind");
            let connector =
                TcpConnector::new(acceptor.local_socket_addr().expect("address"), timeouts).expect("connector");
            (Box::new(connector), Box::new(acceptor), None)
        }
        Link::Loopback { .. } | Link::LossyLoopback { .. } => {
            let (mtu, wrappers, cores) = match link {
                Link::LossyLoopback { mtu, wrappers } => (mtu, wrappers, 1),
                Link::Loopback { mtu, cores } => (mtu, DeviceWrappers::default(), cores),
                Link::Kernel => unreachable!(),
            };
            // Unpinned: tests run side by side on a small machine.
            let options = LoopbackOptions { mtu, wrappers, cores, ..LoopbackOptions::default() };
            let stack = LoopbackStack::start_with(options).expect("loopback stack");
            let acceptor = stack.acceptor(4444, timeouts).expect("listen");
            (Box::new(stack.connector(4444, timeouts)), Box::new(acceptor), Some(stack))
        }
    };
    let dest_config = DestinationConfig {
        decompress_threads: 2,
        max_memory_bytes: mem_bytes,
        accept_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let destination = std::thread::spawn(move || {
        let mut vm = SyntheticDestination::new(dest_config.max_memory_bytes, HugePolicy::Never);
        let report = receive(&mut *acceptor, &mut vm, &dest_config).map_err(|e| e.to_string());
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
    let source = migrate(&guest, &*connector, config, &mut |_| {}).map_err(|e| e.to_string());
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
