//! `vmigrate bench`: the tables of Intel's 2015 KVM live-migration talk, reproduced side by side in one run. Each row is one
//! real migration between two `vmigrate` processes (`recv`, then `send`), in two network
//! namespaces over a shaped veth link when `--netns` names them, so every row meets the
//! same link, codecs and CPUs. What each run reports (total time, downtime, bytes, rounds,
//! CPU on each side) goes into a table, `bench.json` and charts (`charts.rs`).

mod charts;
mod html;
mod model;

use super::args::{BenchArgs, BenchStack, BENCH_ROWS, DEVICE_ROWS};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The `send` options of a row.
fn row_options(row: &str, mem: u64) -> Result<Vec<String>> {
    // QEMU's XBZRLE cache defaults to 64 MiB for any guest; a sixteenth of the guest
    // gives the dirty guest's hot pages room (256 MiB for 4 GiB).
    let cache = format!("{}", (mem / 16).max(4 << 20));
    // Rows that name no codec send pages as they are (`send` itself defaults to adaptive).
    let options: &[&str] = match row {
        "plain" => &["--codec", "none"],
        "lz4" => &["--codec", "lz4"],
        "zlib" => &["--codec", "zlib:1"],
        "zstd" => &["--codec", "zstd:1"],
        "shuffle-lz4" => &["--codec", "shuffle-lz4"],
        "shuffle-zstd" => &["--codec", "shuffle-zstd:1"],
        "bitshuffle-lz4" => &["--codec", "bitshuffle-lz4"],
        "adaptive" => &["--codec", "adaptive"],
        // On DPDK's ISA-L compression device (a build with the dpdk feature, as root).
        "deflate" | "deflate-both" => &["--codec", "deflate", "--compress-device", "compress_isal0"],
        "adaptive+deflate" => &["--codec", "adaptive", "--compress-device", "compress_isal0"],
        "xbzrle" => &["--codec", "none", "--xbzrle-cache", &cache],
        "lz4+xbzrle" => &["--codec", "lz4", "--xbzrle-cache", &cache],
        "zlib+xbzrle" => &["--codec", "zlib:1", "--xbzrle-cache", &cache],
        "zstd+xbzrle" => &["--codec", "zstd:1", "--xbzrle-cache", &cache],
        "skip-unused-off" => &["--codec", "none", "--no-skip-unused"],
        "deferred-cleanup-off" => &["--codec", "none", "--no-deferred-cleanup"],
        other => bail!("unknown bench row {other:?}; rows are {BENCH_ROWS},{DEVICE_ROWS}"),
    };
    Ok(options.iter().map(|s| s.to_string()).collect())
}

/// The `recv` options of a row: `deflate-both` inflates on the device too.
fn receiver_options(row: &str) -> Vec<String> {
    match row {
        "deflate-both" => vec!["--compress-device".into(), "compress_isal0".into()],
        _ => Vec::new(),
    }
}

fn workload(guest: &str, args: &BenchArgs) -> Result<String> {
    Ok(match guest {
        "idle" => "idle".into(),
        "dirty" => format!("dirty:{}:5000:16", args.dirty_area),
        other => bail!("unknown bench guest {other:?}: idle or dirty"),
    })
}

/// One row's outcome, as `bench.json` keeps it.
#[derive(Serialize, Clone)]
#[serde(rename_all = "kebab-case")]
pub struct RunResult {
    pub guest: String,
    pub row: String,
    pub total_time_ms: u64,
    pub downtime_ms: u64,
    pub transferred_bytes: u64,
    pub total_bytes: u64,
    pub source_cpu_seconds: f64,
    pub destination_cpu_seconds: f64,
    /// Whether both ends hashed all memory and found it equal (only with `--verify`; the
    /// suite's tests verify every codec and option).
    pub verified: Option<bool>,
    /// The source's per-round rows (time, pages, rate, pages dirtied meanwhile).
    pub rounds: serde_json::Value,
    /// Every run's total time, when the row ran several times (this one is the median).
    pub total_times_ms: Vec<u64>,
}

impl RunResult {
    fn cpu_percent(&self, seconds: f64) -> f64 {
        100.0 * seconds / (self.total_time_ms.max(1) as f64 / 1000.0)
    }
}

/// A command run here, or inside namespace `PREFIX-SIDE`.
fn command(netns: Option<&str>, side: &str) -> Result<Command> {
    let bin = std::env::current_exe().context("finding this vmigrate binary")?;
    Ok(match netns {
        Some(prefix) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &format!("{prefix}-{side}")]).arg(bin);
            command
        }
        None => Command::new(bin),
    })
}

/// Waits for `child` up to `deadline`; its stdout and stderr.
fn finish(
    mut child: Child,
    mut stderr: impl Read + Send + 'static,
    deadline: Instant,
    what: &str,
) -> Result<(String, String)> {
    let mut stdout = child.stdout.take().context("piped stdout")?;
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish in time (killed)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if !status.success() {
        bail!("{what} failed: {}", stderr.lines().filter(|l| l.contains("error")).collect::<Vec<_>>().join("; "));
    }
    Ok((stdout, stderr))
}

fn one_run(args: &BenchArgs, guest: &str, row: &str, port: u16) -> Result<RunResult> {
    let netns = args.netns.as_deref();
    // The destination's address and each side's stack options; DPDK's EAL arguments go
    // last, after `--`.
    let ours = |stack: &str, prefix: &str, veth: &str, ip: &str| {
        let mut options = vec!["--stack".into(), stack.into(), "--ip".into(), ip.into(), "--iface".into()];
        let iface = format!("{prefix}-{veth}");
        if stack == "dpdk" {
            let lcore = if veth == "vs" { "1" } else { "0" };
            options.push("net_af_packet0".into());
            options.extend(
                ["--", "--no-huge", "-m", "256", "--no-pci", "-l", lcore, "--log-level=error"].map(String::from),
            );
            options.push(format!("--file-prefix={iface}"));
            options.extend(["--vdev".into(), format!("net_af_packet0,iface={iface}")]);
        } else {
            options.push(iface);
        }
        options
    };
    let (host, recv_stack, send_stack): (&str, Vec<String>, Vec<String>) = match (args.stack, netns) {
        (BenchStack::Kernel, Some(_)) => ("10.77.0.2", Vec::new(), Vec::new()),
        (BenchStack::Kernel, None) => ("127.0.0.1", Vec::new(), Vec::new()),
        (BenchStack::AfPacket | BenchStack::Dpdk, Some(prefix)) => {
            let stack = if args.stack == BenchStack::Dpdk { "dpdk" } else { "af-packet" };
            ("10.77.0.12", ours(stack, prefix, "vd", "10.77.0.12/24"), ours(stack, prefix, "vs", "10.77.0.11/24"))
        }
        (_, None) => bail!("--stack af-packet and dpdk need --netns (the namespaces' veth ends)"),
    };
    let threads = args.compress_threads.to_string();
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let mut recv = command(netns, "dst")?;
    recv.args(["recv", "--json", "--run-after", "0.2", "--listen", &format!("{host}:{port}")])
        .args(["--decompress-threads", &threads])
        .args(receiver_options(row))
        .args(&recv_stack)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut receiver = recv.spawn().context("starting vmigrate recv")?;
    let mut stderr = BufReader::new(receiver.stderr.take().context("piped stderr")?);
    let mut line = String::new();
    let mut said = String::new();
    while !line.starts_with("vmigrate: waiting for a migration on") {
        line.clear();
        if stderr.read_line(&mut line)? == 0 {
            let _ = receiver.kill();
            bail!("vmigrate recv ended before listening:\n{said}");
        }
        said += &line;
    }
    let mut send = command(netns, "src")?;
    send.args(["send", "--json", "--to", &format!("{host}:{port}")])
        .args(if args.verify { &["--verify"][..] } else { &[] })
        .args(["--mem", &args.mem.to_string(), "--workload", &workload(guest, args)?])
        .args(match (guest, &args.idle_image) {
            ("idle", Some(image)) => vec!["--image".into(), image.clone().into_os_string()],
            _ => Vec::new(),
        })
        .args(["--compress-threads", &threads])
        .args(row_options(row, args.mem)?)
        .args(&send_stack)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut sender = send.spawn().context("starting vmigrate send")?;
    let send_stderr = sender.stderr.take().context("piped stderr")?;
    let sent = finish(sender, send_stderr, deadline, "send");
    let received = finish(receiver, stderr, deadline, "recv");
    let (sent, received) = (sent?.0, received?.0);
    let sent: serde_json::Value = serde_json::from_str(&sent).context("send's JSON")?;
    let received: serde_json::Value = serde_json::from_str(&received).context("recv's JSON")?;
    let number = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    Ok(RunResult {
        guest: guest.into(),
        row: row.into(),
        total_time_ms: number(&sent["total-time"]),
        downtime_ms: number(&sent["downtime"]),
        transferred_bytes: number(&sent["ram"]["transferred"]),
        total_bytes: number(&sent["ram"]["total"]),
        source_cpu_seconds: sent["cpu-seconds"].as_f64().unwrap_or(0.0),
        destination_cpu_seconds: received["cpu-seconds"].as_f64().unwrap_or(0.0),
        verified: args.verify.then(|| sent["verified"] == true && received["verified"] == true),
        rounds: sent["rounds"].clone(),
        total_times_ms: Vec::new(),
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// The talk's table: one line per guest and row, with each row's total time against plain.
/// `result`'s total time against the plain row's of the same guest ("+12%"), or nothing
/// where there is no plain row.
fn versus_plain(result: &RunResult, results: &[RunResult]) -> String {
    let plain = results.iter().find(|r| r.guest == result.guest && r.row == "plain");
    plain
        .map(|p| format!("{:+.0}%", 100.0 * (result.total_time_ms as f64 / p.total_time_ms.max(1) as f64 - 1.0)))
        .unwrap_or_default()
}

pub fn table(link: &str, results: &[RunResult]) -> String {
    let mut out = format!(
        "link: {link}\n{:<6} {:<21} {:>9} {:>10} {:>12} {:>10} {:>8} {:>8} {:>9}\n",
        "guest", "row", "total s", "downtime", "transferred", "total RAM", "CPU src", "CPU dst", "vs plain"
    );
    for result in results {
        let versus = versus_plain(result, results);
        out += &format!(
            "{:<6} {:<21} {:>9.2} {:>7} ms {:>8.0} MiB {:>6.0} MiB {:>7.0}% {:>7.0}% {:>9}\n",
            result.guest,
            result.row,
            result.total_time_ms as f64 / 1000.0,
            result.downtime_ms,
            mib(result.transferred_bytes),
            mib(result.total_bytes),
            result.cpu_percent(result.source_cpu_seconds),
            result.cpu_percent(result.destination_cpu_seconds),
            versus
        );
    }
    out
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&args.report).with_context(|| format!("creating {}", args.report.display()))?;
    for row in &args.rows {
        row_options(row, args.mem)?;
    }
    let mut results = Vec::new();
    let mut port = args.port;
    for guest in &args.guests {
        workload(guest, &args)?;
        // Repeats go round the rows (plain, lz4, ..., plain, lz4, ...), so that a slow
        // spell of this shared machine falls on every row alike, not on one row's runs.
        let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); args.rows.len()];
        for attempt in 1..=args.repeat {
            for (row, row_runs) in args.rows.iter().zip(&mut runs) {
                log::info!("bench: {guest} guest, {row}, over {} (run {attempt} of {})", args.link, args.repeat);
                let result = one_run(&args, guest, row, port).with_context(|| format!("{guest} guest, row {row}"))?;
                if result.verified == Some(false) {
                    bail!("{guest} guest, row {row}: the memory did not verify");
                }
                row_runs.push(result);
                port += 1;
            }
        }
        for mut row_runs in runs {
            row_runs.sort_by_key(|r| r.total_time_ms);
            let mut median = row_runs[row_runs.len() / 2].clone();
            median.total_times_ms = row_runs.iter().map(|r| r.total_time_ms).collect();
            results.push(median);
        }
    }
    let mut table = table(&args.link, &results);
    // What faster links would take: each stage's rate on one core, on these guests' pages.
    let mut model = serde_json::Map::new();
    let mut model_text = String::new();
    for guest in &args.guests {
        let image = if guest == "idle" { args.idle_image.as_deref() } else { None };
        let pages = model::sample_pages(guest, image)?;
        let rates = model::calibrate(&pages);
        model_text += "\n";
        model_text += &model::table(guest, &rates);
        model.insert(guest.clone(), serde_json::to_value(&rates)?);
    }
    table += &model_text;
    print!("{table}");
    std::fs::write(args.report.join("table.txt"), &table)?;
    let json = serde_json::json!({
        "link": args.link,
        "stack": format!("{:?}", args.stack),
        "mem": args.mem,
        "dirty-area": args.dirty_area,
        "idle-image": args.idle_image,
        "runs": results,
        "model": model,
    });
    std::fs::write(args.report.join("bench.json"), serde_json::to_string_pretty(&json)?)?;
    match charts::write(&args.report, &args.link, &results) {
        Ok(files) => log::info!("bench: wrote {} charts to {}", files, args.report.display()),
        Err(err) => log::warn!("no charts: {err:#}"),
    }
    let page = html::write(&args.report, &args.link, &results, &model_text)?;
    log::info!("bench: the report as one page: {}", page.display());
    Ok(ExitCode::SUCCESS)
}
