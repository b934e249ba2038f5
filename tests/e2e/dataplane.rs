//! Migrations over smoltcp on the in-process wire (two dataplane cores, no kernel
//! networking): every workload, one and four connections, MTU 1500 and 9000, verified.

use migration::codec::Codec;
use migration::precopy::PrecopyConfig;
use std::time::Duration;
use transport::config::SourceConfig;
use transport::synthetic::WorkloadSpec;
use vmigrate_tests::session::{migrate_synthetic_on, Link};

const MEM: u64 = 32 << 20;

fn check(link: &Link, workload: WorkloadSpec, codec: Codec, connections: u16, xbzrle: bool) {
    let label = format!("{link:?} {workload} {codec} x{connections} xbzrle={xbzrle}");
    let link = link.clone();
    let config = SourceConfig {
        codec,
        connections,
        xbzrle_cache_bytes: xbzrle.then_some(MEM),
        verify: true,
        max_bandwidth_bytes_per_s: Some(100 << 20),
        precopy: PrecopyConfig { downtime_limit: Duration::ZERO, max_rounds: 3, ..Default::default() },
        ..SourceConfig::default()
    };
    let outcome = migrate_synthetic_on(link, MEM, workload, &config);
    let stats = outcome.source.unwrap_or_else(|e| panic!("{label}: {e}"));
    let report = outcome.destination.unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(stats.verified, Some(true), "{label}");
    assert_eq!(report.verified, Some(true), "{label}");
    outcome.destination_check.unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(outcome.source_writes_after, 0, "{label}: source guest ran after handing over");
    if !matches!(workload, WorkloadSpec::Idle) {
        assert!(outcome.writes_after_resume > 0, "{label}: destination guest did not run");
    }
    assert_eq!(report.connections, connections);
}

#[test]
fn every_workload_over_the_loopback_wire() {
    let link = Link::Loopback { mtu: 1500, cores: 1 };
    for workload in [
        WorkloadSpec::Seq { pages_per_s: 50_000 },
        WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 5000, bits: 16 },
        WorkloadSpec::Idle,
    ] {
        for connections in [1, 4] {
            check(&link, workload, Codec::Lz4, connections, true);
        }
    }
}

#[test]
fn jumbo_frames_and_every_codec() {
    let link = Link::Loopback { mtu: 9000, cores: 1 };
    let workload = WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 5000, bits: 16 };
    for codec in [Codec::None, Codec::Lz4, Codec::Zlib { level: 1 }] {
        check(&link, workload, codec, 2, false);
    }
}

#[test]
fn lossy_and_corrupting_wire_still_migrates_intact() {
    // Seeded: the same frames are dropped and corrupted on every run. smoltcp recovers
    // from loss by retransmission timeouts (no SACK), so the guest is kept small; the
    // point is that every byte arrives intact: corrupted frames fail the TCP checksum and
    // are retransmitted, and our frame CRC32C stands behind it.
    let wrappers = dataplane::core::DeviceWrappers { drop_pct: 1, corrupt_pct: 1, seed: 7, ..Default::default() };
    let config = SourceConfig {
        codec: Codec::Lz4,
        connections: 2,
        verify: true,
        precopy: PrecopyConfig { max_rounds: 2, ..Default::default() },
        ..SourceConfig::default()
    };
    let outcome = vmigrate_tests::session::migrate_synthetic_on(
        Link::LossyLoopback { mtu: 1500, wrappers },
        4 << 20,
        WorkloadSpec::Seq { pages_per_s: 2000 },
        &config,
    );
    let stats = outcome.source.expect("migration over a lossy wire");
    assert_eq!(stats.verified, Some(true));
    outcome.destination_check.expect("seq pages intact");
}

#[test]
fn connections_spread_over_two_dataplane_cores_per_side() {
    let link = Link::Loopback { mtu: 1500, cores: 2 };
    let workload = WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 5000, bits: 16 };
    for connections in [2, 4] {
        check(&link, workload, Codec::Lz4, connections, true);
    }
}
