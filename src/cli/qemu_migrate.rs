//! `qemu-migrate`: a QEMU migration through vmigrate from start to end, the way `virsh
//! migrate` drives one: both QEMUs set up alike over QMP, the relays started, the
//! migration started on the source, its progress shown from `query-migrate`, and QEMU's
//! final figures printed beside the relays'.

use super::args::QemuMigrateArgs;
use super::control::{ControlSocket, Events, Status};
use super::exit::{Exit, Failure};
use super::metrics::MetricsPage;
use super::relay::{encoding, print_report, report_json, timeouts};
use super::relay_control::FORCE_DOWNTIME_MS;
use super::stacks::{connector_for, seconds};
use ::relay::control::RelayControls;
use ::relay::destination::{relay_destination, DestinationRelayConfig};
use ::relay::qmp::Qmp;
use ::relay::source::{SourceRelay, SourceRelayConfig};
use ::relay::{RelayFailure, RelayReport};
use anyhow::{bail, Context, Result};
use engine::cancel::Cancel;
use engine::tuning::Tuning;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use transport::pipe::{Connector, TcpAcceptor, TcpConnector, Timeouts};

type RelayThread = JoinHandle<Result<RelayReport, RelayFailure>>;

pub fn qemu_migrate(args: QemuMigrateArgs) -> Result<ExitCode> {
    let qmp_timeout = Duration::from_secs(10);
    let mut source = Qmp::connect(&args.src_qmp, qmp_timeout).context("the source QEMU's QMP socket")?;
    let mut destination = Qmp::connect(&args.dst_qmp, qmp_timeout).context("the destination QEMU's QMP socket")?;
    let status = destination.execute("query-status", json!({}))?;
    if status["status"] != "inmigrate" {
        bail!(
            "the destination QEMU is {}, not waiting for a migration: start it with -incoming defer",
            status["status"]
        );
    }
    for (qmp, side) in [(&mut source, "source"), (&mut destination, "destination")] {
        configure(qmp, &args).with_context(|| format!("setting up the {side} QEMU"))?;
    }

    // Removed with everything in it however the command ends.
    let work_dir = private_work_dir()?;
    let work = work_dir.path();
    let timeouts = timeouts(&args.relay)?;

    let DestinationSide { connector, stack: _stack, relay: destination_relay, incoming } =
        destination_side(&args, work, timeouts)?;
    let incoming_uri = format!("unix:{}", incoming.display());
    destination.execute("migrate-incoming", json!({ "uri": incoming_uri })).context("migrate-incoming")?;

    let relay_socket = work.join("source.sock");
    let config = SourceRelayConfig {
        encoding: encoding(&args.carry)?,
        compress_threads: super::relay::compress_threads(&args.carry, &args.stack),
        pin_workers: !args.relay.no_pin,
        first_connection_timeout: seconds("--wait", args.relay.wait)?,
    };
    let relay = SourceRelay::bind(&relay_socket, config)?;
    let controls = Arc::new(RelayControls::default());
    let watch = Watch::default();
    if let Some(address) = args.metrics.metrics {
        let page = watch.metrics.clone().with_relay(&controls);
        page.with_stack(_stack.as_ref().map(dataplane::stack::CoreStack::meter)).serve(address)?;
    }
    let source_relay =
        std::thread::Builder::new().name("relay-source".into()).spawn(move || relay.run(&*connector, controls))?;
    source.execute("migrate", json!({ "uri": format!("unix:{}", relay_socket.display()) })).context("migrate")?;

    // SIGINT or SIGTERM cancels QEMU's migration (the source guest runs on); a second one
    // quits at once. The control socket's commands go to the source QEMU.
    let _control = watch.start(args.control.as_deref())?;
    let info = follow(&mut source, seconds("--timeout", args.timeout)?, &watch, args.relay.json)?;
    let source_report = source_relay.join().unwrap_or_else(|_| Err(RelayFailure::Local("the relay panicked".into())));
    let destination_report = destination_relay
        .map(|thread| thread.join().unwrap_or_else(|_| Err(RelayFailure::Local("the relay panicked".into()))));

    let status = info["status"].as_str().unwrap_or("?").to_string();
    if args.relay.json {
        let relay = |report: &Result<RelayReport, RelayFailure>| match report {
            Ok(report) => report_json(report).unwrap_or(Value::Null),
            Err(err) => json!({ "error": err.to_string() }),
        };
        let mut value = json!({ "qemu": info, "relay": { "source": relay(&source_report) } });
        if let Some(report) = &destination_report {
            value["relay"]["destination"] = relay(report);
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_qemu(&info);
        if let Ok(report) = &source_report {
            print_report("relay", report, false)?;
        }
    }
    if status != "completed" {
        let why = info["error-desc"].as_str().unwrap_or("no reason given");
        // The source relay's failure, if any, says what kind of ending it was; else QEMU's
        // status does.
        return Err(match source_report {
            Err(err) => anyhow::Error::new(err).context(format!("the migration {status}: {why}; source relay")),
            Ok(_) if status == "cancelled" => Failure::err(Exit::Cancelled, format!("the migration {status}: {why}")),
            Ok(_) => anyhow::anyhow!("the migration {status}: {why}"),
        });
    }
    source_report.context("the source relay")?;
    if let Some(report) = destination_report {
        report.context("the destination relay")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the source relay sends: a remote destination relay the user started, or ours, in
/// this process.
struct DestinationSide {
    connector: Box<dyn Connector>,
    /// Our stack's cores, when the remote relay is reached through them.
    stack: Option<dataplane::stack::CoreStack>,
    /// Our own destination relay.
    relay: Option<RelayThread>,
    /// The destination QEMU's incoming socket.
    incoming: PathBuf,
}

fn destination_side(args: &QemuMigrateArgs, work: &std::path::Path, timeouts: Timeouts) -> Result<DestinationSide> {
    let (connector, stack, relay, incoming): (Box<dyn Connector>, _, Option<RelayThread>, PathBuf) = match &args.to {
        Some(to) => {
            let incoming = args.dst_incoming.clone().context("--to needs --dst-incoming")?;
            let (connector, stack) = connector_for(&args.stack, !args.relay.no_pin, to, timeouts)?;
            (connector, stack, None, incoming)
        }
        None => {
            let incoming = work.join("incoming.sock");
            let mut acceptor = TcpAcceptor::bind("127.0.0.1:0", timeouts)?;
            let connector = TcpConnector::new(acceptor.local_socket_addr()?, timeouts)?;
            let config = DestinationRelayConfig {
                qemu: incoming.clone(),
                first_connection_timeout: seconds("--wait", args.relay.wait)?,
                qemu_connect_timeout: Duration::from_secs(10),
            };
            let thread = std::thread::Builder::new()
                .name("relay-destination".into())
                .spawn(move || relay_destination(&mut acceptor, &config, Default::default()))?;
            (Box::new(connector), None, Some(thread), incoming)
        }
    };
    Ok(DestinationSide { connector, stack, relay, incoming })
}

/// The same capabilities and parameters on either QEMU.
fn configure(qmp: &mut Qmp, args: &QemuMigrateArgs) -> Result<()> {
    let capability = |name: &str, on: bool| json!({ "capability": name, "state": on });
    let capabilities = vec![capability("multifd", args.multifd.is_some()), capability("xbzrle", args.qemu_xbzrle)];
    qmp.execute("migrate-set-capabilities", json!({ "capabilities": capabilities }))?;
    let mut parameters = json!({
        "downtime-limit": args.downtime_limit,
        "max-bandwidth": args.max_bandwidth,
    });
    if let Some(channels) = args.multifd {
        parameters["multifd-channels"] = channels.into();
        // vmigrate compresses the carried streams; QEMU's own multifd compression stays off.
        parameters["multifd-compression"] = "none".into();
    }
    qmp.execute("migrate-set-parameters", parameters)?;
    Ok(())
}

/// What an operator reaches the running migration by: signals, the control socket and
/// the metrics endpoint.
#[derive(Default)]
struct Watch {
    cancel: Cancel,
    tuning: Tuning,
    status: Status,
    events: Events,
    metrics: MetricsPage,
}

impl Watch {
    /// Signals and (with `control`) the control socket, watched until dropped.
    fn start(&self, control: Option<&std::path::Path>) -> Result<Option<ControlSocket>> {
        let watch = self;
        super::control::cancel_on_signals(&watch.cancel)?;
        let socket = match control {
            Some(path) => Some(ControlSocket::start(
                path,
                watch.cancel.clone(),
                watch.tuning.clone(),
                watch.status.clone(),
                watch.events.clone(),
            )?),
            None => None,
        };
        Ok(socket)
    }
}

/// Polls `query-migrate` until the migration ends, showing progress on a terminal; past
/// `timeout`, or when `cancel` is, the migration is cancelled on the source QEMU.
fn follow(source: &mut Qmp, timeout: Duration, watch: &Watch, json: bool) -> Result<Value> {
    let bar = (!json && std::io::stderr().is_terminal()).then(super::logging::spinner);
    let started = Instant::now();
    let cancel = &watch.cancel;
    let (mut cancelled, mut forced) = (false, false);
    let (mut last_status, mut last_pass) = (String::new(), 0);
    loop {
        let info = source.execute("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("");
        watch.status.set(info.clone());
        watch.metrics.update_qemu(&info);
        // A pass before the state it led to: "completed" comes last.
        let pass = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        if pass != last_pass {
            watch.events.emit("MIGRATION_PASS", json!({ "pass": pass }));
            last_pass = pass;
        }
        if status != last_status {
            watch.events.emit("MIGRATION", json!({ "status": status }));
            last_status = status.to_string();
        }
        if matches!(status, "completed" | "failed" | "cancelled") {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok(info);
        }
        tune(source, &watch.tuning, &mut forced)?;
        if let Some(bar) = &bar {
            let ram = &info["ram"];
            let mib = |key: &str| ram[key].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
            bar.set_message(format!(
                "{status}: {:.0} MiB sent, {:.0} MiB left, {:.0} Mbit/s, pass {}, expected downtime {} ms",
                mib("transferred"),
                mib("remaining"),
                ram["mbps"].as_f64().unwrap_or(0.0),
                ram["dirty-sync-count"],
                info["expected-downtime"]
            ));
            bar.tick();
        }
        if !cancelled && (started.elapsed() > timeout || cancel.is_cancelled()) {
            if cancel.is_cancelled() {
                log::info!("{}: cancelling the migration", cancel.reason());
            } else {
                log::info!("the migration ran past --timeout: cancelling it");
            }
            source.execute("migrate_cancel", json!({}))?;
            cancelled = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The control socket's changes, handed to the source QEMU: a new downtime limit or
/// bandwidth cap, a switchover forced (once) by QEMU's largest downtime limit.
fn tune(source: &mut Qmp, tuning: &Tuning, forced: &mut bool) -> Result<()> {
    let mut parameters = serde_json::Map::new();
    if let Some(limit) = tuning.take_downtime_limit() {
        parameters.insert("downtime-limit".into(), (limit.as_millis() as u64).min(FORCE_DOWNTIME_MS).into());
    }
    if let Some(rate) = tuning.take_max_bandwidth() {
        // QEMU has no "no cap": its largest.
        parameters.insert("max-bandwidth".into(), rate.unwrap_or(i64::MAX as u64).into());
    }
    if tuning.switchover_asked() && !*forced {
        parameters.insert("downtime-limit".into(), FORCE_DOWNTIME_MS.into());
        *forced = true;
    }
    if !parameters.is_empty() {
        log::info!("control socket: {} on the source QEMU", Value::Object(parameters.clone()));
        source.execute("migrate-set-parameters", Value::Object(parameters)).context("migrate-set-parameters")?;
    }
    Ok(())
}

/// QEMU's figures, under QEMU's names.
fn print_qemu(info: &Value) {
    let ram = &info["ram"];
    println!(
        "QEMU: {} in {} ms, downtime {} ms, setup {} ms",
        info["status"].as_str().unwrap_or("?"),
        info["total-time"],
        info["downtime"],
        info["setup-time"]
    );
    println!(
        "QEMU ram: {} total, {} transferred, {} duplicate (zero) pages, {} normal pages, {} passes, {:.0} Mbit/s",
        ram["total"],
        ram["transferred"],
        ram["duplicate"],
        ram["normal"],
        ram["dirty-sync-count"],
        ram["mbps"].as_f64().unwrap_or(0.0)
    );
    if let Some(xbzrle) = info.get("xbzrle-cache") {
        println!(
            "QEMU xbzrle: {} pages, {} bytes, cache miss rate {}, overflow {}",
            xbzrle["pages"], xbzrle["bytes"], xbzrle["cache-miss-rate"], xbzrle["overflow"]
        );
    }
}

/// A directory for the relays' unix sockets that only this user can enter, under a name
/// no one can guess: a socket there carries guest memory, and another local user who could
/// place or swap one would receive it. `tempfile` fails rather than reuse a path that
/// already exists; the mode is asked for (its default follows the umask, 0755 here).
fn private_work_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix("vmigrate-qemu-migrate-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_work_dir_is_private_and_unpredictable() {
        let first = private_work_dir().unwrap();
        let second = private_work_dir().unwrap();
        assert_ne!(first.path(), second.path(), "each run gets a directory of its own");
        let metadata = std::fs::metadata(first.path()).unwrap();
        assert_eq!(metadata.mode() & 0o777, 0o700, "only the owner may enter or list it");
        let mine = tempfile::tempfile().unwrap().metadata().unwrap();
        assert_eq!(metadata.uid(), mine.uid(), "owned by the user who runs the command");
        assert!(!first.path().to_string_lossy().contains(&std::process::id().to_string()), "no pid in the name");
        let path = first.path().to_path_buf();
        std::fs::write(path.join("source.sock"), b"").unwrap();
        drop(first);
        assert!(!path.exists(), "removed with its sockets when dropped");
    }
}
