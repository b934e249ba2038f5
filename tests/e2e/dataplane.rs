//! Migrations over smoltcp on the in-process wire (two dataplane cores, no kernel
//! networking): every workload, one and four connections, MTU 1500 and 9000, verified;
//! and what the send probes of our stack and of the kernel's TCP say of the link.

use dataplane::stack::{LoopbackStack, DEFAULT_SOCKET_BUFFER_BYTES};
use engine::config::SourceConfig;
use guests::synthetic::WorkloadSpec;
use migration::codec::Codec;
use migration::precopy::PrecopyConfig;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use transport::pipe::{Acceptor, Connection, Connector, TcpAcceptor, TcpConnector, Timeouts};
use vmigrate_tests::session::{migrate_synthetic_on, Link};

const MEM: u64 = 32 << 20;

fn check(link: &Link, workload: WorkloadSpec, codec: Codec, connections: u16, xbzrle: bool) {
    let label = format!("{link:?} {workload} {codec} x{connections} xbzrle={xbzrle}");
    let link = link.clone();
    let config = SourceConfig {
        codec,
        connections,
        xbzrle_cache_bytes: xbzrle.then_some(MEM),
        verify: true,
        max_bandwidth_bytes_per_s: Some(100 << 20),
        precopy: PrecopyConfig { downtime_limit: Duration::ZERO, max_rounds: 3, ..Default::default() },
        ..SourceConfig::default()
    };
    let outcome = migrate_synthetic_on(link, MEM, workload, &config);
    let stats = outcome.source.unwrap_or_else(|e| panic!("{label}: {e}"));
    let report = outcome.destination.unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(stats.verified, Some(true), "{label}");
    assert_eq!(report.verified, Some(true), "{label}");
    outcome.destination_check.unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(outcome.source_writes_after, 0, "{label}: source guest ran after handing over");
    if !matches!(workload, WorkloadSpec::Idle) {
        assert!(outcome.writes_after_resume > 0, "{label}: destination guest did not run");
    }
    assert_eq!(report.connections, connections);
}

#[test]
fn every_workload_over_the_loopback_wire() {
    let link = Link::Loopback { mtu: 1500, cores: 1 };
    for workload in [
        WorkloadSpec::Seq { pages_per_s: 50_000 },
        WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 5000, bits: 16 },
        WorkloadSpec::Idle,
    ] {
        for connections in [1, 4] {
            check(&link, workload, Codec::Lz4, connections, true);
        }
    }
}

#[test]
fn jumbo_frames_and_every_codec() {
    let link = Link::Loopback { mtu: 9000, cores: 1 };
    let workload = WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 5000, bits: 16 };
    for codec in [Codec::None, Codec::Lz4, Codec::Zlib { level: 1 }] {
        check(&link, workload, codec, 2, false);
    }
}

#[test]
fn lossy_and_corrupting_wire_still_migrates_intact() {
    // Seeded: the same frames are dropped and corrupted on every run. smoltcp recovers
    // from loss by retransmission timeouts (no SACK), so the guest is kept small; the
    // point is that every byte arrives intact: corrupted frames fail the TCP checksum and
    // are retransmitted, and our frame CRC32C stands behind it.
    let faults = dataplane::faults::Faults { drop: 0.01, corrupt: 0.01, ..Default::default() };
    let wrappers = dataplane::core::DeviceWrappers { faults, seed: 7, ..Default::default() };
    let config = SourceConfig {
        codec: Codec::Lz4,
        connections: 2,
        verify: true,
        precopy: PrecopyConfig { max_rounds: 2, ..Default::default() },
        ..SourceConfig::default()
    };
    let outcome = vmigrate_tests::session::migrate_synthetic_on(
        Link::LossyLoopback { mtu: 1500, wrappers },
        4 << 20,
        WorkloadSpec::Seq { pages_per_s: 2000 },
        &config,
    );
    let stats = outcome.source.expect("migration over a lossy wire");
    assert_eq!(stats.verified, Some(true));
    outcome.destination_check.expect("seq pages intact");
}

#[test]
fn connections_spread_over_two_dataplane_cores_per_side() {
    let link = Link::Loopback { mtu: 1500, cores: 2 };
    let workload = WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 5000, bits: 16 };
    for connections in [2, 4] {
        check(&link, workload, Codec::Lz4, connections, true);
    }
}

/// The fault matrix over the in-process wire (seeded faults on what each end receives):
/// every migration either completes and verifies, or fails with a clear error, the source
/// guest still running and no destination guest, within a bound. Prints one row per case.
#[test]
fn every_fault_ends_verified_or_cleanly_failed_in_bounded_time() {
    use dataplane::faults::{Blackout, Faults};
    use vmigrate_tests::reliability::{record, Ending};
    let second = Duration::from_secs(1);
    let cases: Vec<(&str, Faults)> = vec![
        ("loss 0.1%", Faults { drop: 0.001, ..Default::default() }),
        ("loss 1%", Faults { drop: 0.01, ..Default::default() }),
        ("loss 5%", Faults { drop: 0.05, ..Default::default() }),
        ("reordering 1%", Faults { reorder: 0.01, ..Default::default() }),
        ("duplication 1%", Faults { duplicate: 0.01, ..Default::default() }),
        ("corruption 1%", Faults { corrupt: 0.01, ..Default::default() }),
        ("link down 1 s", Faults { blackout: Some(Blackout { after: 50 * MS, length: second }), ..Default::default() }),
        (
            "link down 30 s",
            Faults { blackout: Some(Blackout { after: 50 * MS, length: 30 * second }), ..Default::default() },
        ),
    ];
    // 50 MB/s: the bulk round of 8 MiB lasts longer than the time before a blackout.
    let config = SourceConfig {
        codec: Codec::Lz4,
        connections: 2,
        verify: true,
        max_bandwidth_bytes_per_s: Some(50_000_000),
        ..SourceConfig::default()
    };
    let mut rows = Vec::new();
    for (name, faults) in cases {
        let wrappers = dataplane::core::DeviceWrappers { faults, seed: 11, ..Default::default() };
        let started = std::time::Instant::now();
        let outcome = vmigrate_tests::session::migrate_synthetic_on(
            Link::LossyLoopback { mtu: 1500, wrappers },
            8 << 20,
            WorkloadSpec::Dirty { area_bytes: 4 << 20, pages_per_s: 2000, bits: 16 },
            &config,
        );
        let took = started.elapsed();
        // The harness's connections give up after 20 s of silence.
        assert!(took < Duration::from_secs(60), "{name}: {took:?}");
        let verdict = match &outcome.source {
            Ok(stats) => {
                assert_eq!(stats.verified, Some(true), "{name}");
                outcome.destination_check.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
                record("network fault (in-process wire, seeded)", name, Ending::Verified);
                "completed, verified".to_string()
            }
            Err(err) => {
                assert!(outcome.source_writes_after > 0, "{name}: the source guest stopped");
                assert!(outcome.destination.is_err() && outcome.writes_after_resume == 0, "{name}: a guest resumed");
                record("network fault (in-process wire, seeded)", name, Ending::FailedCleanly);
                format!("failed cleanly: {err}")
            }
        };
        rows.push(format!("| {name} | {:.1} s | {verdict} |", took.as_secs_f64()));
    }
    eprintln!("| fault | time | outcome |\n|---|---|---|\n{}", rows.join("\n"));
    // A link down for a second is ridden out; one down for 30 s is given up on.
    assert!(rows[6].contains("completed"), "{}", rows[6]);
    assert!(rows[7].contains("failed cleanly"), "{}", rows[7]);
}

const MS: Duration = Duration::from_millis(1);

/// What a stack's send probe says while the reader stalls and then drains (adaptive
/// compression measures the link by it): the send buffer fills and says so, bytes the
/// receiver has not taken in are not counted acknowledged, and once everything is read,
/// all of it was acknowledged and the buffer is no longer full.
fn probe_follows_a_stalled_then_draining_reader(sender: Connection, mut receiver: Connection) {
    const BYTES: usize = 32 << 20;
    let probe = sender.probe.clone().expect("the stack has a send probe");
    assert_eq!(probe.acknowledged(), 0);
    assert!(!probe.full(), "nothing written yet");
    let writer = std::thread::spawn(move || {
        let mut sender = sender;
        sender.writer.write_all(&vec![7u8; BYTES]).expect("write");
        sender
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe.full() {
        assert!(Instant::now() < deadline, "the send buffer never showed full behind a stalled reader");
        std::thread::sleep(Duration::from_millis(1));
    }
    let held_back = probe.acknowledged();
    assert!(held_back < BYTES as u64, "{held_back} bytes acknowledged while the reader stalls");
    let mut read = 0;
    let mut buffer = vec![0u8; 1 << 20];
    while read < BYTES {
        let n = receiver.reader.read(&mut buffer).expect("read");
        assert!(n > 0, "the stream ended after {read} bytes");
        read += n;
    }
    let _sender = writer.join().expect("writer");
    while probe.acknowledged() < BYTES as u64 {
        assert!(Instant::now() < deadline, "acknowledged {} of {BYTES} bytes read", probe.acknowledged());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(probe.acknowledged(), BYTES as u64);
    assert!(!probe.full(), "everything acknowledged, yet the send buffer shows full");
}

/// One connection over a fresh loopback wire on `port`, its reads timing out after `io`:
/// the stack and the acceptor (both must live while the connection does) and both ends.
fn wire_connection(port: u16, io: Duration) -> (LoopbackStack, dataplane::stack::CoreAcceptor, Connection, Connection) {
    let stack = LoopbackStack::start(1500, DEFAULT_SOCKET_BUFFER_BYTES, false).expect("start the loopback wire");
    let timeouts = Timeouts { connect: Duration::from_secs(10), io };
    let mut acceptor = stack.acceptor(port, timeouts).expect("listen");
    let sender = stack.connector(port, timeouts).connect().expect("connect");
    let receiver = acceptor.accept(Duration::from_secs(10)).expect("accept");
    (stack, acceptor, sender, receiver)
}

#[test]
fn the_send_probe_follows_the_link_on_our_stack() {
    let (_stack, _acceptor, sender, receiver) = wire_connection(4710, Duration::from_secs(30));
    probe_follows_a_stalled_then_draining_reader(sender, receiver);
}

#[test]
fn the_send_probe_follows_the_link_on_kernel_tcp() {
    let timeouts = Timeouts { connect: Duration::from_secs(10), io: Duration::from_secs(30) };
    let mut acceptor = TcpAcceptor::bind("127.0.0.1:0", timeouts).expect("listen");
    let address = acceptor.local_socket_addr().expect("address");
    let sender = TcpConnector::new(address, timeouts).expect("connector").connect().expect("connect");
    let receiver = acceptor.accept(Duration::from_secs(10)).expect("accept");
    probe_follows_a_stalled_then_draining_reader(sender, receiver);
}

/// The names of this process's threads now.
fn thread_names() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// Migrates over the wire and returns whether connection writer and reader threads were
/// seen while the migration ran (sampled every millisecond).
fn connection_threads_seen(direct: bool) -> (bool, bool) {
    let config = SourceConfig {
        codec: Codec::None,
        connections: 2,
        verify: true,
        direct_send: direct,
        // Slow enough that the connections live for a few hundred sampling periods.
        max_bandwidth_bytes_per_s: Some(200 << 20),
        precopy: PrecopyConfig { downtime_limit: Duration::ZERO, max_rounds: 2, ..Default::default() },
        ..SourceConfig::default()
    };
    let workload = WorkloadSpec::Seq { pages_per_s: 20_000 };
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let seen = {
        let running = running.clone();
        std::thread::spawn(move || {
            let (mut writers, mut readers) = (false, false);
            while running.load(std::sync::atomic::Ordering::Acquire) {
                let names = thread_names();
                writers |= names.iter().any(|name| name.starts_with("conn-writer"));
                readers |= names.iter().any(|name| name.starts_with("conn-reader"));
                std::thread::sleep(MS);
            }
            (writers, readers)
        })
    };
    let outcome = migrate_synthetic_on(Link::Loopback { mtu: 1500, cores: 1 }, MEM, workload, &config);
    running.store(false, std::sync::atomic::Ordering::Release);
    let seen = seen.join().expect("sampler");
    assert_eq!(outcome.source.expect("source").verified, Some(true));
    outcome.destination_check.expect("destination guest intact");
    seen
}

/// The design's shape: over our stack, the polling cores take the compression workers'
/// frames from their rings themselves, and put the frames they receive together and queue
/// them for the decompression workers themselves; no writer or reader thread runs per
/// connection (the same migration with connection threads shows that the sampling would
/// see them). Connection 0's answer reader on the source stays a thread.
#[test]
fn polling_cores_move_frames_without_connection_threads() {
    assert_eq!(connection_threads_seen(false), (true, true), "the sampler missed the threads it was shown");
    let (writers, readers) = connection_threads_seen(true);
    assert!(!writers, "a connection writer thread ran over our stack");
    assert!(!readers, "a destination connection reader thread ran over our stack");
}

/// An `Outbound` that offers `total` bytes of a counting pattern in slices of odd sizes,
/// with an idle poll between slices, then says it is done.
struct Pattern {
    total: usize,
    offset: usize,
    idle_next: bool,
    bytes: Vec<u8>,
    lost: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl transport::pipe::Outbound for Pattern {
    fn next(&mut self) -> transport::pipe::Next<'_> {
        use transport::pipe::Next;
        if self.offset == self.total {
            return Next::Done;
        }
        self.idle_next = !self.idle_next;
        if self.idle_next {
            return Next::Idle;
        }
        let len = (self.total - self.offset).min(1 + self.offset % 70_001);
        self.bytes = (self.offset..self.offset + len).map(|i| i as u8).collect();
        Next::Bytes(&self.bytes)
    }

    fn advance(&mut self, n: usize) {
        self.offset += n;
        // The rest of a slice not taken is offered again (the pattern is positional).
        self.idle_next = true;
    }

    fn lost(&mut self, why: &str) {
        *self.lost.lock().unwrap() = Some(why.to_string());
    }
}

/// A connection's write side handed to its core: what the writer wrote before comes
/// first, then every byte the `Outbound` offers, in order, then the end of the stream
/// once the application closes.
#[test]
fn a_core_drains_a_handed_over_write_side_in_order() {
    const TOTAL: usize = 8 << 20;
    let (_stack, _acceptor, mut sender, mut receiver) = wire_connection(4711, Duration::from_secs(30));
    sender.writer.write_all(b"first").expect("write before the hand-over");
    let lost = std::sync::Arc::new(std::sync::Mutex::new(None));
    let pattern = Pattern { total: TOTAL, offset: 0, idle_next: false, bytes: Vec::new(), lost: lost.clone() };
    let attach = sender.direct_send.take().expect("our stack takes the write side");
    attach(Box::new(pattern));
    drop(sender.writer);
    let mut head = [0u8; 5];
    receiver.reader.read_exact(&mut head).expect("read the first bytes");
    assert_eq!(&head, b"first");
    let mut received = Vec::with_capacity(TOTAL);
    let mut buffer = vec![0u8; 1 << 16];
    while received.len() < TOTAL {
        let n = receiver.reader.read(&mut buffer).expect("read");
        assert!(n > 0, "the stream ended after {} bytes", received.len());
        received.extend_from_slice(&buffer[..n]);
    }
    assert_eq!(received.len(), TOTAL);
    if let Some(i) = received.iter().enumerate().position(|(i, &b)| b != i as u8) {
        panic!("byte {i} is {} where {} was sent", received[i], i as u8);
    }
    (sender.closer)();
    assert_eq!(receiver.reader.read(&mut buffer).expect("read the end"), 0, "the stream goes on after the close");
    assert_eq!(*lost.lock().unwrap(), None);
}

/// What an `Inbound` was given, and how its stream ended.
#[derive(Default)]
struct Collected {
    bytes: Vec<u8>,
    end: Option<Result<(), String>>,
}

/// An `Inbound` that takes odd-sized bites and holds back on every third call, as a
/// receiver whose queues fill would.
struct Collector {
    collected: std::sync::Arc<std::sync::Mutex<Collected>>,
    calls: usize,
}

impl transport::pipe::Inbound for Collector {
    fn receive(&mut self, bytes: &[u8]) -> usize {
        self.calls += 1;
        if self.calls.is_multiple_of(3) {
            return 0;
        }
        let n = bytes.len().min(1 + self.calls % 40_000);
        self.collected.lock().unwrap().bytes.extend_from_slice(&bytes[..n]);
        n
    }

    fn holding(&self) -> bool {
        false
    }

    fn end(&mut self, how: Result<(), &str>) {
        self.collected.lock().unwrap().end = Some(how.map_err(str::to_string));
    }
}

fn collector() -> (Box<Collector>, std::sync::Arc<std::sync::Mutex<Collected>>) {
    let collected = std::sync::Arc::new(std::sync::Mutex::new(Collected::default()));
    (Box::new(Collector { collected: collected.clone(), calls: 0 }), collected)
}

/// Waits until the collector's stream ended.
fn ended(collected: &std::sync::Mutex<Collected>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(end) = collected.lock().unwrap().end.clone() {
            return end;
        }
        assert!(Instant::now() < deadline, "the stream never ended for the Inbound");
        std::thread::sleep(MS);
    }
}

/// A connection's read side handed to its core: what the reader had received and not
/// returned comes first, then every byte sent, in order, however the `Inbound` takes them,
/// then the end of the stream. A peer silent past the read timeout ends it with why.
#[test]
fn a_core_delivers_to_a_handed_over_read_side_in_order() {
    const TOTAL: usize = 8 << 20;
    let timeouts = Timeouts { connect: Duration::from_secs(10), io: Duration::from_millis(300) };
    let (stack, mut acceptor, mut sender, mut receiver) = wire_connection(4712, timeouts.io);
    sender.writer.write_all(b"first").expect("write before the hand-over");
    let mut head = [0u8; 2];
    receiver.reader.read_exact(&mut head).expect("read the first bytes");
    assert_eq!(&head, b"fi");
    let (inbound, collected) = collector();
    let attach = receiver.direct_receive.take().expect("our stack delivers the read side");
    attach(receiver.reader, inbound);
    let pattern: Vec<u8> = (0..TOTAL).map(|i| i as u8).collect();
    sender.writer.write_all(&pattern).expect("write");
    drop(sender.writer);
    (sender.closer)();
    assert_eq!(ended(&collected), Ok(()));
    let collected = std::mem::take(&mut collected.lock().unwrap().bytes);
    assert_eq!(collected.len(), 3 + TOTAL);
    assert_eq!(&collected[..3], b"rst");
    if let Some(i) = collected[3..].iter().zip(&pattern).position(|(a, b)| a != b) {
        panic!("byte {i} is {} where {} was sent", collected[3 + i], pattern[i]);
    }

    // A peer that connects and then says nothing.
    let _quiet = stack.connector(4712, timeouts).connect().expect("connect");
    let receiver = acceptor.accept(Duration::from_secs(10)).expect("accept");
    let (inbound, collected) = collector();
    let started = Instant::now();
    (receiver.direct_receive.expect("our stack delivers the read side"))(receiver.reader, inbound);
    let end = ended(&collected);
    assert!(end.as_ref().is_err_and(|why| why.contains("silent")), "{end:?}");
    assert!(started.elapsed() >= Duration::from_millis(300), "ended before the read timeout");
}

/// One TLS connection (a random pre-shared key) over a fresh loopback wire on `port`: the
/// stack and both secured ends.
fn tls_wire_connection(port: u16, io: Duration) -> (LoopbackStack, Connection, Connection) {
    use transport::pipe::{Acceptor, Connector};
    use transport::tls::{TlsAcceptor, TlsAuth, TlsConnector, TlsSettings};
    let stack = LoopbackStack::start(1500, DEFAULT_SOCKET_BUFFER_BYTES, false).expect("start the loopback wire");
    let timeouts = Timeouts { connect: Duration::from_secs(10), io };
    let settings = TlsSettings { auth: TlsAuth::random_psk(), server_name: None };
    let mut acceptor =
        TlsAcceptor::new(Box::new(stack.acceptor(port, timeouts).expect("listen")), settings.server().expect("server"));
    let connector =
        TlsConnector::new(Box::new(stack.connector(port, timeouts)), settings.client("dst").expect("client"));
    let sender = std::thread::spawn(move || connector.connect().expect("TLS connect"));
    let receiver = acceptor.accept(Duration::from_secs(10)).expect("TLS accept");
    (stack, sender.join().expect("connector"), receiver)
}

/// TLS with the write side handed to the core: records are sealed as the core pulls, after
/// what the threaded writer sealed before, and the application's end closes the session
/// cleanly (close_notify: the reader sees an end, not a truncation).
#[test]
fn a_core_seals_tls_records_of_a_handed_over_write_side_in_order() {
    const TOTAL: usize = 8 << 20;
    let (_stack, mut sender, mut receiver) = tls_wire_connection(4713, Duration::from_secs(30));
    sender.writer.write_all(b"first").expect("write before the hand-over");
    let lost = std::sync::Arc::new(std::sync::Mutex::new(None));
    let pattern = Pattern { total: TOTAL, offset: 0, idle_next: false, bytes: Vec::new(), lost: lost.clone() };
    let attach = sender.direct_send.take().expect("TLS over our stack hands the write side over");
    attach(Box::new(pattern));
    // Dropped after the hand-over: it must not close the session under the core.
    drop(sender.writer);
    let mut received = Vec::with_capacity(5 + TOTAL);
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = receiver.reader.read(&mut buffer).expect("read: the session ends cleanly");
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..n]);
    }
    assert_eq!(received.len(), 5 + TOTAL);
    assert_eq!(&received[..5], b"first");
    if let Some(i) = received[5..].iter().enumerate().position(|(i, &b)| b != i as u8) {
        panic!("byte {i} is {} where {} was sent", received[5 + i], i as u8);
    }
    assert_eq!(*lost.lock().unwrap(), None);
}

/// TLS with the read side handed to the core: the plaintext the threaded reader had opened
/// and the ciphertext it had read come first, then every byte, in order, however the
/// `Inbound` takes them (holding back every third call), then a clean end.
#[test]
fn a_core_opens_tls_records_for_a_handed_over_read_side_in_order() {
    const TOTAL: usize = 8 << 20;
    let (_stack, mut sender, mut receiver) = tls_wire_connection(4714, Duration::from_secs(30));
    sender.writer.write_all(b"first").expect("write before the hand-over");
    let mut head = [0u8; 2];
    receiver.reader.read_exact(&mut head).expect("read the first bytes");
    assert_eq!(&head, b"fi");
    let (inbound, collected) = collector();
    let attach = receiver.direct_receive.take().expect("TLS over our stack hands the read side over");
    attach(receiver.reader, inbound);
    let pattern: Vec<u8> = (0..TOTAL).map(|i| i as u8).collect();
    sender.writer.write_all(&pattern).expect("write");
    // The writer's end seals close_notify.
    drop(sender.writer);
    assert_eq!(ended(&collected), Ok(()));
    (sender.closer)();
    let collected = std::mem::take(&mut collected.lock().unwrap().bytes);
    assert_eq!(collected.len(), 3 + TOTAL);
    assert_eq!(&collected[..3], b"rst");
    if let Some(i) = collected[3..].iter().zip(&pattern).position(|(a, b)| a != b) {
        panic!("byte {i} is {} where {} was sent", collected[3 + i], pattern[i]);
    }

    // A stream cut off without close_notify is a truncation, not an end.
    let (_stack, mut sender, receiver) = tls_wire_connection(4715, Duration::from_secs(30));
    let (inbound, collected) = collector();
    (receiver.direct_receive.expect("TLS over our stack hands the read side over"))(receiver.reader, inbound);
    sender.writer.write_all(&pattern[..1 << 20]).expect("write");
    (sender.closer)();
    let end = ended(&collected);
    assert!(end.as_ref().is_err_and(|why| why.contains("close_notify")), "{end:?}");
}
