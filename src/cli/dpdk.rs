//! `--stack dpdk`: the EAL, the mbuf pool and the port under our dataplane cores, and the
//! port's report when they stop: its statistics, and whether every mbuf came back to the
//! pool once the port was closed.

use anyhow::Result;
use dataplane::core::CoreConfig;
use dataplane::stack::CoreStack;

/// What the user asked of one DPDK port.
#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
pub struct PortRequest<'a> {
    /// The port's name as the EAL knows it (e.g. `net_af_packet0`).
    pub name: &'a str,
    pub cores: usize,
    pub mtu: Option<u16>,
    /// Print the driver's extended statistics at teardown.
    pub xstats: bool,
    /// Send large segments whole (a memif to another vmigrate: `--whole-segments`).
    pub whole_segments: bool,
}

/// The buffer size of a memif made with `args` (its `bsize=`, else the driver's default).
#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
fn memif_buffer_bytes(args: &str) -> Option<usize> {
    /// DPDK's memif buffers when `bsize` is not given (ETH_MEMIF_DEFAULT_PKT_BUFFER_SIZE).
    const DEFAULT_BUFFER_BYTES: usize = 2048;
    match args.split(',').find_map(|arg| arg.trim().strip_prefix("bsize=")) {
        Some(value) => value.parse().ok(),
        None => Some(DEFAULT_BUFFER_BYTES),
    }
}

#[cfg(feature = "dpdk")]
mod with_dpdk {
    use super::*;
    use crate::cli::exit::Failure;
    use anyhow::Context;
    use dataplane::dpdk_nic::LargeSegments;
    use dataplane::stack::NicBackend;
    use std::sync::{Arc, OnceLock};

    static EAL: OnceLock<dpdk::Eal> = OnceLock::new();

    /// Mbufs an AF_XDP queue may keep at close: its fill ring (the driver's default of 2048
    /// descriptors) and what it had taken to refill it (up to a receive burst; 2049 and
    /// 2050 were seen).
    const AF_XDP_FILL_RING: u32 = 2048 + dpdk::MAX_RX_BURST as u32;

    /// The process's EAL, initialised from `args` by the first caller (DPDK allows one
    /// initialisation per process; later callers share it and their `args` are ignored).
    pub fn eal(args: &[String]) -> Result<&'static dpdk::Eal> {
        if let Some(eal) = EAL.get() {
            return Ok(eal);
        }
        let eal = dpdk::Eal::init(args).context("initialising DPDK (the EAL arguments after --)")?;
        Ok(EAL.get_or_init(|| eal))
    }

    /// Our stack on `request.cores` queue pairs of a DPDK port. The mbuf pool lives for the
    /// process; the port is closed when the stack is dropped, after its cores.
    pub fn port_stack(eal: &'static dpdk::Eal, request: &PortRequest, config: CoreConfig) -> Result<CoreStack> {
        let name = request.name;
        let cores = request.cores.max(1);
        let whole = request.whole_segments && config.offload_in_use();
        let pool = match whole {
            // Whole segments arrive whole: one mbuf each, not a chain of small ones that
            // would be copied out into one buffer for smoltcp. A memif allocates one per
            // frame received and has no ring of them to fill, so a queue holds a receive
            // burst or two and the few small frames it sends (its segments come from the
            // large pool): 512 a queue, 32 MiB.
            true => dpdk::Mempool::with_data_room(eal, &format!("vm_{name}"), 512 * cores as u32 - 1, 32, u16::MAX),
            // Per queue: its receive and transmit rings, a burst each way, and what smoltcp
            // holds.
            false => {
                let mtu = request.mtu.unwrap_or(1500);
                dpdk::Mempool::for_mtu(eal, &format!("vm_{name}"), 8192 * cores as u32 - 1, 256, mtu)
            }
        }
        .with_context(|| format!("the mbuf pool for DPDK port {name}"))?;
        let pool: &'static dpdk::Mempool = Box::leak(Box::new(pool));
        let port = dpdk::Port::start(eal, name, cores as u16, pool, request.mtu)
            .with_context(|| format!("starting DPDK port {name}"))?;
        // Large segments wherever offload is on (the default) and the port can send them
        // (it chains mbufs, or cuts segments itself): their own pools.
        let can_cut = port.segment_offload().tso || port.segment_offload().multi_segment;
        if whole {
            check_whole_segments(&port)?;
        }
        let segments = match config.offload_in_use() && can_cut {
            true => Some(LargeSegments {
                pools: Box::leak(Box::new(
                    dpdk::segments::SegmentPools::new(eal, &format!("vm_{name}"), cores as u16)
                        .with_context(|| format!("the large-segment pools for DPDK port {name}"))?,
                )),
                whole,
            }),
            false => None,
        };
        let port = Arc::new(port);
        log::info!("{}", describe(&port, config.offload_in_use(), whole));
        let xstats = request.xstats;
        let teardown = port.clone();
        let stack = CoreStack::start(NicBackend::Dpdk { port, pool, segments }, name, cores, config)
            .with_context(|| format!("starting the dataplane on DPDK port {name}"))?;
        Ok(stack.on_teardown(move || finish(teardown, pool, segments, xstats)))
    }

    /// Whole segments need a memif (a link with no MTU of its own between two of our
    /// stacks) whose buffers hold one: a larger frame would be chained over several of its
    /// descriptors, which 22.11's memif gets wrong (see `LargeSegments`).
    fn check_whole_segments(port: &dpdk::Port) -> Result<()> {
        let name = port.name();
        if port.driver() != "net_memif" {
            return Err(Failure::usage(format!(
                "--whole-segments is for a memif between two vmigrate processes; port {name} is {}",
                port.driver()
            )));
        }
        // A memif made with no arguments at all has the driver's default buffers too.
        let buffer = memif_buffer_bytes(port.device_args().as_deref().unwrap_or("")).unwrap_or(0);
        if buffer < dpdk::segments::LARGE_FRAME_BYTES {
            return Err(Failure::usage(format!(
                "--whole-segments needs memif buffers that hold a 64 KiB segment; port {name}'s are {buffer} \
                 bytes: add bsize=65535 to its --vdev (and rsize=8, for 32 MiB of shared memory), on both ends"
            )));
        }
        Ok(())
    }

    /// The port's line in the log; `offload`: large segments were asked for; `whole`: they
    /// go uncut.
    fn describe(port: &dpdk::Port, offload: bool, whole: bool) -> String {
        let cut = port.segment_offload();
        let segments = match (offload, cut.tso, cut.multi_segment) {
            (false, _, _) => "off",
            (true, _, true) if whole => "64 KiB, sent whole, merged by GRO",
            (true, true, _) => "64 KiB, cut by the device (TSO), merged by GRO",
            (true, false, true) => "64 KiB, cut by GSO, merged by GRO",
            (true, false, false) => "merged by GRO when received; sent at the MTU (the device chains no mbufs)",
        };
        let offload = port.checksum_offload();
        let checksums = match (offload.receive, offload.transmit) {
            (true, true) => "receive and transmit",
            (true, false) => "receive",
            (false, true) => "transmit",
            (false, false) => "none",
        };
        let link = port.link();
        format!(
            "DPDK port {}: {} queue pair(s), MTU {}, link {} {} Mbit/s, checksum offload: {checksums}, \
             large segments: {segments}",
            port.name(),
            port.queues(),
            port.mtu(),
            if link.up { "up" } else { "down" },
            link.speed_mbps,
        )
    }

    /// Reports the port's counters, closes it (its queues give back the mbufs they held)
    /// and checks that the pool is full again: anything missing is a leak.
    fn finish(
        port: Arc<dpdk::Port<'static>>,
        pool: &'static dpdk::Mempool,
        segments: Option<LargeSegments>,
        xstats: bool,
    ) {
        let name = port.name().to_string();
        let (driver, queues) = (port.driver().to_string(), u32::from(port.queues()));
        let stats = port.stats();
        log::info!(
            "DPDK port {name}: {} packets received, {} sent; {} missed, {} receive errors, \
             {} transmit errors, {} dropped at a full transmit queue",
            stats.rx_packets,
            stats.tx_packets,
            stats.rx_missed,
            stats.rx_errors,
            stats.tx_errors,
            stats.tx_dropped
        );
        if xstats {
            for (stat, value) in port.xstats().into_iter().filter(|(_, value)| *value != 0) {
                log::info!("  {stat} = {value}");
            }
        }
        match Arc::try_unwrap(port) {
            Ok(port) => drop(port),
            Err(_) => {
                log::warn!("DPDK port {name} still in use at teardown: its mbufs were not counted");
                return;
            }
        }
        let (available, size) = (pool.available(), pool.size());
        if let Some(Err(missing)) = segments.map(|large| large.pools.all_back()) {
            log::warn!("DPDK port {name} closed: {missing} never came back to their pools");
        } else if available == size {
            log::info!("DPDK port {name} closed: all {size} mbufs back in the pool");
        } else if driver == "net_af_xdp" && size - available <= AF_XDP_FILL_RING * queues {
            // DPDK 22.11's AF_XDP driver leaves the mbufs of its fill rings (the buffers
            // the kernel was to receive into) out of the pool when the port closes.
            log::info!(
                "DPDK port {name} closed: all mbufs back in the pool but {} that the AF_XDP fill ring held",
                size - available
            );
        } else {
            log::warn!("DPDK port {name} closed: {} of {size} mbufs never came back to the pool", size - available);
        }
    }
}

/// EAL arguments for an EAL of this process's own: no hugepages (`megabytes` of memory),
/// no PCI, no shared configuration, a file prefix `vmigrate-TAG-PID`, main lcore 0.
pub fn private_eal_args(tag: &str, megabytes: u32) -> Vec<String> {
    let prefix = format!("--file-prefix=vmigrate-{tag}-{}", std::process::id());
    let memory = megabytes.to_string();
    ["--no-huge", "-m", &memory, "--no-pci", "--no-shconf", &prefix, "--log-level=error", "-l", "0"]
        .iter()
        .map(|arg| arg.to_string())
        .collect()
}

/// The demo's EAL arguments when none are given: an EAL of its own, and two memif ports
/// joined to each other through an abstract socket of this process's own: `net_memif0` the
/// server, `net_memif1` the client; with buffers that hold a whole 64 KiB segment.
pub fn demo_eal_args() -> Vec<String> {
    let socket = format!("/vmigrate-demo-{}", std::process::id());
    let mut args = private_eal_args("demo", 512);
    for role in ["net_memif0,role=server", "net_memif1,role=client"] {
        args.extend(["--vdev".to_string(), format!("{role},id=0,socket={socket},{WHOLE_SEGMENT_MEMIF}")]);
    }
    args
}

/// A memif's devargs for `--whole-segments`: buffers of 64 KiB, 256 of them per ring.
const WHOLE_SEGMENT_MEMIF: &str = "bsize=65535,rsize=8";

#[cfg(feature = "dpdk")]
pub use with_dpdk::eal;

/// Our stack on the DPDK port `request` names, after initialising the EAL with `eal_args`.
#[cfg(feature = "dpdk")]
pub fn stack(eal_args: &[String], request: &PortRequest, config: CoreConfig) -> Result<CoreStack> {
    let eal = with_dpdk::eal(eal_args)?;
    with_dpdk::port_stack(eal, request, config)
}

#[cfg(not(feature = "dpdk"))]
pub fn stack(_eal_args: &[String], _request: &PortRequest, _config: CoreConfig) -> Result<CoreStack> {
    Err(super::exit::Failure::usage(
        "this vmigrate was built without DPDK: build it with `--features dpdk` (needs libdpdk-dev)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memif_s_buffer_size_is_read_from_its_device_arguments() {
        assert_eq!(memif_buffer_bytes("role=client,id=0,socket=/s,bsize=65535,rsize=8"), Some(65535));
        assert_eq!(memif_buffer_bytes("role=server,id=0"), Some(2048), "the driver's default");
        assert_eq!(memif_buffer_bytes(""), Some(2048), "no arguments at all");
        assert_eq!(memif_buffer_bytes("bsize=big"), None);
    }

    #[test]
    fn the_demo_s_memif_pair_holds_whole_segments() {
        let args = demo_eal_args();
        let vdevs: Vec<&String> =
            args.iter().skip_while(|arg| *arg != "--vdev").filter(|arg| arg.starts_with("net_memif")).collect();
        assert_eq!(vdevs.len(), 2);
        for vdev in vdevs {
            assert_eq!(memif_buffer_bytes(vdev), Some(65535), "{vdev}");
        }
    }
}
