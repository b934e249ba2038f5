//! The `vmigrate` binary: `demo` in one process, and `send` / `recv` as two processes
//! over loopback kernel TCP, with JSON output under QEMU's names.

use std::io::{BufRead, Write};
use std::process::Command;
use std::time::Duration;
use vmigrate_tests::control::{self, assert_ends_completed, listen_for_events};
use vmigrate_tests::metrics;
use vmigrate_tests::process::{
    assert_large_segments_both_ways, assert_migrated, assert_whole_segments, is_root, json, run, Receiver,
};

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn demo_runs_and_reports_qemu_names() {
    let finished =
        run(Command::new(BIN).args(["demo", "--mem", "64MiB", "--verify", "--json", "--run-after", "0.3"]), DEADLINE);
    assert!(finished.status.success(), "demo failed:\n{}", finished.stderr);
    let value = json(&finished.stdout);
    for key in ["status", "total-time", "setup-time", "downtime", "expected-downtime"] {
        assert!(value.get(key).is_some(), "missing {key}");
    }
    for key in [
        "total",
        "transferred",
        "remaining",
        "duplicate",
        "skipped",
        "normal",
        "normal-bytes",
        "dirty-sync-count",
        "dirty-pages-rate",
        "mbps",
        "pages-per-second",
        "precopy-bytes",
        "downtime-bytes",
    ] {
        assert!(value["ram"].get(key).is_some(), "missing ram.{key}");
    }
    for key in ["cache-size", "bytes", "pages", "cache-miss", "cache-miss-rate", "encoding-rate", "overflow"] {
        assert!(value["xbzrle-cache"].get(key).is_some(), "missing xbzrle-cache.{key}");
    }
    for key in ["pages", "compressed-size", "compression-rate"] {
        assert!(value["compression"].get(key).is_some(), "missing compression.{key}");
    }
    assert_eq!(value["status"], "completed");
    assert_eq!(value["verified"], true);
    assert_eq!(value["destination-guest"]["check"], "ok");
    assert!(value["destination-guest"]["writes-after-resume"].as_u64().unwrap() > 0);
    assert!(value["rounds"].as_array().unwrap().len() >= 2);
    assert!(
        value["guest-backing"].as_str().unwrap().starts_with("hugetlb") || value["guest-backing"] == "anonymous-thp"
    );
    // The default stack's polling cores, each side: busy for part of the time they ran.
    for side in ["source", "destination"] {
        let plane = &value["dataplane"][side];
        assert_eq!(plane["cores"], 1, "{side}");
        let (busy, running) = (plane["busy-seconds"].as_f64().unwrap(), plane["running-seconds"].as_f64().unwrap());
        assert!(busy > 0.0 && busy <= running, "{side}: busy {busy} s of {running} s");
    }
}

/// Rounds of 2 s (24 MiB at 100 Mbit/s) under a 1 s `--io-timeout`: connection 0 carries
/// nothing else from the destination while a round arrives, so only its heartbeats keep
/// the source from taking it for dead. Both stacks, since each has its own read timeout.
#[test]
fn rounds_longer_than_the_io_timeout_are_kept_alive_by_heartbeats() {
    for stack in ["kernel", "loopback"] {
        let mut demo = Command::new(BIN);
        demo.args(["demo", "--stack", stack, "--workload", "seq:1000", "--mem", "24MiB", "--verify"]);
        demo.args(["--max-bandwidth", "100mbit", "--io-timeout", "1", "--json", "--run-after", "0.2"]);
        // Pages as they are: adaptive would pack the sweeper's pages 100x, and the rounds
        // would be short.
        demo.args(["--codec", "none"]);
        let finished = run(&mut demo, DEADLINE);
        assert!(finished.status.success(), "{stack}: demo failed:\n{}", finished.stderr);
        let value = json(&finished.stdout);
        assert!(value["total-time"].as_f64().unwrap() > 2000.0, "{stack}: the rounds were not long: {value}");
        assert_eq!(value["verified"], true, "{stack}");
        assert_eq!(value["destination-guest"]["check"], "ok", "{stack}");
    }
}

#[test]
fn demo_prints_the_seed_table() {
    let finished =
        run(Command::new(BIN).args(["demo", "--mem", "32MiB", "--codec", "lz4", "--run-after", "0.1"]), DEADLINE);
    assert!(finished.status.success(), "demo failed:\n{}", finished.stderr);
    for heading in ["total time", "downtime", "transferred RAM", "total RAM", "stop-and-copy"] {
        assert!(finished.stdout.contains(heading), "missing {heading:?} in:\n{}", finished.stdout);
    }
}

#[test]
fn demo_over_dpdk_ports() {
    if !cfg!(feature = "dpdk") {
        eprintln!("SKIPPED demo_over_dpdk_ports: built without the dpdk feature (cargo test --features dpdk)");
        return;
    }
    if !is_root() {
        eprintln!("SKIPPED demo_over_dpdk_ports: DPDK's EAL needs root here");
        return;
    }
    // The default: a memif pair inside the process, one port per side, no hugepages, with
    // buffers that take whole segments.
    let finished = run(
        Command::new(BIN).args([
            "demo",
            "--stack",
            "dpdk",
            "--mem",
            "64MiB",
            "--verify",
            "--json",
            "--run-after",
            "0.3",
        ]),
        DEADLINE,
    );
    assert!(finished.status.success(), "demo over DPDK failed:\n{}", finished.stderr);
    assert_eq!(json(&finished.stdout)["verified"], true);
    for port in ["net_memif0", "net_memif1"] {
        let closed = format!("DPDK port {port} closed: all ");
        assert!(finished.stderr.contains(&closed), "{port}: no clean teardown in:\n{}", finished.stderr);
    }
    let moved = json(&finished.stdout)["ram"]["transferred"].as_u64().unwrap();
    assert_whole_segments(&finished.stderr, moved);
    assert!(!finished.stderr.contains("warning"), "{}", finished.stderr);
}

/// `--codec deflate` on DPDK's ISA-L compression device: over the in-process wire (the
/// demo starts an EAL for the device alone) and over a memif pair (one EAL for the ports
/// and the device); the destination inflates on its CPU. Without DPDK the codec is refused
/// with the way out; `--compress-device` with a codec that does not use it is refused in
/// any build.
#[test]
fn demo_compresses_on_a_dpdk_device() {
    let refused =
        run(Command::new(BIN).args(["demo", "--codec", "lz4", "--compress-device", "compress_isal0"]), DEADLINE);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("--codec lz4 does not use it"), "{}", refused.stderr);
    let socket = std::env::temp_dir().join(format!("vmigrate-deflate-{}.sock", std::process::id()));
    let listen = format!("unix:{}", socket.display());
    let relay = run(
        Command::new(BIN).args(["qemu-send", "--listen", &listen, "--to", "127.0.0.1:9", "--codec", "deflate"]),
        DEADLINE,
    );
    assert_eq!(relay.status.code(), Some(2), "{}", relay.stderr);
    assert!(relay.stderr.contains("which the relays do not drive"), "{}", relay.stderr);
    let deflate = |stack: &str| {
        let args =
            ["demo", "--stack", stack, "--codec", "deflate", "--mem", "64MiB", "--workload", "dirty:16MiB:2000:16"];
        run(Command::new(BIN).args(args).args(["--verify", "--json", "--run-after", "0.3"]), DEADLINE)
    };
    if !cfg!(feature = "dpdk") {
        let finished = deflate("loopback");
        assert_eq!(finished.status.code(), Some(2), "{}", finished.stderr);
        assert!(finished.stderr.contains("built without DPDK"), "{}", finished.stderr);
        assert!(finished.stderr.contains("--codec zlib"), "{}", finished.stderr);
        eprintln!("SKIPPED demo_compresses_on_a_dpdk_device: built without the dpdk feature");
        return;
    }
    if !is_root() {
        eprintln!("SKIPPED demo_compresses_on_a_dpdk_device: DPDK's EAL needs root here");
        return;
    }
    for stack in ["loopback", "dpdk"] {
        let finished = deflate(stack);
        assert!(finished.status.success(), "deflate over {stack} failed:\n{}", finished.stderr);
        let report = json(&finished.stdout);
        assert_eq!(report["verified"], true, "{stack}");
        assert_eq!(report["compress-device"], "compress_isal0", "{stack}");
        assert!(report["encode"]["device-pages"].as_u64() > Some(0), "{stack}: {}", report["encode"]);
        assert_eq!(report["encode"]["device-fallback-pages"], 0, "{stack}");
        assert!(report["destination"]["compressed-pages"].as_u64() > Some(0), "{stack}");
    }
    // Two processes, each with an EAL of its own: `send` compresses on ISA-L's device,
    // `recv` inflates on zlib's.
    let receiver = Receiver::start(BIN, &["--json", "--run-after", "0.3", "--compress-device", "compress_zlib0"]);
    let to = receiver.address.clone();
    let send = ["send", "--to", &to, "--mem", "64MiB", "--workload", "dirty:16MiB:2000:16", "--codec", "deflate"];
    let sent = run(Command::new(BIN).args(send).args(["--verify", "--json"]), DEADLINE);
    let received = receiver.wait(DEADLINE);
    assert_migrated(&sent, &received);
    let inflated = json(&received.stdout)["device-inflated-pages"].as_u64();
    assert_eq!(inflated, json(&sent.stdout)["compression"]["pages"].as_u64(), "{}", received.stdout);
}

/// DPDK with no kernel in the path: `recv` and `send` as two processes, each on its end of
/// a memif pair (shared memory; the receiver is the server of the memif socket), with and
/// without hugepages, one connection and four; with segments cut to the MTU and sent whole
/// (`--whole-segments`, which refuses a memif whose buffers cannot hold one).
#[test]
fn migrations_over_memif_between_two_processes() {
    if !cfg!(feature = "dpdk") {
        eprintln!("SKIPPED migrations_over_memif_between_two_processes: built without the dpdk feature");
        return;
    }
    if !is_root() {
        eprintln!("SKIPPED migrations_over_memif_between_two_processes: DPDK's EAL needs root here");
        return;
    }
    let socket = std::env::temp_dir().join(format!("vmigrate-memif-{}.sock", std::process::id()));
    let side = |role: &str, ip: &str, lcore: &str, run: MemifRun, tail: &[&str]| {
        let mut args: Vec<String> =
            ["--stack", "dpdk", "--iface", "net_memif0", "--ip", ip, "--dataplane-cores", run.cores]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(tail.iter().map(|s| s.to_string()));
        if run.whole {
            args.push("--whole-segments".into());
        }
        args.extend(["--", "--no-pci", "--log-level=error", "-m", "256", "-l", lcore].map(String::from));
        if !run.hugepages {
            args.push("--no-huge".into());
        }
        args.push(format!("--file-prefix=vmigrate-memif-{}-{role}", std::process::id()));
        let buffers = if run.whole { ",bsize=65535,rsize=8" } else { "" };
        args.push(format!("--vdev=net_memif0,role={role},id=0,socket={}{buffers}", socket.display()));
        args
    };
    // --whole-segments on a memif of the default 2 KiB buffers: refused, saying what to add.
    let small = MemifRun { hugepages: false, connections: "1", cores: "1", whole: false };
    let mut refused = side("server", "10.77.0.12/24", "0", small, &["--listen", "10.77.0.12:4699"]);
    refused.insert(0, "--whole-segments".into());
    let refused = run(Command::new(BIN).arg("recv").args(refused), DEADLINE);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("add bsize=65535 to its --vdev"), "{}", refused.stderr);
    let _ = std::fs::remove_file(&socket);
    let runs = [
        MemifRun { hugepages: false, connections: "1", cores: "1", whole: false },
        MemifRun { hugepages: false, connections: "4", cores: "1", whole: false },
        MemifRun { hugepages: true, connections: "2", cores: "1", whole: false },
        MemifRun { hugepages: false, connections: "4", cores: "2", whole: false },
        MemifRun { hugepages: false, connections: "2", cores: "1", whole: true },
    ];
    for (run_index, memif) in runs.into_iter().enumerate() {
        let (connections, cores) = (memif.connections, memif.cores);
        let port = 4700 + run_index;
        let listen = format!("10.77.0.12:{port}");
        let mut recv = Command::new(BIN);
        recv.args(["recv", "--json", "--run-after", "0.3"]).args(side(
            "server",
            "10.77.0.12/24",
            "0",
            memif,
            &["--listen", &listen],
        ));
        let receiver = Receiver::spawn(recv);
        let mut send = Command::new(BIN);
        send.args(["send", "--mem", "64MiB", "--workload", "dirty:32MiB:5000:16", "--verify", "--json"]).args(side(
            "client",
            "10.77.0.11/24",
            "1",
            memif,
            &["--to", &listen, "--connections", connections],
        ));
        let sent = run(&mut send, DEADLINE);
        let received = receiver.wait(DEADLINE);
        assert_migrated(&sent, &received);
        for output in [&sent, &received] {
            assert!(
                output.stderr.contains("DPDK port net_memif0 closed: all "),
                "no clean teardown:\n{}",
                output.stderr
            );
            assert!(!output.stderr.contains("warning"), "{}", output.stderr);
        }
        let both = format!("{}{}", sent.stderr, received.stderr);
        if memif.whole {
            assert_whole_segments(&both, json(&sent.stdout)["ram"]["transferred"].as_u64().unwrap());
        } else {
            // The sender's segments were cut, the receiver's frames merged.
            assert_large_segments_both_ways(&both);
        }
        if cores != "1" {
            // memif's queue k at one end is queue k at the other, and both ends steer by
            // the same rule: every frame arrives on the core that owns its flow.
            for output in [&sent, &received] {
                let none_moved = output.stderr.lines().filter(|line| line.contains("dpdk: 0 of ")).count();
                assert_eq!(none_moved, 2, "frames moved between cores:\n{}", output.stderr);
            }
        }
        let _ = std::fs::remove_file(&socket);
    }
}

/// One run of `migrations_over_memif_between_two_processes`.
#[derive(Clone, Copy)]
struct MemifRun {
    hugepages: bool,
    connections: &'static str,
    /// Dataplane cores a side.
    cores: &'static str,
    whole: bool,
}

/// The libraries speak through the log facade; the binary shows info and up by default,
/// debug lines with -v, warnings only with -q, and what RUST_LOG asks for per crate.
#[test]
fn verbosity_follows_v_q_and_rust_log() {
    let demo = |flags: &[&str], rust_log: Option<&str>| {
        let mut command = Command::new(BIN);
        command.args(flags).args(["demo", "--mem", "16MiB", "--run-after", "0.1"]).env_remove("RUST_LOG");
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let finished = run(&mut command, DEADLINE);
        assert!(finished.status.success(), "demo {flags:?} failed:\n{}", finished.stderr);
        finished.stderr
    };
    let round_line = "vmigrate: DEBUG vmigrate_engine::source::scanner: round finished";
    let plain = demo(&[], None);
    assert!(!plain.contains("DEBUG"), "debug lines by default:\n{plain}");
    let verbose = demo(&["-v"], None);
    assert!(verbose.contains(round_line) && verbose.contains(" round=1 "), "no round lines with -v:\n{verbose}");
    let filtered = demo(&[], Some("vmigrate_engine=debug"));
    assert!(filtered.contains(round_line), "RUST_LOG=vmigrate_engine=debug ignored:\n{filtered}");
    // -q leaves warnings and errors: a source whose destination is not there says why it
    // failed, but not (an info line) that its guest runs on.
    let refused = |flag: &[&str]| {
        let mut command = Command::new(BIN);
        command.args(flag).args(["send", "--to", "127.0.0.1:1", "--mem", "16MiB"]).env_remove("RUST_LOG");
        let finished = run(&mut command, DEADLINE);
        assert!(!finished.status.success());
        finished.stderr
    };
    assert!(refused(&[]).contains("vmigrate: source guest keeps running"));
    let quiet = refused(&["-q"]);
    assert!(!quiet.contains("keeps running"), "-q still shows info lines:\n{quiet}");
    assert!(quiet.contains("vmigrate: error: migration failed"), "-q hid the error:\n{quiet}");
    // Announcements that callers wait for are not log lines: -q keeps them.
    let mut lonely = Command::new(BIN);
    lonely.args(["-q", "recv", "--listen", "127.0.0.1:0", "--accept-timeout", "0.2"]);
    assert!(run(&mut lonely, DEADLINE).stderr.contains("vmigrate: waiting for a migration on 127.0.0.1:"));
}

#[test]
fn trusting_received_checksums_still_catches_corruption_by_the_stream_crc() {
    // Our stack skips its IPv4/TCP receive checks; a corrupted frame then reaches the
    // migration stream, whose per-frame CRC must refuse it: a clean failure, no guest.
    let finished = run(
        Command::new(BIN).args(["demo", "--mem", "32MiB", "--checksum", "trust-receive", "--fault-corrupt", "1"]),
        DEADLINE,
    );
    assert!(!finished.status.success(), "a corrupted migration was accepted:\n{}", finished.stdout);
    assert!(finished.stderr.contains("checksum mismatch"), "unexpected failure:\n{}", finished.stderr);
    // With the stack's own checks the same faults are dropped and retransmitted.
    let finished =
        run(Command::new(BIN).args(["demo", "--mem", "32MiB", "--fault-corrupt", "1", "--verify"]), DEADLINE);
    assert!(finished.status.success(), "demo with full checksums failed:\n{}", finished.stderr);
}

fn two_processes(workload: &str, extra: &[&str]) {
    let receiver = Receiver::start(BIN, &["--json", "--run-after", "0.3", "--decompress-threads", "2"]);
    let mut send_args =
        vec!["send", "--to", receiver.address.as_str(), "--mem", "64MiB", "--workload", workload, "--verify", "--json"];
    send_args.extend_from_slice(extra);
    let sender = run(Command::new(BIN).args(&send_args), DEADLINE);
    let received = receiver.wait(DEADLINE);
    assert_migrated(&sender, &received);
}

#[test]
fn send_and_recv_in_two_processes() {
    two_processes("seq", &[]);
}

/// The kernel's socket tuning for links: the sender's unsent limit and the listener's
/// fixed receive buffer; the migration verifies with both.
#[test]
fn send_and_recv_with_an_unsent_limit_and_a_receive_buffer() {
    let receiver = Receiver::start(BIN, &["--json", "--run-after", "0.3", "--receive-buffer", "256KiB"]);
    let sender = run(
        Command::new(BIN)
            .args(["send", "--to", receiver.address.as_str(), "--mem", "64MiB", "--workload", "seq"])
            .args(["--verify", "--json", "--unsent-limit", "64KiB"]),
        DEADLINE,
    );
    let received = receiver.wait(DEADLINE);
    assert_migrated(&sender, &received);
}

#[test]
fn send_and_recv_four_connections_zlib_xbzrle() {
    two_processes(
        "dirty:16MiB:5000:16",
        &[
            "--connections",
            "4",
            "--codec",
            "zlib",
            "--xbzrle-cache",
            "8MiB",
            "--downtime-limit",
            "1",
            "--max-rounds",
            "3",
        ],
    );
}

#[test]
fn addresses_as_qemu_writes_them_and_xbzrle_turned_on_as_on_the_relays() {
    // `tcp:` addresses on both ends; --xbzrle alone turns XBZRLE on with QEMU's 64 MiB.
    let receiver = Receiver::spawn({
        let mut command = Command::new(BIN);
        command.args(["recv", "--listen", "tcp:127.0.0.1:0", "--json", "--run-after", "0.3"]);
        command
    });
    let to = format!("tcp:{}", receiver.address);
    let sender = run(
        Command::new(BIN)
            .args(["send", "--to", &to, "--mem", "64MiB", "--workload", "dirty:16MiB:5000:16", "--verify", "--json"])
            .args(["--xbzrle", "--codec", "none", "--downtime-limit", "1", "--max-rounds", "3"]),
        DEADLINE,
    );
    let received = receiver.wait(DEADLINE);
    let (sent, _) = assert_migrated(&sender, &received);
    assert_eq!(sent["xbzrle-cache"]["cache-size"], 64u64 << 20, "{sent}");
    let bad = run(Command::new(BIN).args(["send", "--to", "tcp:nowhere", "--mem", "16MiB"]), DEADLINE);
    assert_eq!(bad.code(), 2, "a malformed address is a usage error: {}", bad.stderr);
}

#[test]
fn a_running_migrations_metrics_parse_with_prometheus_own_parser() {
    if !metrics::parser_available() {
        eprintln!(
            "SKIPPED a_running_migrations_metrics_parse_with_prometheus_own_parser: no python3-prometheus-client"
        );
        return;
    }
    let receiver = Receiver::start(BIN, &["--run-after", "0.1", "--metrics", "127.0.0.1:0"]);
    let incoming = metrics::announced(receiver.announced_so_far()).expect("recv served no metrics");
    // 256 MiB at 400 Mbit/s, pages as they are, a guest that dirties little: seconds of
    // bulk stage to scrape in, then a quick end.
    let mut send = Command::new(BIN)
        .args(["send", "--to", &receiver.address, "--mem", "256MiB", "--workload", "seq:1000"])
        .args(["--max-bandwidth", "400mbit"])
        .args(["--codec", "none", "--metrics", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start send");
    let mut stderr = std::io::BufReader::new(send.stderr.take().expect("stderr"));
    let mut line = String::new();
    while metrics::announced(&line).is_none() {
        line.clear();
        assert!(stderr.read_line(&mut line).expect("send's stderr") > 0, "send never served its metrics");
    }
    let outgoing = metrics::announced(&line).expect("announced");
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    // Two scrapes of each end while the bulk stage runs: the counters grow between them.
    let mut parsed = Vec::new();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(700));
        parsed.push((metrics::scrape_parsed(&outgoing), metrics::scrape_parsed(&incoming)));
    }
    let transferred =
        |(sent, _): &(serde_json::Value, _)| metrics::sample(sent, "vmigrate_migration_transferred_bytes_total{}");
    assert!(transferred(&parsed[0]) > 0.0, "{:?}", parsed[0]);
    assert!(transferred(&parsed[1]) > transferred(&parsed[0]), "the counter did not grow");
    let received =
        |(_, received): &(_, serde_json::Value)| metrics::sample(received, "vmigrate_incoming_received_bytes_total{}");
    assert!(received(&parsed[0]) > 0.0, "{:?}", parsed[0].1);
    assert!(received(&parsed[1]) > received(&parsed[0]), "the destination's counter did not grow");
    let (sent, incoming) = &parsed[1];
    assert_eq!(metrics::sample(incoming, "vmigrate_incoming_ram_bytes{}"), (256u64 << 20) as f64, "{incoming}");
    assert!(metrics::sample(sent, "vmigrate_migration_pages_total{\"kind\": \"raw\"}") > 0.0, "{sent}");
    for name in ["vmigrate_migration_expected_downtime_seconds{}", "vmigrate_migration_downtime_limit_seconds{}"] {
        assert!(sent[name].is_number(), "{name} missing: {sent}");
    }
    // The kernel's TCP: no dataplane cores to report.
    assert!(metrics::samples(sent, "vmigrate_dataplane_core_busy_seconds_total").is_empty(), "{sent}");
    assert!(send.wait().expect("send").success());
    receiver.wait(DEADLINE);
}

#[test]
fn man_pages_and_completions_come_from_the_command_line_itself() {
    let dir = std::env::temp_dir().join(format!("vmigrate-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let made = run(Command::new(BIN).arg("man").arg(&dir), DEADLINE);
    assert!(made.status.success(), "{}", made.stderr);
    // A page per command, each naming its options as --help does.
    for (page, option) in [
        ("vmigrate.1", "Exit status"),
        ("vmigrate-send.1", "downtime\\-limit"),
        ("vmigrate-recv.1", "accept\\-timeout"),
        ("vmigrate-qemu-recv.1", "listen"),
        ("vmigrate-qemu-migrate.1", "max\\-bandwidth"),
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is not a man page:\n{text}");
        assert!(text.contains(option), "{page} does not mention {option}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // The bash completion script parses, and completes the commands and their options.
    let script = run(Command::new(BIN).args(["completions", "bash"]), DEADLINE);
    assert!(script.status.success(), "{}", script.stderr);
    for word in ["qemu-migrate", "--downtime-limit", "--xbzrle-cache"] {
        assert!(script.stdout.contains(word), "the completions lack {word}");
    }
    let path = std::env::temp_dir().join(format!("vmigrate-completion-{}.bash", std::process::id()));
    std::fs::write(&path, &script.stdout).unwrap();
    let parsed = run(Command::new("bash").arg("-n").arg(&path), DEADLINE);
    let _ = std::fs::remove_file(&path);
    assert!(parsed.status.success(), "bash cannot parse the completions: {}", parsed.stderr);
}

#[test]
fn link_benchmark_streams_count_every_byte() {
    // The polling core moving the bytes itself (the default), and the application's
    // threads through the pipe.
    for pump in [None, Some("--connection-threads")] {
        let looped =
            run(Command::new(BIN).args(["stream-loopback", "--bytes", "16MiB", "--no-pin"]).args(pump), DEADLINE);
        assert!(looped.status.success(), "{pump:?}: {}", looped.stderr);
        let value = json(&looped.stdout);
        assert_eq!(value["bytes"], 16 << 20, "{pump:?}");
        assert!(value["gbit-per-s"].as_f64().unwrap() > 0.0);
        // Counted (not asserted zero: a sender not scheduled for the RTO floor retransmits).
        assert!(value["retransmissions"].is_u64(), "{pump:?}: {value}");
    }

    let mut command = Command::new(BIN);
    command.args(["stream-recv", "--listen", "127.0.0.1:0"]);
    let receiver = vmigrate_tests::process::Receiver::spawn_announcing(command, "vmigrate: waiting for a stream on ");
    let sent = run(Command::new(BIN).args(["stream-send", "--to", &receiver.address, "--bytes", "8MiB"]), DEADLINE);
    let received = receiver.wait(DEADLINE);
    assert!(sent.status.success(), "{}", sent.stderr);
    assert!(received.status.success(), "{}", received.stderr);
    assert_eq!(json(&received.stdout)["bytes"], 8 << 20);

    // Three streams in parallel: both ends count all of them.
    let mut command = Command::new(BIN);
    command.args(["stream-recv", "--listen", "127.0.0.1:0", "--streams", "3"]);
    let receiver = vmigrate_tests::process::Receiver::spawn_announcing(command, "vmigrate: waiting for a stream on ");
    let sent = run(
        Command::new(BIN).args(["stream-send", "--to", &receiver.address, "--bytes", "8MiB", "--streams", "3"]),
        DEADLINE,
    );
    let received = receiver.wait(DEADLINE);
    assert!(sent.status.success(), "{}", sent.stderr);
    assert!(received.status.success(), "{}", received.stderr);
    assert_eq!(json(&sent.stdout)["bytes"], 3 * (8 << 20));
    assert_eq!(json(&received.stdout)["bytes"], 3 * (8 << 20));
}

/// `vmigrate send` cancelled mid-migration, by `how`: "SIGINT", "SIGTERM" or the control
/// socket's `cancel`. One clear error on each side; the source guest runs on; the
/// destination resumes nothing.
fn cancel_a_running_send(how: &str) {
    let receiver = Receiver::start(BIN, &["--json", "--run-after", "0.3"]);
    let control = std::env::temp_dir().join(format!("vmigrate-control-{}-{how}.sock", std::process::id()));
    let control_arg = format!("unix:{}", control.display());
    // 256 MiB at 50 MB/s, pages as they are: seconds of bulk stage to cancel in.
    let send = Command::new(BIN)
        .args(["send", "--to", &receiver.address, "--mem", "256MiB", "--workload", "seq", "--max-bandwidth", "400mbit"])
        .args(["--codec", "none"])
        .args(["--control", &control_arg])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start send");
    // Under way: the control socket reports the bulk stage.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(stream) = std::os::unix::net::UnixStream::connect(&control) {
            let mut writer = stream.try_clone().expect("clone");
            writeln!(writer, "status").expect("ask status");
            let mut line = String::new();
            std::io::BufReader::new(stream).read_line(&mut line).expect("status answer");
            if line.contains("\"bulk\"") {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the migration never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    match how {
        "SIGINT" | "SIGTERM" => {
            let status = Command::new("kill").args([&format!("-{}", &how[3..]), &send.id().to_string()]).status();
            assert!(status.expect("kill").success());
        }
        _ => {
            let stream = std::os::unix::net::UnixStream::connect(&control).expect("control socket");
            let mut writer = stream.try_clone().expect("clone");
            writeln!(writer, "cancel").expect("cancel");
            let mut line = String::new();
            std::io::BufReader::new(stream).read_line(&mut line).expect("answer");
            assert_eq!(line.trim(), "ok");
        }
    }
    let sent = vmigrate_tests::process::wait(send, DEADLINE, String::new());
    // Exit statuses (docs/exit-codes.md): cancelled here, the peer gave up there.
    let error = sent.assert_failure_with(6);
    assert!(error.contains("migration cancelled"), "{how}: {error}");
    assert!(sent.stderr.contains("source guest keeps running"), "{how}: {}", sent.stderr);
    assert!(!control.exists(), "{how}: the control socket was left behind");
    let received = receiver.wait(DEADLINE);
    let destination_error = received.assert_failure_with(7);
    assert!(destination_error.contains("the source aborted: migration cancelled"), "{how}: {destination_error}");
}

/// Bytes per second the migration moved over `span`, by `query-migrate`.
fn rate_over(socket: &std::path::Path, span: Duration) -> f64 {
    rate_of(socket, "transferred", span)
}

/// Bytes per second over `span` by `query-migrate`'s `field` (a byte count).
fn rate_of(socket: &std::path::Path, field: &str, span: Duration) -> f64 {
    let query = r#"{"execute": "query-migrate"}"#;
    let before = control::command(socket, query)["return"].clone();
    std::thread::sleep(span);
    let after = control::command(socket, query)["return"].clone();
    let bytes = after[field].as_f64().unwrap() - before[field].as_f64().unwrap();
    let ms = after["elapsed-ms"].as_f64().unwrap() - before["elapsed-ms"].as_f64().unwrap();
    bytes / ms.max(1.0) * 1000.0
}

#[test]
fn the_control_socket_changes_a_running_migration() {
    let receiver = Receiver::start(BIN, &["--json", "--run-after", "0.3"]);
    let control = std::env::temp_dir().join(format!("vmigrate-tune-{}.sock", std::process::id()));
    // 256 MiB at 800 Mbit/s, pages as they are, a guest that dirties little.
    let send = Command::new(BIN)
        .args(["send", "--to", &receiver.address, "--mem", "256MiB", "--workload", "seq:1000", "--verify", "--json"])
        .args(["--codec", "none", "--max-bandwidth", "800mbit"])
        .arg("--control")
        .arg(format!("unix:{}", control.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start send");
    let deadline = std::time::Instant::now() + DEADLINE;
    while !control.exists()
        || control::command(&control, r#"{"execute": "query-migrate"}"#)["return"]["stage"] != "bulk"
    {
        assert!(std::time::Instant::now() < deadline, "the migration never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A client in QMP's command mode only listens from then on: it gets the events.
    let events = listen_for_events(&control);
    let unknown = control::command(&control, r#"{"execute": "migrate-pause"}"#);
    assert_eq!(unknown["error"]["class"], "CommandNotFound", "{unknown}");
    // A lower cap slows the running migration at once: 800 Mbit/s to 80.
    let fast = rate_over(&control, Duration::from_millis(600));
    let set = control::command(
        &control,
        r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 10000000}}"#,
    );
    assert_eq!(set, serde_json::json!({ "return": {} }));
    std::thread::sleep(Duration::from_millis(200));
    let slow = rate_over(&control, Duration::from_millis(600));
    eprintln!("rate {fast:.0} B/s, then {slow:.0} B/s under a cap of 10 MB/s");
    assert!(slow < fast / 3.0, "the rate went from {fast:.0} to {slow:.0} B/s under a cap of 10 MB/s");
    // The cap lifted and the switchover forced: the bulk round ends where it stands and
    // the rest goes in the stop-and-copy.
    control::command(
        &control,
        r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 0, "downtime-limit": 5000}}"#,
    );
    let forced = control::command(&control, r#"{"execute": "migrate-switchover"}"#);
    assert_eq!(forced, serde_json::json!({ "return": {} }));
    let sent = vmigrate_tests::process::wait(send, DEADLINE, String::new());
    let received = receiver.wait(DEADLINE);
    let (report, _) = assert_migrated(&sent, &received);
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "the bulk round, then the stop-and-copy: {rounds:?}");
    let (bulk, last) = (rounds[0]["pages"].as_u64().unwrap(), rounds[1]["pages"].as_u64().unwrap());
    assert!(bulk < 65_536, "the bulk round sent all {bulk} pages: it was not cut short");
    assert!(bulk + last >= 65_536, "{bulk} + {last} pages: some were lost");
    eprintln!("switchover forced: {bulk} pages in the bulk round, {last} in the stop-and-copy");
    // QMP's events, stamped: the last says the migration completed.
    assert_ends_completed(&events.join().expect("the listening client"));
}

/// `recv --control` and a source started with no control socket of its own: waits until
/// pages arrive; the receiver and its control socket's path.
fn receive_under_control(name: &str, cap: &str) -> (Receiver, std::process::Child, std::path::PathBuf) {
    let control = std::env::temp_dir().join(format!("vmigrate-{name}-{}.sock", std::process::id()));
    let control_arg = format!("unix:{}", control.display());
    let receiver = Receiver::start(BIN, &["--json", "--run-after", "0.3", "--control", &control_arg]);
    // 256 MiB, pages as they are, a guest that dirties little.
    let send = Command::new(BIN)
        .args(["send", "--to", &receiver.address, "--mem", "256MiB", "--workload", "seq:1000", "--verify", "--json"])
        .args(["--codec", "none", "--max-bandwidth", cap])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start send");
    let deadline = std::time::Instant::now() + DEADLINE;
    while !control.exists()
        || control::command(&control, r#"{"execute": "query-migrate"}"#)["return"]["received"].as_u64().unwrap_or(0)
            == 0
    {
        assert!(std::time::Instant::now() < deadline, "the migration never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    (receiver, send, control)
}

/// The destination's operator changes the migration: the source applies what `recv`'s
/// control socket was told.
#[test]
fn the_destinations_control_socket_changes_the_migration_at_the_source() {
    let (receiver, send, control) = receive_under_control("recv-tune", "800mbit");
    let events = listen_for_events(&control);
    let fast = rate_of(&control, "received", Duration::from_millis(600));
    let set = control::command(
        &control,
        r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 10000000}}"#,
    );
    assert_eq!(set, serde_json::json!({ "return": {} }));
    std::thread::sleep(Duration::from_millis(300));
    let slow = rate_of(&control, "received", Duration::from_millis(600));
    eprintln!("received {fast:.0} B/s, then {slow:.0} B/s under a cap of 10 MB/s set at the destination");
    assert!(slow < fast / 3.0, "the rate went from {fast:.0} to {slow:.0} B/s under a cap of 10 MB/s");
    control::command(
        &control,
        r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 0, "downtime-limit": 5000}}"#,
    );
    let forced = control::command(&control, r#"{"execute": "migrate-switchover"}"#);
    assert_eq!(forced, serde_json::json!({ "return": {} }));
    let sent = vmigrate_tests::process::wait(send, DEADLINE, String::new());
    let received = receiver.wait(DEADLINE);
    let (report, _) = assert_migrated(&sent, &received);
    assert!(sent.stderr.contains("bandwidth cap set to 10000000 bytes/s by the destination"), "{}", sent.stderr);
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "the bulk round, then the stop-and-copy: {rounds:?}");
    let bulk = rounds[0]["pages"].as_u64().unwrap();
    assert!(bulk < 65_536, "the bulk round sent all {bulk} pages: it was not cut short");
    assert_ends_completed(&events.join().expect("the listening client"));
    assert!(!control.exists(), "the control socket was left behind");
}

/// The destination's operator cancels: the source is told why and its guest runs on.
#[test]
fn the_destinations_control_socket_cancels_the_migration() {
    let (receiver, send, control) = receive_under_control("recv-cancel", "400mbit");
    let events = listen_for_events(&control);
    let cancelled = control::command(&control, r#"{"execute": "migrate_cancel"}"#);
    assert_eq!(cancelled, serde_json::json!({ "return": {} }));
    let received = receiver.wait(DEADLINE);
    let error = received.assert_failure_with(6);
    assert!(error.contains("migration cancelled"), "{error}");
    let sent = vmigrate_tests::process::wait(send, DEADLINE, String::new());
    // Exit statuses (docs/exit-codes.md): cancelled here, the peer gave up there.
    let source_error = sent.assert_failure_with(7);
    assert!(source_error.contains("cancelled on the control socket"), "{source_error}");
    assert!(sent.stderr.contains("source guest keeps running"), "{}", sent.stderr);
    let events = events.join().expect("the listening client");
    let last = events.last().expect("no event");
    assert_eq!(last["data"]["status"], "cancelled", "{events:?}");
}

#[test]
fn sigint_sigterm_and_the_control_socket_cancel_a_migration() {
    for how in ["SIGINT", "SIGTERM", "control"] {
        cancel_a_running_send(how);
    }
}

#[test]
fn bench_writes_the_table_json_and_charts() {
    let report = std::env::temp_dir().join(format!("vmigrate-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&report);
    let finished = run(
        Command::new(BIN)
            .args(["bench", "--verify", "--mem", "64MiB", "--dirty-area", "16MiB", "--rows", "plain,zstd,xbzrle"])
            .arg("--report")
            .arg(&report),
        DEADLINE,
    );
    assert!(finished.status.success(), "bench failed:\n{}", finished.stderr);
    for heading in ["total s", "downtime", "transferred", "total RAM", "CPU src", "CPU dst", "vs plain"] {
        assert!(finished.stdout.contains(heading), "missing {heading:?}:\n{}", finished.stdout);
    }
    let value = json(&std::fs::read_to_string(report.join("bench.json")).expect("bench.json"));
    let runs = value["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 6, "two guests, three rows");
    for run in runs {
        assert_eq!(run["verified"], true, "{run}");
        assert!(run["total-time-ms"].as_u64().unwrap() > 0);
        assert_eq!(run["total-bytes"], 64 << 20);
        assert!(run["source-cpu-seconds"].as_f64().is_some());
        assert!(!run["rounds"].as_array().unwrap().is_empty());
    }
    // The dirty guest's pages are random 16-bit numbers: zstd shrinks them, so it sends less.
    let sent = |row: &str| {
        runs.iter().find(|r| r["guest"] == "dirty" && r["row"] == row).unwrap()["transferred-bytes"].as_u64().unwrap()
    };
    assert!(sent("zstd") < sent("plain"), "zstd {} plain {}", sent("zstd"), sent("plain"));
    for chart in ["total-time.svg", "rounds-idle.svg", "rounds-dirty.svg"] {
        let svg = std::fs::read_to_string(report.join(chart)).unwrap_or_else(|e| panic!("{chart}: {e}"));
        assert!(svg.starts_with("<svg") && svg.contains("plain"), "{chart} is not a chart");
    }
    check_html_report(&report.join("report.html"), runs.len());
    let _ = std::fs::remove_dir_all(report);
}

/// The bench's one-page report: its table holds every run and its charts are inline; in
/// headless Chromium (where installed: CI installs it) the table is in the page as the
/// browser built it, and the screenshot is not blank.
fn check_html_report(page: &std::path::Path, runs: usize) {
    let html = std::fs::read_to_string(page).expect("report.html");
    assert!(html.contains("<table id=\"runs\">"), "no table in report.html");
    assert_eq!(html.matches("<tr><td>").count(), runs, "a table row per run");
    assert_eq!(html.matches("<svg").count(), 3, "the three charts inline");
    if Command::new("chromium").arg("--version").output().is_err() {
        eprintln!("SKIPPED opening report.html in a browser: no chromium (Debian's chromium package)");
        return;
    }
    let url = format!("file://{}", page.display());
    let headless = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600"];
    let dom = run(Command::new("chromium").args(headless).args(["--dump-dom", &url]), DEADLINE);
    assert!(
        dom.stdout.contains("<table id=\"runs\">") && dom.stdout.contains("zstd"),
        "the browser's page lacks the table"
    );
    let shot = page.with_file_name("report.png");
    let taken = run(
        Command::new("chromium").args(headless).arg(format!("--screenshot={}", shot.display())).arg(&url),
        DEADLINE,
    );
    assert!(shot.exists(), "no screenshot: {}", taken.stderr);
    let decoder = png::Decoder::new(std::fs::File::open(&shot).expect("screenshot"));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).expect("the PNG's pixels");
    let pixels = &pixels[..frame.buffer_size()];
    let step = frame.color_type.samples();
    let inked = pixels.chunks(step).filter(|p| p.iter().take(3).any(|&c| c < 200)).count();
    let share = inked as f64 / (pixels.len() / step) as f64;
    // Text, table borders and chart lines: a few percent of the page at least, far from all.
    assert!((0.01..0.9).contains(&share), "the screenshot looks blank or black: {:.1}% inked", share * 100.0);
}

#[test]
fn a_guest_booted_from_a_memory_image_migrates_its_pages() {
    // A 16 MiB image: 300 pages of text at scattered places, the rest zero.
    let image = std::env::temp_dir().join(format!("vmigrate-image-{}.img", std::process::id()));
    let mut bytes = vec![0u8; 16 << 20];
    for i in 0..300usize {
        let at = (i * 13 % 4096) * 4096;
        let text = format!("page {i} of a guest image ");
        for (j, b) in text.bytes().cycle().take(4096).enumerate() {
            bytes[at + j] = b;
        }
    }
    std::fs::write(&image, &bytes).unwrap();
    let finished = run(
        Command::new(BIN)
            .args(["demo", "--mem", "32MiB", "--verify", "--json", "--run-after", "0.1", "--image"])
            .arg(&image),
        DEADLINE,
    );
    assert!(finished.status.success(), "demo from an image failed:\n{}", finished.stderr);
    let value = json(&finished.stdout);
    assert_eq!(value["verified"], true);
    assert_eq!(value["ram"]["normal"], 300, "the image's 300 pages, no more: {}", value["ram"]);
    // Larger than the guest: refused with a clear error.
    let too_small = run(Command::new(BIN).args(["demo", "--mem", "8MiB", "--image"]).arg(&image), DEADLINE);
    let error = too_small.assert_clean_failure();
    assert!(error.contains("larger than the guest"), "{error}");
    let _ = std::fs::remove_file(image);
}
