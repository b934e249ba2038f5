//! Stopping a migration from outside: SIGINT and SIGTERM, and a control socket an operator
//! (or a management layer) writes commands to.
//!
//! The first signal cancels the migration (the source guest runs on; the destination is
//! told why); a second one ends the process at once. The control socket takes one command
//! per line: `cancel` cancels, `status` answers with the migration's last progress as JSON.

use anyhow::{Context, Result};
use engine::cancel::Cancel;
use engine::source::Progress;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
            "round": progress.round,
            "stage": progress.stage,
            "remaining-pages": progress.remaining_pages,
            "transferred": progress.transferred_bytes,
            "mbps": progress.mbps,
            "elapsed-ms": progress.elapsed.as_millis() as u64,
        });
    }

    fn json(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).to_string()
    }
}

/// A control socket, removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl ControlSocket {
    /// Listens on `path` for commands (see the module's description).
    pub fn start(path: &Path, cancel: Cancel, status: Status) -> Result<ControlSocket> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
        std::thread::Builder::new().name("control".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let (cancel, status) = (cancel.clone(), status.clone());
                std::thread::spawn(move || serve(stream, &cancel, &status));
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

fn serve(stream: UnixStream, cancel: &Cancel, status: &Status) {
    let Ok(mut writer) = stream.try_clone() else { return };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let answer = match line.trim() {
            "cancel" => {
                log::info!("cancel requested on the control socket");
                cancel.cancel("cancelled on the control socket");
                "ok".to_string()
            }
            "status" => status.json(),
            "" => continue,
            other => format!("error: unknown command {other:?} (cancel, status)"),
        };
        if writeln!(writer, "{answer}").is_err() {
            return;
        }
    }
}
