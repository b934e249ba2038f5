//! Large segments through a real EAL: a 60 000-byte TCP segment cut by DPDK's GSO library
//! into MTU-sized frames with correct checksums, sent through the ring PMD (a port whose
//! transmit queue is its own receive queue), and merged back whole by DPDK's GRO library;
//! a full ring that leaves frames waiting in order; no mbuf leaked. One test per process
//! (one EAL per process); SKIPPED without DPDK or root.

#[test]
fn a_large_segment_is_cut_sent_and_merged_back_whole() {
    if !dpdk::AVAILABLE {
        eprintln!("SKIPPED a_large_segment_is_cut_sent_and_merged_back_whole: built without DPDK");
    }
    // Without DPDK the run below is compiled out.
    #[cfg(dpdk)]
    with_dpdk::run();
}

#[cfg(dpdk)]
mod with_dpdk {
    use dpdk::segments::{merge_tcp4, HeaderLengths, SegmentPools};
    use dpdk::{Eal, Mbuf, Mempool, Port};

    const PAYLOAD: usize = 60_000;
    const MSS: u16 = 1448;
    const HEADERS: HeaderLengths = HeaderLengths { l2: 14, l3: 20, l4: 20 };
    const SEQUENCE: u32 = 0x0102_0304;

    /// An Ethernet, IPv4 and TCP (ACK only) frame around `payload`; checksums left zero.
    fn tcp_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 54];
        frame[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        frame[14] = 0x45;
        frame[16..18].copy_from_slice(&((20 + 20 + payload.len()) as u16).to_be_bytes());
        frame[20..22].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
        frame[22] = 64;
        frame[23] = 6;
        frame[26..30].copy_from_slice(&[10, 0, 0, 1]);
        frame[30..34].copy_from_slice(&[10, 0, 0, 2]);
        frame[34..36].copy_from_slice(&49152u16.to_be_bytes());
        frame[36..38].copy_from_slice(&4600u16.to_be_bytes());
        frame[38..42].copy_from_slice(&SEQUENCE.to_be_bytes());
        frame[46] = 5 << 4;
        frame[47] = 0x10; // ACK
        frame[48..50].copy_from_slice(&65535u16.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    pub fn run() {
        let prefix = format!("--file-prefix=vmigrate-segments-{}", std::process::id());
        let args =
            ["--no-huge", "-m", "256", "--no-pci", "-l", "0", "--vdev", "net_ring0", "--log-level=error", &prefix];
        let eal = match Eal::init(&args.map(String::from)) {
            Ok(eal) => eal,
            Err(err) => {
                eprintln!("SKIPPED a_large_segment_is_cut_sent_and_merged_back_whole: the EAL did not start ({err})");
                return;
            }
        };
        let headers = Mempool::new(&eal, "seg_headers", 4095, 0).expect("header pool");
        let pools = SegmentPools::new(&eal, "seg", 1).expect("segment pools");
        let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i * 7 + i / 251) as u8).collect();
        {
            let port = Port::start(&eal, "net_ring0", 1, &headers, None).expect("the ring port");
            let mut segment = Mbuf::alloc(pools.large()).expect("a large mbuf");
            let frame = tcp_frame(&payload);
            segment.append(frame.len() as u16).expect("room for 64 KiB").copy_from_slice(&frame);
            segment.set_header_lengths(HEADERS);

            let mut frames = Vec::new();
            pools.cut_tcp4(segment, MSS, &headers, &mut frames).expect("GSO");
            assert_eq!(frames.len(), PAYLOAD.div_ceil(usize::from(MSS)));
            for frame in &mut frames {
                assert!(frame.len() <= 54 + usize::from(MSS), "a frame of {} bytes", frame.len());
                assert_eq!(frame.segments(), 2, "a header mbuf and an indirect one over the data");
                frame.finish_tcp4_checksums(false);
            }
            let count = frames.len();
            assert_eq!(port.transmit(0, frames), count);

            let mut received: Vec<Mbuf> = Vec::new();
            while received.len() < count {
                assert!(port.receive(0, &mut received, 32) > 0, "the ring gives back what was sent");
            }
            let mut joined = Vec::new();
            for frame in &mut received {
                assert!(frame.classify_tcp4(), "an IPv4 TCP frame");
                assert!(frame.tcp4_checksums_ok(), "GSO's frame with our checksums");
                let mut bytes = vec![0u8; frame.len()];
                frame.copy_to(&mut bytes);
                let sequence = u32::from_be_bytes(bytes[38..42].try_into().unwrap());
                assert_eq!(sequence as usize, SEQUENCE as usize + joined.len(), "frames in order");
                joined.extend_from_slice(&bytes[54..]);
            }
            assert_eq!(joined, payload, "the frames carry the segment's payload, cut in order");

            // A damaged frame fails the check.
            let mut damaged = Mbuf::alloc(&headers).expect("an mbuf");
            let mut bytes = tcp_frame(&payload[..100]);
            bytes[60] ^= 1;
            damaged.append(bytes.len() as u16).unwrap().copy_from_slice(&bytes);
            assert!(damaged.classify_tcp4());
            assert!(!damaged.tcp4_checksums_ok(), "zero checksums and a flipped bit do not pass");
            drop(damaged);

            merge_tcp4(&mut received);
            assert_eq!(received.len(), 1, "GRO merges the flow's consecutive frames into one");
            let merged = &received[0];
            assert_eq!(merged.len(), 54 + PAYLOAD);
            let mut bytes = vec![0u8; merged.len()];
            assert_eq!(merged.copy_to(&mut bytes), bytes.len());
            assert_eq!(&bytes[54..], &payload[..]);
            assert_eq!(usize::from(u16::from_be_bytes([bytes[16], bytes[17]])), 40 + PAYLOAD, "IP length");

            // A full ring is backpressure: what it would not take stays, in order.
            drop(received);
            let mut frames: Vec<Mbuf> = (0..3000u16)
                .map(|n| {
                    let mut mbuf = Mbuf::alloc(&headers).expect("an mbuf");
                    mbuf.append(2).expect("room").copy_from_slice(&n.to_be_bytes());
                    mbuf
                })
                .collect();
            let sent = port.transmit_some(0, &mut frames);
            assert!(sent > 0 && !frames.is_empty(), "the ring took {sent} of 3000");
            assert_eq!(frames[0].data(), (sent as u16).to_be_bytes(), "the first frame not taken leads");
            let mut back: Vec<Mbuf> = Vec::new();
            while port.receive(0, &mut back, 64) > 0 {}
            assert_eq!(back.len(), sent);
            assert!(port.transmit_some(0, &mut frames) > 0, "room again once the ring is drained");
            while port.receive(0, &mut back, 64) > 0 {}
            let order: Vec<u16> = back.iter().map(|m| u16::from_be_bytes([m.data()[0], m.data()[1]])).collect();
            assert!(order.windows(2).all(|pair| pair[1] == pair[0] + 1), "frames left in order");
        }
        assert_eq!(headers.available(), headers.size(), "header mbufs leaked");
        pools.all_back().expect("segment mbufs leaked");
    }
}
