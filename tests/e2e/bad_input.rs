//! Bad input ends a migration with one clear error line and a non-zero exit, never a
//! panic or a hang; the source guest keeps running; the destination starts no guest.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use vmigrate_tests::process::{assert_migrated, run, Receiver};
use vmigrate_tests::proxy::{Fault, FaultProxy};
use vmigrate_tests::reliability::{record, Ending};
use vmigrate_tests::strangers::Strangers;
use vmigrate_tests::stream;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(60);
// Exit statuses (docs/exit-codes.md).
const USAGE: i32 = 2;
const REFUSED: i32 = 3;
const TIMED_OUT: i32 = 4;
const INTEGRITY: i32 = 5;
const LINK: i32 = 7;

/// Sends `bytes` to a fresh `vmigrate recv`, then closes; returns recv's error line, after
/// checking that recv exited with `code` (docs/exit-codes.md).
fn feed_receiver(bytes: &[u8], code: i32) -> String {
    let receiver = Receiver::start(BIN, &["--accept-timeout", "10"]);
    {
        let mut socket = TcpStream::connect(&receiver.address).expect("connect to recv");
        socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = socket.write_all(bytes);
        let _ = socket.shutdown(std::net::Shutdown::Write);
        // Drain whatever recv answers (a refusal) until it closes.
        let mut answer = Vec::new();
        let _ = socket.read_to_end(&mut answer);
    }
    let finished = receiver.wait(DEADLINE);
    assert!(!finished.stdout.contains("destination-guest"), "a guest was resumed");
    finished.assert_failure_with(code).to_string()
}

#[test]
fn wrong_magic_is_turned_away_and_named_when_no_source_comes() {
    // A stranger: recv goes on waiting for the real source, and when none comes its error
    // says whom it turned away and why (a source missing --tls reads its hint here).
    let mut bytes = stream::opening(1 << 20);
    bytes[..8].copy_from_slice(b"QEVMQEVM");
    let error = feed_receiver(&bytes, TIMED_OUT);
    assert!(error.contains("nothing within 10s"), "{error}");
    assert!(error.contains("turned away 1 connection: 127.0.0.1:"), "{error}");
    assert!(error.contains("bad magic"), "{error}");
}

#[test]
fn strangers_at_the_listener_hold_up_no_source() {
    // Random bytes, an HTTP request, half a preamble and a silent connection come first
    // and stay open; the real source still migrates, verified, and each stranger that
    // said something is turned away with a warning naming it.
    let receiver = Receiver::start(BIN, &["--accept-timeout", "60", "--run-after", "0.3", "--json"]);
    let strangers = Strangers::connect(&receiver.address, &migration::handshake::MAGIC);
    let sent = run(
        Command::new(BIN)
            .args(["send", "--to", &receiver.address, "--mem", "64MiB", "--workload", "seq"])
            .args(["--verify", "--json"]),
        DEADLINE,
    );
    let received = receiver.wait(DEADLINE);
    assert_migrated(&sent, &received);
    let peers = strangers.peers();
    for (peer, (kind, _)) in peers.iter().zip(&strangers.sockets).take(2) {
        assert!(
            received
                .stderr
                .contains(&format!("turned away a connection from {peer}: not a vmigrate stream: bad magic")),
            "{kind} stranger ({peer}) not named:\n{}",
            received.stderr
        );
    }
}

#[test]
fn newer_protocol_version_is_refused() {
    let mut bytes = stream::opening(1 << 20);
    let newer = migration::handshake::VERSION_MAX + 1;
    bytes[8..10].copy_from_slice(&newer.to_le_bytes());
    bytes[10..12].copy_from_slice(&(newer + 2).to_le_bytes());
    let error = feed_receiver(&bytes, REFUSED);
    let expected = format!("no common protocol version: peer speaks {newer}..={}", newer + 2);
    assert!(error.contains(&expected), "{error}");
}

#[test]
fn a_version_1_source_is_refused_before_it_meets_a_heartbeat() {
    // Version 1 sources took the destination's heartbeat for a protocol violation.
    let mut bytes = stream::opening(1 << 20);
    bytes[8..12].copy_from_slice(&[1, 0, 1, 0]);
    let error = feed_receiver(&bytes, REFUSED);
    assert!(error.contains("no common protocol version: peer speaks 1..=1"), "{error}");
}

#[test]
fn an_io_timeout_shorter_than_the_heartbeats_is_refused() {
    for (command, extra) in [
        ("recv", &["--listen", "127.0.0.1:0"][..]),
        ("qemu-recv", &["--listen", "127.0.0.1:0", "--to", "unix:/nonexistent"]),
    ] {
        let finished = run(Command::new(BIN).arg(command).args(extra).args(["--io-timeout", "0.5"]), DEADLINE);
        let error = finished.assert_failure_with(USAGE);
        assert!(error.contains("--io-timeout 0.5: at least 1 s"), "{command}: {error}");
    }
}

#[test]
fn options_of_a_dpdk_port_are_refused_on_other_stacks() {
    let af_packet = ["--stack", "af-packet", "--iface", "lo", "--ip", "10.77.0.12/24", "--listen", "10.77.0.12:1"];
    for (command, extra, option) in [
        ("recv", &["--listen", "127.0.0.1:0"][..], "--whole-segments"),
        ("send", &["--to", "127.0.0.1:9"][..], "--port-mtu=9000"),
        ("recv", &af_packet[..], "--nic-xstats"),
    ] {
        let finished = run(Command::new(BIN).arg(command).args(extra).arg(option), DEADLINE);
        let error = finished.assert_failure_with(USAGE);
        assert!(error.contains("is for --stack dpdk"), "{command} {option}: {error}");
    }
}

#[test]
fn oversized_length_is_refused_before_allocation() {
    let mut bytes = stream::opening(1 << 20);
    let mut frame = stream::raw_pages(1, 1, 0, 1, 0xab);
    frame[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend(frame);
    let error = feed_receiver(&bytes, INTEGRITY);
    assert!(error.contains("exceeds the limit"), "{error}");
}

#[test]
fn truncated_stream_is_reported() {
    let mut bytes = stream::opening(1 << 20);
    let frame = stream::raw_pages(1, 1, 0, 4, 0xab);
    bytes.extend_from_slice(&frame[..frame.len() / 2]);
    let error = feed_receiver(&bytes, LINK);
    assert!(error.contains("truncated"), "{error}");
}

#[test]
fn flipped_payload_byte_is_caught() {
    let mut bytes = stream::opening(1 << 20);
    let mut frame = stream::raw_pages(1, 1, 0, 2, 0xab);
    let at = frame.len() - 100;
    frame[at] ^= 1;
    bytes.extend(frame);
    let error = feed_receiver(&bytes, INTEGRITY);
    assert!(error.contains("checksum mismatch"), "{error}");
}

#[test]
fn a_copy_of_contents_the_original_does_not_hold_is_refused() {
    // The source says page 1 is a copy of page 0 and hashed contents page 0 never held:
    // the destination checks the original before it fills the copy, and stops.
    let mut bytes = stream::opening_with(migration::handshake::Hello { copies: true, ..stream::hello(vec![1 << 20]) });
    bytes.extend(stream::raw_pages(1, 1, 0, 1, 0xab));
    bytes.extend(stream::copy_page(1, 2, 1, 0, migration::seen_pages::copy_digest(&[0xcd; 4096])));
    bytes.extend(stream::round_end(1, 3, 2));
    let error = feed_receiver(&bytes, INTEGRITY);
    assert!(error.contains("page 1: sent as a copy of region 0 page 0, which does not hold the contents"), "{error}");
}

#[test]
fn guest_larger_than_the_destination_allows_is_refused() {
    let receiver = Receiver::start(BIN, &["--max-mem", "16MiB"]);
    let sender = run(
        Command::new(BIN).args(["send", "--to", &receiver.address, "--mem", "64MiB", "--workload", "seq"]),
        DEADLINE,
    );
    let error = sender.assert_failure_with(REFUSED);
    assert!(error.contains("exceeds this destination's limit"), "{error}");
    assert!(sender.stderr.contains("source guest keeps running"), "{}", sender.stderr);
    receiver.wait(DEADLINE).assert_failure_with(REFUSED);
}

/// A real migration through a proxy that damages the stream: both ends fail cleanly, the
/// source guest runs on, the destination resumes nothing.
fn migrate_through(fault: Fault, expect: &str, recv_code: i32) {
    let receiver = Receiver::start(BIN, &[]);
    let proxy = FaultProxy::start(receiver.address.parse().unwrap(), fault);
    let to = proxy.address.to_string();
    let sender = run(
        Command::new(BIN).args([
            "send",
            "--to",
            &to,
            "--mem",
            "64MiB",
            "--workload",
            "dirty:32MiB:5000:16",
            "--connections",
            "2",
        ]),
        DEADLINE,
    );
    let received = receiver.wait(DEADLINE);
    let send_error = sender.assert_clean_failure();
    let recv_error = received.assert_failure_with(recv_code);
    assert!(sender.stderr.contains("source guest keeps running"), "{}", sender.stderr);
    assert!(!received.stdout.contains("destination-guest"), "a guest was resumed");
    assert!(
        recv_error.contains(expect) || send_error.contains(expect),
        "neither side said {expect:?}:\n{send_error}\n{recv_error}"
    );
}

#[test]
fn corruption_in_flight_aborts_both_sides() {
    migrate_through(Fault::FlipByte { connection: 1, offset: 3 << 20 }, "checksum mismatch", INTEGRITY);
}

#[test]
fn cut_connection_aborts_both_sides() {
    migrate_through(Fault::CutAfter { connection: 0, bytes: 5 << 20 }, "connection", LINK);
}

/// A migration that is well under way when something is killed: 8 MiB have crossed.
const UNDER_WAY_BYTES: u64 = 8 << 20;

fn start_sender(to: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["send", "--to", to, "--mem", "256MiB", "--workload", "dirty:128MiB:5000:16"])
        // 128 MiB at 100 MiB/s: the bulk round lasts over a second.
        .args(["--max-bandwidth", "100MiB"]);
    command
}

#[test]
fn killed_source_leaves_the_destination_without_a_guest() {
    let receiver = Receiver::start(BIN, &["--accept-timeout", "20"]);
    let proxy = FaultProxy::start(receiver.address.parse().unwrap(), Fault::None);
    let mut sender = start_sender(&proxy.address.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start send");
    assert!(proxy.wait_forwarded(UNDER_WAY_BYTES, DEADLINE), "the migration never got under way");
    sender.kill().expect("kill send");
    let _ = sender.wait();
    let received = receiver.wait(DEADLINE);
    let error = received.assert_failure_with(LINK);
    assert!(error.contains("connection 0: connection closed by the peer"), "{error}");
    assert!(!received.stdout.contains("destination-guest"), "a guest was resumed");
}

#[test]
fn killed_destination_leaves_the_source_guest_running() {
    let mut receiver = Receiver::start(BIN, &[]);
    let proxy = FaultProxy::start(receiver.address.parse().unwrap(), Fault::None);
    let to = proxy.address.to_string();
    let sender = std::thread::spawn(move || run(&mut start_sender(&to), DEADLINE));
    assert!(proxy.wait_forwarded(UNDER_WAY_BYTES, DEADLINE), "the migration never got under way");
    receiver.kill();
    let sent = sender.join().expect("sender thread");
    let error = sent.assert_failure_with(LINK);
    assert!(error.contains("connection"), "{error}");
    assert!(sent.stderr.contains("source guest keeps running"), "{}", sent.stderr);
}

#[test]
fn a_second_source_is_turned_away_while_a_session_runs() {
    let receiver = Receiver::start(BIN, &["--json", "--run-after", "0.3"]);
    // The first migration, slowed down (256 MiB at 50 MB/s, a guest that dirties little,
    // pages sent as they are) so that the second arrives while it runs.
    let first = Command::new(BIN)
        .args(["send", "--to", &receiver.address, "--mem", "256MiB", "--workload", "seq:1000", "--verify", "--json"])
        .args(["--max-bandwidth", "400mbit", "--codec", "none"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the first sender");
    std::thread::sleep(Duration::from_millis(1500));
    let second = run(
        Command::new(BIN).args(["send", "--to", &receiver.address, "--mem", "32MiB", "--connections", "2"]),
        DEADLINE,
    );
    let error = second.assert_failure_with(REFUSED);
    assert!(error.contains("another migration session is in progress"), "{error}");
    assert!(second.stderr.contains("source guest keeps running"), "{}", second.stderr);
    // The first migration was not disturbed.
    let first = vmigrate_tests::process::wait(first, DEADLINE, String::new());
    let received = receiver.wait(DEADLINE);
    vmigrate_tests::process::assert_migrated(&first, &received);
}

/// The committed corpus (`tests/corpus/destination`): a recorded stream, which a
/// destination takes whole, and that stream truncated and damaged in chosen places, each
/// of which it refuses with an error, no guest and no hang. `VMIGRATE_WRITE_CORPUS=1`
/// records it afresh.
#[test]
fn the_corpus_of_damaged_streams_is_refused_cleanly() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/destination"));
    if std::env::var_os("VMIGRATE_WRITE_CORPUS").is_some() {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("corpus dir");
        let stream = vmigrate_tests::corpus::record_stream();
        std::fs::write(dir.join("valid.bin"), &stream).expect("write");
        for (name, bytes) in vmigrate_tests::corpus::damaged(&stream) {
            std::fs::write(dir.join(format!("{name}.bin")), bytes).expect("write");
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(dir).expect("the committed corpus").flatten().map(|e| e.path()).collect();
    files.sort();
    assert!(files.len() > 30, "the corpus holds {} streams", files.len());
    for file in files {
        let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let bytes = std::fs::read(&file).expect("read");
        // The recorded source kept its connection open until the destination answered; a
        // damaged stream is one whose source died, so its connection ends with its bytes.
        let hold_open = if name == "valid.bin" { Duration::from_secs(2) } else { Duration::ZERO };
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(vmigrate_tests::corpus::replay(&bytes, hold_open));
        });
        let (report, resumed) = result
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{name}: the destination hung or panicked"));
        let kind = name.trim_end_matches(".bin").split("-at-").next().unwrap_or_default().to_string();
        if name == "valid.bin" {
            // A protocol version bump makes the recorded stream stale: record it afresh.
            assert!(report.is_ok() && resumed, "{name}: {report:?} (after a protocol change, VMIGRATE_WRITE_CORPUS=1)");
            record("corpus stream replayed to a destination", "whole recorded stream", Ending::Verified);
        } else {
            let err = report.expect_err(&name);
            assert!(!resumed, "{name}: a guest was resumed ({err})");
            assert!(!err.is_empty());
            record("corpus stream replayed to a destination", &kind, Ending::Refused);
        }
    }
}

/// Either end killed at points drawn at random (seeded: the same points every run), from
/// the handshake's first bytes to late in the migration. Killing the source leaves the
/// destination failed, with no guest; killing the destination leaves the source failed,
/// its guest running. A point past the end of the migration lets it complete.
#[test]
fn peers_killed_at_random_points_lose_nothing() {
    const GROUP: &str = "peer killed at a seeded point (kernel TCP)";
    let mut state = 0x5eed_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // From the handshake's first bytes to late in the migration (about 300 MB go in all),
    // each point moved by a random offset.
    let points: Vec<u64> = [0u32, 8, 14, 18, 22, 24, 25, 26].iter().map(|&e| (1u64 << e) + next() % (1 << e)).collect();
    for (index, &point) in points.iter().enumerate() {
        let kill_source = index % 2 == 0;
        let mut receiver = Receiver::start(BIN, &["--accept-timeout", "20", "--json", "--run-after", "0.2"]);
        let proxy = FaultProxy::start(receiver.address.parse().unwrap(), Fault::None);
        let to = proxy.address.to_string();
        let mut sender = start_sender(&to)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start send");
        let reached = proxy.wait_forwarded(point, Duration::from_secs(20));
        let who = if kill_source { "source" } else { "destination" };
        eprintln!("killing the {who} after {point} bytes: {}", if reached { "reached" } else { "not reached" });
        if !reached {
            // The migration ended before the point: it must have completed.
            let sent = vmigrate_tests::process::wait(sender, DEADLINE, String::new());
            assert!(sent.status.success(), "{who} at {point}: {}", sent.stderr);
            let _ = receiver.wait(DEADLINE);
            record(GROUP, &format!("{who} killed past the migration's end"), Ending::Verified);
            continue;
        }
        if kill_source {
            sender.kill().expect("kill send");
            let _ = sender.wait();
            let received = receiver.wait(DEADLINE);
            received.assert_clean_failure();
            assert!(!received.stdout.contains("destination-guest"), "source killed at {point}: a guest was resumed");
            record(GROUP, "source killed mid-migration", Ending::FailedCleanly);
        } else {
            receiver.kill();
            let sent = vmigrate_tests::process::wait(sender, DEADLINE, String::new());
            // Killed after the switchover, the migration may have completed on the source.
            if sent.status.success() {
                record(GROUP, "destination killed mid-migration", Ending::Verified);
            } else {
                sent.assert_clean_failure();
                assert!(
                    sent.stderr.contains("source guest keeps running"),
                    "destination killed at {point}: {}",
                    sent.stderr
                );
                record(GROUP, "destination killed mid-migration", Ending::FailedCleanly);
            }
        }
    }
}
