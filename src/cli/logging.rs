//! Where the log facade goes: stderr, one line a record, above the progress line. The
//! libraries (ours, smoltcp, rustls) speak through `log`; only this binary decides what is
//! shown. `-v`/`-q` set our verbosity (info by default), `RUST_LOG` refines it per target
//! (`RUST_LOG=vmigrate_engine=debug`), and traced frames (`--trace`) always pass.

use clap_verbosity_flag::{InfoLevel, Verbosity};
use dataplane::layers::FRAME_TRACE_TARGET;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use log::{Level, LevelFilter};
use std::io::Write;
use std::sync::OnceLock;

/// Every progress line is drawn through this, so that a log line is printed above it
/// rather than through it.
fn progress_lines() -> &'static MultiProgress {
    static LINES: OnceLock<MultiProgress> = OnceLock::new();
    LINES.get_or_init(MultiProgress::new)
}

/// A spinner with a message, drawn above nothing and below every log line.
pub fn spinner() -> ProgressBar {
    let bar = progress_lines().add(ProgressBar::new_spinner());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    bar
}

/// Installs the logger once, at start-up.
pub fn init(verbosity: &Verbosity<InfoLevel>) {
    let ours = verbosity.log_level_filter();
    // Other crates' info lines (rustls's, say) are theirs to explain, not an operator's
    // concern: they show from -v on, as ours do from -vv.
    let theirs = if ours >= LevelFilter::Debug { ours } else { ours.min(LevelFilter::Warn) };
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(theirs)
        .filter_module("vmigrate", ours)
        .filter_module(FRAME_TRACE_TARGET, LevelFilter::Trace)
        .parse_env(env_logger::Env::default())
        .format(|out, record| {
            if record.target() == FRAME_TRACE_TARGET {
                return writeln!(out, "{}", record.args());
            }
            let fields = Fields::of(record);
            match record.level() {
                Level::Error => writeln!(out, "vmigrate: error: {}{fields}", record.args()),
                Level::Warn => writeln!(out, "vmigrate: warning: {}{fields}", record.args()),
                Level::Info => writeln!(out, "vmigrate: {}{fields}", record.args()),
                level => writeln!(out, "vmigrate: {} {}: {}{fields}", level, record.target(), record.args()),
            }
        });
    let logger = builder.build();
    let max = logger.filter();
    if indicatif_log_bridge::LogWrapper::new(progress_lines().clone(), logger).try_init().is_ok() {
        log::set_max_level(max);
    }
}

/// A record's structured fields (`conn = 2; "..."`), as ` conn=2` after its message.
struct Fields(String);

impl Fields {
    fn of(record: &log::Record) -> Fields {
        struct Collect(String);
        impl<'kvs> log::kv::VisitSource<'kvs> for Collect {
            fn visit_pair(
                &mut self,
                key: log::kv::Key<'kvs>,
                value: log::kv::Value<'kvs>,
            ) -> Result<(), log::kv::Error> {
                self.0.push_str(&format!(" {key}={value}"));
                Ok(())
            }
        }
        let mut fields = Collect(String::new());
        let _ = record.key_values().visit(&mut fields);
        Fields(fields.0)
    }
}

impl std::fmt::Display for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
