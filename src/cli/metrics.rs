//! `--metrics ADDR:PORT`: the running migration's figures in Prometheus's text format,
//! served over HTTP at `/metrics` for a Prometheus server (or anything that reads the
//! format) to scrape. The page is rendered at each progress report and served as it
//! stands, so a scrape never waits on the migration.

use anyhow::{Context, Result};
use engine::source::Progress;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The page the endpoint serves, rendered from the last progress report.
#[derive(Clone, Default)]
pub struct MetricsPage(Arc<Mutex<String>>);

impl MetricsPage {
    /// Renders `progress` as the page to serve from now on.
    pub fn update(&self, progress: &Progress) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = render(progress);
    }

    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serves the page at `address` (`/metrics`) on a thread of its own, for as long as the
    /// process runs; returns the address it listens on (a port 0 is chosen by the system).
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
        Ok(bound)
    }
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

/// The progress in Prometheus's text format (version 0.0.4).
fn render(p: &Progress) -> String {
    let e = &p.encoded;
    let mut out = String::new();
    let stage = format!("stage=\"{}\"", p.stage);
    family(&mut out, "migration_round", "gauge", "The pre-copy round under way.", &[("", p.round.into())]);
    family(&mut out, "migration_stage", "gauge", "The stage under way (1 on its label).", &[(&stage, 1.0)]);
    family(
        &mut out,
        "migration_remaining_pages",
        "gauge",
        "Pages left to send in this round.",
        &[("", p.remaining_pages as f64)],
    );
    family(
        &mut out,
        "migration_transferred_bytes_total",
        "counter",
        "Bytes put on the connections.",
        &[("", p.transferred_bytes as f64)],
    );
    family(
        &mut out,
        "migration_throughput_bits_per_second",
        "gauge",
        "Mean rate since the start.",
        &[("", p.mbps * 1e6)],
    );
    family(
        &mut out,
        "migration_elapsed_seconds",
        "gauge",
        "Time since the migration started.",
        &[("", p.elapsed.as_secs_f64())],
    );
    family(
        &mut out,
        "migration_pages_total",
        "counter",
        "Pages sent, by how they went.",
        &[
            ("kind=\"zero\"", e.zero_pages as f64),
            ("kind=\"raw\"", e.raw_pages as f64),
            ("kind=\"compressed\"", e.compressed_pages as f64),
            ("kind=\"xbzrle\"", e.xbzrle_pages as f64),
            ("kind=\"xbzrle-unchanged\"", e.xbzrle_unchanged as f64),
        ],
    );
    family(
        &mut out,
        "migration_payload_bytes_total",
        "counter",
        "Bytes of page payload, by how they went.",
        &[("kind=\"compressed\"", e.compressed_bytes as f64), ("kind=\"xbzrle\"", e.xbzrle_bytes as f64)],
    );
    let ratio = if e.compressed_bytes == 0 {
        1.0
    } else {
        (e.compressed_pages * migration::PAGE_SIZE_BYTES as u64) as f64 / e.compressed_bytes as f64
    };
    family(
        &mut out,
        "migration_compression_ratio",
        "gauge",
        "Guest bytes per wire byte of compressed pages.",
        &[("", ratio)],
    );
    family(
        &mut out,
        "migration_xbzrle_cache_misses_total",
        "counter",
        "Pages sent again not found in the cache.",
        &[("", e.xbzrle_cache_miss as f64)],
    );
    family(
        &mut out,
        "migration_dirty_pages_per_second",
        "gauge",
        "Pages the guest dirtied per second (last round).",
        &[("", p.dirty_pages_rate as f64)],
    );
    family(
        &mut out,
        "migration_expected_downtime_seconds",
        "gauge",
        "Downtime a switchover now would take.",
        &[("", p.expected_downtime.min(Duration::from_secs(86_400)).as_secs_f64())],
    );
    family(
        &mut out,
        "migration_downtime_limit_seconds",
        "gauge",
        "The downtime limit.",
        &[("", p.downtime_limit.as_secs_f64())],
    );
    out
}
