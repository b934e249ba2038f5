//! A device that cannot be opened is reported clearly: here an AF_PACKET vdev on an
//! interface that does not exist. Its own process, since the EAL starts once per process.

#[test]
fn a_vdev_on_a_missing_interface_is_a_clear_error() {
    if !dpdk::AVAILABLE {
        eprintln!("SKIPPED a_vdev_on_a_missing_interface_is_a_clear_error: built without DPDK");
    }
    // Without DPDK the run below is compiled out.
    #[cfg(dpdk)]
    with_dpdk::run();
}

#[cfg(dpdk)]
mod with_dpdk {
    use dpdk::{Eal, Mempool, Port};

    pub fn run() {
        let prefix = format!("--file-prefix=vmigrate-test-{}", std::process::id());
        let args = [
            "--no-huge",
            "-m",
            "128",
            "--no-pci",
            "-l",
            "0",
            "--vdev",
            "net_af_packet0,iface=vmigrate-nope0",
            "--log-level=error",
            &prefix,
        ];
        // DPDK either refuses to start, or starts without the device: both must say so.
        let message = match Eal::init(&args) {
            Err(err) => err.to_string(),
            Ok(eal) => {
                let pool = Mempool::new(&eal, "vmigrate_err", 255, 0).expect("mempool");
                let started = Port::start(&eal, "net_af_packet0", 1, &pool, None).map(|_| ());
                match started {
                    Err(err) => err.to_string(),
                    Ok(()) => panic!("a port on a missing interface started"),
                }
            }
        };
        eprintln!("reported: {message}");
        assert!(
            message.contains("net_af_packet0") || message.contains("rte_eal_init"),
            "the error does not say what failed: {message}"
        );
    }
}
