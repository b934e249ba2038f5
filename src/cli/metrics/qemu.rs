//! QEMU's own figures (`qemu-migrate --metrics`), from its last `query-migrate` answer, under
//! the same names as `send`'s where they mean the same thing.

use super::family;
use serde_json::Value;

pub(super) fn render(info: &Value) -> String {
    let mut out = String::new();
    let ram = &info["ram"];
    let number = |value: &Value| value.as_f64().unwrap_or(0.0);
    let status = format!("stage=\"{}\"", super::label(info["status"].as_str().unwrap_or("none")));
    family(
        &mut out,
        "migration_round",
        "gauge",
        "The pre-copy round under way (QEMU's dirty-sync-count).",
        &[("", number(&ram["dirty-sync-count"]))],
    );
    family(&mut out, "migration_stage", "gauge", "QEMU's migration status (1 on its label).", &[(&status, 1.0)]);
    family(
        &mut out,
        "migration_remaining_pages",
        "gauge",
        "Pages left to send in this round.",
        &[("", number(&ram["remaining"]) / number(&ram["page-size"]).max(1.0))],
    );
    family(
        &mut out,
        "migration_transferred_bytes_total",
        "counter",
        "Bytes QEMU put on its streams.",
        &[("", number(&ram["transferred"]))],
    );
    family(
        &mut out,
        "migration_throughput_bits_per_second",
        "gauge",
        "QEMU's rate.",
        &[("", number(&ram["mbps"]) * 1e6)],
    );
    family(
        &mut out,
        "migration_elapsed_seconds",
        "gauge",
        "Time since the migration started.",
        &[("", number(&info["total-time"]) / 1e3)],
    );
    family(
        &mut out,
        "migration_pages_total",
        "counter",
        "Pages sent, by how they went.",
        &[
            ("kind=\"zero\"", number(&ram["duplicate"])),
            ("kind=\"raw\"", number(&ram["normal"])),
            ("kind=\"xbzrle\"", number(&info["xbzrle-cache"]["pages"])),
        ],
    );
    family(
        &mut out,
        "migration_xbzrle_cache_misses_total",
        "counter",
        "Pages sent again not found in the cache.",
        &[("", number(&info["xbzrle-cache"]["cache-miss"]))],
    );
    family(
        &mut out,
        "migration_dirty_pages_per_second",
        "gauge",
        "Pages the guest dirtied per second (last round).",
        &[("", number(&ram["dirty-pages-rate"]))],
    );
    family(
        &mut out,
        "migration_expected_downtime_seconds",
        "gauge",
        "Downtime a switchover now would take.",
        &[("", number(&info["expected-downtime"]) / 1e3)],
    );
    out
}
