//! `--metrics ADDR:PORT`: a running migration's figures in Prometheus's text format,
//! served over HTTP at `/metrics` for a Prometheus server (or anything that reads the
//! format) to scrape. Each command puts its own figures on the page (`source.rs`,
//! `destination.rs`, `relay.rs`) and, on our own stack, the dataplane cores' (`stack.rs`).
//! A scrape never waits on the migration: the migration's part is rendered at each
//! progress report and served as it stands, the rest is read from counters at the scrape.

mod destination;
mod qemu;
mod relay;
mod source;
mod stack;

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A part of the page read at each scrape.
type LivePart = Box<dyn Fn(&mut String) + Send>;

/// The page the endpoint serves.
#[derive(Clone, Default)]
pub struct MetricsPage {
    /// The migration's part, as last reported.
    reported: Arc<Mutex<String>>,
    live: Arc<Mutex<Vec<LivePart>>>,
}

impl MetricsPage {
    /// Renders the source's `progress` as its part of the page from now on.
    pub fn update(&self, progress: &engine::source::Progress) {
        *lock(&self.reported) = source::render(progress);
    }

    /// Renders the destination's `progress` as its part of the page from now on.
    pub fn update_incoming(&self, progress: &engine::destination::DestinationProgress) {
        *lock(&self.reported) = destination::render(progress);
    }

    /// Renders QEMU's `query-migrate` answer as the migration's part of the page.
    pub fn update_qemu(&self, info: &serde_json::Value) {
        *lock(&self.reported) = qemu::render(info);
    }

    /// Adds a relay's figures, read at each scrape.
    pub fn with_relay(self, controls: &Arc<::relay::control::RelayControls>) -> MetricsPage {
        let controls = controls.clone();
        lock(&self.live).push(Box::new(move |out| relay::render(out, &controls.meter)));
        self
    }

    /// Adds the dataplane cores' figures (None: the kernel's stack, nothing to add).
    pub fn with_stack(self, meter: Option<dataplane::stats::StackMeter>) -> MetricsPage {
        if let Some(meter) = meter {
            lock(&self.live).push(Box::new(move |out| stack::render(out, &meter.snapshot())));
        }
        self
    }

    fn text(&self) -> String {
        let mut out = lock(&self.reported).clone();
        for part in lock(&self.live).iter() {
            part(&mut out);
        }
        out
    }

    /// Serves the page at `address` (`/metrics`) on a thread of its own, for as long as the
    /// process runs, and says where on stderr (with port 0 this is how a scraper learns
    /// the port).
    pub fn serve(&self, address: SocketAddr) -> Result<SocketAddr> {
        let listener = TcpListener::bind(address).with_context(|| format!("--metrics {address}"))?;
        let bound = listener.local_addr()?;
        let page = self.clone();
        std::thread::Builder::new().name("metrics".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                // One scrape at a time is plenty; a slow one is cut off by its timeout.
                let _ = answer(stream, &page);
            }
        })?;
        eprintln!("vmigrate: metrics at http://{bound}/metrics");
        Ok(bound)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers one HTTP request: the page for `GET /metrics`, 404 for anything else.
fn answer(stream: TcpStream, page: &MetricsPage) -> std::io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers, up to the blank line: nothing in them changes the answer.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if path == "/metrics" || path.starts_with("/metrics?") {
        ("200 OK", page.text())
    } else {
        ("404 Not Found", "vmigrate serves /metrics\n".to_string())
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// One metric family: its help, type and samples (`labels` may be empty).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP vmigrate_{name} {help}\n# TYPE vmigrate_{name} {kind}");
    for (labels, value) in samples {
        let labels = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "vmigrate_{name}{labels} {value}");
    }
}

/// A label value escaped as the text format asks (backslash, quote, newline).
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
