//! `deflate` on DPDK's software compression devices, in process: migrations of a dirty
//! guest compressed by `compress_isal0` and by `compress_zlib0` verify, the destination
//! inflating on its CPU; a device that fails pages (injected around the real one) has them
//! compressed on the CPU, counted, and the migration still verifies; a device that cannot
//! be opened stops the migration before the guest is paused; `adaptive` runs with
//! `deflate` among its choices; the destination inflates on a device of its own, falling
//! back to the CPU for what it fails, or for everything where it cannot open it. One test, since the EAL starts once per process. It needs
//! DPDK (built with `--features dpdk`) and root (the EAL): without them it says SKIPPED.

#[test]
fn migrations_compress_on_the_device_and_fall_back_to_the_cpu() {
    #[cfg(feature = "dpdk")]
    with_dpdk::run();
    #[cfg(not(feature = "dpdk"))]
    eprintln!("SKIPPED migrations_compress_on_the_device_and_fall_back_to_the_cpu: built without DPDK");
}

#[cfg(feature = "dpdk")]
mod with_dpdk {
    use engine::config::SourceConfig;
    use engine::offload::dpdk::DpdkDevice;
    use engine::offload::{OffloadDevice, OffloadQueue, Offloaded};
    use guests::synthetic::WorkloadSpec;
    use migration::codec::Codec;
    use std::sync::Arc;
    use vmigrate_tests::session::{iterating_config, migrate_synthetic, migrate_synthetic_inflating_on, Outcome};

    const MEM: u64 = 32 << 20;
    /// 16 random bits in each 32-bit word: deflate packs it, lz4 does not.
    const DIRTY: WorkloadSpec = WorkloadSpec::Dirty { area_bytes: 16 << 20, pages_per_s: 5000, bits: 16 };

    pub fn run() {
        if !vmigrate_tests::process::is_root() {
            eprintln!("SKIPPED migrations_compress_on_the_device_and_fall_back_to_the_cpu: the EAL needs root");
            return;
        }
        let prefix = format!("--file-prefix=vmigrate-offload-{}", std::process::id());
        let args = ["--no-huge", "-m", "256", "--no-pci", "--no-shconf", "-l", "0", "--log-level=error", &prefix];
        let args = args.into_iter().chain(["--vdev", "compress_isal0", "--vdev", "compress_zlib0"]);
        let eal: &'static dpdk::Eal =
            Box::leak(Box::new(dpdk::Eal::init(&args.collect::<Vec<_>>()).expect("EAL initialisation")));
        for name in ["compress_isal0", "compress_zlib0"] {
            let device: Arc<dyn OffloadDevice> = Arc::new(DpdkDevice::new(eal, name).expect(name));
            let stats = verified(name, &migrate(Codec::Deflate, device));
            assert!(stats.encode.device_pages > 0, "{name} compressed nothing");
            assert_eq!(stats.encode.device_fallback_pages, 0, "{name} failed pages");
            assert!(stats.compression.compression_rate > 1.3, "{name}: ratio {}", stats.compression.compression_rate);
            assert_eq!(stats.compress_device.as_deref(), Some(name));
        }
        let isal = || DpdkDevice::new(eal, "compress_isal0").expect("compress_isal0");
        // Every fifth operation (a block of pages) fails on the device: its pages go
        // through the CPU's deflate.
        let failing: Arc<dyn OffloadDevice> = Arc::new(Failing { device: isal(), every: 5 });
        let stats = verified("failing device", &migrate(Codec::Deflate, failing));
        let encode = &stats.encode;
        assert!(encode.device_fallback_pages > 0 && encode.device_pages > 0, "{encode:?}");
        assert!(encode.device_pages > 3 * encode.device_fallback_pages, "{encode:?}");
        // A device that cannot be opened: the migration fails before the guest pauses.
        let outcome = migrate(Codec::Deflate, Arc::new(Unopenable));
        let err = outcome.source.expect_err("no device, no migration");
        assert!(err.contains("compression device unopenable0: its queues are gone"), "{err}");
        assert!(outcome.source_writes_after > 0, "the source guest must keep running");
        // Adaptive with deflate among its choices.
        verified("adaptive", &migrate(Codec::Adaptive, Arc::new(isal())));
        // The destination inflating on a device of its own (zlib's), one that fails some
        // pages (those go to the CPU), and one that cannot be opened (all go to the CPU).
        let zlib = || DpdkDevice::new(eal, "compress_zlib0").expect("compress_zlib0");
        let config =
            SourceConfig { offload: Some(Arc::new(isal())), ..iterating_config(MEM, Codec::Deflate, 2, false) };
        let destinations: [(&str, Arc<dyn OffloadDevice>); 3] = [
            ("inflating on compress_zlib0", Arc::new(zlib())),
            ("inflating on a failing device", Arc::new(Failing { device: zlib(), every: 4 })),
            ("no device to inflate on", Arc::new(Unopenable)),
        ];
        for (label, device) in destinations {
            let outcome = migrate_synthetic_inflating_on(device, MEM, DIRTY, &config);
            let stats = verified(label, &outcome);
            let report = outcome.destination.expect("verified above");
            let on_device = report.device_inflated_pages;
            let fallback = report.device_fallback_pages;
            eprintln!("{label}: {on_device} pages inflated on the device, {fallback} on the CPU after it failed them");
            assert_eq!(
                on_device + fallback,
                if label.starts_with("no") { 0 } else { stats.compression.pages },
                "{label}"
            );
            assert_eq!(fallback > 0, label.contains("failing"), "{label}");
        }
    }

    fn migrate(codec: Codec, device: Arc<dyn OffloadDevice>) -> Outcome {
        let config = SourceConfig { offload: Some(device), ..iterating_config(MEM, codec, 2, false) };
        migrate_synthetic(MEM, DIRTY, &config)
    }

    fn verified(label: &str, outcome: &Outcome) -> migration::stats::MigrationStats {
        let stats = outcome.source.clone().unwrap_or_else(|e| panic!("{label}: source failed: {e}"));
        let report = outcome.destination.as_ref().unwrap_or_else(|e| panic!("{label}: destination failed: {e}"));
        assert_eq!(stats.verified, Some(true), "{label}: memory differs");
        assert_eq!(report.verified, Some(true), "{label}: the destination saw a mismatch");
        outcome.destination_check.clone().unwrap_or_else(|e| panic!("{label}: {e}"));
        eprintln!(
            "{label}: {} pages compressed (ratio {:.2}), {} by the device, {} on the CPU after it failed them",
            stats.compression.pages,
            stats.compression.compression_rate,
            stats.encode.device_pages,
            stats.encode.device_fallback_pages
        );
        stats
    }

    /// The real device, with one page in `every` failed before it gets there.
    #[derive(Debug)]
    struct Failing {
        device: DpdkDevice,
        every: usize,
    }

    impl OffloadDevice for Failing {
        fn name(&self) -> &str {
            self.device.name()
        }

        fn open(&self, count: usize) -> Result<Vec<Box<dyn OffloadQueue>>, String> {
            let queues = self.device.open(count)?;
            let every = self.every;
            Ok(queues.into_iter().map(|queue| Box::new(FailingQueue { queue, every, seen: 0 }) as _).collect())
        }
    }

    struct FailingQueue {
        queue: Box<dyn OffloadQueue>,
        every: usize,
        seen: usize,
    }

    impl OffloadQueue for FailingQueue {
        fn compress_pages(&mut self, inputs: &[(&[u8], usize)], done: &mut dyn FnMut(usize, Offloaded<'_>)) {
            let passed = self.pass(inputs.len(), &mut |index| done(index, Offloaded::Failed("injected")));
            let kept: Vec<(&[u8], usize)> = passed.iter().map(|&index| inputs[index]).collect();
            self.queue.compress_pages(&kept, &mut |at, outcome| done(passed[at], outcome));
        }

        fn inflate_pages(&mut self, inputs: &[(&[u8], usize)], done: &mut dyn FnMut(usize, Option<&[u8]>)) {
            let passed = self.pass(inputs.len(), &mut |index| done(index, None));
            let kept: Vec<(&[u8], usize)> = passed.iter().map(|&index| inputs[index]).collect();
            self.queue.inflate_pages(&kept, &mut |at, inflated| done(passed[at], inflated));
        }

        fn pages_per_operation(&self) -> usize {
            self.queue.pages_per_operation()
        }
    }

    impl FailingQueue {
        /// Fails one input in `every` through `fail`; the indices of the others.
        fn pass(&mut self, count: usize, fail: &mut dyn FnMut(usize)) -> Vec<usize> {
            let mut passed = Vec::new();
            for index in 0..count {
                self.seen += 1;
                if self.seen.is_multiple_of(self.every) {
                    fail(index);
                } else {
                    passed.push(index);
                }
            }
            passed
        }
    }

    #[derive(Debug)]
    struct Unopenable;

    impl OffloadDevice for Unopenable {
        fn name(&self) -> &str {
            "unopenable0"
        }

        fn open(&self, _count: usize) -> Result<Vec<Box<dyn OffloadQueue>>, String> {
            Err("its queues are gone".to_string())
        }
    }
}
