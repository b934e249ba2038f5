//! A QEMU migration through the relays that goes wrong: the destination QEMU absent or
//! refusing, a relay killed, the link cut, the migration cancelled on the source. Each
//! must end with one clear error on each relay still alive, the source QEMU reporting the
//! migration failed or cancelled, its guest still running, and no relay socket left
//! behind. Needs QEMU (and root for the namespaces of the link cut); a run without them
//! says SKIPPED.

use std::process::Command;
use std::time::{Duration, Instant};
use vmigrate_tests::netns::Namespaces;
use vmigrate_tests::process::{is_root, Finished, Receiver};
use vmigrate_tests::proxy::{Fault, FaultProxy};
use vmigrate_tests::qemu::{qemu_available, wait_migration, Migration, GUEST_MIB};
use vmigrate_tests::reliability::{record, Ending};

const GROUP: &str = "QEMU migration through the relays";

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(120);
/// QEMU's bandwidth cap for these tests: 20 MB/s makes the migration last seconds.
const SLOW: u64 = 20_000_000;

fn skip(test: &str) -> bool {
    if !qemu_available() {
        eprintln!("SKIPPED {test}: QEMU not installed (qemu-system-x86)");
        return true;
    }
    false
}

/// `qemu-recv` on 127.0.0.1 towards `incoming`, and `qemu-send` towards it.
fn relays(migration: &Migration, extra_recv: &[&str]) -> (Receiver, Receiver) {
    let incoming = format!("unix:{}", migration.incoming.display());
    let mut recv = Command::new(BIN);
    recv.args(["qemu-recv", "--listen", "127.0.0.1:0", "--to", &incoming, "--io-timeout", "3"]).args(extra_recv);
    let receiver = Receiver::spawn_announcing(recv, "vmigrate: waiting for the source relay on ");
    let mut send = Command::new(BIN);
    let listen = format!("unix:{}", migration.relay.display());
    send.args(["qemu-send", "--listen", &listen, "--to", &receiver.address, "--io-timeout", "3"]);
    let sender = Receiver::spawn_announcing(send, "vmigrate: waiting for QEMU on ");
    (receiver, sender)
}

/// Waits until the source QEMU has sent `bytes` of RAM (the migration is under way).
fn wait_transferred(migration: &mut Migration, bytes: u64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let info = migration.source_qmp.execute("query-migrate", serde_json::json!({})).expect("query-migrate");
        if info["ram"]["transferred"].as_u64().unwrap_or(0) >= bytes {
            return;
        }
        let status = info["status"].as_str().unwrap_or("");
        assert!(status == "setup" || status == "active", "the migration is not under way: {info}");
        assert!(Instant::now() < deadline, "the migration never got going: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn error_line(finished: &Finished) -> String {
    finished.assert_clean_failure().to_string()
}

#[test]
fn destination_qemu_absent() {
    if skip("destination_qemu_absent") {
        return;
    }
    let mut migration = Migration::prepare(&format!("{}-absent", std::process::id()), None, 8 << 30, GUEST_MIB);
    // The relay is pointed at a socket no QEMU listens on.
    migration.incoming = migration.dir.join("nobody.sock");
    let (receiver, sender) = relays(&migration, &["--qemu-wait", "0.5"]);
    migration.start();
    let (sent, received) = (sender.wait(DEADLINE), receiver.wait(DEADLINE));
    let (send_error, recv_error) = (error_line(&sent), error_line(&received));
    assert!(send_error.contains("destination QEMU"), "{send_error}");
    assert!(recv_error.contains("destination QEMU"), "{recv_error}");
    migration.assert_source_survived();
    record(GROUP, "destination QEMU absent", Ending::FailedCleanly);
}

#[test]
fn destination_qemu_refuses() {
    if skip("destination_qemu_refuses") {
        return;
    }
    // A destination with twice the RAM: QEMU refuses the stream at RAM's first section.
    let mut migration = Migration::prepare(&format!("{}-refuses", std::process::id()), None, 8 << 30, 2 * GUEST_MIB);
    let (receiver, sender) = relays(&migration, &[]);
    migration.start();
    let (sent, received) = (sender.wait(DEADLINE), receiver.wait(DEADLINE));
    let (send_error, recv_error) = (error_line(&sent), error_line(&received));
    eprintln!("qemu-send: {send_error}\nqemu-recv: {recv_error}");
    migration.assert_source_survived();
    record(GROUP, "destination QEMU refusing", Ending::FailedCleanly);
}

/// A main stream whose digest does not check out at the destination relay, though every
/// frame's did (the proxy between the relays forges it, at the checkpoint and the end):
/// the destination QEMU never gets its end-of-file marker, so it never completes the
/// migration nor starts the guest.
#[test]
fn a_stream_whose_digest_fails_never_completes_on_the_destination() {
    if skip("a_stream_whose_digest_fails_never_completes_on_the_destination") {
        return;
    }
    let mut migration = Migration::prepare(&format!("{}-digest", std::process::id()), None, 8 << 30, GUEST_MIB);
    let incoming = format!("unix:{}", migration.incoming.display());
    let mut recv = Command::new(BIN);
    recv.args(["qemu-recv", "--listen", "127.0.0.1:0", "--to", &incoming, "--io-timeout", "3"]);
    let receiver = Receiver::spawn_announcing(recv, "vmigrate: waiting for the source relay on ");
    let proxy = FaultProxy::start(receiver.address.parse().unwrap(), Fault::ForgeRelayDigest { connection: 0 });
    let mut send = Command::new(BIN);
    let listen = format!("unix:{}", migration.relay.display());
    send.args(["qemu-send", "--listen", &listen, "--to", &proxy.address.to_string(), "--io-timeout", "3"]);
    let sender = Receiver::spawn_announcing(send, "vmigrate: waiting for QEMU on ");
    migration.start();
    let (sent, received) = (sender.wait(DEADLINE), receiver.wait(DEADLINE));
    let recv_error = error_line(&received);
    assert!(recv_error.contains("digest mismatch"), "{recv_error}");
    assert!(error_line(&sent).contains("digest mismatch"), "the source relay was told why");
    // The destination QEMU saw its stream end before its end-of-file marker: it failed the
    // incoming migration (QEMU 7.2 then exits), and its guest never ran.
    let (status, stderr) = migration.destination.wait_exit(DEADLINE).expect("the destination QEMU waits on");
    assert!(!status.success(), "the destination QEMU exited cleanly: {stderr}");
    assert!(stderr.contains("load of migration failed"), "{stderr}");
    assert_eq!(migration.destination.markers(), 0, "the destination guest ran");
    eprintln!("destination QEMU: {}", stderr.trim());
    // The source QEMU, which has no return path to learn otherwise, saw its stream written
    // whole: an operator resumes its guest (`cont`), as after any failed QEMU migration.
    let info = wait_migration(&mut migration.source_qmp, DEADLINE);
    eprintln!("source QEMU: migration {}", info["status"]);
    record(GROUP, "stream digest forged between the relays", Ending::FailedCleanly);
}

#[test]
fn killed_destination_relay() {
    if skip("killed_destination_relay") {
        return;
    }
    let mut migration = Migration::prepare(&format!("{}-kill-recv", std::process::id()), None, SLOW, GUEST_MIB);
    let (mut receiver, sender) = relays(&migration, &[]);
    migration.start();
    wait_transferred(&mut migration, 10 << 20);
    receiver.kill();
    let sent = sender.wait(DEADLINE);
    let error = error_line(&sent);
    assert!(error.contains("relay link") || error.contains("closed"), "{error}");
    migration.assert_source_survived();
    record(GROUP, "destination relay killed", Ending::FailedCleanly);
}

#[test]
fn killed_source_relay() {
    if skip("killed_source_relay") {
        return;
    }
    let mut migration = Migration::prepare(&format!("{}-kill-send", std::process::id()), None, SLOW, GUEST_MIB);
    let (receiver, mut sender) = relays(&migration, &[]);
    migration.start();
    wait_transferred(&mut migration, 10 << 20);
    sender.kill();
    let received = receiver.wait(DEADLINE);
    let error = error_line(&received);
    assert!(error.contains("relay link"), "{error}");
    // The killed relay could not remove its socket; QEMU's view is what counts here.
    let _ = std::fs::remove_file(&migration.relay);
    migration.assert_source_survived();
    record(GROUP, "source relay killed", Ending::FailedCleanly);
}

#[test]
fn migrate_cancel_on_the_source() {
    if skip("migrate_cancel_on_the_source") {
        return;
    }
    // Without multifd: QEMU 7.2's own multifd cancel was seen to hang in "cancelling" for
    // minutes after both relays had closed every socket (its send threads' doing).
    let mut migration = Migration::prepare(&format!("{}-cancel", std::process::id()), None, SLOW, GUEST_MIB);
    let (receiver, sender) = relays(&migration, &[]);
    migration.start();
    wait_transferred(&mut migration, 10 << 20);
    migration.source_qmp.execute("migrate_cancel", serde_json::json!({})).expect("migrate_cancel");
    let (sent, received) = (sender.wait(DEADLINE), receiver.wait(DEADLINE));
    let send_error = error_line(&sent);
    assert!(send_error.contains("before the migration completed"), "{send_error}");
    let recv_error = error_line(&received);
    assert!(recv_error.contains("aborted"), "{recv_error}");
    assert_eq!(migration.assert_source_survived(), "cancelled");
    record(GROUP, "migrate_cancel on the source", Ending::FailedCleanly);
}

#[test]
fn link_cut_between_the_relays() {
    if skip("link_cut_between_the_relays") {
        return;
    }
    if !is_root() {
        eprintln!("SKIPPED link_cut_between_the_relays: needs root for network namespaces");
        return;
    }
    let ns = Namespaces::up(&format!("vmc{}", std::process::id() % 100_000), &[], BIN);
    let mut migration = Migration::prepare(&format!("{}-cut", std::process::id()), None, SLOW, GUEST_MIB);
    let incoming = format!("unix:{}", migration.incoming.display());
    let listen = format!("unix:{}", migration.relay.display());
    let (vs, vd) = (ns.veth("src"), ns.veth("dst"));
    let ours = |iface: &str, ip: &str| ["--stack", "af-packet", "--iface", iface, "--ip", ip].join(" ");
    let recv_args =
        format!("qemu-recv --listen 10.77.0.12:4700 --to {incoming} --io-timeout 3 {}", ours(&vd, "10.77.0.12/24"));
    let send_args =
        format!("qemu-send --listen {listen} --to 10.77.0.12:4700 --io-timeout 3 {}", ours(&vs, "10.77.0.11/24"));
    let recv_args: Vec<&str> = recv_args.split(' ').collect();
    let send_args: Vec<&str> = send_args.split(' ').collect();
    let receiver =
        Receiver::spawn_announcing(ns.command("dst", &recv_args), "vmigrate: waiting for the source relay on ");
    let sender = Receiver::spawn_announcing(ns.command("src", &send_args), "vmigrate: waiting for QEMU on ");
    migration.start();
    wait_transferred(&mut migration, 10 << 20);
    // The cable pulled: frames stop both ways, and nothing says so.
    let down = ns.program("src", "ip", &["link", "set", &vs, "down"]).status().expect("ip link");
    assert!(down.success());
    let cut = Instant::now();
    let (sent, received) = (sender.wait(DEADLINE), receiver.wait(DEADLINE));
    let (send_error, recv_error) = (error_line(&sent), error_line(&received));
    eprintln!("after {:?}: qemu-send: {send_error}\nqemu-recv: {recv_error}", cut.elapsed());
    assert!(cut.elapsed() < Duration::from_secs(30), "the relays took {:?} to notice", cut.elapsed());
    migration.assert_source_survived();
    record(GROUP, "link cut between the relays (30 s silence)", Ending::FailedCleanly);
}

#[test]
fn sigint_to_qemu_migrate_cancels_the_migration() {
    if skip("sigint_to_qemu_migrate_cancels_the_migration") {
        return;
    }
    let dir = vmigrate_tests::qemu::tempdir(&format!("{}-sigint", std::process::id()));
    let image = vmigrate_tests::qemu::sweeper_image(&dir);
    let source = vmigrate_tests::qemu::Vm::start(&dir, "source", &image, false);
    let destination = vmigrate_tests::qemu::Vm::start(&dir, "destination", &image, true);
    let mut source_qmp = source.qmp();
    assert!(source.wait_markers_above(0, Duration::from_secs(30)), "the source guest never swept");
    let socket = |vm: &vmigrate_tests::qemu::Vm| format!("unix:{}", vm.control_socket().display());
    let orchestrator = Command::new(BIN)
        .args(["qemu-migrate", "--src-qmp", &socket(&source), "--dst-qmp", &socket(&destination)])
        .args(["--max-bandwidth", "20MB"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start qemu-migrate");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let info = source_qmp.execute("query-migrate", serde_json::json!({})).expect("query-migrate");
        if info["ram"]["transferred"].as_u64().unwrap_or(0) >= 10 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the migration never got going: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill").args(["-INT", &orchestrator.id().to_string()]).status().expect("kill");
    assert!(kill.success());
    let finished = vmigrate_tests::process::wait(orchestrator, DEADLINE, String::new());
    let error = error_line(&finished);
    assert!(error.contains("cancelled"), "{error}");
    let info = vmigrate_tests::qemu::wait_migration(&mut source_qmp, DEADLINE);
    assert_eq!(info["status"], "cancelled", "{info}");
    let run = source_qmp.execute("query-status", serde_json::json!({})).expect("query-status");
    assert_eq!(run["status"], "running", "{run}");
    let markers = source.markers();
    assert!(source.wait_markers_above(markers, Duration::from_secs(60)), "the source guest stopped sweeping");
    drop((source, destination));
    let _ = std::fs::remove_dir_all(&dir);
}
