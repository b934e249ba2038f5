//! Migrations between two network namespaces joined by a veth pair (scripts/netns): over
//! our smoltcp stack on TAP devices at both ends, over the kernel's TCP, and mixed (our
//! stack sending to the kernel's: it is plain TCP on the wire). Needs root; a run without
//! it says SKIPPED.

use std::process::Command;
use std::time::Duration;
use vmigrate_tests::process::{assert_migrated, run, Receiver};

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const NETNS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns");
const DEADLINE: Duration = Duration::from_secs(180);

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// The harness for one test: namespaces made on creation, removed on drop (also when the
/// test fails).
struct Namespaces {
    prefix: String,
}

impl Namespaces {
    fn up(prefix: &str, extra: &[&str]) -> Namespaces {
        let status =
            Command::new(NETNS).args(["up", "--prefix", prefix]).args(extra).status().expect("run scripts/netns");
        assert!(status.success(), "scripts/netns up failed");
        Namespaces { prefix: prefix.to_string() }
    }

    /// A command run inside the `side` namespace.
    fn command(&self, side: &str, args: &[&str]) -> Command {
        let mut command = Command::new(NETNS);
        command.args(["exec", side, "--prefix", &self.prefix, "--", BIN]).args(args);
        command
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new(NETNS).args(["down", "--prefix", &self.prefix]).status();
    }
}

const TAP_SRC: [&str; 6] = ["--stack", "tap", "--iface", "tap0", "--ip", "10.77.0.11/24"];
const TAP_DST: [&str; 6] = ["--stack", "tap", "--iface", "tap0", "--ip", "10.77.0.12/24"];

/// Runs recv in the destination namespace and send in the source namespace; both must
/// succeed and verify.
fn migrate(ns: &Namespaces, recv: &[&str], send: &[&str]) -> serde_json::Value {
    let mut recv_args = vec!["recv", "--json", "--run-after", "0.3"];
    recv_args.extend_from_slice(recv);
    let receiver = Receiver::spawn(ns.command("dst", &recv_args));
    let mut send_args = vec!["send", "--mem", "64MiB", "--workload", "dirty:32MiB:5000:16", "--verify", "--json"];
    send_args.extend_from_slice(send);
    let sent = run(&mut ns.command("src", &send_args), DEADLINE);
    let received = receiver.wait(DEADLINE);
    assert_migrated(&sent, &received).0
}

#[test]
fn migrations_between_namespaces() {
    if !is_root() {
        eprintln!("SKIPPED migrations_between_namespaces: needs root for network namespaces and TAP devices");
        return;
    }
    let ns = Namespaces::up(&format!("vmt{}", std::process::id() % 100_000), &[]);

    // Our stack at both ends, over TAP, two connections.
    let mut recv = TAP_DST.to_vec();
    recv.extend(["--listen", "10.77.0.12:4444"]);
    let mut send = TAP_SRC.to_vec();
    send.extend(["--to", "10.77.0.12:4444", "--connections", "2", "--codec", "lz4"]);
    migrate(&ns, &recv, &send);

    // The kernel's TCP at both ends: the baseline.
    migrate(&ns, &["--listen", "10.77.0.2:4445"], &["--to", "10.77.0.2:4445"]);

    // Our stack on packet sockets with mapped rings, bound to the veth ends.
    let veth_src = format!("{}-vs", ns.prefix);
    let veth_dst = format!("{}-vd", ns.prefix);
    let recv = ["--stack", "af-packet", "--iface", &veth_dst, "--ip", "10.77.0.12/24", "--listen", "10.77.0.12:4447"];
    let send = ["--stack", "af-packet", "--iface", &veth_src, "--ip", "10.77.0.11/24", "--to", "10.77.0.12:4447"];
    migrate(&ns, &recv, &[&send[..], &["--connections", "2", "--codec", "zlib", "--qdisc-bypass"]].concat());

    // Our stack sending to the kernel's: plain TCP on the wire.
    let mut send = TAP_SRC.to_vec();
    send.extend(["--to", "10.77.0.2:4446"]);
    migrate(&ns, &["--listen", "10.77.0.2:4446"], &send);
}

#[test]
fn migration_through_a_shaped_link() {
    if !is_root() {
        eprintln!("SKIPPED migration_through_a_shaped_link: needs root for network namespaces");
        return;
    }
    // A middle namespace shapes both directions to 500 Mbit/s (tbf); with qdisc bypass on
    // the sender's packet socket the shaping still applies, since it is in the middle.
    let ns = Namespaces::up(&format!("vms{}", std::process::id() % 100_000), &["--rate", "500mbit"]);
    let veth_src = format!("{}-vs", ns.prefix);
    let veth_dst = format!("{}-vd", ns.prefix);
    let recv = ["--stack", "af-packet", "--iface", &veth_dst, "--ip", "10.77.0.12/24", "--listen", "10.77.0.12:4448"];
    let send = ["--stack", "af-packet", "--iface", &veth_src, "--ip", "10.77.0.11/24", "--to", "10.77.0.12:4448"];
    let sent = migrate(&ns, &recv, &[&send[..], &["--qdisc-bypass", "--codec", "lz4"]].concat());
    // 500 Mbit/s is 62.5 MB/s: the average rate the source saw cannot be above it.
    let mbps = sent["ram"]["mbps"].as_f64().unwrap_or(f64::MAX);
    assert!(mbps <= 550.0, "the link was not shaped: {mbps} Mbit/s");
}
