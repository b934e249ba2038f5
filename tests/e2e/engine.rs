//! The engine end to end, in process: every workload, codec, connection count and XBZRLE
//! setting migrates with verification, the destination guest checks its memory and keeps
//! running, and the source guest stays paused (handed over).

use engine::config::SourceConfig;
use guests::synthetic::WorkloadSpec;
use migration::codec::Codec;
use migration::precopy::PrecopyConfig;
use std::time::Duration;
use vmigrate_tests::session::migrate_synthetic;
use vmigrate_tests::session::{iterating_until_cancelled, migrate_and_cancel, CancelAt};

const MEM: u64 = 32 << 20;
/// Loopback TCP moves 32 MiB in milliseconds, faster than any guest dirties it; a
/// 100 MiB/s cap gives rounds long enough for the guest to dirty pages again.
const LINK_BYTES_PER_S: u64 = 100 << 20;
const CODECS: [Codec; 7] = [
    Codec::None,
    Codec::Lz4,
    Codec::Zlib { level: 1 },
    Codec::Zstd { level: 1 },
    Codec::ShuffleLz4,
    Codec::BitShuffleLz4,
    Codec::Adaptive,
];

fn config(codec: Codec, connections: u16, xbzrle: bool) -> SourceConfig {
    vmigrate_tests::session::iterating_config(MEM, codec, connections, xbzrle)
}

/// `expect_deltas`: the workload re-dirties pages across rounds (random writes do; a
/// sweep may have moved on), so XBZRLE must have been used when enabled.
fn check_matrix(workload: WorkloadSpec, expect_writes: bool, expect_deltas: bool) {
    for codec in CODECS {
        for connections in [1u16, 4] {
            for xbzrle in [false, true] {
                let label = format!("{workload} {codec} x{connections} xbzrle={xbzrle}");
                let outcome = migrate_synthetic(MEM, workload, &config(codec, connections, xbzrle));
                let stats = outcome.source.unwrap_or_else(|e| panic!("{label}: source failed: {e}"));
                let report = outcome.destination.unwrap_or_else(|e| panic!("{label}: destination failed: {e}"));
                assert_eq!(stats.verified, Some(true), "{label}: memory differs");
                assert_eq!(report.verified, Some(true), "{label}: destination saw a mismatch");
                assert_eq!(stats.status, "completed");
                outcome.destination_check.unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(outcome.source_writes_after, 0, "{label}: source guest ran after handing over");
                if expect_writes {
                    assert!(outcome.writes_after_resume > 0, "{label}: destination guest did not run");
                    assert!(stats.rounds.len() >= 3, "{label}: expected iterative rounds, got {}", stats.rounds.len());
                }
                if xbzrle && expect_deltas {
                    assert!(stats.xbzrle_cache.pages > 0, "{label}: XBZRLE never used");
                    assert!(report.xbzrle_pages > 0, "{label}: destination applied no deltas");
                }
                // Adaptive may rightly send these small guests raw (pages go raw until the
                // link has been seen full); `adaptive_compresses_where_the_link_is_the_limit`.
                if !matches!(codec, Codec::None | Codec::Adaptive) && matches!(workload, WorkloadSpec::Idle) {
                    assert!(stats.compression.pages > 0, "{label}: nothing compressed");
                    assert!(report.compressed_pages > 0, "{label}: destination decompressed nothing");
                }
                assert_eq!(report.connections, connections);
            }
        }
    }
}

#[test]
fn seq_guest_migrates_with_every_setting() {
    check_matrix(WorkloadSpec::Seq { pages_per_s: 50_000 }, true, false);
}

#[test]
fn dirty_guest_migrates_with_every_setting() {
    check_matrix(WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 5000, bits: 16 }, true, true);
}

#[test]
fn clones_guest_migrates_with_every_setting() {
    check_matrix(WorkloadSpec::Clones { area_bytes: 16 << 20, distinct: 64, pages_per_s: 5000 }, true, false);
}

/// 64 MiB of copies of 64 random pages: each distinct page goes whole once (once per
/// worker that met it first at the same time), every other as a copy of it, and the
/// destination fills them in from the originals it holds (16,000 copies: on several
/// threads).
#[test]
fn pages_alike_go_as_copies_of_one_sent_in_the_round() {
    let (mem, area) = (128 << 20, 64 << 20);
    let workload = WorkloadSpec::Clones { area_bytes: area, distinct: 64, pages_per_s: 0 };
    let area_pages = area / 4096;
    let config = SourceConfig { verify: true, connections: 4, compress_threads: 2, ..SourceConfig::default() };
    let outcome = migrate_synthetic(mem, workload, &config);
    let stats = outcome.source.expect("migration");
    let report = outcome.destination.expect("destination");
    assert_eq!(stats.verified, Some(true));
    assert!(stats.ram.copied >= area_pages - 64 * 2, "{} copies of {area_pages} pages", stats.ram.copied);
    assert_eq!(report.copied_pages, stats.ram.copied);
    assert!(stats.ram.transferred < 2 << 20, "sent {} bytes", stats.ram.transferred);

    // Without the index every page goes whole.
    let config = SourceConfig { copy_index_bytes: None, ..config };
    let stats = migrate_synthetic(mem, workload, &config).source.expect("migration");
    assert_eq!(stats.verified, Some(true));
    assert_eq!(stats.ram.copied, 0);
    assert!(stats.ram.transferred > area, "sent {} bytes", stats.ram.transferred);
}

#[test]
fn idle_guest_migrates_with_every_setting() {
    check_matrix(WorkloadSpec::Idle, false, false);
}

#[test]
fn idle_guest_skips_unused_pages_and_sends_little() {
    let mem = 512 << 20;
    let outcome = migrate_synthetic(mem, WorkloadSpec::Idle, &SourceConfig { verify: true, ..SourceConfig::default() });
    let stats = outcome.source.expect("migration");
    assert_eq!(stats.verified, Some(true));
    let pages = mem / 4096;
    assert!(stats.ram.skipped > pages * 8 / 10, "skipped {} of {pages}", stats.ram.skipped);
    assert!(stats.ram.duplicate > 0, "touched zero pages go as zero runs");
    assert!(stats.ram.transferred < mem / 10, "sent {} of {mem} bytes", stats.ram.transferred);

    // With skipping off every page is visited: the untouched ones go as zero runs.
    let outcome = migrate_synthetic(
        mem,
        WorkloadSpec::Idle,
        &SourceConfig { verify: true, skip_unused: false, ..SourceConfig::default() },
    );
    let stats = outcome.source.expect("migration");
    assert_eq!(stats.verified, Some(true));
    assert_eq!(stats.ram.skipped, 0);
    assert!(stats.ram.duplicate > pages * 8 / 10);
}

/// A VMM whose dirty log started with the migration says so, and nothing is skipped: the
/// pages written before (most of the idle guest's image) all arrive.
#[test]
fn a_log_started_late_skips_nothing() {
    use vmigrate_tests::session::{migrate_guest_on, GuestKind, Link};
    let mem = 64 << 20;
    let config = SourceConfig { verify: true, ..SourceConfig::default() };
    let outcome = migrate_guest_on(GuestKind::SyntheticLateLog, Link::Kernel, mem, WorkloadSpec::Idle, &config);
    let stats = outcome.source.expect("migration");
    assert_eq!(stats.verified, Some(true));
    assert_eq!(stats.ram.skipped, 0, "skip-unused must not trust a log that started late");
    assert_eq!(stats.ram.normal + stats.ram.duplicate, mem / 4096, "every page visited");
}

#[test]
fn adaptive_compresses_where_the_link_is_the_limit() {
    // 10 MiB/s: the idle guest's pages pack 2x and more, and two workers compress far
    // faster than the link carries, so once the link is seen full the policy compresses.
    let config = SourceConfig {
        codec: Codec::Adaptive,
        verify: true,
        compress_threads: 2,
        max_bandwidth_bytes_per_s: Some(10 << 20),
        ..SourceConfig::default()
    };
    let outcome = migrate_synthetic(64 << 20, WorkloadSpec::Idle, &config);
    let stats = outcome.source.expect("migration");
    let report = outcome.destination.expect("destination");
    assert_eq!(stats.verified, Some(true));
    assert!(stats.compression.pages > 0, "nothing compressed: {:?}", stats.compression);
    assert!(report.compressed_pages > 0, "the destination decompressed nothing");
}

#[test]
fn no_codec_puts_more_on_the_wire_than_none() {
    let workload = WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 0, bits: 16 };
    let sent = |codec| {
        let stats =
            migrate_synthetic(32 << 20, workload, &SourceConfig { codec, verify: true, ..SourceConfig::default() })
                .source
                .expect("migration");
        assert_eq!(stats.verified, Some(true));
        stats.ram.transferred
    };
    let none = sent(Codec::None);
    let lz4 = sent(Codec::Lz4);
    let zlib = sent(Codec::Zlib { level: 1 });
    let zstd = sent(Codec::Zstd { level: 1 });
    assert!(lz4 <= none, "lz4 {lz4} > none {none}");
    assert!(zlib * 4 <= none * 3, "zlib {zlib} not 25% under none {none}");
    // zstd codes literals with Huffman too: these random 16-bit numbers shrink under it.
    assert!(zstd * 4 <= none * 3, "zstd {zstd} not 25% under none {none}");
}

#[test]
fn cancel_on_limit_keeps_the_source_guest_running() {
    let config = SourceConfig {
        max_bandwidth_bytes_per_s: Some(LINK_BYTES_PER_S),
        precopy: PrecopyConfig {
            downtime_limit: Duration::from_millis(1),
            max_rounds: 2,
            on_limit: migration::precopy::LimitAction::Cancel,
            ..Default::default()
        },
        ..SourceConfig::default()
    };
    let outcome = migrate_synthetic(32 << 20, WorkloadSpec::Seq { pages_per_s: 20_000 }, &config);
    let err = outcome.source.expect_err("cancelled");
    assert!(err.contains("did not converge"), "{err}");
    let destination = outcome.destination.expect_err("destination must not complete");
    assert!(destination.contains("the source aborted: migration cancelled"), "{destination}");
    assert!(outcome.source_writes_after > 0, "source guest must keep running");
}

#[test]
fn auto_converge_throttles_a_busy_guest() {
    let config = SourceConfig {
        max_bandwidth_bytes_per_s: Some(40 << 20),
        verify: true,
        precopy: PrecopyConfig {
            downtime_limit: Duration::from_millis(20),
            max_rounds: 6,
            auto_converge: true,
            ..Default::default()
        },
        ..SourceConfig::default()
    };
    let outcome = migrate_synthetic(32 << 20, WorkloadSpec::Seq { pages_per_s: 200_000 }, &config);
    let stats = outcome.source.expect("migration");
    assert_eq!(stats.verified, Some(true));
    assert!(
        stats.throttle_pct > 0,
        "expected a throttle; rounds: {:?}",
        stats.rounds.iter().map(|r| r.dirty_pages_after).collect::<Vec<_>>()
    );
}

/// A cancel in each phase up to the switchover: the source reports a cancel, its guest
/// runs on, and the destination fails without resuming anything.
#[test]
fn a_cancel_in_any_phase_keeps_the_source_guest_and_starts_none() {
    let slow = SourceConfig { max_bandwidth_bytes_per_s: Some(LINK_BYTES_PER_S), ..SourceConfig::default() };
    let iterating = iterating_until_cancelled(&slow);
    for at in [CancelAt::Setup, CancelAt::Stage("bulk"), CancelAt::Stage("iterative"), CancelAt::StopAndCopy] {
        let config = if at == CancelAt::Stage("iterative") { &iterating } else { &slow };
        let outcome = migrate_and_cancel(32 << 20, WorkloadSpec::Seq { pages_per_s: 20_000 }, config, at);
        let err = outcome.source.expect_err("a cancelled migration fails");
        assert!(err.starts_with("migration cancelled: test"), "{at:?}: {err}");
        assert!(outcome.source_writes_after > 0, "{at:?}: the source guest must keep running");
        let destination = outcome.destination.expect_err("the destination must not complete");
        assert_eq!(outcome.writes_after_resume, 0, "{at:?}: a destination guest ran");
        if at != CancelAt::Setup {
            assert!(destination.contains("cancelled"), "{at:?}: the destination was told why: {destination}");
        }
        eprintln!("{at:?}: source: {err}; destination: {destination}");
        let phase = match at {
            CancelAt::Setup => "setup".to_string(),
            CancelAt::Stage(stage) => stage.to_string(),
            CancelAt::StopAndCopy => "stop-and-copy".to_string(),
        };
        vmigrate_tests::reliability::record(
            "cancellation (engine)",
            &phase,
            vmigrate_tests::reliability::Ending::FailedCleanly,
        );
    }
}

/// Each pre-copy stage is reported as it begins, however short: a migration over in less
/// than the report interval still shows its bulk and iterative stages, in that order.
#[test]
fn each_stage_is_reported_as_it_begins() {
    let config = SourceConfig { max_bandwidth_bytes_per_s: None, ..config(Codec::Lz4, 1, false) };
    let outcome = migrate_synthetic(8 << 20, WorkloadSpec::Seq { pages_per_s: 20_000 }, &config);
    let stats = outcome.source.expect("migration");
    assert!(stats.rounds.len() >= 3, "rounds: {}", stats.rounds.len());
    let mut stages = outcome.stages_reported.clone();
    stages.dedup();
    assert_eq!(stages.first(), Some(&"bulk"), "reports: {:?}", outcome.stages_reported);
    assert_eq!(stages.get(1), Some(&"iterative"), "reports: {:?}", outcome.stages_reported);
}

/// A caller can act on why a migration failed: the error's variant says what happened,
/// on each side.
#[test]
fn failures_say_what_kind_they_are() {
    use engine::config::DestinationConfig;
    use engine::error::LimitExceeded;
    use engine::MigrationError;
    use guests::guest::GuestRam;
    use guests::synthetic::{SyntheticDestination, SyntheticGuest};
    use hugepages::HugePolicy;
    use migration::handshake::HandshakeError;
    use std::sync::Arc;
    use transport::pipe::{TcpAcceptor, TcpConnector, Timeouts};

    // Nobody connects: the destination timed out.
    let mut lonely = TcpAcceptor::bind("127.0.0.1:0", Timeouts::default()).expect("bind");
    let config = DestinationConfig { accept_timeout: Duration::from_millis(100), ..Default::default() };
    let mut vm = SyntheticDestination::new(config.max_memory_bytes, HugePolicy::Never);
    let waited = engine::destination::receive(&mut lonely, &mut vm, &config);
    assert!(matches!(waited, Err(MigrationError::TimedOut { .. })), "{waited:?}");

    // A guest over the destination's limit: refused by the peer at the source, over a
    // limit at the destination.
    let mut acceptor = TcpAcceptor::bind("127.0.0.1:0", Timeouts::default()).expect("bind");
    let connector =
        TcpConnector::new(acceptor.local_socket_addr().expect("address"), Timeouts::default()).expect("connector");
    let destination = std::thread::spawn(move || {
        let config = DestinationConfig { max_memory_bytes: MEM / 2, ..Default::default() };
        let mut vm = SyntheticDestination::new(config.max_memory_bytes, HugePolicy::Never);
        engine::destination::receive(&mut acceptor, &mut vm, &config).map(|_| ())
    });
    let ram = Arc::new(GuestRam::allocate(&GuestRam::pc_layout(MEM), HugePolicy::Never).expect("guest memory"));
    let mut guest = SyntheticGuest::boot(ram, WorkloadSpec::Idle, 7).expect("boot guest");
    let sent = engine::source::migrate(&guest, &connector, &SourceConfig::default(), &mut |_| {});
    guest.shutdown();
    assert!(matches!(sent, Err(MigrationError::Handshake(HandshakeError::Refused { .. }))), "{sent:?}");
    let received = destination.join().expect("destination thread");
    assert!(
        matches!(received, Err(MigrationError::Limit(LimitExceeded::GuestTooLarge { bytes: MEM, limit })) if limit == MEM / 2),
        "{received:?}"
    );
}
