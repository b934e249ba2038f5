//! The relays' control sockets (`qemu-send --control`, `qemu-recv --control`): the same
//! commands as `send`'s (docs/control.md), served by `control.rs`, acting on a relay
//! session through its `RelayControls`; and `qemu-send --qmp`, through which a downtime
//! limit or a switchover reaches the source QEMU.

use super::control::{ControlSocket, Events, Status};
use ::relay::control::{QemuTuner, RelayControls};
use ::relay::qmp::Qmp;
use anyhow::Result;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the relay's progress is read for `query-migrate` and the events.
const STATUS_EVERY: Duration = Duration::from_millis(100);
/// How long `qemu-send` waits for QEMU's QMP socket when it first needs it.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// A relay's control socket and its progress reader, until dropped.
pub struct RelayControlSocket {
    _socket: ControlSocket,
    events: Events,
    stop: Arc<AtomicBool>,
}

impl RelayControlSocket {
    /// Serves `path` for the session `controls` belongs to.
    pub fn start(path: &Path, controls: &Arc<RelayControls>) -> Result<RelayControlSocket> {
        let (status, events) = (Status::default(), Events::default());
        status.set(json!({ "status": "setup" }));
        let (cancel, tuning) = (controls.cancel.clone(), controls.tuning.clone());
        let socket = ControlSocket::start(path, cancel, tuning, status.clone(), events.clone())?;
        let stop = Arc::new(AtomicBool::new(false));
        let (controls, reader_events, done) = (controls.clone(), events.clone(), stop.clone());
        std::thread::Builder::new().name("relay-status".into()).spawn(move || {
            let mut active = false;
            while !done.load(Ordering::Acquire) {
                let now = progress(&controls);
                if now["status"] == "active" && !active {
                    reader_events.emit("MIGRATION", json!({ "status": "active" }));
                    active = true;
                }
                status.set(now);
                std::thread::sleep(STATUS_EVERY);
            }
        })?;
        Ok(RelayControlSocket { _socket: socket, events, stop })
    }

    /// The session ended (`outcome`: completed, failed or cancelled): the last event.
    pub fn ended(&self, outcome: &str) {
        self.events.emit("MIGRATION", json!({ "status": outcome }));
    }
}

impl Drop for RelayControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// `query-migrate`'s answer for a relay: what it carried so far.
fn progress(controls: &RelayControls) -> Value {
    let meter = &controls.meter;
    let streams = meter.streams.load(Ordering::Acquire);
    json!({
        "status": if streams > 0 { "active" } else { "setup" },
        "streams": streams,
        "transferred": meter.qemu_bytes.load(Ordering::Relaxed),
        "received": meter.delivered_bytes.load(Ordering::Relaxed),
        "wire-sent": meter.wire_bytes.load(Ordering::Relaxed),
        "elapsed-ms": meter.elapsed().as_millis() as u64,
    })
}

/// How a relay session ended, as QMP's `MIGRATION` event says it.
pub fn ending<T>(result: &Result<T, ::relay::RelayFailure>) -> &'static str {
    match result {
        Ok(_) => "completed",
        Err(::relay::RelayFailure::Cancelled(_)) => "cancelled",
        Err(_) => "failed",
    }
}

/// QEMU's largest downtime limit (2000 s): with it QEMU switches over at its next
/// iteration, whatever is left, which is how a switchover is forced on QEMU 7.2
/// (`qemu-migrate` and `qemu-send --qmp` alike).
pub(super) const FORCE_DOWNTIME_MS: u64 = 2_000_000;

/// Hands the source QEMU a downtime limit or a switchover over its QMP socket at `path`
/// (connected when first needed): a switchover is QEMU's largest downtime limit, as
/// `qemu-migrate` forces it on QEMU 7.2.
pub fn qemu_tuner(path: PathBuf) -> QemuTuner {
    let mut qmp: Option<Qmp> = None;
    Box::new(move |tune| {
        let mut parameters = serde_json::Map::new();
        if let Some(ms) = tune.downtime_limit_ms {
            parameters.insert("downtime-limit".into(), ms.min(FORCE_DOWNTIME_MS).into());
        }
        if tune.switchover {
            parameters.insert("downtime-limit".into(), FORCE_DOWNTIME_MS.into());
        }
        if parameters.is_empty() {
            return Ok(());
        }
        if qmp.is_none() {
            qmp = Some(Qmp::connect(&path, QMP_TIMEOUT).map_err(|err| err.to_string())?);
        }
        let session = qmp.as_mut().expect("connected above");
        log::info!("{} on the source QEMU", Value::Object(parameters.clone()));
        match session.execute("migrate-set-parameters", Value::Object(parameters)) {
            Ok(_) => Ok(()),
            Err(err) => {
                // Connect again next time: the socket may have gone with the error.
                qmp = None;
                Err(err.to_string())
            }
        }
    })
}
