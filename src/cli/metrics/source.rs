//! The source's figures (`send --metrics`), from its last progress report.

use super::family;
use engine::source::Progress;
use std::time::Duration;

/// The progress in Prometheus's text format (version 0.0.4).
pub(super) fn render(p: &Progress) -> String {
    let e = &p.encoded;
    let mut out = String::new();
    let stage = format!("stage=\"{}\"", p.stage);
    family(&mut out, "migration_round", "gauge", "The pre-copy round under way.", &[("", p.round.into())]);
    family(&mut out, "migration_stage", "gauge", "The stage under way (1 on its label).", &[(&stage, 1.0)]);
    family(
        &mut out,
        "migration_remaining_pages",
        "gauge",
        "Pages left to send in this round.",
        &[("", p.remaining_pages as f64)],
    );
    family(
        &mut out,
        "migration_transferred_bytes_total",
        "counter",
        "Bytes put on the connections.",
        &[("", p.transferred_bytes as f64)],
    );
    family(
        &mut out,
        "migration_throughput_bits_per_second",
        "gauge",
        "Mean rate since the start.",
        &[("", p.mbps * 1e6)],
    );
    family(
        &mut out,
        "migration_elapsed_seconds",
        "gauge",
        "Time since the migration started.",
        &[("", p.elapsed.as_secs_f64())],
    );
    family(
        &mut out,
        "migration_pages_total",
        "counter",
        "Pages sent, by how they went.",
        &[
            ("kind=\"zero\"", e.zero_pages as f64),
            ("kind=\"raw\"", e.raw_pages as f64),
            ("kind=\"compressed\"", e.compressed_pages as f64),
            ("kind=\"xbzrle\"", e.xbzrle_pages as f64),
            ("kind=\"xbzrle-unchanged\"", e.xbzrle_unchanged as f64),
            ("kind=\"copy\"", e.copied_pages as f64),
        ],
    );
    compression(&mut out, e);
    family(
        &mut out,
        "migration_xbzrle_cache_misses_total",
        "counter",
        "Pages sent again not found in the cache.",
        &[("", e.xbzrle_cache_miss as f64)],
    );
    family(
        &mut out,
        "migration_dirty_pages_per_second",
        "gauge",
        "Pages the guest dirtied per second (last round).",
        &[("", p.dirty_pages_rate as f64)],
    );
    family(
        &mut out,
        "migration_expected_downtime_seconds",
        "gauge",
        "Downtime a switchover now would take.",
        &[("", p.expected_downtime.min(Duration::from_secs(86_400)).as_secs_f64())],
    );
    family(
        &mut out,
        "migration_downtime_limit_seconds",
        "gauge",
        "The downtime limit.",
        &[("", p.downtime_limit.as_secs_f64())],
    );
    out
}

/// The compressed pages' bytes and ratio, and what the compression device did.
fn compression(out: &mut String, e: &migration::stats::EncodeCounters) {
    family(
        out,
        "migration_payload_bytes_total",
        "counter",
        "Bytes of page payload, by how they went.",
        &[("kind=\"compressed\"", e.compressed_bytes as f64), ("kind=\"xbzrle\"", e.xbzrle_bytes as f64)],
    );
    let ratio = if e.compressed_bytes == 0 {
        1.0
    } else {
        (e.compressed_pages * migration::PAGE_SIZE_BYTES as u64) as f64 / e.compressed_bytes as f64
    };
    family(
        out,
        "migration_compression_ratio",
        "gauge",
        "Guest bytes per wire byte of compressed pages.",
        &[("", ratio)],
    );
    family(
        out,
        "migration_compress_device_pages_total",
        "counter",
        "Pages handed to the compression device (deflate), by what became of them.",
        &[("outcome=\"device\"", e.device_pages as f64), ("outcome=\"cpu-fallback\"", e.device_fallback_pages as f64)],
    );
}
