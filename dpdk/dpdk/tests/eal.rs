//! The wrapper against a real EAL (`--no-huge`, no PCI) and the null PMD: initialisation
//! once per process, a mempool, owning mbufs, a port's queue pair, and no mbuf leaked.
//! One test per process, since the EAL can be initialised only once. Without DPDK, or
//! where the EAL cannot start (it needs root), the test says SKIPPED.

#[test]
fn mbufs_go_out_and_come_back_without_a_leak() {
    if !dpdk::AVAILABLE {
        eprintln!("SKIPPED mbufs_go_out_and_come_back_without_a_leak: built without DPDK");
    }
    // Without DPDK the run below is compiled out.
    #[cfg(dpdk)]
    with_dpdk::run();
}

#[cfg(dpdk)]
mod with_dpdk {
    use dpdk::{DpdkError, Eal, Mbuf, Mempool, Port};

    /// No hugepages, no PCI scan, one lcore, the null PMD, and a file prefix of our own so
    /// that concurrent test processes do not share runtime files.
    fn eal_args() -> Vec<String> {
        let prefix = format!("--file-prefix=vmigrate-test-{}", std::process::id());
        let args =
            ["--no-huge", "-m", "256", "--no-pci", "-l", "0", "--vdev", "net_null0", "--log-level=error", &prefix];
        // A one-queue device (AF_PACKET's default qpairs=1) on loopback, for the queue check.
        args.into_iter().chain(["--vdev", "net_af_packet1,iface=lo"]).map(|arg| arg.to_string()).collect()
    }

    pub fn run() {
        let eal = match Eal::init(&eal_args()) {
            Ok(eal) => eal,
            Err(err) if !is_root() => {
                eprintln!("SKIPPED mbufs_go_out_and_come_back_without_a_leak: the EAL needs root here ({err})");
                return;
            }
            Err(err) => panic!("EAL initialisation failed: {err}"),
        };
        assert!(matches!(Eal::init(&eal_args()), Err(DpdkError::AlreadyInitialised)), "a second init is refused");

        let pool = Mempool::new(&eal, "vmigrate_test", 1023, 0).expect("mempool");
        assert_eq!(pool.available(), pool.size(), "a new pool is full");
        {
            let port = Port::start(&eal, "net_null0", 1, &pool, None).expect("start the null port");
            assert!(matches!(Port::start(&eal, "net_nope9", 1, &pool, None), Err(DpdkError::NoSuchPort(_))));
            // More cores than the device has queue pairs is refused, not clamped.
            let refused = Port::start(&eal, "net_af_packet1", 2, &pool, None).map(|_| ()).unwrap_err();
            assert!(matches!(refused, DpdkError::TooManyQueues { asked: 2, max: 1, .. }), "{refused}");
            assert!(refused.to_string().contains("qpairs=N"), "{refused}");
            let packets: Vec<Mbuf> = (0..64)
                .map(|_| {
                    let mut mbuf = Mbuf::alloc(&pool).expect("an mbuf");
                    mbuf.append(60).expect("room for a frame").fill(0xab);
                    assert_eq!(mbuf.data().len(), 60);
                    mbuf
                })
                .collect();
            assert_eq!(pool.available(), pool.size() - 64);
            assert_eq!(port.transmit(0, packets), 64, "the null device takes every packet");
            let mut received = Vec::new();
            let count = port.receive(0, &mut received, 32);
            assert!(count > 0, "the null device always has packets to receive");
            assert_eq!(received.len(), count);
            drop(received);
            let stats = port.stats();
            assert!(stats.tx_packets >= 64, "{stats:?}");
            assert_eq!(stats.tx_dropped, 0);
            // ethdev's generic extended statistics come with every driver.
            let xstats = port.xstats();
            let tx_good = xstats.iter().find(|(name, _)| name == "tx_good_packets");
            assert_eq!(tx_good.map(|(_, value)| *value), Some(stats.tx_packets), "{xstats:?}");
            assert_eq!(port.name(), "net_null0");
        }
        // Every mbuf sent, received or set up in a queue is back in the pool.
        assert_eq!(pool.available(), pool.size(), "mbufs leaked");
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
            .unwrap_or(false)
    }
}
