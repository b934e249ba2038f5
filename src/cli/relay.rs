//! `qemu-send` and `qemu-recv`: the relay pair that carries a QEMU migration over our
//! stacks, and its report.

use super::args::{QemuRecvArgs, QemuSendArgs};
use super::commands::{acceptor_for, connector_for};
use anyhow::{Context, Result};
use std::process::ExitCode;
use std::time::Duration;
use transport::qemu::destination::{relay_destination, DestinationRelayConfig};
use transport::qemu::source::{SourceRelay, SourceRelayConfig};
use transport::qemu::RelayReport;

pub fn qemu_send(args: QemuSendArgs) -> Result<ExitCode> {
    let (connector, _stack) = connector_for(&args.stack, !args.no_pin, &args.to)?;
    let config = SourceRelayConfig { codec: args.codec, first_connection_timeout: seconds(args.wait)? };
    let relay = SourceRelay::bind(&args.listen, config)?;
    eprintln!("vmigrate: waiting for QEMU on unix:{}", relay.path().display());
    let report = relay.run(&*connector).context("relaying the QEMU migration")?;
    print_report("sent", &report, args.json)
}

pub fn qemu_recv(args: QemuRecvArgs) -> Result<ExitCode> {
    let (mut acceptor, _stack) = acceptor_for(&args.stack, !args.no_pin, args.listen)?;
    let config = DestinationRelayConfig {
        qemu: args.to.clone(),
        first_connection_timeout: seconds(args.wait)?,
        qemu_connect_timeout: Duration::from_secs(10),
    };
    eprintln!("vmigrate: waiting for the source relay on {}", acceptor.local_addr());
    let report = relay_destination(&mut *acceptor, &config).context("relaying the QEMU migration")?;
    print_report("received", &report, args.json)
}

fn seconds(value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| anyhow::anyhow!("--wait {value}: not a number of seconds"))
}

/// One line per carried stream, then the totals; or the whole report as JSON.
fn print_report(direction: &str, report: &RelayReport, json: bool) -> Result<ExitCode> {
    let (sent, received) = report.totals();
    if json {
        let mut value = serde_json::to_value(report)?;
        value["sent"] = serde_json::to_value(sent)?;
        value["received"] = serde_json::to_value(received)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>7} {:>14} {:>14} {:>7} {:>14} {:>9}",
        "stream", "QEMU bytes", "on the wire", "ratio", "returned", "seconds"
    );
    for channel in &report.channels {
        let name = if channel.channel == 0 { "main".to_string() } else { format!("{}", channel.channel) };
        println!(
            "{:>7} {:>14} {:>14} {:>7.2} {:>14} {:>9.2}",
            name,
            channel.sent.bytes,
            channel.sent.wire_bytes,
            ratio(channel.sent.bytes, channel.sent.wire_bytes),
            channel.received.bytes,
            channel.seconds
        );
    }
    let rate = sent.bytes.max(received.bytes) as f64 * 8.0 / report.seconds.max(1e-9) / 1e9;
    println!(
        "{direction}: {} stream(s), {} QEMU bytes as {} on the wire ({:.2}x) in {:.2} s, {rate:.2} Gbit/s of QEMU's stream",
        report.channels.len(),
        sent.bytes.max(received.bytes),
        sent.wire_bytes.max(received.wire_bytes),
        ratio(sent.bytes.max(received.bytes), sent.wire_bytes.max(received.wire_bytes)),
        report.seconds
    );
    Ok(ExitCode::SUCCESS)
}

fn ratio(bytes: u64, wire: u64) -> f64 {
    if wire == 0 {
        1.0
    } else {
        bytes as f64 / wire as f64
    }
}
