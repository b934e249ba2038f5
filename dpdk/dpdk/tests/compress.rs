//! Pages through DPDK's software compression devices, `compress_isal` (Intel's ISA-L) and
//! `compress_zlib`, against a real EAL (`--no-huge`, no PCI): every page compresses on the
//! device and comes back whole through the CPU's raw inflater (flate2) and through each
//! device's decompression, whichever device compressed it. One test per process, since the
//! EAL can be initialised only once. Without DPDK, or where the EAL cannot start (it needs
//! root), the test says SKIPPED.

#[test]
fn pages_round_trip_through_isal_zlib_and_the_cpu() {
    if !dpdk::AVAILABLE {
        eprintln!("SKIPPED pages_round_trip_through_isal_zlib_and_the_cpu: built without DPDK");
    }
    // Without DPDK the run below is compiled out.
    #[cfg(dpdk)]
    with_dpdk::run();
}

#[cfg(dpdk)]
mod with_dpdk {
    use dpdk::compress::{Compressor, Direction, OpFailure};
    use dpdk::{DpdkError, Eal};
    use std::io::Read;

    const PAGE: usize = 4096;
    /// Room for a page and what deflate adds to one it cannot compress.
    const ROOM: u16 = 8192;

    /// Pages a guest holds: zeros, text, small numbers, a repeated pattern, random bytes.
    fn pages() -> Vec<Vec<u8>> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut pages = Vec::new();
        for i in 0..64u64 {
            let page: Vec<u8> = match i % 5 {
                0 => vec![0; PAGE],
                1 => b"the quick brown fox jumps over the lazy dog; ".iter().cycle().take(PAGE).copied().collect(),
                2 => (0..PAGE / 4).flat_map(|_| ((random() % 1000) as u32).to_le_bytes()).collect(),
                3 => (0..PAGE).map(|j| (j as u64 * i) as u8).collect(),
                _ => (0..PAGE / 8).flat_map(|_| random().to_le_bytes()).collect(),
            };
            pages.push(page);
        }
        pages
    }

    fn inflate(compressed: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(compressed).read_to_end(&mut out).expect("raw deflate");
        out
    }

    pub fn run() {
        let prefix = format!("--file-prefix=vmigrate-compress-{}", std::process::id());
        let args = ["--no-huge", "-m", "256", "--no-pci", "-l", "0", "--log-level=error", &prefix].into_iter().chain([
            "--vdev",
            "compress_isal0",
            "--vdev",
            "compress_zlib0",
        ]);
        let eal = match Eal::init(&args.collect::<Vec<_>>()) {
            Ok(eal) => eal,
            Err(err) if !is_root() => {
                eprintln!("SKIPPED pages_round_trip_through_isal_zlib_and_the_cpu: the EAL needs root here ({err})");
                return;
            }
            Err(err) => panic!("EAL initialisation failed: {err}"),
        };
        assert!(matches!(Compressor::open(&eal, "compress_nope0", 8, ROOM), Err(DpdkError::NoSuchDevice(_))));
        let mut devices: Vec<Compressor> = ["compress_isal0", "compress_zlib0"]
            .iter()
            .map(|name| Compressor::open(&eal, name, 16, ROOM).unwrap_or_else(|e| panic!("{name}: {e}")))
            .collect();
        let pages = pages();
        let inputs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
        for at in 0..devices.len() {
            let name = devices[at].name().to_string();
            let compressed = devices[at].run(Direction::Compress, &inputs, usize::from(ROOM));
            let compressed: Vec<Vec<u8>> =
                compressed.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{name}: {e}"))).collect();
            let total: usize = compressed.iter().map(Vec::len).sum();
            eprintln!("{name}: {} pages, {} bytes, to {total} bytes", pages.len(), pages.len() * PAGE);
            assert!(total < pages.len() * PAGE * 3 / 4, "{name} hardly compressed: {total} bytes");
            for (page, packed) in pages.iter().zip(&compressed) {
                assert_eq!(&inflate(packed), page, "{name}: the CPU's inflater");
            }
            // Each device decompresses what either compressed.
            let packed: Vec<&[u8]> = compressed.iter().map(Vec::as_slice).collect();
            for other in devices.iter_mut() {
                let back = other.run(Direction::Decompress, &packed, PAGE);
                for (page, back) in pages.iter().zip(back) {
                    let other_name = other.name();
                    assert_eq!(&back.unwrap_or_else(|e| panic!("{other_name}: {e}")), page, "{name} to {other_name}");
                }
            }
        }
        // An output that does not fit is that operation's failure alone.
        let random = &pages[4];
        let results = devices[0].run(Direction::Compress, &[random, &pages[0]], 64);
        assert!(matches!(results[0], Err(OpFailure::OutOfSpace(64))), "{:?}", results[0]);
        assert_eq!(inflate(results[1].as_ref().expect("the zero page fits")), pages[0]);
        drop(devices);
        queue_pairs_on_threads_of_their_own(&eal, &pages);
    }

    /// The device opened again (as a later session does), with a queue pair per thread:
    /// threads the EAL never heard of (the compression workers) compress at once.
    fn queue_pairs_on_threads_of_their_own(eal: &Eal, pages: &[Vec<u8>]) {
        let queues = Compressor::open_queues(eal, "compress_isal0", 2, 64, ROOM).expect("two queue pairs");
        std::thread::scope(|scope| {
            for mut queue in queues {
                scope.spawn(move || {
                    let inputs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
                    let mut seen = vec![false; inputs.len()];
                    queue.run_with(
                        Direction::Compress,
                        &inputs,
                        |_| PAGE - 1,
                        |index, result| {
                            seen[index] = true;
                            match result {
                                Ok(packed) => assert_eq!(inflate(packed), pages[index]),
                                // Random bytes do not shrink below a page.
                                Err(failure) => assert_eq!(failure, OpFailure::OutOfSpace(PAGE - 1), "page {index}"),
                            }
                        },
                    );
                    assert!(seen.iter().all(|seen| *seen), "every page came back");
                });
            }
        });
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }
}
