//! `--tls*`: migrations encrypted and mutually authenticated with TLS 1.3, and every way a
//! peer without the right credentials is refused before any guest memory moves.

use std::process::Command;
use std::time::Duration;
use vmigrate_tests::process::{assert_migrated, json, run, Finished, Receiver};
use vmigrate_tests::proxy::{Fault, FaultProxy};
use vmigrate_tests::reliability::{record, Ending};
use vmigrate_tests::tls::{credentials_dir, make_pki, psk_file};

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(120);
const KEY_A: &str = "a0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff";
const KEY_B: &str = "ffeeddccbbaa99887766554433221100f1e2d3c4b5a69788796a5b4c3d2e1f0a";

fn recv(tls: &[String]) -> Receiver {
    recv_waiting(tls, "60")
}

/// A destination that waits `accept_timeout` seconds for a source it can take: it turns
/// away connections it cannot, and waits on for another.
fn recv_waiting(tls: &[String], accept_timeout: &str) -> Receiver {
    let mut args: Vec<&str> = vec!["--json", "--run-after", "0.3", "--accept-timeout", accept_timeout];
    args.extend(tls.iter().map(String::as_str));
    Receiver::start(BIN, &args)
}

fn send(to: &str, tls: &[String], extra: &[&str]) -> Finished {
    let mut command = Command::new(BIN);
    command.args(["send", "--to", to, "--mem", "64MiB", "--workload", "dirty:16MiB:5000:16", "--verify", "--json"]);
    command.args(extra).args(tls);
    run(&mut command, DEADLINE)
}

fn psk_args(path: &std::path::Path) -> Vec<String> {
    vec!["--tls-psk".into(), path.display().to_string()]
}

/// A source refused for its credentials: one clear error, the guest ran on, and the
/// refusal came at connect, before the migration's own hello (so before any memory).
fn assert_refused(sent: &Finished, expected: &str) -> String {
    let error = sent.assert_clean_failure().to_string();
    assert!(error.contains(expected), "expected {expected:?} in: {error}");
    assert!(sent.stderr.contains("source guest keeps running"), "{}", sent.stderr);
    assert!(!sent.stderr.contains("round 1"), "memory moved before the refusal:\n{}", sent.stderr);
    error
}

#[test]
fn mutual_certificates_migrate_and_verify() {
    let dir = credentials_dir("mutual");
    let pki = make_pki(&dir, "site", &["127.0.0.1"]);
    let receiver = recv(&pki.destination_args());
    let sent = send(&receiver.address, &pki.source_args(), &["--connections", "2", "--codec", "lz4"]);
    let received = receiver.wait(DEADLINE);
    let (sent, _) = assert_migrated(&sent, &received);
    assert_eq!(sent["status"], "completed");
    record("tls", "mutual certificates, 2 connections", Ending::Verified);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_pre_shared_key_migrates_over_our_stack_and_the_kernels() {
    let dir = credentials_dir("psk");
    let key = psk_file(&dir, "a", KEY_A);
    // Our userspace stack, both ends in one process.
    let mut demo = Command::new(BIN);
    demo.args(["demo", "--mem", "64MiB", "--verify", "--json", "--run-after", "0.3", "--connections", "2"]);
    let finished = run(demo.args(psk_args(&key)), DEADLINE);
    assert!(finished.status.success(), "demo over TLS failed:\n{}", finished.stderr);
    assert_eq!(json(&finished.stdout)["verified"], true);
    record("tls", "pre-shared key, userspace stack", Ending::Verified);
    // The kernel's TCP, two processes.
    let receiver = recv(&psk_args(&key));
    let sent = send(&receiver.address, &psk_args(&key), &[]);
    assert_migrated(&sent, &receiver.wait(DEADLINE));
    record("tls", "pre-shared key, kernel TCP", Ending::Verified);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn strangers_are_refused_before_any_memory_moves_and_the_listener_waits_on() {
    let dir = credentials_dir("strangers");
    let key_a = psk_file(&dir, "a", KEY_A);
    let key_b = psk_file(&dir, "b", KEY_B);
    let rogue = make_pki(&dir, "rogue", &["127.0.0.1"]);
    let receiver = recv(&psk_args(&key_a));

    let wrong_key = send(&receiver.address, &psk_args(&key_b), &[]);
    assert_refused(&wrong_key, "certificate");
    record("tls", "source with the wrong pre-shared key", Ending::Refused);

    let rogue_ca = send(&receiver.address, &rogue.source_args(), &[]);
    assert_refused(&rogue_ca, "certificate");
    record("tls", "source with a certificate from another CA", Ending::Refused);

    let plain = send(&receiver.address, &[], &[]);
    let error = plain.assert_clean_failure();
    assert!(error.contains("require TLS"), "{error}");
    assert!(plain.stderr.contains("source guest keeps running"), "{}", plain.stderr);
    record("tls", "source without TLS", Ending::Refused);

    // The listener is still there for the real source, and what it received came from the
    // real source alone (assert_migrated: both ends count the same bytes).
    let sent = send(&receiver.address, &psk_args(&key_a), &[]);
    let received = receiver.wait(DEADLINE);
    assert_migrated(&sent, &received);
    let refusals = received.stderr.matches("vmigrate: warning: refused a TLS connection").count();
    assert_eq!(refusals, 3, "each stranger is named once:\n{}", received.stderr);
    assert_eq!(received.stderr.matches("the peer refused our certificate").count(), 2, "{}", received.stderr);
    assert!(received.stderr.contains("the peer does not speak TLS"), "{}", received.stderr);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_tls_source_meets_a_plain_destination_with_a_clear_error() {
    let dir = credentials_dir("plain-destination");
    let key = psk_file(&dir, "a", KEY_A);
    // It turns the TLS source away and waits on for a plain one: not for a minute here.
    let receiver = recv_waiting(&[], "5");
    let sent = send(&receiver.address, &psk_args(&key), &[]);
    assert_refused(&sent, "TLS");
    let received = receiver.wait(DEADLINE);
    let error = received.assert_clean_failure();
    assert!(error.contains("the source uses --tls, this end does not"), "{error}");
    record("tls", "TLS source, plain destination", Ending::Refused);
    let _ = std::fs::remove_dir_all(dir);
}

/// A byte changed on the way, past the handshake, where no TCP checksum would notice (a
/// proxy that rewrites it): the record it lands in fails its authentication, the
/// destination says so and starts nothing, the source guest runs on.
#[test]
fn a_record_changed_in_transit_fails_the_migration_and_starts_no_guest() {
    let dir = credentials_dir("tampered");
    let key = psk_file(&dir, "a", KEY_A);
    let receiver = recv(&psk_args(&key));
    let proxy =
        FaultProxy::start(receiver.address.parse().unwrap(), Fault::FlipByte { connection: 0, offset: 1 << 20 });
    let sent = send(&proxy.address.to_string(), &psk_args(&key), &[]);
    let received = receiver.wait(DEADLINE);
    let send_error = sent.assert_clean_failure();
    let recv_error = received.assert_clean_failure();
    assert!(recv_error.contains("failed its authentication"), "{recv_error}");
    assert!(sent.stderr.contains("source guest keeps running"), "{send_error}\n{}", sent.stderr);
    assert!(!received.stdout.contains("destination-guest"), "a guest was resumed");
    record("tls", "a record changed in transit", Ending::FailedCleanly);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_destination_certificate_must_name_the_host() {
    let dir = credentials_dir("name");
    let pki = make_pki(&dir, "site", &["destination.example"]);
    let receiver = recv(&pki.destination_args());
    let sent = send(&receiver.address, &pki.source_args(), &[]);
    assert_refused(&sent, "not valid for the name");
    record("tls", "destination certificate for another name", Ending::Refused);
    // Told the name to expect, the same source goes through.
    let mut named = pki.source_args();
    named.extend(["--tls-server-name".to_string(), "destination.example".to_string()]);
    let sent = send(&receiver.address, &named, &[]);
    assert_migrated(&sent, &receiver.wait(DEADLINE));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_credentials_are_refused_at_start() {
    let dir = credentials_dir("bad-credentials");
    let short = psk_file(&dir, "short", "too-short");
    let exposed = psk_file(&dir, "exposed", KEY_A);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cases: [(Vec<String>, &str); 4] = [
        (psk_args(&short), "at least 32 are needed"),
        (psk_args(&exposed), "chmod 600"),
        (psk_args(&dir.join("missing.psk")), "missing.psk"),
        (vec!["--tls".into()], "--tls needs credentials"),
    ];
    for (tls, expected) in cases {
        let sent = send("127.0.0.1:9", &tls, &[]);
        let error = sent.assert_clean_failure();
        assert!(error.contains(expected), "expected {expected:?} in: {error}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
