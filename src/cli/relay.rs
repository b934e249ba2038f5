//! `qemu-send` and `qemu-recv`: the relay pair that carries a QEMU migration over our
//! stacks, and its report.

use super::args::{CarryOptions, QemuRecvArgs, QemuSendArgs, RelayOptions, StackOptions};
use super::cores::CoreShare;
use super::exit::Failure;
use super::relay_control::{ending, qemu_tuner, RelayControlSocket};
use super::stacks::{acceptor_for, connector_for, io_timeouts, seconds};
use ::relay::control::RelayControls;
use ::relay::destination::{relay_destination, DestinationRelayConfig};
use ::relay::source::{SourceRelay, SourceRelayConfig};
use ::relay::RelayReport;
use anyhow::{Context, Result};
use migration::relay::{Encoding, MAX_CACHE_PAGES};
use migration::PAGE_SIZE_BYTES;
use std::process::ExitCode;
use std::sync::Arc;
use transport::pipe::Timeouts;

pub fn qemu_send(args: QemuSendArgs) -> Result<ExitCode> {
    let timeouts = timeouts(&args.relay)?;
    let (connector, _stack) = connector_for(&args.stack, !args.relay.no_pin, &args.to, timeouts)?;
    let config = SourceRelayConfig {
        encoding: encoding(&args.carry)?,
        compress_threads: compress_threads(&args.carry, &args.stack),
        pin_workers: !args.relay.no_pin,
        first_connection_timeout: seconds("--wait", args.relay.wait)?,
    };
    let relay = SourceRelay::bind(&args.listen, config)?;
    let controls = Arc::new(RelayControls::source(args.qmp.clone().map(qemu_tuner)));
    let control = control_socket(args.control.as_deref(), &controls)?;
    serve_metrics(args.metrics, &controls, _stack.as_ref())?;
    // Announcements, not log lines: callers wait for them, whatever the verbosity.
    eprintln!("vmigrate: waiting for QEMU on unix:{}", relay.path().display());
    let result = relay.run(&*connector, controls);
    if let Some(control) = &control {
        control.ended(ending(&result));
    }
    let report = result.context("relaying the QEMU migration")?;
    print_report("sent", &report, args.relay.json)?;
    Ok(ExitCode::SUCCESS)
}

pub fn qemu_recv(args: QemuRecvArgs) -> Result<ExitCode> {
    let timeouts = timeouts(&args.relay)?;
    let (mut acceptor, _stack) = acceptor_for(&args.stack, !args.relay.no_pin, args.listen, timeouts)?;
    let config = DestinationRelayConfig {
        qemu: args.to.clone(),
        first_connection_timeout: seconds("--wait", args.relay.wait)?,
        qemu_connect_timeout: seconds("--qemu-wait", args.qemu_wait)?,
    };
    let controls = Arc::new(RelayControls::destination());
    let control = control_socket(args.control.as_deref(), &controls)?;
    serve_metrics(args.metrics, &controls, _stack.as_ref())?;
    // Always shown: with --listen ADDR:0 this is how a caller learns the port.
    eprintln!("vmigrate: waiting for the source relay on {}", acceptor.local_addr());
    let result = relay_destination(&mut *acceptor, &config, controls);
    if let Some(control) = &control {
        control.ended(ending(&result));
    }
    let report = result.context("relaying the QEMU migration")?;
    print_report("received", &report, args.relay.json)?;
    Ok(ExitCode::SUCCESS)
}

/// `--metrics`: the relay's counters and, on our own stack, its cores'.
fn serve_metrics(
    options: super::args::MetricsOptions,
    controls: &Arc<RelayControls>,
    stack: Option<&dataplane::stack::CoreStack>,
) -> Result<()> {
    if let Some(address) = options.metrics {
        let page = super::metrics::MetricsPage::default().with_relay(controls);
        page.with_stack(stack.map(dataplane::stack::CoreStack::meter)).serve(address)?;
    }
    Ok(())
}

/// The control socket `options` ask for, if any.
fn control_socket(path: Option<&std::path::Path>, controls: &Arc<RelayControls>) -> Result<Option<RelayControlSocket>> {
    path.map(|path| RelayControlSocket::start(path, controls)).transpose()
}

/// The source relay's pool: as asked, or one worker per CPU less the polling cores of
/// `stack` (at most 8).
pub(super) fn compress_threads(options: &CarryOptions, stack: &StackOptions) -> usize {
    match options.compress_threads {
        Some(asked) => asked,
        None => CoreShare::one_end(stack).workers(None),
    }
}

/// The encoding the options ask for.
pub(super) fn encoding(options: &CarryOptions) -> Result<Encoding> {
    let cache = super::args::xbzrle_cache(options.xbzrle, options.xbzrle_cache);
    // A cache asked for holds at least one page.
    let pages = cache.map_or(0, |bytes| (bytes / PAGE_SIZE_BYTES as u64).max(1));
    if pages > u64::from(MAX_CACHE_PAGES) {
        let most = (MAX_CACHE_PAGES as u64 * 4096) >> 20;
        return Err(Failure::usage(format!("--xbzrle-cache {}: at most {most} MiB", cache.unwrap_or_default())));
    }
    if options.codec == migration::codec::Codec::Deflate {
        return Err(Failure::usage(
            "--codec deflate compresses on a DPDK compression device, which the relays do not drive: use \
             --codec zlib (the same raw deflate, on the CPU), zstd or adaptive",
        ));
    }
    Ok(Encoding { codec: options.codec, xbzrle_cache_pages: pages as u32 })
}

pub(super) fn timeouts(options: &RelayOptions) -> Result<Timeouts> {
    io_timeouts(options.io_timeout)
}

/// One line per carried stream, then the totals; or the whole report as JSON.
pub(super) fn print_report(direction: &str, report: &RelayReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&report_json(report)?)?);
        return Ok(());
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
    let (sent, received) = report.totals();
    let (bytes, wire) = (sent.bytes.max(received.bytes), sent.wire_bytes.max(received.wire_bytes));
    let rate = bytes as f64 * 8.0 / report.seconds.max(1e-9) / 1e9;
    println!(
        "{direction}: {} stream(s), {bytes} QEMU bytes as {wire} on the wire ({:.2}x) in {:.2} s, {rate:.2} Gbit/s of QEMU's stream",
        report.channels.len(),
        ratio(bytes, wire),
        report.seconds
    );
    Ok(())
}

/// The report as JSON, with the totals of both directions.
pub(super) fn report_json(report: &RelayReport) -> Result<serde_json::Value> {
    let (sent, received) = report.totals();
    let mut value = serde_json::to_value(report)?;
    value["sent"] = serde_json::to_value(sent)?;
    value["received"] = serde_json::to_value(received)?;
    Ok(value)
}

fn ratio(bytes: u64, wire: u64) -> f64 {
    if wire == 0 {
        1.0
    } else {
        bytes as f64 / wire as f64
    }
}
