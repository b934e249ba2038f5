//! Human output: a live progress line on a terminal, and at the end a table like the
//! the 2015 KVM live-migration talk's (total time, downtime, transferred RAM, total RAM)
//! plus one row per round.

use engine::destination::DestinationReport;
use engine::source::Progress;
use indicatif::ProgressBar;
use migration::stats::MigrationStats;
use std::io::IsTerminal;

pub struct ProgressView {
    bar: Option<ProgressBar>,
}

impl ProgressView {
    /// Shows progress only on a terminal and never in JSON mode.
    pub fn new(json: bool) -> Self {
        let bar = (!json && std::io::stderr().is_terminal()).then(super::logging::spinner);
        ProgressView { bar }
    }

    pub fn update(&mut self, progress: &Progress) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "round {} ({}): {} pages left, {} sent, {:.0} Mbit/s, {:.1} s",
                progress.round,
                progress.stage,
                progress.remaining_pages,
                bytes(progress.transferred_bytes),
                progress.mbps,
                progress.elapsed.as_secs_f64()
            ));
            bar.tick();
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn print_tables(
    stats: &MigrationStats,
    destination: Option<&DestinationReport>,
    guest: Option<&serde_json::Value>,
) {
    println!(
        "{:<28} {:>12} {:>10} {:>16} {:>12}",
        "migration", "total time", "downtime", "transferred RAM", "total RAM"
    );
    let label = format!("vmigrate ({}, {} conn)", stats.codec, stats.connections);
    println!(
        "{:<28} {:>9} ms {:>7} ms {:>16} {:>12}",
        label,
        stats.total_time,
        stats.downtime,
        bytes(stats.ram.transferred),
        bytes(stats.ram.total)
    );
    println!();
    println!(
        "{:>5} {:<13} {:>9} {:>9} {:>12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10}",
        "round", "stage", "time ms", "pages", "sent", "zero", "xbzrle", "compr", "raw", "dirty", "Mbit/s", "exp. down"
    );
    for round in &stats.rounds {
        println!(
            "{:>5} {:<13} {:>9.1} {:>9} {:>12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9.0} {:>7.1} ms",
            round.round,
            round.stage,
            round.duration_ms,
            round.pages,
            bytes(round.transferred),
            round.zero_pages,
            round.xbzrle_pages,
            round.compressed_pages,
            round.raw_pages,
            round.dirty_pages_after,
            round.mbps,
            round.expected_downtime_ms
        );
    }
    println!();
    let ram = &stats.ram;
    println!(
        "pages: {} zero (duplicate), {} copies of others, {} skipped unused, {} normal; {} compressed (ratio {:.2}); {} xbzrle (ratio {:.1}, {} misses, {} overflows)",
        ram.duplicate,
        ram.copied,
        ram.skipped,
        ram.normal,
        stats.compression.pages,
        stats.compression.compression_rate,
        stats.xbzrle_cache.pages,
        stats.xbzrle_cache.encoding_rate,
        stats.xbzrle_cache.cache_miss,
        stats.xbzrle_cache.overflow
    );
    if let Some(device) = &stats.compress_device {
        println!(
            "compression device {device}: {} pages; {} pages it failed compressed on the CPU instead",
            stats.encode.device_pages, stats.encode.device_fallback_pages
        );
    }
    println!("guest memory: {}; setup {} ms; {:.0} Mbit/s average", stats.guest_backing, stats.setup_time, ram.mbps);
    if let Some(verified) = stats.verified {
        println!(
            "verify: {} (destination hash took {} ms, outside the downtime)",
            if verified { "memory matches" } else { "MISMATCH" },
            stats.verify_time.unwrap_or(0)
        );
    }
    if let Some(destination) = destination {
        print_destination(destination, guest.unwrap_or(&serde_json::Value::Null));
    }
}

pub fn print_destination(report: &DestinationReport, guest: &serde_json::Value) {
    println!(
        "destination: {} received over {} connection(s) in {} rounds; {} zero, {} raw, {} compressed, {} xbzrle, {} copied pages applied",
        bytes(report.received_bytes),
        report.connections,
        report.rounds,
        report.zero_pages,
        report.raw_pages,
        report.compressed_pages,
        report.xbzrle_pages,
        report.copied_pages
    );
    if report.device_inflated_pages + report.device_fallback_pages > 0 {
        println!(
            "destination compression device: {} pages inflated; {} pages it failed inflated on the CPU instead",
            report.device_inflated_pages, report.device_fallback_pages
        );
    }
    if let Some(verified) = report.verified {
        println!("destination verify: {}", if verified { "memory matches" } else { "MISMATCH" });
    }
    if !guest.is_null() {
        println!(
            "destination guest: {} ran {} s after resume, {} stores, check {}",
            guest["workload"].as_str().unwrap_or("?"),
            guest["ran-seconds"],
            guest["writes-after-resume"],
            guest["check"].as_str().unwrap_or("?")
        );
        let times = &guest["switchover"];
        if !times.is_null() {
            let shown = |key: &str| times[key].as_u64().map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            println!(
                "KVM switchover: vCPU paused in {} us, state ({} bytes) saved in {} us; destination VM built in {} us",
                shown("pause-us"),
                shown("state-bytes"),
                shown("state-save-us"),
                shown("vm-build-us")
            );
        }
    }
}

/// One side's polling cores over a run, for the JSON report: how many, and the seconds
/// they spent in iterations that moved something (busy) and in all (running). Busy core
/// seconds per GiB is what a core costs a byte, whatever the machine has to spare.
pub fn dataplane(meter: &dataplane::stats::StackMeter) -> serde_json::Value {
    let cores = meter.snapshot();
    let busy: f64 = cores.iter().map(|core| core.busy.as_secs_f64()).sum();
    let running: f64 = cores.iter().map(|core| core.running.as_secs_f64()).sum();
    serde_json::json!({"cores": cores.len(), "busy-seconds": busy, "running-seconds": running})
}
