//! The KVM guest migrated end to end in process: KVM's dirty log drives the rounds, the
//! vCPU's state crosses at stop-and-copy, and the guest on the destination checks its own
//! memory (`check ok N` on its serial port) while the engines verify every page too.
//! Without a usable /dev/kvm each test says SKIPPED.

use engine::config::SourceConfig;
use guests::synthetic::WorkloadSpec;
use migration::codec::Codec;
use migration::precopy::PrecopyConfig;
use std::time::Duration;
use vmigrate_tests::session::{
    iterating_until_cancelled, kvm_or_skip, migrate_guest_and_cancel, migrate_guest_on, CancelAt, GuestKind, Link,
};

const MEM: u64 = 32 << 20;
/// The sweeper at a rate the cap below cannot outrun in one round, so rounds repeat.
const SWEEP: WorkloadSpec = WorkloadSpec::Seq { pages_per_s: 20_000 };
const DIRTY: WorkloadSpec = WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 5000, bits: 16 };

fn config(codec: Codec, connections: u16, xbzrle: bool) -> SourceConfig {
    vmigrate_tests::session::iterating_config(MEM, codec, connections, xbzrle)
}

fn migrate_and_check(label: &str, link: Link, workload: WorkloadSpec, config: &SourceConfig) {
    migrate_kind_and_check(GuestKind::Kvm, label, link, workload, config);
}

fn migrate_kind_and_check(kind: GuestKind, label: &str, link: Link, workload: WorkloadSpec, config: &SourceConfig) {
    let outcome = migrate_guest_on(kind, link, MEM, workload, config);
    let stats = outcome.source.unwrap_or_else(|e| panic!("{label}: source failed: {e}"));
    let report = outcome.destination.unwrap_or_else(|e| panic!("{label}: destination failed: {e}"));
    assert_eq!(stats.verified, Some(true), "{label}: memory differs");
    assert_eq!(report.verified, Some(true), "{label}: the destination saw a mismatch");
    outcome.destination_check.unwrap_or_else(|e| panic!("{label}: {e}"));
    assert!(outcome.writes_after_resume > 0, "{label}: the destination guest did not run");
    assert_eq!(outcome.source_writes_after, 0, "{label}: the source guest ran after handing over");
    assert!(stats.rounds.len() >= 3, "{label}: expected iterative rounds, got {}", stats.rounds.len());
    if config.xbzrle_cache_bytes.is_some() && matches!(workload, WorkloadSpec::Dirty { .. }) {
        assert!(stats.xbzrle_cache.pages > 0, "{label}: XBZRLE never used");
    }
    eprintln!("{label}: ok, {} rounds, downtime {:?}", stats.rounds.len(), stats.downtime);
}

#[test]
fn sweeper_and_dirtier_migrate_over_kernel_tcp() {
    if !kvm_or_skip("sweeper_and_dirtier_migrate_over_kernel_tcp") {
        return;
    }
    for workload in [SWEEP, DIRTY] {
        for (codec, connections, xbzrle) in
            [(Codec::None, 1, false), (Codec::Lz4, 4, false), (Codec::Zstd { level: 1 }, 1, true)]
        {
            let label = format!("kvm {workload} {codec} x{connections} xbzrle={xbzrle}");
            migrate_and_check(&label, Link::Kernel, workload, &config(codec, connections, xbzrle));
        }
    }
}

#[test]
fn sweeper_and_dirtier_migrate_over_the_in_process_wire() {
    if !kvm_or_skip("sweeper_and_dirtier_migrate_over_the_in_process_wire") {
        return;
    }
    for workload in [SWEEP, DIRTY] {
        for connections in [1, 4] {
            let label = format!("kvm {workload} wire x{connections}");
            let link = Link::Loopback { mtu: 1500, cores: 1 };
            migrate_and_check(&label, link, workload, &config(Codec::Lz4, connections, connections == 4));
        }
    }
}

#[test]
fn the_dirty_ring_drives_the_rounds_as_the_log_does() {
    if !kvm_or_skip("the_dirty_ring_drives_the_rounds_as_the_log_does") {
        return;
    }
    for workload in [SWEEP, DIRTY] {
        for connections in [1, 4] {
            let label = format!("kvm dirty ring {workload} x{connections}");
            let config = config(Codec::Lz4, connections, connections == 4);
            migrate_kind_and_check(GuestKind::KvmDirtyRing, &label, Link::Kernel, workload, &config);
        }
    }
}

#[test]
fn an_idle_guest_migrates_with_its_timer_running() {
    if !kvm_or_skip("an_idle_guest_migrates_with_its_timer_running") {
        return;
    }
    let outcome = migrate_guest_on(
        GuestKind::Kvm,
        Link::Kernel,
        64 << 20,
        WorkloadSpec::Idle,
        &SourceConfig { verify: true, ..SourceConfig::default() },
    );
    let stats = outcome.source.expect("migration");
    assert_eq!(stats.verified, Some(true));
    outcome.destination_check.expect("the idle guest answers its check");
    // Only the boot image and the pages the guest touched go: the rest is skipped.
    assert!(stats.ram.skipped > (64 << 20) / 4096 * 9 / 10, "skipped {} pages", stats.ram.skipped);
}

/// A cancel in each phase up to the switchover: the source's vCPU runs on, the
/// destination starts nothing.
#[test]
fn a_cancel_in_any_phase_keeps_the_source_vcpu_running() {
    if !kvm_or_skip("a_cancel_in_any_phase_keeps_the_source_vcpu_running") {
        return;
    }
    // The sweeper's pages are all alike: with copies the whole guest would cross in one
    // round, too fast to cancel in each phase.
    let slow =
        SourceConfig { max_bandwidth_bytes_per_s: Some(100 << 20), copy_index_bytes: None, ..SourceConfig::default() };
    let iterating = iterating_until_cancelled(&slow);
    for at in [CancelAt::Setup, CancelAt::Stage("bulk"), CancelAt::Stage("iterative"), CancelAt::StopAndCopy] {
        let config = if at == CancelAt::Stage("iterative") { &iterating } else { &slow };
        let outcome = migrate_guest_and_cancel(GuestKind::Kvm, MEM, SWEEP, config, at);
        let err = outcome.source.expect_err("a cancelled migration fails");
        assert!(err.starts_with("migration cancelled: test"), "{at:?}: {err}");
        assert!(outcome.source_writes_after > 0, "{at:?}: the source vCPU must run on");
        outcome.destination.expect_err("the destination must not complete");
        assert_eq!(outcome.writes_after_resume, 0, "{at:?}: a destination guest ran");
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(120);

/// `vmigrate send --guest kvm` to `vmigrate recv --guest kvm`: two processes, each with its
/// own VM, the vCPU state in the stream.
#[test]
fn send_and_recv_a_kvm_guest_in_two_processes() {
    use std::process::Command;
    use vmigrate_tests::process::{assert_migrated, run, Receiver};
    if !kvm_or_skip("send_and_recv_a_kvm_guest_in_two_processes") {
        return;
    }
    let receiver = Receiver::start(BIN, &["--guest", "kvm", "--json", "--run-after", "0.3"]);
    let sender = run(
        Command::new(BIN).args([
            "send",
            "--guest",
            "kvm",
            "--to",
            receiver.address.as_str(),
            "--mem",
            "64MiB",
            "--workload",
            "dirty:16MiB:5000:16",
            "--connections",
            "4",
            "--codec",
            "zstd",
            "--xbzrle-cache",
            "16MiB",
            // No downtime is short enough: the rounds run out and force the switchover,
            // so the pages dirtied again in the third round go as XBZRLE deltas against
            // the second's. (A limit of 1 ms let a fast bulk round switch over at once.)
            "--downtime-limit",
            "0",
            "--max-rounds",
            "3",
            "--verify",
            "--json",
        ]),
        DEADLINE,
    );
    let received = receiver.wait(DEADLINE);
    let (sent, received) = assert_migrated(&sender, &received);
    assert_eq!(received["destination-guest"]["check"], "ok 4096", "the guest checked its whole area");
    assert!(sent["xbzrle-cache"]["pages"].as_u64().unwrap_or(0) > 0, "XBZRLE used: {sent}");
}

/// A `recv --guest kvm` on a machine without KVM says so before it listens.
#[test]
fn a_kvm_destination_needs_kvm_before_it_listens() {
    use std::process::Command;
    use vmigrate_tests::process::run;
    let finished = run(
        Command::new(BIN)
            .args(["recv", "--guest", "kvm", "--listen", "127.0.0.1:0", "--accept-timeout", "0.2"])
            // A KVM that cannot be opened: the device node is read through this path.
            .env("VMIGRATE_KVM_DEVICE", "/nonexistent/kvm"),
        DEADLINE,
    );
    assert!(!finished.status.success());
    assert!(finished.stderr.contains("/nonexistent/kvm"), "{}", finished.stderr);
    assert!(!finished.stderr.contains("waiting for a migration"), "it listened:\n{}", finished.stderr);
}

/// Auto-converge that converges: a guest dirtying twice what the link carries is
/// throttled (kept out of KVM_RUN for a growing share of each 10 ms) until a round fits
/// the downtime limit, and the switchover keeps under it.
#[test]
fn auto_converge_brings_a_guest_at_twice_the_link_under_the_downtime_limit() {
    if !kvm_or_skip("auto_converge_brings_a_guest_at_twice_the_link_under_the_downtime_limit") {
        return;
    }
    let limit = Duration::from_millis(50);
    let config = SourceConfig {
        verify: true,
        // 40 MiB/s against the sweeper's 20 000 pages (78 MiB) a second.
        max_bandwidth_bytes_per_s: Some(40 << 20),
        precopy: PrecopyConfig { downtime_limit: limit, max_rounds: 60, auto_converge: true, ..Default::default() },
        // The sweeper's pages are all alike: copies would carry them at any rate.
        copy_index_bytes: None,
        ..SourceConfig::default()
    };
    let outcome = migrate_guest_on(GuestKind::Kvm, Link::Kernel, MEM, SWEEP, &config);
    let stats = outcome.source.expect("migration");
    assert_eq!(stats.verified, Some(true));
    outcome.destination_check.expect("the guest's own check");
    let rounds: Vec<(u64, u8)> = stats.rounds.iter().map(|r| (r.dirty_pages_after, r.throttle_pct)).collect();
    assert!(stats.throttle_pct >= 30, "throttled: {rounds:?}");
    assert!(stats.rounds.len() <= 60, "converged before the round limit: {rounds:?}");
    assert!(
        Duration::from_millis(stats.downtime) <= limit,
        "downtime {} ms over the {limit:?} limit; rounds {rounds:?}",
        stats.downtime
    );
    eprintln!(
        "converged in {} rounds, throttle {}%, downtime {} ms: {rounds:?}",
        stats.rounds.len(),
        stats.throttle_pct,
        stats.downtime
    );
}

/// A destination whose KVM cannot host the source's vCPU refuses in the handshake, with
/// the reason, before the source pauses: the source guest never stops.
#[test]
fn a_destination_that_cannot_host_the_vcpu_refuses_before_the_source_pauses() {
    use vmigrate_tests::session::migrate_kvm_requiring;
    if !kvm_or_skip("a_destination_that_cannot_host_the_vcpu_refuses_before_the_source_pauses") {
        return;
    }
    let config = SourceConfig { verify: true, ..SourceConfig::default() };
    let future_cpu = |r: &mut guests::kvm::KvmRequirements| {
        // A source CPU with every feature of leaf 7: no host offers all of them.
        let leaf7 = r.cpuid.iter_mut().find(|e| e.function == 7 && e.index == 0).expect("leaf 7");
        leaf7.ebx = u32::MAX;
    };
    let odd_msr = |r: &mut guests::kvm::KvmRequirements| r.msrs.push(0x4b56_4d99);
    for (what, edit, expected) in [
        ("CPU features", &future_cpu as &dyn Fn(&mut guests::kvm::KvmRequirements), "CPUID leaf 0x7.0 ebx"),
        ("an MSR", &odd_msr, "MSR 0x4b564d99"),
    ] {
        let outcome = migrate_kvm_requiring(MEM, SWEEP, &config, edit);
        let err = outcome.source.expect_err("refused");
        assert!(err.contains("the destination cannot host this guest") && err.contains(expected), "{what}: {err}");
        let destination = outcome.destination.expect_err("nothing received");
        assert!(destination.contains(expected), "{what}: the destination says why: {destination}");
        assert!(outcome.source_writes_after > 0, "{what}: the source guest runs on");
        assert_eq!(outcome.writes_after_resume, 0, "{what}: no destination guest ran");
    }
}

/// A synthetic source sent to a KVM destination: refused at once, no page moved.
#[test]
fn a_kvm_destination_refuses_a_guest_that_is_not_a_kvm_guest() {
    use std::process::Command;
    use vmigrate_tests::process::{run, Receiver};
    if !kvm_or_skip("a_kvm_destination_refuses_a_guest_that_is_not_a_kvm_guest") {
        return;
    }
    let receiver = Receiver::start(BIN, &["--guest", "kvm"]);
    let sender = run(Command::new(BIN).args(["send", "--to", receiver.address.as_str(), "--mem", "64MiB"]), DEADLINE);
    let received = receiver.wait(DEADLINE);
    assert!(!sender.status.success() && !received.status.success());
    assert!(sender.stderr.contains("the source is not a KVM guest"), "{}", sender.stderr);
    assert!(sender.stderr.contains("source guest keeps running"), "{}", sender.stderr);
}

/// examples/kvm_vmm.rs, the embedding over vm-memory and kvm-ioctls, migrates its guest
/// (cargo test builds the examples beside the test binaries).
#[test]
fn the_kvm_embedding_example_migrates_its_guest() {
    use std::process::Command;
    use vmigrate_tests::process::run;
    if !kvm_or_skip("the_kvm_embedding_example_migrates_its_guest") {
        return;
    }
    let exe = std::env::current_exe().expect("test path");
    let example = exe.parent().and_then(|deps| deps.parent()).map(|dir| dir.join("examples/kvm_vmm"));
    let Some(example) = example.filter(|path| path.exists()) else {
        eprintln!("SKIPPED the_kvm_embedding_example_migrates_its_guest: the example is not built");
        return;
    };
    let finished = run(&mut Command::new(example), DEADLINE);
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(finished.stdout.contains("verified Ok(Some(true))"), "{}", finished.stdout);
    assert!(finished.stdout.contains("destination vCPU ran on"), "{}", finished.stdout);
}
