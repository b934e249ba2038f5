//! The relays' control sockets (docs/control.md) driving a real QEMU migration: the
//! sweeper (tests/guests/sweeper.S) under TCG, carried by `qemu-send` and `qemu-recv` over
//! the kernel's TCP on loopback. A bandwidth cap set on either relay changes the rate; a
//! switchover asked for at the destination relay reaches the source QEMU (`qemu-send
//! --qmp`); a cancel on either relay fails QEMU's migration, and the source guest runs on.
//! Needs QEMU; a run without it says SKIPPED.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmigrate_tests::control::{self, assert_ends_completed, listen_for_events};
use vmigrate_tests::metrics;
use vmigrate_tests::process::{json, Finished, Receiver};
use vmigrate_tests::qemu::{
    check_migrated, configure_migration_with, qemu_available, sweeper_image, wait_migration, Sweepers, Vm,
};

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(180);

/// The relay pair for one migration, each with a control socket.
struct Relays {
    recv: Receiver,
    send: Receiver,
    recv_control: PathBuf,
    send_control: PathBuf,
    /// Where the source QEMU migrates to.
    socket: String,
}

impl Relays {
    /// Relays from `source` to `destination` (its incoming socket), in `dir`, tagged `tag`.
    fn start(dir: &Path, tag: &str, source: &Vm, destination: &Vm) -> Relays {
        let (recv_control, send_control) = (dir.join(format!("{tag}-recv.ctl")), dir.join(format!("{tag}-send.ctl")));
        let unix = |path: &Path| format!("unix:{}", path.display());
        let incoming = unix(&destination.dir.join("incoming.sock"));
        let mut recv = Command::new(BIN);
        recv.args(["qemu-recv", "--listen", "127.0.0.1:0", "--to", &incoming, "--json"]).args([
            "--control",
            &unix(&recv_control),
            "--metrics",
            "127.0.0.1:0",
        ]);
        let recv = Receiver::spawn_announcing(recv, "vmigrate: waiting for the source relay on ");
        let listen = dir.join(format!("{tag}-relay.sock"));
        let mut send = Command::new(BIN);
        send.args(["qemu-send", "--listen", &unix(&listen), "--to", &recv.address, "--codec", "none", "--json"])
            .args(["--control", &unix(&send_control), "--qmp", &unix(&source.control_socket())])
            .args(["--metrics", "127.0.0.1:0"]);
        let send = Receiver::spawn_announcing(send, "vmigrate: waiting for QEMU on ");
        Relays { recv, send, recv_control, send_control, socket: unix(&listen) }
    }

    /// Scrapes both relays' metrics: (qemu-send's, qemu-recv's), parsed.
    fn scrape(&self) -> (serde_json::Value, serde_json::Value) {
        let parsed = |relay: &Receiver| {
            let address = metrics::announced(relay.announced_so_far()).expect("the relay served no metrics");
            metrics::scrape_parsed(&address)
        };
        (parsed(&self.send), parsed(&self.recv))
    }

    /// The two relays' ends: (qemu-send, qemu-recv).
    fn wait(self) -> (Finished, Finished) {
        (self.send.wait(DEADLINE), self.recv.wait(DEADLINE))
    }
}

/// `migrate-set-parameters` with `arguments` on the control socket at `socket`.
fn set(socket: &Path, arguments: serde_json::Value) {
    let line = serde_json::json!({ "execute": "migrate-set-parameters", "arguments": arguments }).to_string();
    assert_eq!(control::command(socket, &line), serde_json::json!({ "return": {} }));
}

/// Bytes per second of QEMU's stream through the source relay over `span`.
fn rate(socket: &Path, span: Duration) -> f64 {
    let query = r#"{"execute": "query-migrate"}"#;
    let before = control::command(socket, query)["return"].clone();
    std::thread::sleep(span);
    let after = control::command(socket, query)["return"].clone();
    let bytes = after["transferred"].as_f64().unwrap() - before["transferred"].as_f64().unwrap();
    let ms = after["elapsed-ms"].as_f64().unwrap() - before["elapsed-ms"].as_f64().unwrap();
    bytes / ms.max(1.0) * 1000.0
}

/// Waits until the source relay has carried some of QEMU's stream.
fn wait_carrying(socket: &Path) {
    let deadline = Instant::now() + DEADLINE;
    while control::command(socket, r#"{"execute": "query-migrate"}"#)["return"]["transferred"].as_u64().unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the relays never carried anything");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts QEMU's migration of `sweepers`' source through `relays`.
fn migrate(sweepers: &mut Sweepers, relays: &Relays) {
    let incoming = format!("unix:{}", sweepers.destination.dir.join("incoming.sock").display());
    let uri = serde_json::json!({ "uri": incoming });
    sweepers.destination_qmp.execute("migrate-incoming", uri).expect("migrate-incoming");
    let uri = serde_json::json!({ "uri": relays.socket });
    sweepers.source_qmp.execute("migrate", uri).expect("migrate");
}

#[test]
fn the_relays_control_sockets_change_a_running_qemu_migration() {
    if !qemu_available() {
        eprintln!("SKIPPED the_relays_control_sockets_change_a_running_qemu_migration: QEMU not installed");
        return;
    }
    let mut sweepers = Sweepers::start("relay-tune");
    configure_migration_with(&mut sweepers.source_qmp, &mut sweepers.destination_qmp, None, 8 << 30, false);
    let relays = Relays::start(&sweepers.dir, "tune", &sweepers.source, &sweepers.destination);
    // Set at the destination relay before anything moves: it reaches the source relay
    // with the session's first stream.
    set(&relays.recv_control, serde_json::json!({ "max-bandwidth": 4_000_000 }));
    let events = listen_for_events(&relays.send_control);
    migrate(&mut sweepers, &relays);
    wait_carrying(&relays.send_control);
    std::thread::sleep(Duration::from_millis(300));
    let slow = rate(&relays.send_control, Duration::from_secs(1));
    let scraped = metrics::parser_available().then(|| relays.scrape());
    set(&relays.send_control, serde_json::json!({ "max-bandwidth": 16_000_000 }));
    std::thread::sleep(Duration::from_millis(300));
    let fast = rate(&relays.send_control, Duration::from_secs(1));
    eprintln!("QEMU's stream through the relays: {slow:.0} B/s under 4 MB/s, then {fast:.0} B/s under 16 MB/s");
    assert!(slow < 6e6, "{slow:.0} B/s under a cap of 4 MB/s set at the destination relay");
    assert!(fast > 2.0 * slow, "{slow:.0} then {fast:.0} B/s: the source relay's new cap did not take");
    // Both relays' metrics, scraped while QEMU's stream ran and parsed by Prometheus's
    // parser, rose with it.
    if let Some((sent_before, received_before)) = scraped {
        let (sent_after, received_after) = relays.scrape();
        let grew = |before: &serde_json::Value, after: &serde_json::Value, key: &str| {
            let (before, after) = (metrics::sample(before, key), metrics::sample(after, key));
            assert!(before > 0.0 && after > before, "{key}: {before} then {after}");
        };
        grew(&sent_before, &sent_after, "vmigrate_relay_qemu_bytes_total{}");
        grew(&sent_before, &sent_after, "vmigrate_relay_wire_bytes_total{}");
        grew(&received_before, &received_after, "vmigrate_relay_delivered_bytes_total{}");
        assert_eq!(metrics::sample(&sent_after, "vmigrate_relay_streams{}"), 1.0, "{sent_after}");
        assert!(metrics::sample(&sent_after, "vmigrate_relay_throughput_bits_per_second{}") > 0.0, "{sent_after}");
    } else {
        eprintln!("SKIPPED the relays' metrics: no python3-prometheus-client");
    }
    // The switchover, asked for at the destination: through the source relay and its QMP
    // socket to the source QEMU, which switches over at its next iteration.
    set(&relays.recv_control, serde_json::json!({ "max-bandwidth": 0 }));
    let forced = control::command(&relays.recv_control, r#"{"execute": "migrate-switchover"}"#);
    assert_eq!(forced, serde_json::json!({ "return": {} }));
    let info = wait_migration(&mut sweepers.source_qmp, DEADLINE);
    assert_eq!(info["status"], "completed", "{info}");
    let (sent, received) = relays.wait();
    assert!(sent.status.success(), "qemu-send failed:\n{}", sent.stderr);
    assert!(received.status.success(), "qemu-recv failed:\n{}", received.stderr);
    let parameters =
        sweepers.source_qmp.execute("query-migrate-parameters", serde_json::json!({})).expect("parameters");
    assert_eq!(parameters["downtime-limit"], 2_000_000, "the switchover never reached QEMU: {parameters}");
    assert_eq!(json(&sent.stdout)["sent"]["bytes"], json(&received.stdout)["received"]["bytes"]);
    assert_ends_completed(&events.join().expect("the listening client"));
    let Sweepers { source, destination, mut source_qmp, mut destination_qmp, dir } = sweepers;
    check_migrated(&source, &destination, &mut source_qmp, &mut destination_qmp);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cancel_on_either_relay_fails_qemus_migration_and_the_source_guest_runs_on() {
    if !qemu_available() {
        eprintln!("SKIPPED a_cancel_on_either_relay_fails_qemus_migration_and_the_source_guest_runs_on: no QEMU");
        return;
    }
    let mut sweepers = Sweepers::start("relay-cancel");
    for (attempt, side) in ["qemu-recv", "qemu-send"].into_iter().enumerate() {
        if attempt > 0 {
            // QEMU's incoming side exits with its failed migration: a fresh destination.
            let image = sweeper_image(&sweepers.dir);
            sweepers.destination = Vm::start(&sweepers.dir, "destination-again", &image, true);
            sweepers.destination_qmp = sweepers.destination.qmp();
        }
        configure_migration_with(&mut sweepers.source_qmp, &mut sweepers.destination_qmp, None, 8 << 30, false);
        let relays = Relays::start(&sweepers.dir, side, &sweepers.source, &sweepers.destination);
        set(&relays.send_control, serde_json::json!({ "max-bandwidth": 2_000_000 }));
        migrate(&mut sweepers, &relays);
        wait_carrying(&relays.send_control);
        let control = if side == "qemu-recv" { &relays.recv_control } else { &relays.send_control };
        let events = listen_for_events(control);
        let cancelled = control::command(control, r#"{"execute": "migrate_cancel"}"#);
        assert_eq!(cancelled, serde_json::json!({ "return": {} }));
        let info = wait_migration(&mut sweepers.source_qmp, DEADLINE);
        assert_eq!(info["status"], "failed", "{side}: {info}");
        let (sent, received) = relays.wait();
        // Cancelled on one side (exit 6), the peer aborted on the other (7).
        let (here, there) = if side == "qemu-recv" { (&received, &sent) } else { (&sent, &received) };
        let error = here.assert_failure_with(6);
        assert!(error.contains("migration cancelled: cancelled on the control socket"), "{side}: {error}");
        let peer_error = there.assert_failure_with(7);
        assert!(peer_error.contains("the peer relay aborted"), "{side}: {peer_error}");
        let events = events.join().expect("the listening client");
        assert_eq!(events.last().map(|e| &e["data"]["status"]), Some(&"cancelled".into()), "{side}: {events:?}");
        // The source guest runs on: its sweep goes on past where it stood.
        let markers = sweepers.source.markers();
        assert!(sweepers.source.wait_markers_above(markers, Duration::from_secs(30)), "{side}: the source stopped");
        eprintln!("{side}: cancelled; QEMU's migration failed, the source guest sweeps on");
    }
    let _ = std::fs::remove_dir_all(&sweepers.dir);
}
