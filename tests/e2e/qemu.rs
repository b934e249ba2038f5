//! QEMU's own live migration carried by the relay pair (`qemu-send` / `qemu-recv`): the
//! boot-sector sweeper (tests/guests/sweeper.S) under TCG, migrated over the kernel's TCP
//! (on loopback, and between two namespaces) and over our stack on AF_PACKET between two
//! namespaces, with and without multifd. After
//! each migration both guests' memory is dumped (the source paused by the migration, the
//! destination started with -S): equal byte for byte, in the sweep's shape; then the
//! destination is let go and its serial markers must continue. Needs QEMU (and root for
//! the namespaces); a run without them says SKIPPED.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vmigrate_tests::control;
use vmigrate_tests::metrics;
use vmigrate_tests::netns::Namespaces;
use vmigrate_tests::process::run;
use vmigrate_tests::process::{is_root, Receiver};
use vmigrate_tests::qemu::{
    check_migrated, configure_migration_with, qemu_available, sweeper_image, tempdir, wait_migration, Sweepers, Vm,
};
use vmigrate_tests::strangers::Strangers;

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(180);

/// Where the relays run: on this host over the kernel's TCP (loopback), or in two
/// namespaces over the kernel's TCP or our stack on AF_PACKET.
enum Link<'a> {
    Kernel,
    KernelBetween(&'a Namespaces),
    AfPacket(&'a Namespaces),
}

impl Link<'_> {
    /// (`qemu-recv` command, `qemu-send` command without its --to), both with `extra`.
    fn relays(&self, dst_socket: &str, src_socket: &str, port: u16) -> (Command, Command, Option<String>) {
        let to = format!("unix:{dst_socket}");
        let listen = format!("unix:{src_socket}");
        match self {
            Link::Kernel => (
                relay_command(&["qemu-recv", "--listen", "127.0.0.1:0", "--to", &to, "--json"]),
                relay_command(&["qemu-send", "--listen", &listen, "--json"]),
                None,
            ),
            Link::KernelBetween(ns) => {
                let address = format!("10.77.0.2:{port}");
                let recv = ["qemu-recv", "--listen", &address, "--to", &to, "--json"];
                let send = ["qemu-send", "--listen", &listen, "--json"];
                (ns.command("dst", &recv), ns.command("src", &send), Some(address))
            }
            Link::AfPacket(ns) => {
                let address = format!("10.77.0.12:{port}");
                let (vs, vd) = (ns.veth("src"), ns.veth("dst"));
                let ours =
                    |iface: &str, ip: &str| ["--stack", "af-packet", "--iface", iface, "--ip", ip].map(String::from);
                let mut recv: Vec<String> =
                    ["qemu-recv", "--listen", &address, "--to", &to, "--json"].map(String::from).to_vec();
                recv.extend(ours(&vd, "10.77.0.12/24"));
                let mut send: Vec<String> = ["qemu-send", "--listen", &listen, "--json"].map(String::from).to_vec();
                send.extend(ours(&vs, "10.77.0.11/24"));
                let recv: Vec<&str> = recv.iter().map(String::as_str).collect();
                let send: Vec<&str> = send.iter().map(String::as_str).collect();
                (ns.command("dst", &recv), ns.command("src", &send), Some(address))
            }
        }
    }
}

fn relay_command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args);
    command
}

/// Migrates the sweeper from a fresh source QEMU to a fresh destination QEMU through the
/// relays on `link`, then checks both guests.
fn migrate_sweeper(link: &Link, multifd: Option<u32>, codec: &str, port: u16) -> serde_json::Value {
    migrate_sweeper_with(link, multifd, Extras::default(), codec, port)
}

/// What a migration may have beside the relays and the guests.
#[derive(Default)]
struct Extras {
    /// QEMU's return path.
    return_path: bool,
    /// Strangers connected to the destination relay's listener before the source relay
    /// (`Link::Kernel` only: the test reaches loopback), and to the source relay's socket
    /// before QEMU.
    strangers: bool,
}

/// As `migrate_sweeper`, with `extras`.
fn migrate_sweeper_with(
    link: &Link,
    multifd: Option<u32>,
    extras: Extras,
    codec: &str,
    port: u16,
) -> serde_json::Value {
    let dir = tempdir(&format!("{}-{port}", std::process::id()));
    let image = sweeper_image(&dir);
    let source = Vm::start(&dir, "source", &image, false);
    let destination = Vm::start(&dir, "destination", &image, true);
    let (mut source_qmp, mut destination_qmp) = (source.qmp(), destination.qmp());
    assert!(source.wait_markers_above(0, Duration::from_secs(30)), "the source guest never swept");
    configure_migration_with(&mut source_qmp, &mut destination_qmp, multifd, 8 << 30, extras.return_path);
    let dst_socket = destination.dir.join("incoming.sock").display().to_string();
    destination_qmp
        .execute("migrate-incoming", serde_json::json!({ "uri": format!("unix:{dst_socket}") }))
        .expect("migrate-incoming");

    let src_socket = dir.join("relay.sock").display().to_string();
    let (recv, mut send, fixed_address) = link.relays(&dst_socket, &src_socket, port);
    let receiver = Receiver::spawn_announcing(recv, "vmigrate: waiting for the source relay on ");
    let to = fixed_address.unwrap_or_else(|| receiver.address.clone());
    let strangers = extras.strangers.then(|| Strangers::connect(&to, &migration::relay::MAGIC));
    send.args(["--to", &to, "--codec"]).args(codec.split(' '));
    let sender = Receiver::spawn_announcing(send, "vmigrate: waiting for QEMU on ");
    let local_strangers = extras.strangers.then(|| Strangers::connect_unix(Path::new(&src_socket), b"QEVM\0\0\0\x03"));

    eprintln!("migrating the sweeper: multifd {multifd:?}, codec {codec}");
    source_qmp.execute("migrate", serde_json::json!({ "uri": format!("unix:{src_socket}") })).expect("migrate");
    let info = wait_migration(&mut source_qmp, DEADLINE);
    let sent = sender.wait(DEADLINE);
    let received = receiver.wait(DEADLINE);
    assert_eq!(info["status"], "completed", "{info}\nqemu-send:\n{}\nqemu-recv:\n{}", sent.stderr, received.stderr);
    let both = format!("qemu-send:\n{}\nqemu-recv:\n{}", sent.stderr, received.stderr);
    assert!(sent.status.success(), "qemu-send failed:\n{both}");
    assert!(received.status.success(), "qemu-recv failed:\n{both}");
    if let Some(strangers) = &strangers {
        // Each stranger that said something was turned away by name; the silent ones
        // held up nothing (the migration above went through with them still open).
        for peer in strangers.peers().iter().take(2) {
            let warning = format!("turned away a connection from {peer}: not a vmigrate stream: bad magic");
            assert!(received.stderr.contains(&warning), "{peer} not named:\n{}", received.stderr);
        }
        // At the source relay's socket, the random bytes and the HTTP request were turned
        // away, named by this process; half a QEMU header and silence held up nothing.
        let warning = format!("turned away a connection on unix:{src_socket} from pid {} ", std::process::id());
        assert_eq!(sent.stderr.matches(&warning).count(), 2, "strangers at the source relay:\n{}", sent.stderr);
        assert!(sent.stderr.contains(r#"not a QEMU migration stream (it began "GET / HT")"#), "{}", sent.stderr);
    }
    drop(local_strangers);
    let (sent, received) = (json(&sent.stdout), json(&received.stdout));
    let streams = 1 + multifd.unwrap_or(0) as usize;
    assert_eq!(sent["channels"].as_array().map(Vec::len), Some(streams), "{sent}");
    assert_eq!(sent["sent"]["bytes"], received["received"]["bytes"], "both relays count QEMU's bytes alike");
    // The relay read QEMU's streams as it carried them: the main one, then multifd's, and
    // found the guest's pages where QEMU put them (all on multifd channels with multifd).
    let channels = sent["channels"].as_array().expect("channels");
    assert_eq!(channels[0]["stream"], "main", "{sent}");
    let pages: u64 = channels.iter().map(|c| c["pages"].as_u64().unwrap_or(0)).sum();
    assert!(pages >= 25_600, "only {pages} pages found: {sent}");
    for channel in &channels[1..] {
        assert_eq!(channel["stream"], "multifd", "{sent}");
    }
    let ram = &info["ram"];
    eprintln!(
        "  QEMU: {} ms, downtime {} ms, {} RAM bytes; relay: {} bytes of QEMU's stream as {} on the wire, {} left \
         behind when QEMU closed a multifd channel",
        info["total-time"],
        info["downtime"],
        ram["transferred"],
        sent["sent"]["bytes"],
        sent["sent"]["wire-bytes"],
        received["received"]["undelivered"]
    );
    // All QEMU 7.2 may leave behind is a trailing multifd packet with no pages (1344 bytes)
    // on some of its channels (`relay::qemu_sink`); the memory check below proves it.
    let undelivered = received["received"]["undelivered"].as_u64().expect("undelivered");
    assert!(undelivered <= 1344 * multifd.unwrap_or(0) as u64, "{received}");
    // QEMU's end-of-file marker (and its machine description after it) reached the
    // destination QEMU only once the stream's digest had checked out.
    let held = received["received"]["held-for-digest"].as_u64().expect("held-for-digest");
    assert!(held > 0, "the end marker was not held back: {received}");

    // Both paused now: the source by the completed migration, the destination by -S.
    let point = check_migrated(&source, &destination, &mut source_qmp, &mut destination_qmp);
    eprintln!("  memory equal on both sides; the sweep stood at page {point}; the destination runs on");
    drop((source, destination));
    let _ = std::fs::remove_dir_all(&dir);
    sent
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

#[test]
fn qemu_migrates_through_the_relays_over_kernel_tcp() {
    if !qemu_available() {
        eprintln!("SKIPPED qemu_migrates_through_the_relays_over_kernel_tcp: QEMU not installed (qemu-system-x86)");
        return;
    }
    // The default: adaptive, on one pool for the main stream and both multifd streams.
    // Strangers (random bytes, HTTP, half a preamble, a silent connection) reach the
    // destination relay's listener first: the source relay's streams still go through.
    let strangers = Extras { strangers: true, ..Extras::default() };
    let sent = migrate_sweeper_with(&Link::Kernel, Some(2), strangers, "adaptive", 1);
    for channel in sent["channels"].as_array().expect("channels") {
        let by_codec: u64 = channel["codecs"].as_object().expect("codecs").values().filter_map(|n| n.as_u64()).sum();
        assert_eq!(Some(by_codec), channel["sent"]["chunks"].as_u64(), "every chunk through the pool: {channel}");
    }
    // With the return path, the source QEMU keeps its main channel open until the
    // destination has loaded: the relay's checkpoint lets the end-of-file marker through.
    migrate_sweeper_with(&Link::Kernel, Some(2), Extras { return_path: true, ..Extras::default() }, "zlib", 2);
    // XBZRLE in the relay, with a cache that holds the whole guest: the pages the sweep
    // dirtied go again as deltas against the copies carried first, on one stream and
    // across multifd's (one cache for all the streams).
    for (multifd, port) in [(None, 3), (Some(2), 5)] {
        let sent = migrate_sweeper(&Link::Kernel, multifd, "none --xbzrle --xbzrle-cache 256MiB", port);
        let channels = sent["channels"].as_array().expect("channels");
        let count = |what: &str| channels.iter().map(|c| c["encodings"][what].as_u64().unwrap_or(0)).sum::<u64>();
        eprintln!(
            "  multifd {multifd:?}: {} deltas, {} unchanged, {} references, {} uncached",
            count("xbzrle"),
            count("unchanged"),
            count("duplicate"),
            count("uncached")
        );
        assert!(count("xbzrle") + count("unchanged") > 0, "no page went as a delta: {sent}");
    }
}

#[test]
fn qemu_migrates_through_the_relays_between_namespaces() {
    if !qemu_available() || !is_root() {
        eprintln!("SKIPPED qemu_migrates_through_the_relays_between_namespaces: needs QEMU and root (namespaces)");
        return;
    }
    let ns = Namespaces::up(&format!("vmq{}", std::process::id() % 100_000), &[], BIN);
    migrate_sweeper(&Link::KernelBetween(&ns), None, "lz4", 4601);
    migrate_sweeper(&Link::KernelBetween(&ns), Some(2), "lz4", 4602);
    migrate_sweeper(&Link::AfPacket(&ns), None, "lz4", 4603);
    migrate_sweeper(&Link::AfPacket(&ns), Some(2), "zlib --xbzrle", 4604);
}

#[test]
fn qemu_migrate_drives_both_qemus_and_the_relays() {
    if !qemu_available() {
        eprintln!("SKIPPED qemu_migrate_drives_both_qemus_and_the_relays: QEMU not installed (qemu-system-x86)");
        return;
    }
    let Sweepers { dir, source, destination, mut source_qmp, mut destination_qmp } = Sweepers::start("orchestrated");
    let socket = |vm: &Vm| format!("unix:{}", vm.control_socket().display());
    // A temp dir of the command's own, to see that it leaves nothing there.
    let temp = dir.join("tmp");
    std::fs::create_dir_all(&temp).unwrap();
    let finished = run(
        Command::new(BIN).env("TMPDIR", &temp).args([
            "qemu-migrate",
            "--src-qmp",
            &socket(&source),
            "--dst-qmp",
            &socket(&destination),
            "--multifd",
            "2",
            "--codec",
            "lz4",
            // Written as on `send`: milliseconds, and bits per second.
            "--downtime-limit",
            "500",
            "--max-bandwidth",
            "10gbit",
            "--json",
        ]),
        DEADLINE,
    );
    assert!(finished.status.success(), "qemu-migrate failed:\n{}", finished.stderr);
    let report = json(&finished.stdout);
    assert_eq!(report["qemu"]["status"], "completed", "{report}");
    let relayed = &report["relay"]["source"];
    assert_eq!(relayed["channels"].as_array().map(Vec::len), Some(3), "main and two multifd streams: {relayed}");
    assert_eq!(relayed["sent"]["bytes"], report["relay"]["destination"]["received"]["bytes"]);
    // QEMU's own count of RAM bytes is part of the stream the relays carried.
    let ram = report["qemu"]["ram"]["transferred"].as_u64().unwrap_or(0);
    assert!(ram > 0 && relayed["sent"]["bytes"].as_u64().unwrap_or(0) >= ram, "{report}");
    // Both QEMUs were set up alike.
    for qmp in [&mut source_qmp, &mut destination_qmp] {
        let parameters = qmp.execute("query-migrate-parameters", serde_json::json!({})).expect("parameters");
        assert_eq!(parameters["multifd-channels"], 2, "{parameters}");
        assert_eq!(parameters["downtime-limit"], 500, "{parameters}");
        assert_eq!(parameters["max-bandwidth"], 1_250_000_000u64, "{parameters}");
    }
    let point = check_migrated(&source, &destination, &mut source_qmp, &mut destination_qmp);
    eprintln!("orchestrated: memory equal on both sides, the sweep stood at page {point}");
    // The files by which threads claim CPUs (`transport::pin`) stay, on purpose: removing
    // a lock file races with a process about to lock it.
    let left: Vec<_> = std::fs::read_dir(&temp)
        .expect("the command's temp dir")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| !(name.starts_with("vmigrate-cpu-") && name.ends_with(".lock")))
        .collect();
    assert!(left.is_empty(), "qemu-migrate left its sockets behind in {}: {left:?}", temp.display());
}

#[test]
fn qemu_migrate_takes_control_commands() {
    if !qemu_available() {
        eprintln!("SKIPPED qemu_migrate_takes_control_commands: QEMU not installed (qemu-system-x86)");
        return;
    }
    let Sweepers { dir, source, destination, mut source_qmp, mut destination_qmp } = Sweepers::start("controlled");
    let socket = |vm: &Vm| format!("unix:{}", vm.control_socket().display());
    let control = dir.join("control.sock");
    // 40 Mbit/s: the guest's 100 MiB of pages would take some 20 s.
    let mut migrate = Command::new(BIN);
    migrate
        .args(["qemu-migrate", "--src-qmp", &socket(&source), "--dst-qmp", &socket(&destination)])
        .args(["--codec", "none", "--max-bandwidth", "40mbit", "--json", "--metrics", "127.0.0.1:0", "--control"])
        .arg(format!("unix:{}", control.display()));
    let migrate = Receiver::spawn_announcing(migrate, "vmigrate: metrics at http://");
    let ask = |line: &str| control::command(&control, line);
    let deadline = std::time::Instant::now() + DEADLINE;
    while !control.exists() || ask(r#"{"execute": "query-migrate"}"#)["return"]["status"] != "active" {
        assert!(std::time::Instant::now() < deadline, "the migration never became active");
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = control::listen_for_events(&control);
    std::thread::sleep(Duration::from_millis(500));
    // QEMU's figures and the relay's, scraped while pre-copy runs.
    if metrics::parser_available() {
        let scraped = metrics::scrape_parsed(&migrate.address);
        assert_eq!(metrics::sample(&scraped, r#"vmigrate_migration_stage{"stage": "active"}"#), 1.0, "{scraped}");
        assert!(metrics::sample(&scraped, "vmigrate_migration_transferred_bytes_total{}") > 0.0, "{scraped}");
        assert!(metrics::sample(&scraped, "vmigrate_migration_round{}") >= 1.0, "{scraped}");
        assert!(metrics::sample(&scraped, "vmigrate_relay_qemu_bytes_total{}") > 0.0, "{scraped}");
    } else {
        eprintln!("SKIPPED qemu-migrate's metrics: no python3-prometheus-client");
    }
    assert_eq!(ask(r#"{"execute": "migrate-switchover"}"#), serde_json::json!({ "return": {} }));
    let finished = migrate.wait(DEADLINE);
    assert!(finished.status.success(), "qemu-migrate failed:\n{}", finished.stderr);
    let report = json(&finished.stdout);
    assert_eq!(report["qemu"]["status"], "completed", "{report}");
    // Forced QEMU's way: its largest downtime limit, and what was left went in the downtime.
    let parameters = source_qmp.execute("query-migrate-parameters", serde_json::json!({})).expect("parameters");
    assert_eq!(parameters["downtime-limit"], 2_000_000, "{parameters}");
    let ram = &report["qemu"]["ram"];
    eprintln!(
        "forced: {} ms in all, downtime {} ms, {} bytes in the downtime of {}",
        report["qemu"]["total-time"], report["qemu"]["downtime"], ram["downtime-bytes"], ram["transferred"]
    );
    // At once: most of the pages went in the downtime, not at 40 Mbit/s before it.
    let (downtime_bytes, transferred) = (ram["downtime-bytes"].as_u64().unwrap(), ram["transferred"].as_u64().unwrap());
    assert!(downtime_bytes > transferred / 2, "{downtime_bytes} of {transferred} bytes in the downtime");
    control::assert_ends_completed(&events.join().expect("the listening client"));
    check_migrated(&source, &destination, &mut source_qmp, &mut destination_qmp);
    let _ = std::fs::remove_dir_all(&dir);
}
