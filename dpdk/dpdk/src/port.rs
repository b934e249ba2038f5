//! A DPDK port (a NIC, or a virtual device such as net_af_packet or net_tap) with one
//! RX/TX queue pair per dataplane core, RSS across the queues where the device has it.

use crate::{DpdkError, Eal, Mbuf, Mempool};
use dpdk_sys::consts;
use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Descriptors per queue.
const RING_DESCRIPTORS: u16 = 1024;
/// Attempts to hand a burst to a transmit queue before the rest is freed (counted).
const TX_ATTEMPTS: usize = 8;
/// The most packets one receive burst takes (a larger `max` is cut to it).
pub const MAX_RX_BURST: u16 = 64;

pub struct Port<'pool> {
    id: u16,
    name: String,
    /// The driver's name (`net_memif`, `net_af_xdp`, ...).
    driver: String,
    queues: u16,
    checksum_offload: ChecksumOffload,
    segment_offload: SegmentOffload,
    _pool: &'pool Mempool,
    /// Packets freed because the transmit queue stayed full.
    tx_dropped: AtomicU64,
}

/// The checksum work the device does for us, from its capabilities, and turned on: IPv4
/// header and TCP checksums together (a device with one but not the other is treated as
/// having neither; it saves little and doubles the cases).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChecksumOffload {
    /// Received packets carry the device's verdict in their offload flags.
    pub receive: bool,
    /// The device fills in the checksums of packets flagged for it.
    pub transmit: bool,
}

/// What the device takes of large segments (see `segments`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentOffload {
    /// The device cuts a large TCP segment into frames itself (TSO), and fills in their
    /// checksums.
    pub tso: bool,
    /// The device sends packets chained over several mbufs (GSO's frames are).
    pub multi_segment: bool,
}

// SAFETY: DPDK allows each queue of a port to be used from its own lcore at once; every
// method here names its queue, and one queue is only ever used by one dataplane core (the
// caller's contract, as for any DPDK program). The rest is read-only or atomic.
unsafe impl Sync for Port<'_> {}
// SAFETY: as above; the port id is a plain number valid in any thread of the process.
unsafe impl Send for Port<'_> {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStatus {
    pub up: bool,
    pub speed_mbps: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Packets the NIC dropped because no receive descriptor was free.
    pub rx_missed: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Packets we freed after the transmit queue stayed full.
    pub tx_dropped: u64,
}

fn check(call: &'static str, result: i32) -> Result<(), DpdkError> {
    if result < 0 {
        Err(DpdkError::from_code(call, result))
    } else {
        Ok(())
    }
}

/// Room for a device's arguments; longer ones are reported as none.
const DEVICE_ARGS_BYTES: usize = 8192;

impl<'pool> Port<'pool> {
    /// Configures and starts the port named `name` (as the EAL knows it, e.g. the vdev
    /// name `net_af_packet0`) with `queues` RX/TX queue pairs fed from `pool`, and its MTU
    /// set to `mtu` if given (else the device's default, usually 1500).
    pub fn start(
        _eal: &Eal,
        name: &str,
        queues: u16,
        pool: &'pool Mempool,
        mtu: Option<u16>,
    ) -> Result<Port<'pool>, DpdkError> {
        let c_name = CString::new(name).map_err(|_| DpdkError::BadArgument(name.to_string()))?;
        let mut id = 0u16;
        // SAFETY: a valid C string and a live output location.
        if unsafe { dpdk_sys::rte_eth_dev_get_port_by_name(c_name.as_ptr(), &mut id) } != 0 {
            return Err(DpdkError::NoSuchPort(name.to_string()));
        }
        let mut info = dpdk_sys::rte_eth_dev_info::default();
        // SAFETY: the port exists; `info` is a live struct of the right type.
        check("rte_eth_dev_info_get", unsafe { dpdk_sys::rte_eth_dev_info_get(id, &mut info) })?;
        // A core per queue pair: fewer queues than cores would leave cores polling queues
        // that do not exist (DPDK hands the driver a null queue), so it is an error.
        let queues = queues.max(1);
        let max = info.max_rx_queues.min(info.max_tx_queues);
        if queues > max {
            return Err(DpdkError::TooManyQueues { port: name.to_string(), asked: queues, max });
        }

        let mut conf = dpdk_sys::rte_eth_conf::default();
        let receive_checksums = consts::RTE_ETH_RX_OFFLOAD_IPV4_CKSUM | consts::RTE_ETH_RX_OFFLOAD_TCP_CKSUM;
        let transmit_checksums = consts::RTE_ETH_TX_OFFLOAD_IPV4_CKSUM | consts::RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
        let checksum_offload = ChecksumOffload {
            receive: info.rx_offload_capa & receive_checksums == receive_checksums,
            transmit: info.tx_offload_capa & transmit_checksums == transmit_checksums,
        };
        if checksum_offload.receive {
            conf.rxmode.offloads |= receive_checksums;
        }
        if checksum_offload.transmit {
            conf.txmode.offloads |= transmit_checksums;
        }
        // SAFETY: DPDK fills in the driver's name as a static C string (or leaves it null).
        let driver = (!info.driver_name.is_null())
            .then(|| unsafe { std::ffi::CStr::from_ptr(info.driver_name) }.to_string_lossy().into_owned());
        // net_tap's TSO is DPDK's GSO library inside the driver, and 22.11's driver refuses
        // (counts an error and stops the burst at) any segment cut to a full MTU: it compares
        // the Ethernet frame with the IP MTU. Our own GSO does the same work without that.
        let tso_usable = driver.as_deref() != Some("net_tap");
        let segment_offload = SegmentOffload {
            tso: tso_usable && info.tx_offload_capa & consts::RTE_ETH_TX_OFFLOAD_TCP_TSO != 0,
            multi_segment: info.tx_offload_capa & consts::RTE_ETH_TX_OFFLOAD_MULTI_SEGS != 0,
        };
        if segment_offload.tso {
            conf.txmode.offloads |= consts::RTE_ETH_TX_OFFLOAD_TCP_TSO;
        }
        if segment_offload.multi_segment {
            conf.txmode.offloads |= consts::RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
        }
        let rss = (consts::RTE_ETH_RSS_IP | consts::RTE_ETH_RSS_TCP) & info.flow_type_rss_offloads;
        if queues > 1 && rss != 0 {
            conf.rxmode.mq_mode = dpdk_sys::rte_eth_rx_mq_mode_RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_hf = rss;
        }
        // SAFETY: the port exists and is stopped; `conf` lives across the call.
        check("rte_eth_dev_configure", unsafe { dpdk_sys::rte_eth_dev_configure(id, queues, queues, &conf) })?;
        let mut current = 0u16;
        // SAFETY: the port exists; `current` is a live u16.
        let known = unsafe { dpdk_sys::rte_eth_dev_get_mtu(id, &mut current) } == 0;
        // Some devices (memif) cannot change their MTU at all: asking for the one they
        // have is not an error.
        if let Some(mtu) = mtu.filter(|&mtu| !known || mtu != current) {
            // SAFETY: the port is configured and stopped.
            check("rte_eth_dev_set_mtu", unsafe { dpdk_sys::rte_eth_dev_set_mtu(id, mtu) })?;
        }
        // SAFETY: as above.
        let socket = unsafe { dpdk_sys::rte_eth_dev_socket_id(id) };
        let socket = if socket < 0 { dpdk_sys::consts::SOCKET_ID_ANY } else { socket } as u32;
        for queue in 0..queues {
            // SAFETY: the port is configured with `queues` queues; null configurations
            // take the driver's defaults; the pool outlives the port ('pool).
            check("rte_eth_rx_queue_setup", unsafe {
                dpdk_sys::rte_eth_rx_queue_setup(id, queue, RING_DESCRIPTORS, socket, std::ptr::null(), pool.as_ptr())
            })?;
            // SAFETY: as above.
            check("rte_eth_tx_queue_setup", unsafe {
                dpdk_sys::rte_eth_tx_queue_setup(id, queue, RING_DESCRIPTORS, socket, std::ptr::null())
            })?;
        }
        // SAFETY: the port is configured and its queues set up.
        check("rte_eth_dev_start", unsafe { dpdk_sys::rte_eth_dev_start(id) })?;
        // Our stack owns a MAC address of its own, not the port's: the port must take in
        // frames for any address. Not every device can say no to this; those still work if
        // the stack is given the port's own address.
        // SAFETY: the port is started.
        let _ = unsafe { dpdk_sys::rte_eth_promiscuous_enable(id) };
        Ok(Port {
            id,
            name: name.to_string(),
            driver: driver.unwrap_or_default(),
            queues,
            checksum_offload,
            segment_offload,
            _pool: pool,
            tx_dropped: AtomicU64::new(0),
        })
    }

    /// Makes the calling thread, which will poll this port's queues, an lcore of its own
    /// for as long as the registration lives (see `LcoreRegistration`).
    pub fn register_polling_thread(&self) -> Result<crate::LcoreRegistration, DpdkError> {
        crate::LcoreRegistration::register()
    }

    /// The name the EAL knows the port by (e.g. `net_af_packet0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver's name (`net_memif`, `net_af_xdp`, ...).
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// The arguments the port's device was made with: a vdev's `key=value,...` after its
    /// name on the EAL's command line (None for a device made without any).
    pub fn device_args(&self) -> Option<String> {
        let mut buffer = vec![0u8; DEVICE_ARGS_BYTES];
        // SAFETY: the port exists; `buffer` has room for the length passed.
        let copied = unsafe {
            dpdk_sys::vm_port_device_args(self.id, buffer.as_mut_ptr().cast::<std::ffi::c_char>(), buffer.len())
        };
        if copied != 0 {
            return None;
        }
        let text = std::ffi::CStr::from_bytes_until_nul(&buffer).ok()?;
        Some(text.to_string_lossy().into_owned())
    }

    pub fn queues(&self) -> u16 {
        self.queues
    }

    pub fn checksum_offload(&self) -> ChecksumOffload {
        self.checksum_offload
    }

    pub fn segment_offload(&self) -> SegmentOffload {
        self.segment_offload
    }

    /// The port's MTU (the largest IP packet it sends).
    pub fn mtu(&self) -> u16 {
        let mut mtu = 1500u16;
        // SAFETY: the port exists; `mtu` is a live u16.
        unsafe { dpdk_sys::rte_eth_dev_get_mtu(self.id, &mut mtu) };
        mtu
    }

    /// Receives up to `max` packets (at most `MAX_RX_BURST`) from `queue` into `packets`;
    /// returns how many came. No allocation: this is every dataplane core's hot path.
    pub fn receive(&self, queue: u16, packets: &mut impl Extend<Mbuf<'pool>>, max: u16) -> usize {
        // Left unwritten: zeroing it cost a memset per poll, and the driver writes the
        // entries it returns.
        let mut raw = [std::mem::MaybeUninit::<*mut dpdk_sys::rte_mbuf>::uninit(); MAX_RX_BURST as usize];
        let max = max.min(MAX_RX_BURST);
        // SAFETY: `raw` has room for `max` pointers; the queue exists (queue < queues, else
        // the driver returns 0).
        let count = unsafe { dpdk_sys::vm_rte_eth_rx_burst(self.id, queue, raw.as_mut_ptr().cast(), max) };
        packets.extend(raw[..usize::from(count)].iter().filter_map(|entry| {
            // SAFETY: the driver wrote the first `count` entries.
            let mbuf = NonNull::new(unsafe { entry.assume_init() })?;
            // SAFETY: the burst handed these mbufs, from our pool, to us.
            Some(unsafe { Mbuf::from_raw(mbuf) })
        }));
        usize::from(count)
    }

    /// Hands `queue` what it takes of `packets` now, from the front, in one try; what it
    /// would not take stays in `packets`, in order, for the caller to try again (a full
    /// queue is backpressure, not loss). Returns how many went.
    pub fn transmit_some(&self, queue: u16, packets: &mut Vec<Mbuf<'pool>>) -> usize {
        if packets.is_empty() {
            return 0;
        }
        let count = packets.len().min(usize::from(u16::MAX)) as u16;
        // `Mbuf` is a transparent owning pointer, so the Vec's buffer is the array of mbuf
        // pointers the driver reads.
        let raw = packets.as_mut_ptr().cast::<*mut dpdk_sys::rte_mbuf>();
        // SAFETY: `raw` points at `count` live mbufs we own; the driver takes ownership of
        // the first `sent`, which are then forgotten here (not freed twice).
        let sent = usize::from(unsafe { dpdk_sys::vm_rte_eth_tx_burst(self.id, queue, raw, count) });
        for mbuf in packets.drain(..sent) {
            std::mem::forget(mbuf);
        }
        sent
    }

    /// Sends `packets` on `queue`, retrying a full queue a few times; what it still would
    /// not take is freed and counted. Returns how many were queued for sending.
    pub fn transmit(&self, queue: u16, mut packets: Vec<Mbuf<'pool>>) -> usize {
        let total = packets.len();
        for _ in 0..TX_ATTEMPTS {
            if packets.is_empty() {
                break;
            }
            self.transmit_some(queue, &mut packets);
        }
        // What the driver still would not take is freed as `packets` drops.
        self.tx_dropped.fetch_add(packets.len() as u64, Ordering::Relaxed);
        total - packets.len()
    }

    pub fn link(&self) -> LinkStatus {
        let mut link = dpdk_sys::rte_eth_link::default();
        // SAFETY: the port exists; `link` is a live struct.
        unsafe { dpdk_sys::rte_eth_link_get_nowait(self.id, &mut link) };
        LinkStatus { up: link.link_status() != 0, speed_mbps: link.link_speed }
    }

    pub fn stats(&self) -> PortStats {
        let mut stats = dpdk_sys::rte_eth_stats::default();
        // SAFETY: the port exists; `stats` is a live struct.
        unsafe { dpdk_sys::rte_eth_stats_get(self.id, &mut stats) };
        PortStats {
            rx_packets: stats.ipackets,
            tx_packets: stats.opackets,
            rx_bytes: stats.ibytes,
            tx_bytes: stats.obytes,
            rx_missed: stats.imissed,
            rx_errors: stats.ierrors,
            tx_errors: stats.oerrors,
            tx_dropped: self.tx_dropped.load(Ordering::Relaxed),
        }
    }
}

impl Port<'_> {
    /// The driver's extended statistics (`rte_eth_xstats`), by name, in the driver's order:
    /// per-queue counters and whatever else the device keeps. Empty if the driver has none
    /// or they changed size between the two calls.
    pub fn xstats(&self) -> Vec<(String, u64)> {
        // SAFETY: a null buffer of size 0 asks only for the count.
        let count = unsafe { dpdk_sys::rte_eth_xstats_get_names(self.id, std::ptr::null_mut(), 0) };
        let Ok(count) = usize::try_from(count) else { return Vec::new() };
        let mut names = vec![dpdk_sys::rte_eth_xstat_name::default(); count];
        let mut values = vec![dpdk_sys::rte_eth_xstat::default(); count];
        // SAFETY: both buffers hold `count` entries, as passed.
        let (named, valued) = unsafe {
            (
                dpdk_sys::rte_eth_xstats_get_names(self.id, names.as_mut_ptr(), count as u32),
                dpdk_sys::rte_eth_xstats_get(self.id, values.as_mut_ptr(), count as u32),
            )
        };
        if named != count as i32 || valued != count as i32 {
            return Vec::new();
        }
        values
            .iter()
            .filter_map(|stat| {
                let name = names.get(stat.id as usize)?;
                // SAFETY: DPDK writes each name as a NUL-terminated string inside its array.
                let name = unsafe { std::ffi::CStr::from_ptr(name.name.as_ptr()) };
                Some((name.to_string_lossy().into_owned(), stat.value))
            })
            .collect()
    }
}

impl Drop for Port<'_> {
    fn drop(&mut self) {
        // SAFETY: the port was started by us; stopping and closing it returns the mbufs its
        // queues held to the pool, which outlives the port.
        unsafe {
            dpdk_sys::rte_eth_dev_stop(self.id);
            dpdk_sys::rte_eth_dev_close(self.id);
        }
    }
}
