//! Two smoltcp stacks on the in-process wire carry byte streams intact.

use std::io::{Read, Write};
use std::time::{Duration, Instant};
use transport::pipe::{Acceptor, Connector, Timeouts, CHRONO_SPAN};
use vmigrate_dataplane::core::DeviceWrappers;
use vmigrate_dataplane::layers::{pcap_frame_lengths, pcap_frames};
use vmigrate_dataplane::stack::{LoopbackOptions, LoopbackStack, DEFAULT_SOCKET_BUFFER_BYTES};
use vmigrate_dataplane::SUPER_FRAME_BYTES;

fn pattern(index: usize) -> u8 {
    (index.wrapping_mul(2654435761) >> 13) as u8
}

/// Carries 32 MiB one way and an answer back over `stack`, checking every byte.
fn carry(stack: &LoopbackStack) {
    let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(10) };
    let mut acceptor = stack.acceptor(4444, timeouts).unwrap();
    let connector = stack.connector(4444, timeouts);
    const BYTES: usize = 32 << 20;
    let server = std::thread::spawn(move || {
        let mut connection = acceptor.accept(Duration::from_secs(5)).expect("accept");
        let mut received = 0usize;
        let mut buffer = vec![0u8; 100_000];
        while received < BYTES {
            let n = connection.reader.read(&mut buffer).expect("read");
            assert!(n > 0, "early end of stream at {received}");
            for (i, &b) in buffer[..n].iter().enumerate() {
                assert_eq!(b, pattern(received + i), "byte {}", received + i);
            }
            received += n;
        }
        connection.writer.write_all(b"done").unwrap();
        (connection.closer)();
    });
    let mut connection = connector.connect().expect("connect");
    let data: Vec<u8> = (0..BYTES).map(pattern).collect();
    let start = Instant::now();
    for piece in data.chunks(123_457) {
        connection.writer.write_all(piece).unwrap();
    }
    let mut answer = [0u8; 4];
    connection.reader.read_exact(&mut answer).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(&answer, b"done");
    let mut rest = Vec::new();
    connection.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the server closed after its answer");
    server.join().unwrap();
    eprintln!("loopback wire: {:.2} Gbit/s (informative, not asserted)", BYTES as f64 * 8.0 / seconds / 1e9);
}

#[test]
fn streams_arrive_intact_in_both_directions() {
    carry(&LoopbackStack::start(1500, DEFAULT_SOCKET_BUFFER_BYTES, false).unwrap());
}

/// With offload the sender hands the wire segments far above the MTU and the receiver
/// takes them whole; without, no frame exceeds the MTU. Each is seen in a capture of the
/// source's end, and the stream arrives intact either way.
#[test]
fn segments_pass_the_wire_whole_with_offload_and_cut_to_the_mtu_without() {
    for offload in [true, false] {
        let pcap = std::env::temp_dir().join(format!("vmigrate-wire-{}-{offload}.pcap", std::process::id()));
        let wrappers = DeviceWrappers { pcap: Some(pcap.clone()), ..DeviceWrappers::default() };
        let stack = LoopbackStack::start_with(LoopbackOptions { offload, wrappers, ..LoopbackOptions::default() });
        carry(&stack.unwrap());
        let lengths = pcap_frame_lengths(&std::fs::read(&pcap).expect("the capture"));
        let _ = std::fs::remove_file(&pcap);
        let largest = lengths.iter().copied().max().unwrap_or(0);
        let over_mtu = lengths.iter().filter(|&&len| len > 1514).count();
        eprintln!("offload {offload}: {} frames, the largest {largest} bytes, {over_mtu} over the MTU", lengths.len());
        if offload {
            assert!(largest > 16 * 1514 && largest <= SUPER_FRAME_BYTES, "largest frame {largest}");
            assert!(over_mtu * 4 > lengths.len() / 2, "{over_mtu} of {} frames over the MTU", lengths.len());
        } else {
            assert_eq!(largest, 1514, "a full-sized frame, and nothing larger");
        }
    }
}

/// The initial sequence numbers of the SYN and the SYN-ACK in a capture (IPv4, TCP).
fn handshake_sequence_numbers(pcap: &[u8]) -> (Option<u32>, Option<u32>) {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket};
    let (mut syn, mut syn_ack) = (None, None);
    for frame in pcap_frames(pcap) {
        let Ok(ethernet) = EthernetFrame::new_checked(frame) else { continue };
        if ethernet.ethertype() != EthernetProtocol::Ipv4 {
            continue;
        }
        let Ok(ip) = Ipv4Packet::new_checked(ethernet.payload()) else { continue };
        if ip.next_header() != IpProtocol::Tcp {
            continue;
        }
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else { continue };
        let seq = tcp.seq_number().0 as u32;
        match (tcp.syn(), tcp.ack()) {
            (true, false) => syn = syn.or(Some(seq)),
            (true, true) => syn_ack = syn_ack.or(Some(seq)),
            _ => {}
        }
    }
    (syn, syn_ack)
}

/// Each end of each connection opens with its own initial sequence number (RFC 6528): a
/// stack whose numbers repeat from run to run lets a blind attacker inject into a stream.
#[test]
fn connections_open_with_initial_sequence_numbers_of_their_own() {
    let mut opened = Vec::new();
    for run in 0..2 {
        let pcap = std::env::temp_dir().join(format!("vmigrate-isn-{}-{run}.pcap", std::process::id()));
        let wrappers = DeviceWrappers { pcap: Some(pcap.clone()), ..DeviceWrappers::default() };
        let stack = LoopbackStack::start_with(LoopbackOptions { wrappers, ..LoopbackOptions::default() }).unwrap();
        let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(5) };
        let mut acceptor = stack.acceptor(4444, timeouts).unwrap();
        let connection = stack.connector(4444, timeouts).connect().expect("connect");
        let accepted = acceptor.accept(Duration::from_secs(5)).expect("accept");
        drop((connection, accepted));
        drop(stack);
        let capture = std::fs::read(&pcap).expect("the capture");
        let _ = std::fs::remove_file(&pcap);
        let (syn, syn_ack) = handshake_sequence_numbers(&capture);
        let (syn, syn_ack) = (syn.expect("a SYN in the capture"), syn_ack.expect("a SYN-ACK in the capture"));
        assert_ne!(syn, syn_ack, "both ends chose the same initial sequence number");
        opened.push((syn, syn_ack));
    }
    assert_ne!(opened[0], opened[1], "two stacks opened with the same initial sequence numbers");
}

/// A stack that stops while its application still holds a connection delivers what was
/// written to it, then ends the stream, as a kernel does with a process's sockets at its
/// exit: the peer reads every byte and a clean end, not a silence until its timeout.
#[test]
fn a_stopping_stack_delivers_what_its_application_wrote() {
    let stack = std::sync::Arc::new(LoopbackStack::start(1500, DEFAULT_SOCKET_BUFFER_BYTES, false).unwrap());
    let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(5) };
    let mut acceptor = stack.acceptor(4444, timeouts).unwrap();
    let mut connection = stack.connector(4444, timeouts).connect().expect("connect");
    let mut accepted = acceptor.accept(Duration::from_secs(5)).expect("accept");
    // More than the peer's socket buffer: with the peer not reading yet, some of it is
    // still queued on the sending side when its stack stops.
    const BYTES: usize = 3 * DEFAULT_SOCKET_BUFFER_BYTES;
    let data: Vec<u8> = (0..BYTES).map(pattern).collect();
    connection.writer.write_all(&data).expect("written");
    let stopping = std::thread::spawn({
        let stack = stack.clone();
        move || stack.stop_sources()
    });
    let mut received = Vec::new();
    accepted.reader.read_to_end(&mut received).expect("the stream ends cleanly");
    assert_eq!(received.len(), BYTES, "bytes delivered before the end");
    assert!(received == data, "the bytes arrived as written");
    stopping.join().unwrap();
    drop(connection);
}

/// A sender whose peer does not read is held back by the peer's window, and its probe says
/// so, as a kernel socket's does (`tcpi_rwnd_limited`): the adaptive policy then takes the
/// receiver, not the link, for the slower end.
#[test]
fn a_sender_whose_peer_does_not_read_is_receiver_limited() {
    let stack = LoopbackStack::start(1500, DEFAULT_SOCKET_BUFFER_BYTES, false).unwrap();
    let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(20) };
    let mut acceptor = stack.acceptor(4444, timeouts).unwrap();
    let mut connection = stack.connector(4444, timeouts).connect().expect("connect");
    let mut accepted = acceptor.accept(Duration::from_secs(5)).expect("accept");
    let probe = connection.probe.clone().expect("the dataplane has a probe");
    let glance = |spans: u32| {
        (0..spans).any(|_| {
            std::thread::sleep(CHRONO_SPAN * 2);
            probe.receiver_limited()
        })
    };
    assert!(!glance(3), "nothing to send");

    // More than the peer's socket buffer and both rings: the sender waits on the window.
    const BYTES: usize = 16 << 20;
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..BYTES).map(pattern).collect();
        connection.writer.write_all(&data).expect("written");
        connection
    });
    assert!(glance(500), "the window of a peer that does not read held the sender back");

    let mut received = vec![0u8; BYTES];
    accepted.reader.read_exact(&mut received).expect("everything arrives once read");
    let connection = writer.join().unwrap();
    // The first look after the read judges the span the read ended; the next ones, the idle.
    glance(1);
    assert!(!glance(3), "everything was sent: nothing is held back");
    drop(connection);
}

#[test]
fn connecting_to_a_closed_port_fails() {
    let stack = LoopbackStack::start(1500, DEFAULT_SOCKET_BUFFER_BYTES, false).unwrap();
    let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(5) };
    let error = stack.connector(9, timeouts).connect().err().expect("nobody listens on port 9");
    assert!(error.to_string().contains("refused") || error.kind() == std::io::ErrorKind::TimedOut, "{error}");
}

/// While a connection is open, each core reports it (both ends, a smoothed RTT once
/// sampled) and a busy time that grew with the transfer and never exceeds its running
/// time; on a wire that drops 2% of frames, the sender's retransmissions are counted.
#[test]
fn cores_report_their_connections_and_busy_time() {
    use vmigrate_dataplane::faults::Faults;
    for drop in [0.0, 0.02] {
        let faults = Faults { drop, ..Faults::default() };
        let wrappers = DeviceWrappers { faults, seed: 3, ..DeviceWrappers::default() };
        let stack = LoopbackStack::start_with(LoopbackOptions { wrappers, ..LoopbackOptions::default() }).unwrap();
        let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(20) };
        let mut acceptor = stack.acceptor(4444, timeouts).unwrap();
        let connector = stack.connector(4444, timeouts);
        const BYTES: usize = 8 << 20;
        let server = std::thread::spawn(move || {
            let mut connection = acceptor.accept(Duration::from_secs(5)).expect("accept");
            let mut buffer = vec![0u8; BYTES];
            connection.reader.read_exact(&mut buffer).expect("read");
            connection.writer.write_all(b"done").unwrap();
            connection
        });
        let mut connection = connector.connect().expect("connect");
        connection.writer.write_all(&vec![7u8; BYTES]).unwrap();
        let mut answer = [0u8; 4];
        connection.reader.read_exact(&mut answer).unwrap();
        let _server_end = server.join().unwrap();
        // Published every 100 ms.
        std::thread::sleep(Duration::from_millis(300));
        let (sources, destinations) = stack.meters();
        let (source, destination) = (&sources.snapshot()[0], &destinations.snapshot()[0]);
        eprintln!("drop {drop}: {source:?}\n{destination:?}");
        for core in [source, destination] {
            assert!(core.busy > Duration::ZERO && core.busy <= core.running, "{core:?}");
            assert_eq!(core.connections.len(), 1, "{core:?}");
            assert!(core.connections[0].smoothed_rtt.is_some(), "{core:?}");
        }
        assert_eq!(source.connections[0].remote, destination.connections[0].local);
        assert_eq!(source.connections[0].local, destination.connections[0].remote);
        // The wire drops a frame its queue has no room for, as a NIC ring does: a few
        // retransmissions happen even without faults.
        assert_eq!(source.retransmissions, source.connections[0].retransmissions);
        if drop > 0.0 {
            assert!(source.retransmissions > 10, "{source:?}");
        }
    }
}

/// Both ends of the wire stop together right after the connection closes from both sides,
/// as a process ends that ran both: each core answers the other until both are done, so no
/// FIN goes unacknowledged and is resent (each resend a retransmission timeout, and the
/// stop held for the whole linger). Stopped one after the other, about half such runs
/// resent the last FIN until the linger ran out.
#[test]
fn both_ends_stopping_together_leave_nothing_to_resend() {
    for run in 0..8 {
        let stack = LoopbackStack::start(1500, DEFAULT_SOCKET_BUFFER_BYTES, false).unwrap();
        let timeouts = Timeouts { connect: Duration::from_secs(5), io: Duration::from_secs(5) };
        let mut acceptor = stack.acceptor(4444, timeouts).unwrap();
        let mut connection = stack.connector(4444, timeouts).connect().expect("connect");
        let mut accepted = acceptor.accept(Duration::from_secs(5)).expect("accept");
        connection.writer.write_all(&[7u8; 65536]).expect("written");
        let mut received = vec![0u8; 65536];
        accepted.reader.read_exact(&mut received).expect("received");
        accepted.writer.write_all(b"done").expect("answered");
        let mut answer = [0u8; 4];
        connection.reader.read_exact(&mut answer).expect("the answer");
        // The sender closes first (its FIN is acknowledged meanwhile), the receiver last,
        // and the stack stops at once, before the receiver's FIN can have been answered.
        (connection.closer)();
        std::thread::sleep(Duration::from_millis(20));
        (accepted.closer)();
        let (sources, destinations) = stack.meters();
        drop((connection, accepted, acceptor, stack));
        let resent: u64 =
            sources.snapshot().iter().chain(&destinations.snapshot()).map(|core| core.retransmissions).sum();
        assert_eq!(resent, 0, "run {run}: segments resent on a wire that loses nothing");
    }
}
