//! The destination's figures (`recv --metrics`), from its last progress report.

use super::family;
use engine::destination::DestinationProgress;

pub(super) fn render(p: &DestinationProgress) -> String {
    let mut out = String::new();
    let seconds = p.elapsed.as_secs_f64();
    family(
        &mut out,
        "incoming_rounds_applied",
        "gauge",
        "Rounds whose every page is applied.",
        &[("", p.rounds.into())],
    );
    family(
        &mut out,
        "incoming_received_bytes_total",
        "counter",
        "Frame bytes received on every connection.",
        &[("", p.received_bytes as f64)],
    );
    family(
        &mut out,
        "incoming_ram_bytes",
        "gauge",
        "The guest's memory, as the source announced it.",
        &[("", p.ram_total as f64)],
    );
    let rate = if seconds > 0.0 { p.received_bytes as f64 * 8.0 / seconds } else { 0.0 };
    family(&mut out, "incoming_throughput_bits_per_second", "gauge", "Mean rate since the start.", &[("", rate)]);
    family(&mut out, "incoming_elapsed_seconds", "gauge", "Time since the source's Hello.", &[("", seconds)]);
    out
}
