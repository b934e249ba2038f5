//! Stopping a migration from outside: SIGINT and SIGTERM, and a control socket an operator
//! (or a management layer) writes commands to.
//!
//! The first signal cancels the migration (the source guest runs on; the destination is
//! told why); a second one ends the process at once. The control socket takes one command
//! per line, in the manner of QMP (docs/control.md): a JSON object `{"execute": NAME,
//! "arguments": {...}}` answered with `{"return": ...}` or `{"error": {"class", "desc"}}`:
//! `query-migrate`, `migrate_cancel`, `migrate-set-parameters` (`downtime-limit` in ms,
//! `max-bandwidth` in bytes per second, 0 for none) and `migrate-switchover` (end pre-copy
//! now). The plain words `cancel` and `status` still work. A client that sends
//! `qmp_capabilities` (as a QMP client does first) also gets QMP's events from then on,
//! each on a line of its own: `MIGRATION` when the state changes (active, completed,
//! failed, cancelled), `MIGRATION_PASS` when a round begins.

use anyhow::{Context, Result};
use engine::cancel::Cancel;
use engine::destination::DestinationProgress;
use engine::source::Progress;
use engine::tuning::Tuning;
use serde_json::{json, Value};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Turns SIGINT and SIGTERM into a cancel of `cancel`.
pub fn cancel_on_signals(cancel: &Cancel) -> Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing the signal handlers")?;
    let cancel = cancel.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for signal in signals.forever() {
            let name = if signal == SIGINT { "SIGINT" } else { "SIGTERM" };
            if cancel.is_cancelled() {
                log::info!("{name} again: quitting now");
                std::process::exit(128 + signal);
            }
            log::info!("{name}: cancelling the migration (send it again to quit at once)");
            cancel.cancel(format!("{name} received"));
        }
    })?;
    Ok(())
}

/// The migration's last progress, as the control socket reports it.
#[derive(Clone, Default)]
pub struct Status(Arc<Mutex<serde_json::Value>>);

impl Status {
    pub fn update(&self, progress: &Progress) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = serde_json::json!({
            "status": "active",
            "round": progress.round,
            "stage": progress.stage,
            "remaining-pages": progress.remaining_pages,
            "transferred": progress.transferred_bytes,
            "mbps": progress.mbps,
            "elapsed-ms": progress.elapsed.as_millis() as u64,
            "expected-downtime": progress.expected_downtime.as_millis().min(u128::from(u64::MAX)) as u64,
            "downtime-limit": progress.downtime_limit.as_millis() as u64,
            "dirty-pages-rate": progress.dirty_pages_rate,
        });
    }

    /// From a destination's progress: what has arrived so far.
    pub fn update_incoming(&self, progress: &DestinationProgress) {
        self.set(json!({
            "status": "active",
            "round": progress.rounds + 1,
            "rounds-applied": progress.rounds,
            "received": progress.received_bytes,
            "ram-total": progress.ram_total,
            "elapsed-ms": progress.elapsed.as_millis() as u64,
        }));
    }

    /// The status as it stands, whole (QEMU's own `query-migrate`, for `qemu-migrate`).
    pub fn set(&self, value: Value) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = value;
    }

    fn json(&self) -> String {
        self.value().to_string()
    }

    fn value(&self) -> Value {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How a migration ended, as QMP's `MIGRATION` event says it.
pub fn ending<T>(result: &Result<T, engine::MigrationError>) -> &'static str {
    match result {
        Ok(_) => "completed",
        Err(engine::MigrationError::Cancelled(_)) => "cancelled",
        Err(engine::MigrationError::Aborted { kind: transport::abort::AbortKind::Cancelled, .. }) => "cancelled",
        Err(_) => "failed",
    }
}

/// The control socket's clients, to send QMP-style events to.
#[derive(Clone, Default)]
pub struct Events {
    clients: Arc<Mutex<Vec<Client>>>,
    /// The last round announced (0: none yet, the migration not yet active).
    pass: Arc<AtomicU32>,
}

/// A client's write side, shared by its answers and the events.
type Client = Arc<Mutex<UnixStream>>;

impl Events {
    /// Sends `{"event": NAME, "data": DATA, "timestamp": ...}` to every client (one that
    /// has gone is dropped).
    pub fn emit(&self, name: &str, data: Value) {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let line = json!({
            "event": name,
            "data": data,
            "timestamp": { "seconds": since.as_secs(), "microseconds": since.subsec_micros() },
        })
        .to_string();
        lock(&self.clients).retain(|client| writeln!(lock(client), "{line}").is_ok());
    }

    /// From a progress report: `MIGRATION` active with the first one, `MIGRATION_PASS`
    /// with each new round.
    pub fn progress(&self, progress: &Progress) {
        self.pass(progress.round);
    }

    /// Round `round` (from 1) is under way: `MIGRATION` active with the first call,
    /// `MIGRATION_PASS` with each new round.
    pub fn pass(&self, round: u32) {
        let before = self.pass.swap(round, Ordering::AcqRel);
        if before == 0 {
            self.emit("MIGRATION", json!({ "status": "active" }));
        }
        if round != before {
            self.emit("MIGRATION_PASS", json!({ "pass": round }));
        }
    }

    fn join(&self, client: Client) {
        lock(&self.clients).push(client);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A control socket, removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl ControlSocket {
    /// Listens on `path` for commands (see the module's description).
    pub fn start(path: &Path, cancel: Cancel, tuning: Tuning, status: Status, events: Events) -> Result<ControlSocket> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
        std::thread::Builder::new().name("control".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let controls = Controls {
                    cancel: cancel.clone(),
                    tuning: tuning.clone(),
                    status: status.clone(),
                    events: events.clone(),
                };
                std::thread::spawn(move || serve(stream, &controls));
            }
        })?;
        Ok(ControlSocket { path: path.to_path_buf() })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the control socket's commands act on.
struct Controls {
    cancel: Cancel,
    tuning: Tuning,
    status: Status,
    events: Events,
}

fn serve(stream: UnixStream, controls: &Controls) {
    let Ok(writer) = stream.try_clone() else { return };
    let writer: Client = Arc::new(Mutex::new(writer));
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let answer = match line.trim() {
            "" => continue,
            "cancel" => {
                cancel(&controls.cancel);
                "ok".to_string()
            }
            "status" => controls.status.json(),
            json if json.starts_with('{') => {
                let answer = execute(json, controls);
                if answer.get("return").is_some() && json.contains("\"qmp_capabilities\"") {
                    // Command mode, as QMP's: the events from now on.
                    controls.events.join(writer.clone());
                }
                answer.to_string()
            }
            other => format!("error: unknown command {other:?} (cancel, status, or a JSON command)"),
        };
        if writeln!(lock(&writer), "{answer}").is_err() {
            return;
        }
    }
}

fn cancel(cancel: &Cancel) {
    log::info!("cancel requested on the control socket");
    cancel.cancel("cancelled on the control socket");
}

/// One JSON command, QMP's way: `{"return": ...}` or `{"error": {"class", "desc"}}`.
fn execute(line: &str, controls: &Controls) -> Value {
    let error = |class: &str, desc: String| json!({ "error": { "class": class, "desc": desc } });
    let command: Value = match serde_json::from_str(line) {
        Ok(command) => command,
        Err(err) => return error("GenericError", format!("not JSON: {err}")),
    };
    let arguments = &command["arguments"];
    match command["execute"].as_str().unwrap_or_default() {
        "qmp_capabilities" => json!({ "return": {} }),
        "query-migrate" => json!({ "return": controls.status.value() }),
        "migrate_cancel" => {
            cancel(&controls.cancel);
            json!({ "return": {} })
        }
        "migrate-switchover" => {
            log::info!("switchover asked for on the control socket");
            controls.tuning.switch_over_now();
            json!({ "return": {} })
        }
        "migrate-set-parameters" => {
            let number = |name: &'static str| arguments.get(name).map(|v| v.as_u64().ok_or(name));
            match (number("downtime-limit"), number("max-bandwidth")) {
                (Some(Err(name)), _) | (_, Some(Err(name))) => {
                    error("GenericError", format!("{name}: a whole number expected"))
                }
                (limit, bandwidth) => {
                    if let Some(Ok(ms)) = limit {
                        log::info!("downtime limit set to {ms} ms on the control socket");
                        controls.tuning.set_downtime_limit(std::time::Duration::from_millis(ms));
                    }
                    if let Some(Ok(rate)) = bandwidth {
                        log::info!("bandwidth cap set to {rate} bytes/s on the control socket (0: none)");
                        controls.tuning.set_max_bandwidth((rate > 0).then_some(rate));
                    }
                    json!({ "return": {} })
                }
            }
        }
        "" => error("GenericError", "no \"execute\" in the command".into()),
        other => error(
            "CommandNotFound",
            format!(
                "the command {other} has not been found (qmp_capabilities, query-migrate, migrate_cancel, \
                 migrate-set-parameters, migrate-switchover)"
            ),
        ),
    }
}
