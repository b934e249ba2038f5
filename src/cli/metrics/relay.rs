//! A relay's figures (`qemu-send` / `qemu-recv --metrics`), read from its counters at each
//! scrape. QEMU's own figures (rounds, dirty rate, expected downtime) are QEMU's: its
//! `query-migrate`, or `qemu-migrate`.

use super::family;
use relay::control::RelayMeter;
use std::sync::atomic::Ordering;

pub(super) fn render(out: &mut String, meter: &RelayMeter) {
    let qemu = meter.qemu_bytes.load(Ordering::Relaxed);
    let wire = meter.wire_bytes.load(Ordering::Relaxed);
    let seconds = meter.elapsed().as_secs_f64();
    family(
        out,
        "relay_streams",
        "gauge",
        "QEMU's streams opened.",
        &[("", meter.streams.load(Ordering::Acquire).into())],
    );
    family(
        out,
        "relay_qemu_bytes_total",
        "counter",
        "Bytes of QEMU's streams read from this host's QEMU.",
        &[("", qemu as f64)],
    );
    family(
        out,
        "relay_delivered_bytes_total",
        "counter",
        "Bytes of the peer's streams delivered to this host's QEMU.",
        &[("", meter.delivered_bytes.load(Ordering::Relaxed) as f64)],
    );
    family(
        out,
        "relay_wire_bytes_total",
        "counter",
        "Frame bytes this relay put on its connections.",
        &[("", wire as f64)],
    );
    let ratio = if wire == 0 { 1.0 } else { qemu as f64 / wire as f64 };
    family(out, "relay_compression_ratio", "gauge", "QEMU's bytes per wire byte sent.", &[("", ratio)]);
    let rate = if seconds > 0.0 { wire as f64 * 8.0 / seconds } else { 0.0 };
    family(out, "relay_throughput_bits_per_second", "gauge", "Mean wire rate since the first stream.", &[("", rate)]);
    family(out, "relay_elapsed_seconds", "gauge", "Time since the first stream.", &[("", seconds)]);
}
