//! Migrations between two network namespaces joined by a veth pair (scripts/netns): over
//! our smoltcp stack on TAP devices at both ends, over the kernel's TCP, and mixed (our
//! stack sending to the kernel's: it is plain TCP on the wire). Needs root; a run without
//! it says SKIPPED.

use std::process::Command;
use std::time::Duration;
use vmigrate_tests::metrics;
use vmigrate_tests::netns::Namespaces;
#[cfg(feature = "dpdk")]
use vmigrate_tests::process::assert_large_segments_both_ways;
use vmigrate_tests::process::{assert_migrated, is_root, run, Finished, Receiver};

const BIN: &str = env!("CARGO_BIN_EXE_vmigrate");
const DEADLINE: Duration = Duration::from_secs(180);

/// Our stack's side of a migration: the stack, its interface and address, and where the
/// destination listens.
struct Side<'a> {
    stack: &'a str,
    iface: String,
    ip: &'a str,
}

impl Side<'_> {
    fn args(&self) -> Vec<String> {
        ["--stack", self.stack, "--iface", &self.iface, "--ip", self.ip].iter().map(|s| s.to_string()).collect()
    }
}

/// Our stack at both ends on `stack` ("tap" or "af-packet"): (source side, destination side).
fn our_stack<'a>(ns: &Namespaces, stack: &'a str) -> (Side<'a>, Side<'a>) {
    let (src, dst) = match stack {
        "tap" => ("tap0".to_string(), "tap0".to_string()),
        _ => (format!("{}-vs", ns.prefix), format!("{}-vd", ns.prefix)),
    };
    (Side { stack, iface: src, ip: "10.77.0.11/24" }, Side { stack, iface: dst, ip: "10.77.0.12/24" })
}

/// Runs recv in the destination namespace and send in the source namespace with `workload`
/// on a 64 MiB guest; both must succeed and verify. Returns the source's report.
fn migrate(ns: &Namespaces, recv: &[String], send: &[String], workload: &str) -> serde_json::Value {
    let (sent, received) = migrate_runs(ns, recv, send, workload);
    assert_migrated(&sent, &received).0
}

/// As `migrate`, returning both processes' outputs (after checking the migration).
fn migrate_runs(ns: &Namespaces, recv: &[String], send: &[String], workload: &str) -> (Finished, Finished) {
    let mut recv_args: Vec<&str> = vec!["recv", "--json", "--run-after", "0.3"];
    recv_args.extend(recv.iter().map(String::as_str));
    let receiver = Receiver::spawn(ns.command("dst", &recv_args));
    let mut send_args: Vec<&str> = vec!["send", "--mem", "64MiB", "--workload", workload, "--verify", "--json"];
    send_args.extend(send.iter().map(String::as_str));
    let sent = run(&mut ns.command("src", &send_args), DEADLINE);
    let received = receiver.wait(DEADLINE);
    assert_migrated(&sent, &received);
    (sent, received)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A migration over our stack at both ends, with `extra` options on both.
fn migrate_ours(ns: &Namespaces, stack: &str, port: u16, workload: &str, send_extra: &[&str], both: &[&str]) {
    let (src, dst) = our_stack(ns, stack);
    let listen = format!("10.77.0.12:{port}");
    let mut recv = dst.args();
    recv.extend(strings(&["--listen", &listen]));
    recv.extend(strings(both));
    let mut send = src.args();
    send.extend(strings(&["--to", &listen]));
    send.extend(strings(send_extra));
    send.extend(strings(both));
    eprintln!("migrating {workload} over {stack} with {send_extra:?} {both:?}");
    migrate(ns, &recv, &send, workload);
}

const WORKLOADS: [&str; 2] = ["seq", "dirty:32MiB:5000:16"];

/// Where a `--pcap` capture of this test process goes.
fn capture_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("vmigrate-{}-{name}.pcap", std::process::id()))
}

/// The lengths of the frames in the capture at `path`, which is then removed.
fn captured_lengths(path: &std::path::Path) -> Vec<usize> {
    let bytes = std::fs::read(path).expect("the capture");
    let _ = std::fs::remove_file(path);
    dataplane::layers::pcap_frame_lengths(&bytes)
}

/// Frames longer than an MTU-sized (1500) Ethernet frame.
fn over_mtu(lengths: &[usize]) -> usize {
    lengths.iter().filter(|&&len| len > 1514).count()
}

fn largest(lengths: &[usize]) -> usize {
    lengths.iter().copied().max().unwrap_or(0)
}

/// A migration over our stack on `stack` with both ends capturing (`--pcap`); returns the
/// lengths of the frames in the source's capture and in the destination's.
fn captures(ns: &Namespaces, stack: &str, port: u16, offload: bool) -> (Vec<usize>, Vec<usize>) {
    let (src, dst) = our_stack(ns, stack);
    let capture = |side: &str| capture_path(&format!("{stack}-{port}-{side}"));
    let listen = format!("10.77.0.12:{port}");
    let mut recv = dst.args();
    recv.extend(strings(&["--listen", &listen, "--pcap", &capture("dst").display().to_string()]));
    let mut send = src.args();
    send.extend(strings(&["--to", &listen, "--pcap", &capture("src").display().to_string()]));
    if !offload {
        recv.push("--no-offload".into());
        send.push("--no-offload".into());
    }
    migrate(ns, &recv, &send, WORKLOADS[0]);
    (captured_lengths(&capture("src")), captured_lengths(&capture("dst")))
}

#[test]
fn migrations_between_namespaces() {
    if !is_root() {
        eprintln!("SKIPPED migrations_between_namespaces: needs root for network namespaces and TAP devices");
        return;
    }
    let ns = Namespaces::up(&format!("vmt{}", std::process::id() % 100_000), &[], BIN);

    // Our stack at both ends, on TAP queues and on packet sockets bound to the veth ends:
    // each workload with 1 and 4 connections on 1 and 2 dataplane cores per side.
    let mut port = 4500;
    for stack in ["tap", "af-packet"] {
        for workload in WORKLOADS {
            for (connections, cores) in [(1, 1), (4, 1), (1, 2), (4, 2)] {
                let (connections, cores) = (connections.to_string(), cores.to_string());
                port += 1;
                migrate_ours(
                    &ns,
                    stack,
                    port,
                    workload,
                    &["--connections", &connections],
                    &["--dataplane-cores", &cores],
                );
            }
        }
    }
    // Offload on TAP (virtio-net headers) and on packet sockets (PACKET_VNET_HDR): our
    // 64 KiB segments leave whole and cross the bridge and the veth whole, so the
    // destination's capture holds them as large frames too; with --no-offload no frame
    // exceeds the MTU. Each migration verifies.
    for (stack, port, offload) in
        [("tap", 4603, true), ("tap", 4604, false), ("af-packet", 4605, true), ("af-packet", 4606, false)]
    {
        let (src_lengths, dst_lengths) = captures(&ns, stack, port, offload);
        eprintln!(
            "{stack} offload {offload}: source sent {} frames ({} over the MTU, the largest {}), destination got {} ({} over, the largest {})",
            src_lengths.len(), over_mtu(&src_lengths), largest(&src_lengths), dst_lengths.len(), over_mtu(&dst_lengths), largest(&dst_lengths)
        );
        if offload {
            assert!(largest(&src_lengths) > 16 * 1514 && largest(&dst_lengths) > 16 * 1514);
            // Under the kernel's GSO limit, so that it passes them on whole rather than
            // cutting them in software at the veth: nearly every large frame the source
            // sent reaches the destination as it was (a few may be retransmitted cut).
            assert!(largest(&src_lengths) <= dataplane::KERNEL_SEGMENT_FRAME_BYTES);
            assert!(
                10 * over_mtu(&dst_lengths) >= 9 * over_mtu(&src_lengths),
                "{stack}: large frames were cut on the way"
            );
        } else {
            assert_eq!((over_mtu(&src_lengths), over_mtu(&dst_lengths)), (0, 0));
        }
    }

    // A plain TAP device, made as a new user makes one (single queue): one core works on
    // it, and two are refused with how to make a device that has the queues.
    for side in ["src", "dst"] {
        for step in [
            &["tuntap", "add", "dev", "tap1", "mode", "tap"][..],
            &["link", "set", "tap1", "master", "br0"],
            &["link", "set", "tap1", "up"],
        ] {
            assert!(ns.program(side, "ip", step).status().expect("ip").success(), "{side}: ip {step:?}");
        }
    }
    let single = |ip: &str, tail: &[&str]| {
        let mut args = strings(&["--stack", "tap", "--iface", "tap1", "--ip", ip]);
        args.extend(strings(tail));
        args
    };
    let recv = single("10.77.0.12/24", &["--listen", "10.77.0.12:4601"]);
    let send = single("10.77.0.11/24", &["--to", "10.77.0.12:4601", "--connections", "2"]);
    migrate(&ns, &recv, &send, WORKLOADS[0]);
    let mut two =
        vec!["recv", "--stack", "tap", "--iface", "tap1", "--ip", "10.77.0.12/24", "--listen", "10.77.0.12:4602"];
    two.extend(["--dataplane-cores", "2", "--accept-timeout", "1"]);
    let refused = run(&mut ns.command("dst", &two), DEADLINE);
    let error = refused.assert_clean_failure();
    assert!(error.contains("has one queue") && error.contains("multi_queue"), "{error}");

    // Codecs and qdisc bypass ride on the same stacks.
    migrate_ours(&ns, "af-packet", 4600, "seq", &["--connections", "2", "--codec", "zlib", "--qdisc-bypass"], &[]);

    // The kernel's TCP at both ends: the baseline.
    migrate(&ns, &strings(&["--listen", "10.77.0.2:4445"]), &strings(&["--to", "10.77.0.2:4445"]), WORKLOADS[1]);

    // Our stack sending to the kernel's: plain TCP on the wire.
    let (src, _) = our_stack(&ns, "tap");
    let mut send = src.args();
    send.extend(strings(&["--to", "10.77.0.2:4446", "--dataplane-cores", "2", "--connections", "2"]));
    migrate(&ns, &strings(&["--listen", "10.77.0.2:4446"]), &send, WORKLOADS[1]);
    let (src, _) = our_stack(&ns, "af-packet");
    let mut send = src.args();
    send.extend(strings(&["--to", "10.77.0.2:4447"]));
    migrate(&ns, &strings(&["--listen", "10.77.0.2:4447"]), &send, WORKLOADS[1]);

    // The kernel's TCP sending to our stack on a packet socket. Over a veth the kernel
    // hands its 64 KiB GSO segments across whole, and our offloaded socket takes them so.
    let (_, dst) = our_stack(&ns, "af-packet");
    let kernel_to_ours = |port: u16, tail: &[&str]| {
        let mut recv = dst.args();
        recv.extend(strings(&["--listen", &format!("10.77.0.12:{port}")]));
        recv.extend(strings(tail));
        migrate(&ns, &recv, &strings(&["--to", &format!("10.77.0.12:{port}"), "--connections", "4"]), WORKLOADS[1]);
    };
    // The lengths of the frames our receiver captured in a migration on `port`.
    let received = |port: u16| {
        let path = capture_path(&format!("kernel-{port}"));
        kernel_to_ours(port, &["--pcap", &path.display().to_string()]);
        captured_lengths(&path)
    };
    let whole = received(4449);
    assert!(largest(&whole) > 16 * 1514, "the kernel's segments did not arrive whole: the largest {}", largest(&whole));
    // With the sending side's segmentation capped at the MTU and its veth end's TSO off,
    // as a NIC's wire carries frames (a veth aggregates only frames from a peer without
    // TSO), receive aggregation (GRO, turned on for the veth end) hands our socket large
    // frames again; without offload the socket takes only MTU-sized frames, so GRO must be
    // off. Last, since it changes the kernel's side for the rest of the run.
    for device in ["br0", &ns.veth("src")] {
        let status =
            ns.program("src", "ip", &["link", "set", device, "gso_max_size", "1500"]).status().expect("run ip");
        assert!(status.success(), "could not cap GSO on {device}");
    }
    let status = ns.program("src", "ethtool", &["-K", &ns.veth("src"), "tso", "off"]).status().expect("run ethtool");
    assert!(status.success(), "could not turn TSO off on the source's veth end");
    let gro = |setting: &str| {
        let device = ns.veth("dst");
        let status = ns.program("dst", "ethtool", &["-K", &device, "gro", setting]).status().expect("run ethtool");
        assert!(status.success(), "could not turn GRO {setting} on {device}");
    };
    gro("on");
    let aggregated = received(4450);
    // Any frame over the MTU is an aggregate here; how many segments GRO merges depends on
    // how many arrive within one NAPI poll, which a busy machine lowers (two, at times).
    assert!(largest(&aggregated) > 1514, "no GRO aggregates arrived: the largest frame {}", largest(&aggregated));
    gro("off");
    kernel_to_ours(4448, &["--dataplane-cores", "2", "--no-offload"]);
    eprintln!(
        "kernel to our AF_PACKET: the largest frame {} with the sender's GSO, {} with GRO ({} of {} over the MTU)",
        largest(&whole),
        largest(&aggregated),
        over_mtu(&aggregated),
        aggregated.len()
    );
}

/// The KVM guest between namespaces over our stack on packet sockets: its vCPU state
/// crosses, and the guest on the destination checks its own memory.
#[test]
fn kvm_guest_migrations_between_namespaces() {
    if !is_root() {
        eprintln!("SKIPPED kvm_guest_migrations_between_namespaces: needs root for network namespaces");
        return;
    }
    if let Err(why) = guests::kvm::available() {
        eprintln!("SKIPPED kvm_guest_migrations_between_namespaces: no usable KVM ({why})");
        return;
    }
    let ns = Namespaces::up(&format!("vmk{}", std::process::id() % 100_000), &[], BIN);
    let mut port = 4700;
    for workload in ["seq:20000", "dirty:16MiB:5000:16"] {
        for connections in ["1", "4"] {
            port += 1;
            migrate_ours(
                &ns,
                "af-packet",
                port,
                workload,
                &["--connections", connections, "--codec", "lz4", "--xbzrle-cache", "16MiB"],
                &["--guest", "kvm"],
            );
        }
    }
}

#[test]
fn migration_through_a_shaped_link() {
    if !is_root() {
        eprintln!("SKIPPED migration_through_a_shaped_link: needs root for network namespaces");
        return;
    }
    // A middle namespace shapes both directions to 500 Mbit/s (tbf); with qdisc bypass on
    // the sender's packet socket the shaping still applies, since it is in the middle.
    let ns = Namespaces::up(&format!("vms{}", std::process::id() % 100_000), &["--rate", "500mbit"], BIN);
    let (src, dst) = our_stack(&ns, "af-packet");
    let mut recv = dst.args();
    recv.extend(strings(&["--listen", "10.77.0.12:4448"]));
    let mut send = src.args();
    send.extend(strings(&["--to", "10.77.0.12:4448", "--qdisc-bypass", "--codec", "lz4"]));
    let sent = migrate(&ns, &recv, &send, WORKLOADS[1]);
    // 500 Mbit/s is 62.5 MB/s: the average rate the source saw cannot be above it.
    let mbps = sent["ram"]["mbps"].as_f64().unwrap_or(f64::MAX);
    assert!(mbps <= 550.0, "the link was not shaped: {mbps} Mbit/s");
}

/// Frames the middle namespace's loss rule has dropped so far.
fn frames_dropped(ns: &Namespaces) -> u64 {
    let output = ns.program("mid", "nft", &["list", "ruleset"]).output().expect("run nft in the middle namespace");
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .skip_while(|word| *word != "packets")
        .nth(1)
        .and_then(|count| count.parse().ok())
        .unwrap_or(0)
}

#[test]
fn migration_through_a_lossy_link() {
    if !is_root() {
        eprintln!("SKIPPED migration_through_a_lossy_link: needs root for network namespaces");
        return;
    }
    // 1 Gbit/s with 1% of frames dropped each way, over both of our NIC backends, with the
    // `dirty` guest. Both ends share this host: their polling cores must claim different
    // CPUs (transport::pin::claim_cpu), or at 1% loss the stream slows eightfold.
    let ns = Namespaces::up(&format!("vml{}", std::process::id() % 100_000), &["--rate", "1gbit", "--loss", "1"], BIN);
    let before = frames_dropped(&ns);
    for (port, stack) in [(4449, "af-packet"), (4450, "tap")] {
        migrate_ours(&ns, stack, port, WORKLOADS[1], &["--connections", "2"], &["--dataplane-cores", "2"]);
    }
    scrape_our_stack_while_it_migrates(&ns, 4451);
    let dropped = frames_dropped(&ns) - before;
    assert!(dropped > 0, "the loss rule dropped no frame: the link was not lossy");
    eprintln!("the lossy link dropped {dropped} frames");
}

/// A migration over our stack (packet sockets, 2 connections) on the lossy link, both
/// ends serving `--metrics` in their namespaces, scraped while it runs and parsed with
/// Prometheus's parser: each dataplane core's busy time, each connection's RTT and the
/// retransmissions the loss caused.
fn scrape_our_stack_while_it_migrates(ns: &Namespaces, port: u16) {
    if !metrics::parser_available() {
        eprintln!("SKIPPED the dataplane's metrics on a lossy link: no python3-prometheus-client");
        return;
    }
    let (src, dst) = our_stack(ns, "af-packet");
    let listen = format!("10.77.0.12:{port}");
    let mut recv = strings(&["recv", "--json", "--run-after", "0.3", "--listen", &listen]);
    recv.extend(dst.args().into_iter().chain(strings(&["--metrics", "127.0.0.1:0"])));
    let recv: Vec<&str> = recv.iter().map(String::as_str).collect();
    let receiver = Receiver::spawn_announcing(ns.command("dst", &recv), "vmigrate: metrics at http://");
    // 256 MiB at 400 Mbit/s: seconds to scrape in.
    let mut send =
        strings(&["send", "--mem", "256MiB", "--workload", "seq:1000", "--verify", "--json", "--to", &listen]);
    send.extend(strings(&["--codec", "none", "--max-bandwidth", "400mbit", "--connections", "2"]));
    send.extend(src.args().into_iter().chain(strings(&["--metrics", "127.0.0.1:0"])));
    let send: Vec<&str> = send.iter().map(String::as_str).collect();
    let sender = Receiver::spawn_announcing(ns.command("src", &send), "vmigrate: metrics at http://");
    std::thread::sleep(Duration::from_millis(2000));
    let python = |side: &str| ns.program(side, metrics::PYTHON, &[]);
    let (sent, received) = (
        metrics::scrape_parsed_with(python("src"), &sender.address),
        metrics::scrape_parsed_with(python("dst"), &receiver.address),
    );
    let (sent_run, received_run) = (sender.wait(DEADLINE), receiver.wait(DEADLINE));
    assert_migrated(&sent_run, &received_run);

    for (side, parsed) in [("source", &sent), ("destination", &received)] {
        let busy = metrics::samples(parsed, "vmigrate_dataplane_core_busy_seconds_total");
        let running = metrics::samples(parsed, "vmigrate_dataplane_core_running_seconds_total");
        assert!(!busy.is_empty() && busy.len() == running.len(), "{side}: {parsed}");
        for ((_, busy), (_, running)) in busy.iter().zip(&running) {
            assert!(*busy > 0.0 && busy <= running, "{side}: busy {busy} s of {running} s");
        }
        let rtts = metrics::samples(parsed, "vmigrate_connection_smoothed_rtt_seconds");
        assert!(rtts.len() >= 2, "{side}: at least the two data connections: {parsed}");
        // Both queues of every open connection, as `ss` shows them.
        let connections = metrics::samples(parsed, "vmigrate_connection_retransmissions_total").len();
        for queue in ["vmigrate_connection_send_queue_bytes", "vmigrate_connection_receive_queue_bytes"] {
            let queues = metrics::samples(parsed, queue);
            assert!(connections >= 2 && queues.len() == connections, "{side}: {queue} for each connection: {parsed}");
        }
        eprintln!("{side}: cores busy {busy:?} of {running:?}; RTTs {rtts:?}");
    }
    let peer = format!("\"remote\": \"{listen}\"");
    let towards_destination = metrics::samples(&sent, "vmigrate_connection_retransmissions_total");
    assert!(towards_destination.iter().filter(|(key, _)| key.contains(&peer)).count() >= 2, "{sent}");
    let retransmitted: f64 =
        metrics::samples(&sent, "vmigrate_dataplane_core_retransmissions_total").iter().map(|(_, n)| n).sum();
    assert!(retransmitted > 0.0, "1% loss, and no retransmission counted: {sent}");
    eprintln!("the source's cores retransmitted {retransmitted} times by the scrape");
    assert!(metrics::sample(&received, "vmigrate_incoming_received_bytes_total{}") > 0.0, "{received}");
}

/// EAL arguments for one side: its own lcore, file prefix and memory, and `vdev`.
#[cfg(feature = "dpdk")]
fn eal_args(ns: &Namespaces, side: &str, vdev: &str, hugepages: bool) -> Vec<String> {
    let lcore = if side == "src" { "1" } else { "0" };
    let mut args: Vec<String> = vec!["--".into()];
    if !hugepages {
        args.push("--no-huge".into());
    }
    let prefix = format!("--file-prefix={}-{side}", ns.prefix);
    args.extend(["-m", "128", "--no-pci", "-l", lcore, "--log-level=error", &prefix, "--vdev", vdev].map(String::from));
    args
}

/// `send` or `recv` options for our stack on the DPDK port `port`, made from `vdev`.
#[cfg(feature = "dpdk")]
fn dpdk_side(
    ns: &Namespaces,
    side: &str,
    port: &str,
    vdev: &str,
    cores: usize,
    hugepages: bool,
    tail: &[&str],
) -> Vec<String> {
    let ip = if side == "src" { "10.77.0.11/24" } else { "10.77.0.12/24" };
    let cores = cores.to_string();
    let mut args = strings(&["--stack", "dpdk", "--iface", port, "--ip", ip, "--dataplane-cores", &cores]);
    args.extend(strings(tail));
    args.extend(eal_args(ns, side, vdev, hugepages));
    args
}

/// The port's teardown report: closed, and every mbuf back in its pool.
#[cfg(feature = "dpdk")]
fn assert_port_closed_clean(stderr: &str) {
    assert!(stderr.contains("mbufs back in the pool"), "no clean DPDK teardown reported:\n{stderr}");
    assert!(!stderr.contains("warning: DPDK"), "{stderr}");
}

/// Waits (up to 20 s) for the TAP device `tap` to appear in `namespace`, then puts it in
/// the namespace's bridge and up. Returns whether it did.
#[cfg(feature = "dpdk")]
fn bridge_when_present(namespace: &str, tap: &str) -> bool {
    // Quiet: until the device appears, every try fails with "Cannot find device".
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(["-n", namespace])
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for _ in 0..200 {
        if ip(&["link", "set", tap, "master", "br0"]) {
            return ip(&["link", "set", tap, "up"]);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn migrations_over_dpdk() {
    if !cfg!(feature = "dpdk") {
        eprintln!("SKIPPED migrations_over_dpdk: built without the dpdk feature (cargo test --features dpdk)");
    } else if !is_root() {
        eprintln!("SKIPPED migrations_over_dpdk: needs root for network namespaces and DPDK");
    } else {
        #[cfg(feature = "dpdk")]
        dpdk_migrations();
    }
}

#[cfg(feature = "dpdk")]
fn dpdk_migrations() {
    let ns = Namespaces::up(&format!("vmd{}", std::process::id() % 100_000), &[], BIN);
    // Our stack on a DPDK port at one side: an AF_PACKET vdev on that side's veth end, with
    // a queue pair per dataplane core.
    let ours = |side: &str, cores: usize, hugepages: bool, tail: &[&str]| {
        let veth = format!("{}-{}", ns.prefix, if side == "src" { "vs" } else { "vd" });
        let vdev = format!("net_af_packet0,iface={veth},qpairs={cores}");
        dpdk_side(&ns, side, "net_af_packet0", &vdev, cores, hugepages, tail)
    };
    let mut port = 4900;
    // DPDK at both ends: each workload on 1 and 2 queue pairs without hugepages, then with.
    for (workload, cores, connections, hugepages) in [
        (WORKLOADS[0], 1, "1", false),
        (WORKLOADS[1], 1, "1", false),
        (WORKLOADS[0], 2, "4", false),
        (WORKLOADS[1], 2, "4", false),
        (WORKLOADS[1], 1, "2", true),
    ] {
        port += 1;
        let listen = format!("10.77.0.12:{port}");
        eprintln!("migrating {workload} over dpdk, {cores} cores, hugepages {hugepages}");
        let recv = ours("dst", cores, hugepages, &["--listen", &listen, "--nic-xstats"]);
        let send = ours("src", cores, hugepages, &["--to", &listen, "--connections", connections]);
        let (sent, received) = migrate_runs(&ns, &recv, &send, workload);
        assert_port_closed_clean(&sent.stderr);
        assert_port_closed_clean(&received.stderr);
        assert_large_segments_both_ways(&format!("{}{}", sent.stderr, received.stderr));
        if cores > 1 {
            // The kernel's fanout hash, not our rule, picks each frame's queue: the cores
            // hand each other's frames over, and count them (how many is the hash's luck).
            let handed = "frames received handed to the core that owns their flow";
            assert_eq!(received.stderr.matches(handed).count(), cores, "{}", received.stderr);
            received.stderr.lines().filter(|line| line.contains(handed)).for_each(|line| eprintln!("{line}"));
        }
        // The driver's extended statistics, asked of the receiver: ethdev's generic ones
        // are there for every driver, and the receiver took in packets.
        let good = received.stderr.lines().find_map(|line| line.trim().strip_prefix("vmigrate:   rx_good_packets = "));
        assert!(good.and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0), "{}", received.stderr);
    }

    // DPDK's AF_XDP driver on the veth ends (an XSK socket on queue 0, with the driver's
    // XDP program loaded on the veth; no bpffs in the namespaces, so libxdp loads it
    // without its dispatcher). It chains no mbufs: frames of the MTU.
    let xdp = |side: &str, tail: &[&str]| {
        let veth = format!("{}-{}", ns.prefix, if side == "src" { "vs" } else { "vd" });
        let vdev = format!("net_af_xdp0,iface={veth},start_queue=0,queue_count=1");
        dpdk_side(&ns, side, "net_af_xdp0", &vdev, 1, false, tail)
    };
    // A kernel without AF_XDP on veth devices makes the port fail to start: said, not failed.
    let mut probe = strings(&["recv", "--accept-timeout", "1"]);
    probe.extend(xdp("dst", &["--listen", "10.77.0.12:4954"]));
    let probe_refs: Vec<&str> = probe.iter().map(String::as_str).collect();
    let probed = run(&mut ns.command("dst", &probe_refs), DEADLINE);
    if probed.stderr.contains("waiting for a migration on") {
        let recv = xdp("dst", &["--listen", "10.77.0.12:4953"]);
        let send = xdp("src", &["--to", "10.77.0.12:4953", "--connections", "2"]);
        eprintln!("migrating {} over DPDK net_af_xdp", WORKLOADS[1]);
        let (sent, received) = migrate_runs(&ns, &recv, &send, WORKLOADS[1]);
        for output in [&sent, &received] {
            assert!(output.stderr.contains("DPDK port net_af_xdp0: 1 queue pair(s)"), "{}", output.stderr);
            assert!(output.stderr.contains("DPDK port net_af_xdp0 closed: all mbufs back"), "{}", output.stderr);
            assert!(!output.stderr.contains("warning: DPDK"), "{}", output.stderr);
        }
        // It cannot send large segments, but merges what it receives.
        let merged = received.stderr.lines().find_map(|line| {
            line.split_once("dpdk: ")?.1.split_once(" large segments received")?.0.parse::<u64>().ok()
        });
        assert!(merged.is_some_and(|merged| merged > 0), "{}", received.stderr);
    } else {
        let why = probed.stderr.lines().last().unwrap_or("no output");
        eprintln!("SKIPPED the AF_XDP migration: this kernel would not open an AF_XDP port on a veth ({why})");
    }

    // net_tap vdevs: DPDK makes a kernel TAP device for each port, which the harness
    // bridges to the veth end once it appears (the sender's SYN is retried meanwhile).
    let attach: Vec<_> = ["src", "dst"]
        .into_iter()
        .map(|side| {
            let namespace = format!("{}-{side}", ns.prefix);
            std::thread::spawn(move || bridge_when_present(&namespace, &format!("dtap{side}")))
        })
        .collect();
    let tap = |side: &str, tail: &[&str]| {
        dpdk_side(&ns, side, "net_tap0", &format!("net_tap0,iface=dtap{side}"), 1, false, tail)
    };
    let recv = tap("dst", &["--listen", "10.77.0.12:4952"]);
    let send = tap("src", &["--to", "10.77.0.12:4952", "--connections", "2"]);
    let (sent, received) = migrate_runs(&ns, &recv, &send, WORKLOADS[1]);
    // The TAP PMD offers IPv4 and TCP checksum offload, and our stack takes it both ways.
    for output in [&sent, &received] {
        assert!(output.stderr.contains("checksum offload: receive and transmit"), "{}", output.stderr);
        assert_port_closed_clean(&output.stderr);
    }
    // Its TSO is the GSO library inside the driver, which refuses full-MTU frames: our
    // own GSO cuts the segments.
    assert!(sent.stderr.contains("by GSO"), "{}", sent.stderr);
    assert_large_segments_both_ways(&format!("{}{}", sent.stderr, received.stderr));
    for thread in attach {
        assert!(thread.join().expect("attach thread"), "a DPDK TAP device never appeared");
    }

    // DPDK on one side, the kernel's TCP or our AF_PACKET stack on the other: plain TCP.
    // Over a veth the kernel leaves its checksums, and our AF_PACKET stack's with offload,
    // for a NIC to finish, and DPDK's af_packet PMD does not report that; with checksum
    // offload off on the destination's devices the kernel computes them (as it does before
    // any NIC without it), for its own TCP and for our offloaded segments, which it then
    // also cuts to the MTU itself. Last: it changes the destination's side.
    for device in ["br0", &format!("{}-vd", ns.prefix)] {
        let status = Command::new("ip")
            .args(["netns", "exec", &format!("{}-dst", ns.prefix), "ethtool", "-K", device, "tx", "off"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run ethtool");
        assert!(status.success(), "could not turn off checksum offload on {device}");
    }
    let (_, dst) = our_stack(&ns, "af-packet");
    let mut recv = dst.args();
    recv.extend(strings(&["--listen", "10.77.0.12:4951"]));
    let send = ours("src", 1, false, &["--to", "10.77.0.12:4951"]);
    migrate(&ns, &recv, &send, WORKLOADS[0]);
    let send = ours("src", 1, false, &["--to", "10.77.0.2:4950"]);
    migrate(&ns, &strings(&["--listen", "10.77.0.2:4950"]), &send, WORKLOADS[1]);
}

/// A fault put on the middle namespace's link for one migration.
enum LinkFault {
    /// nftables rules (a `table` in nft's syntax) in the middle namespace.
    Rules(String),
    /// Both middle veth ends down for this long, from 300 ms into the migration.
    Down(Duration),
}

/// Random drops of `percent`% of the frames crossing the middle bridge, both ways.
fn loss_rules(percent: f64) -> String {
    let per10k = (percent * 100.0).round() as u32;
    bridge_rule(&format!("numgen random mod 10000 < {per10k} counter drop"))
}

/// One rule on the frames the middle bridge forwards.
fn bridge_rule(rule: &str) -> String {
    format!("table bridge faults {{\n chain forward {{\n type filter hook forward priority 0; policy accept;\n {rule}\n }}\n}}\n")
}

/// Every fault the middle namespace can make on this kernel, on one link (reordering needs
/// sch_netem, which this machine's kernel lacks; the in-process wire's seeded faults cover
/// it). Corruption rewrites a TCP payload byte without fixing the checksum: frames of the
/// kernel's TCP on a veth carry no finished checksum and are trusted by the receiving
/// kernel, so the corruption reaches the migration stream, whose frame CRC must catch it;
/// our stack checks TCP checksums itself and retransmits.
fn link_faults(prefix: &str) -> Vec<(String, LinkFault)> {
    let second = Duration::from_secs(1);
    let mut cases: Vec<(String, LinkFault)> = [0.1, 1.0, 5.0]
        .into_iter()
        .map(|percent| (format!("loss {percent}%"), LinkFault::Rules(loss_rules(percent))))
        .collect();
    let dup = |end: &str| {
        format!(
            "chain dup_{end} {{\n type filter hook ingress device \"{prefix}-{end}\" priority 0; policy accept;\n \
             numgen random mod 100 < 1 dup to \"{prefix}-{}\"\n }}\n",
            if end == "ms" { "md" } else { "ms" }
        )
    };
    cases.push((
        "duplication 1%".into(),
        LinkFault::Rules(format!("table netdev faults {{\n{}{}}}\n", dup("ms"), dup("md"))),
    ));
    cases.push((
        "corruption 0.5%".into(),
        LinkFault::Rules(bridge_rule("ip protocol tcp numgen random mod 1000 < 5 counter @ih,0,8 set 0x5a")),
    ));
    cases.push(("link down 1 s".into(), LinkFault::Down(second)));
    cases.push(("link down 30 s".into(), LinkFault::Down(30 * second)));
    cases
}

/// Bytes the middle namespace's end toward the source has received so far (the stream's
/// data, once the migration runs), for the namespaces of `prefix`.
fn bytes_from_source(prefix: &str) -> u64 {
    let path = format!("/sys/class/net/{prefix}-ms/statistics/rx_bytes");
    Command::new("ip")
        .args(["netns", "exec", &format!("{prefix}-mid"), "cat", &path])
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Puts both middle veth ends down for `length`, once `after` bytes from the source have
/// crossed (so the migration's connections are up and its data under way: an outage
/// during the connection's setup would test the connect timeout instead), unless told to
/// end early.
fn blackout(
    ns: &Namespaces,
    after: u64,
    length: Duration,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let ends = [format!("{}-ms", ns.prefix), format!("{}-md", ns.prefix)];
    let mid = format!("{}-mid", ns.prefix);
    let set = move |state: &str| {
        for end in &ends {
            let status = Command::new("ip").args(["-n", &mid, "link", "set", end, state]).status();
            assert!(status.is_ok_and(|s| s.success()), "ip link set {end} {state}");
        }
    };
    let prefix = ns.prefix.clone();
    let handle = std::thread::spawn(move || {
        let started = bytes_from_source(&prefix);
        while bytes_from_source(&prefix) < started + after {
            if stopped.recv_timeout(Duration::from_millis(10)).is_ok() {
                return;
            }
        }
        set("down");
        let _ = stopped.recv_timeout(length);
        set("up");
    });
    (stop, handle)
}

/// Runs one migration through `fault` over `stack` ("kernel", "af-packet", "tap" or "dpdk"), the peers
/// giving up after `io_timeout` of silence. Returns how it ended, after checking that
/// nothing was lost: verified, or both ends failed with one clear error, the source guest
/// running on and no destination guest.
fn migrate_through(ns: &Namespaces, stack: &str, port: u16, fault: &LinkFault) -> (bool, Duration, String) {
    // Long enough that 5% loss each way never silences a connection this long (at 5 s a
    // row failed now and then with "peer silent for too long"), short enough that the
    // 30 s outage ends both sides well before the link returns.
    const IO_TIMEOUT: &str = "10";
    let listen = if stack == "kernel" { format!("10.77.0.2:{port}") } else { format!("10.77.0.12:{port}") };
    let mut recv = strings(&["recv", "--json", "--run-after", "0.3", "--io-timeout", IO_TIMEOUT, "--listen", &listen]);
    let mut send = strings(&[
        "send",
        "--to",
        &listen,
        "--mem",
        "32MiB",
        "--workload",
        "dirty:8MiB:2000:16",
        "--verify",
        "--json",
        "--max-bandwidth",
        "200mbit",
        "--io-timeout",
        IO_TIMEOUT,
        // Pages as they are, so that the faults' timing meets the migration as it was
        // written for (adaptive would halve these pages).
        "--codec",
        "none",
    ]);
    if stack == "dpdk" {
        // DPDK's net_af_packet on each veth end, with GSO and GRO (the EAL's arguments last).
        #[cfg(feature = "dpdk")]
        for (side, args) in [("dst", &mut recv), ("src", &mut send)] {
            let veth = format!("{}-{}", ns.prefix, if side == "src" { "vs" } else { "vd" });
            args.extend(dpdk_side(ns, side, "net_af_packet0", &format!("net_af_packet0,iface={veth}"), 1, false, &[]));
        }
    } else if stack != "kernel" {
        let (src, dst) = our_stack(ns, stack);
        recv.extend(dst.args());
        send.extend(src.args());
    }
    let recv_refs: Vec<&str> = recv.iter().map(String::as_str).collect();
    let send_refs: Vec<&str> = send.iter().map(String::as_str).collect();
    if let LinkFault::Rules(rules) = fault {
        let mut nft = ns.program("mid", "nft", &["-f", "-"]);
        let mut child = nft.stdin(std::process::Stdio::piped()).spawn().expect("nft");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft refused: {rules}");
    }
    let receiver = Receiver::spawn(ns.command("dst", &recv_refs));
    let started = std::time::Instant::now();
    let outage = match fault {
        LinkFault::Down(length) => Some(blackout(ns, 1 << 20, *length)),
        LinkFault::Rules(_) => None,
    };
    let sent = run(&mut ns.command("src", &send_refs), DEADLINE);
    let received = receiver.wait(DEADLINE);
    let took = started.elapsed();
    if let Some((stop, handle)) = outage {
        let _ = stop.send(());
        handle.join().expect("blackout thread");
    }
    if let LinkFault::Rules(_) = fault {
        let status = ns.program("mid", "nft", &["flush", "ruleset"]).status().expect("nft flush");
        assert!(status.success());
    }
    if sent.status.success() && received.status.success() {
        assert_migrated(&sent, &received);
        return (true, took, "completed, verified".into());
    }
    let error = sent.assert_clean_failure().to_string();
    assert!(sent.stderr.contains("source guest keeps running"), "{}", sent.stderr);
    received.assert_clean_failure();
    assert!(!received.stdout.contains("destination-guest"), "a destination guest started:\n{}", received.stdout);
    (false, took, format!("failed cleanly: {error}"))
}

#[test]
fn network_faults_on_a_veth_link_end_verified_or_cleanly_failed() {
    use vmigrate_tests::reliability::{record, Ending};
    if !is_root() {
        eprintln!(
            "SKIPPED network_faults_on_a_veth_link_end_verified_or_cleanly_failed: needs root for network namespaces"
        );
        return;
    }
    // The middle namespace carries the faults; its tbf at 10 Gbit/s shapes nothing here.
    let ns = Namespaces::up(&format!("vmf{}", std::process::id() % 100_000), &["--rate", "10gbit"], BIN);
    let mut rows = Vec::new();
    let mut port = 4700;
    // Our stack on its offload paths (64 KiB segments, partial checksums) on packet sockets
    // and TAP: the faults are on the link, not injected by our stack, so offload stays on.
    // Built with DPDK, also DPDK's net_af_packet with 64 KiB segments (GSO, GRO).
    let stacks: &[&str] =
        if cfg!(feature = "dpdk") { &["kernel", "af-packet", "tap", "dpdk"] } else { &["kernel", "af-packet", "tap"] };
    for &stack in stacks {
        let group = match stack {
            "kernel" => "network fault (veth, kernel TCP)",
            "af-packet" => "network fault (veth, our stack on AF_PACKET, offload)",
            "dpdk" => "network fault (veth, our stack on DPDK net_af_packet, GSO and GRO)",
            _ => "network fault (veth, our stack on TAP, offload)",
        };
        for (name, fault) in link_faults(&ns.prefix) {
            port += 1;
            let (verified, took, outcome) = migrate_through(&ns, stack, port, &fault);
            record(group, &name, if verified { Ending::Verified } else { Ending::FailedCleanly });
            rows.push(format!("| {stack} | {name} | {:.1} s | {outcome} |", took.as_secs_f64()));
            match name.as_str() {
                // A TCP connection rides out a second of silence.
                "link down 1 s" => assert!(verified, "{stack}: {outcome}"),
                // Thirty seconds exceed --io-timeout 10: both ends give up, long before the
                // link returns.
                "link down 30 s" => {
                    assert!(!verified, "{stack}: {outcome}");
                    assert!(took < Duration::from_secs(20), "{stack}: gave up after {took:?}");
                }
                _ if name.starts_with("loss") || name.starts_with("duplication") => {
                    assert!(verified, "{stack} {name}: {outcome}")
                }
                // The destination's frame CRC refuses the damage, and tells the source why.
                _ if name.starts_with("corruption") && !verified => {
                    assert!(outcome.contains("checksum") || outcome.contains("frame"), "{stack}: {outcome}")
                }
                _ => {}
            }
        }
    }
    eprintln!("| stack | fault | time | outcome |\n|---|---|---|---|\n{}", rows.join("\n"));
}

#[test]
fn bench_runs_over_our_stack_on_a_shaped_link() {
    if !is_root() {
        eprintln!("SKIPPED bench_runs_over_our_stack_on_a_shaped_link: needs root for network namespaces");
        return;
    }
    let ns = Namespaces::up(&format!("vmb{}", std::process::id() % 100_000), &["--rate", "1gbit"], BIN);
    let report = std::env::temp_dir().join(format!("vmigrate-netns-bench-{}", std::process::id()));
    // Our stack on packet sockets, and (built with DPDK) on a DPDK port on the same veth.
    let stacks: &[(&str, &str)] = if cfg!(feature = "dpdk") {
        &[("af-packet", "AfPacket"), ("dpdk", "Dpdk")]
    } else {
        &[("af-packet", "AfPacket")]
    };
    for (stack, reported) in stacks {
        let finished = run(
            Command::new(BIN)
                .args(["bench", "--verify", "--mem", "64MiB", "--dirty-area", "16MiB", "--rows", "plain,adaptive"])
                .args(["--stack", stack, "--netns", &ns.prefix, "--link", "1gbit", "--report"])
                .arg(&report),
            DEADLINE,
        );
        assert!(finished.status.success(), "bench over {stack} failed:\n{}", finished.stderr);
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report.join("bench.json")).unwrap()).unwrap();
        assert_eq!(value["stack"], *reported);
        let runs = value["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 4);
        for run in runs {
            assert_eq!(run["verified"], true, "{stack}: {run}");
            // Each guest's used memory once, plus what the dirty guest rewrote meanwhile.
            assert!(run["transferred-bytes"].as_u64().unwrap() < 80 << 20, "{stack}: {run}");
        }
    }
    let _ = std::fs::remove_dir_all(report);
}
