//! In-process migrations of a synthetic or a KVM guest over loopback kernel TCP or the
//! in-process wire: the source and the destination engines run in one test process, as an
//! embedding VMM would run them.

use dataplane::core::DeviceWrappers;
use dataplane::stack::{LoopbackOptions, LoopbackStack};
use engine::cancel::Cancel;
use engine::config::{DestinationConfig, SourceConfig};
use engine::destination::{receive, DestinationReport};
use engine::source::{migrate, Progress};
use engine::vm::SourceVm;
use guests::guest::GuestRam;
use guests::kvm::{DirtyTracking, KvmDestination, KvmGuest};
use guests::synthetic::{SyntheticDestination, SyntheticGuest, WorkloadSpec};
use hugepages::HugePolicy;
use migration::codec::Codec;
use migration::precopy::PrecopyConfig;
use migration::stats::MigrationStats;
use std::sync::Arc;
use std::time::Duration;
use transport::pipe::{Acceptor, Connector, TcpAcceptor, TcpConnector, Timeouts};

pub struct Outcome {
    pub source: Result<MigrationStats, String>,
    pub destination: Result<DestinationReport, String>,
    /// Stores the resumed destination guest made in its first 200 ms.
    pub writes_after_resume: u64,
    /// The destination guest's own memory check, after it ran.
    pub destination_check: Result<(), String>,
    /// Stores the source guest made in 100 ms after the migration returned.
    pub source_writes_after: u64,
    /// The stage of each progress report the source made, in order.
    pub stages_reported: Vec<&'static str>,
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

/// A source configuration that keeps a writing guest of `mem_bytes` iterating: a
/// 100 MiB/s cap (loopback moves tens of MiB in milliseconds, faster than any guest
/// dirties them) and a zero downtime limit, never met while the guest writes, so that
/// rounds repeat (where XBZRLE works) until the limit of 3 forces the switchover. The
/// XBZRLE cache, when on, is as large as the guest: a sweep re-dirties every page each
/// round, which thrashes a smaller direct-mapped cache (as it would QEMU's).
pub fn iterating_config(mem_bytes: u64, codec: Codec, connections: u16, xbzrle: bool) -> SourceConfig {
    SourceConfig {
        codec,
        connections,
        xbzrle_cache_bytes: xbzrle.then_some(mem_bytes),
        verify: true,
        compress_threads: 2,
        max_bandwidth_bytes_per_s: Some(100 << 20),
        precopy: PrecopyConfig { downtime_limit: Duration::ZERO, max_rounds: 3, ..Default::default() },
        ..SourceConfig::default()
    }
}

/// Which guest a test migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// The synthetic guest: a thread writing guest memory.
    Synthetic,
    /// The KVM micro-VM (`guests::kvm`): a vCPU under KVM, its dirty log and vCPU state.
    Kvm,
    /// The same, its writes recorded by KVM's dirty ring.
    KvmDirtyRing,
    /// The synthetic guest presented as a VMM that turned its dirty log on when the
    /// migration started (`LogCoverage::SinceMigrationStart`).
    SyntheticLateLog,
}

/// Boots a synthetic guest of `mem_bytes` running `workload`, migrates it with `config`
/// over the kernel's TCP, lets the destination guest run briefly, and reports what both
/// sides saw.
pub fn migrate_synthetic(mem_bytes: u64, workload: WorkloadSpec, config: &SourceConfig) -> Outcome {
    migrate_synthetic_on(Link::Kernel, mem_bytes, workload, config)
}

/// As [`migrate_synthetic`], over `link`.
pub fn migrate_synthetic_on(link: Link, mem_bytes: u64, workload: WorkloadSpec, config: &SourceConfig) -> Outcome {
    run(GuestKind::Synthetic, link, mem_bytes, workload, config, Twists::default())
}

/// As [`migrate_synthetic_on`], with the guest of `kind`.
pub fn migrate_guest_on(
    kind: GuestKind,
    link: Link,
    mem_bytes: u64,
    workload: WorkloadSpec,
    config: &SourceConfig,
) -> Outcome {
    run(kind, link, mem_bytes, workload, config, Twists::default())
}

/// Whether the KVM guest can run here; says SKIPPED for `test` where it cannot.
pub fn kvm_or_skip(test: &str) -> bool {
    match guests::kvm::available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: no usable KVM ({why})");
            false
        }
    }
}

/// Where a test cancels a migration (`SourceConfig::cancel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelAt {
    /// Before the source connects.
    Setup,
    /// When the source reports progress in this stage ("bulk", "iterative").
    Stage(&'static str),
    /// When the source pauses the guest for stop-and-copy.
    StopAndCopy,
}

/// `base` made to iterate until a cancel arrives: no round meets a zero downtime limit
/// while the guest writes, and the round cap is far off, so the migration is still
/// iterating at the first progress report (every 250 ms). A 5 ms limit was met within
/// 250 ms once the destination faulted its pages in faster.
pub fn iterating_until_cancelled(base: &SourceConfig) -> SourceConfig {
    let precopy = PrecopyConfig { downtime_limit: Duration::ZERO, max_rounds: 10_000, ..Default::default() };
    SourceConfig { precopy, ..base.clone() }
}

/// As [`migrate_synthetic`], cancelling the migration at `at`.
pub fn migrate_and_cancel(mem_bytes: u64, workload: WorkloadSpec, config: &SourceConfig, at: CancelAt) -> Outcome {
    run(
        GuestKind::Synthetic,
        Link::Kernel,
        mem_bytes,
        workload,
        config,
        Twists { cancel_at: Some(at), ..Twists::default() },
    )
}

/// As [`migrate_and_cancel`], with the guest of `kind`.
pub fn migrate_guest_and_cancel(
    kind: GuestKind,
    mem_bytes: u64,
    workload: WorkloadSpec,
    config: &SourceConfig,
    at: CancelAt,
) -> Outcome {
    run(kind, Link::Kernel, mem_bytes, workload, config, Twists { cancel_at: Some(at), ..Twists::default() })
}

/// Migrates a KVM guest whose requirements (CPU model, MSRs) `edit` changes on the way
/// out, as a source on another host would state them.
pub fn migrate_kvm_requiring(
    mem_bytes: u64,
    workload: WorkloadSpec,
    config: &SourceConfig,
    edit: &dyn Fn(&mut guests::kvm::KvmRequirements),
) -> Outcome {
    run(
        GuestKind::Kvm,
        Link::Kernel,
        mem_bytes,
        workload,
        config,
        Twists { edit_requirements: Some(edit), ..Twists::default() },
    )
}

/// What a test changes in a migration beyond the source's configuration.
#[derive(Default)]
struct Twists<'a> {
    /// Cancel the migration at this point.
    cancel_at: Option<CancelAt>,
    /// Change the KVM guest's requirements on the way out.
    edit_requirements: Option<&'a dyn Fn(&mut guests::kvm::KvmRequirements)>,
    /// The destination inflates `deflate` pages on this device.
    destination_offload: Option<Arc<dyn engine::offload::OffloadDevice>>,
}

/// As [`migrate_synthetic`], the destination inflating `deflate` pages on `device`.
pub fn migrate_synthetic_inflating_on(
    device: Arc<dyn engine::offload::OffloadDevice>,
    mem_bytes: u64,
    workload: WorkloadSpec,
    config: &SourceConfig,
) -> Outcome {
    let twists = Twists { destination_offload: Some(device), ..Twists::default() };
    run(GuestKind::Synthetic, Link::Kernel, mem_bytes, workload, config, twists)
}

/// A source guest whose stores can be counted.
trait CountedGuest: SourceVm {
    fn writes(&self) -> u64;
}

impl CountedGuest for SyntheticGuest {
    fn writes(&self) -> u64 {
        SyntheticGuest::writes(self)
    }
}

impl CountedGuest for KvmGuest {
    fn writes(&self) -> u64 {
        KvmGuest::writes(self)
    }
}

fn boot(kind: GuestKind, mem_bytes: u64, workload: WorkloadSpec) -> Box<dyn CountedGuest> {
    match kind {
        GuestKind::Synthetic | GuestKind::SyntheticLateLog => {
            let layout = GuestRam::pc_layout(mem_bytes);
            let ram = Arc::new(GuestRam::allocate(&layout, HugePolicy::Never).expect("guest memory"));
            Box::new(SyntheticGuest::boot(ram, workload, 7).expect("boot guest"))
        }
        GuestKind::Kvm | GuestKind::KvmDirtyRing => {
            let tracking = if kind == GuestKind::Kvm { DirtyTracking::Log } else { DirtyTracking::Ring };
            let guest = KvmGuest::boot_with(mem_bytes, workload, 7, tracking).expect("boot the KVM guest");
            if let WorkloadSpec::Seq { .. } = workload {
                // Pages the guest never touched are skipped (KVM's log runs since boot):
                // let the sweeper cover its area once, as the synthetic seq guest's boot does.
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while guest.writes() < mem_bytes / 4096 && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Box::new(guest)
        }
    }
}

/// Receives into a guest of `kind`, lets it run 200 ms, and has it checked: the report,
/// the stores it made while running, and the check's verdict.
fn receive_and_check(
    kind: GuestKind,
    acceptor: &mut dyn Acceptor,
    config: &DestinationConfig,
) -> (Result<DestinationReport, String>, u64, Result<(), String>) {
    let run_for = Duration::from_millis(200);
    match kind {
        GuestKind::Synthetic | GuestKind::SyntheticLateLog => {
            let mut vm = SyntheticDestination::new(config.max_memory_bytes, HugePolicy::Never);
            let report = receive(acceptor, &mut vm, config).map_err(|e| e.to_string());
            let (writes, check) = match vm.guest() {
                Some(guest) => {
                    let before = guest.writes();
                    std::thread::sleep(run_for);
                    guest.pause();
                    let writes = guest.writes() - before;
                    let check = guest.check();
                    guest.shutdown();
                    (writes, check)
                }
                None => (0, Err("no guest resumed".to_string())),
            };
            (report, writes, check)
        }
        GuestKind::Kvm | GuestKind::KvmDirtyRing => {
            let mut vm = KvmDestination::new(config.max_memory_bytes).expect("KVM on the destination");
            let report = receive(acceptor, &mut vm, config).map_err(|e| e.to_string());
            let (writes, check) = match vm.guest() {
                Some(guest) => {
                    let before = guest.writes();
                    std::thread::sleep(run_for);
                    let writes = guest.writes() - before;
                    // The guest checks itself, running, and says so on its serial port.
                    (writes, guest.check().map(drop))
                }
                None => (0, Err("no guest resumed".to_string())),
            };
            (report, writes, check)
        }
    }
}

/// The source VM of a test: the guest, with a hook on pause.
struct HookedGuest<'a> {
    guest: &'a dyn CountedGuest,
    /// What the log is said to cover, where the test overrides the guest's own answer.
    coverage: Option<engine::vm::LogCoverage>,
    /// Requirements stated instead of the guest's own.
    requirements: Option<Vec<u8>>,
    on_pause: Box<dyn Fn() + Send + Sync + 'a>,
}

impl SourceVm for HookedGuest<'_> {
    fn memory(&self) -> &dyn migration::memory::GuestMemory {
        SourceVm::memory(self.guest)
    }
    fn dirty_log(&self) -> &dyn migration::dirty::DirtyLog {
        SourceVm::dirty_log(self.guest)
    }
    fn log_coverage(&self) -> engine::vm::LogCoverage {
        self.coverage.unwrap_or_else(|| SourceVm::log_coverage(self.guest))
    }
    fn requirements(&self) -> Vec<u8> {
        self.requirements.clone().unwrap_or_else(|| SourceVm::requirements(self.guest))
    }
    fn pause(&self) {
        SourceVm::pause(self.guest);
        (self.on_pause)();
    }
    fn resume(&self) {
        SourceVm::resume(self.guest);
    }
    fn device_state(&self) -> Vec<u8> {
        SourceVm::device_state(self.guest)
    }
    fn set_throttle(&self, pct: u8) {
        SourceVm::set_throttle(self.guest, pct);
    }
}

fn run(
    kind: GuestKind,
    link: Link,
    mem_bytes: u64,
    workload: WorkloadSpec,
    config: &SourceConfig,
    twists: Twists<'_>,
) -> Outcome {
    let Twists { cancel_at, edit_requirements, destination_offload } = twists;
    let guest = boot(kind, mem_bytes, workload);
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
        // A migration cancelled before it connects leaves the destination waiting.
        accept_timeout: Duration::from_secs(if cancel_at == Some(CancelAt::Setup) { 2 } else { 10 }),
        // One switch for both ends, as the CLI's `--connection-threads`.
        direct_receive: config.direct_send,
        offload: destination_offload,
        ..Default::default()
    };
    let destination = std::thread::spawn(move || receive_and_check(kind, &mut *acceptor, &dest_config));
    let cancel = Cancel::new();
    let config = SourceConfig { cancel: cancel_at.map(|_| cancel.clone()), ..config.clone() };
    if cancel_at == Some(CancelAt::Setup) {
        cancel.cancel("test, at setup");
    }
    let vm = HookedGuest {
        guest: &*guest,
        coverage: (kind == GuestKind::SyntheticLateLog).then_some(engine::vm::LogCoverage::SinceMigrationStart),
        requirements: edit_requirements.map(|edit| {
            let mut requirements =
                guests::kvm::KvmRequirements::decode(&guest.requirements()).expect("a KVM guest's requirements");
            edit(&mut requirements);
            requirements.encode()
        }),
        on_pause: Box::new(|| {
            if cancel_at == Some(CancelAt::StopAndCopy) {
                cancel.cancel("test, in stop-and-copy");
            }
        }),
    };
    let mut stages_reported = Vec::new();
    let mut on_progress = |progress: &Progress| {
        stages_reported.push(progress.stage);
        if let Some(CancelAt::Stage(stage)) = cancel_at {
            if progress.stage == stage {
                cancel.cancel(format!("test, in the {stage} stage"));
            }
        }
    };
    let source = migrate(&vm, &*connector, &config, &mut on_progress).map_err(|e| e.to_string());
    let before = guest.writes();
    std::thread::sleep(Duration::from_millis(100));
    let source_writes_after = guest.writes() - before;
    let (destination, writes_after_resume, destination_check) = destination.join().expect("destination thread");
    // A failure message names both ends' view.
    let source = source.map_err(|e| match &destination {
        Err(d) => format!("{e} (destination: {d})"),
        Ok(_) => e,
    });
    Outcome { source, destination, writes_after_resume, destination_check, source_writes_after, stages_reported }
}
