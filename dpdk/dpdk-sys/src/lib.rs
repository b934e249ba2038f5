//! Raw bindings to the system DPDK (22.11 or newer), made by bindgen at build time, and the
//! out-of-line shim (`vm_*`) over the fast path DPDK only defines as static inline
//! functions. Everything here is unsafe and unchecked: the `dpdk` crate is the safe
//! wrapper. Built where DPDK is absent, the crate is empty and `AVAILABLE` is false.

#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code, clippy::all)]

#[cfg(dpdk)]
include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// Whether this build found DPDK (otherwise the crate is empty).
pub const AVAILABLE: bool = cfg!(dpdk);

/// Constants DPDK defines as macros of expressions (bit shifts of ULLs) that bindgen cannot
/// evaluate, copied from the 22.11 headers. `tests` checks each against the value the C
/// shim compiled from the headers exports.
pub mod consts {
    pub const RTE_MBUF_F_RX_IP_CKSUM_MASK: u64 = (1 << 4) | (1 << 7);
    pub const RTE_MBUF_F_RX_IP_CKSUM_GOOD: u64 = 1 << 7;
    pub const RTE_MBUF_F_RX_IP_CKSUM_BAD: u64 = 1 << 4;
    pub const RTE_MBUF_F_RX_L4_CKSUM_MASK: u64 = (1 << 3) | (1 << 8);
    pub const RTE_MBUF_F_RX_L4_CKSUM_GOOD: u64 = 1 << 8;
    pub const RTE_MBUF_F_RX_L4_CKSUM_BAD: u64 = 1 << 3;
    pub const RTE_MBUF_F_TX_IPV4: u64 = 1 << 55;
    pub const RTE_MBUF_F_TX_IP_CKSUM: u64 = 1 << 54;
    pub const RTE_MBUF_F_TX_TCP_CKSUM: u64 = 1 << 52;
    pub const RTE_MBUF_F_TX_TCP_SEG: u64 = 1 << 50;
    pub const RTE_ETH_TX_OFFLOAD_TCP_TSO: u64 = 1 << 5;
    pub const RTE_ETH_TX_OFFLOAD_MULTI_SEGS: u64 = 1 << 15;
    pub const RTE_ETH_TX_OFFLOAD_IPV4_CKSUM: u64 = 1 << 1;
    pub const RTE_ETH_TX_OFFLOAD_TCP_CKSUM: u64 = 1 << 3;
    pub const RTE_ETH_RX_OFFLOAD_IPV4_CKSUM: u64 = 1 << 1;
    pub const RTE_ETH_RX_OFFLOAD_TCP_CKSUM: u64 = 1 << 3;
    pub const RTE_ETH_RSS_IP: u64 = (1 << 2) | (1 << 3) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 13) | (1 << 15);
    pub const RTE_ETH_RSS_TCP: u64 = (1 << 4) | (1 << 10) | (1 << 16);
    pub const RTE_PKTMBUF_HEADROOM: u32 = 128;
    /// The most frames `rte_gro_reassemble_burst` takes at once.
    pub const RTE_GRO_MAX_BURST_ITEM_NUM: usize = 128;
    pub const RTE_MBUF_DEFAULT_BUF_SIZE: u32 = 2048 + RTE_PKTMBUF_HEADROOM;
    pub const SOCKET_ID_ANY: i32 = -1;
}

#[cfg(all(test, dpdk))]
mod tests {
    use super::consts::*;
    use super::*;

    #[test]
    fn every_constant_matches_the_headers() {
        // SAFETY: reading constants the shim defines; they are initialised at load time.
        let exported = unsafe {
            [
                ("RTE_MBUF_F_RX_IP_CKSUM_MASK", vm_RTE_MBUF_F_RX_IP_CKSUM_MASK, RTE_MBUF_F_RX_IP_CKSUM_MASK),
                ("RTE_MBUF_F_RX_IP_CKSUM_GOOD", vm_RTE_MBUF_F_RX_IP_CKSUM_GOOD, RTE_MBUF_F_RX_IP_CKSUM_GOOD),
                ("RTE_MBUF_F_RX_IP_CKSUM_BAD", vm_RTE_MBUF_F_RX_IP_CKSUM_BAD, RTE_MBUF_F_RX_IP_CKSUM_BAD),
                ("RTE_MBUF_F_RX_L4_CKSUM_MASK", vm_RTE_MBUF_F_RX_L4_CKSUM_MASK, RTE_MBUF_F_RX_L4_CKSUM_MASK),
                ("RTE_MBUF_F_RX_L4_CKSUM_GOOD", vm_RTE_MBUF_F_RX_L4_CKSUM_GOOD, RTE_MBUF_F_RX_L4_CKSUM_GOOD),
                ("RTE_MBUF_F_RX_L4_CKSUM_BAD", vm_RTE_MBUF_F_RX_L4_CKSUM_BAD, RTE_MBUF_F_RX_L4_CKSUM_BAD),
                ("RTE_MBUF_F_TX_IPV4", vm_RTE_MBUF_F_TX_IPV4, RTE_MBUF_F_TX_IPV4),
                ("RTE_MBUF_F_TX_IP_CKSUM", vm_RTE_MBUF_F_TX_IP_CKSUM, RTE_MBUF_F_TX_IP_CKSUM),
                ("RTE_MBUF_F_TX_TCP_CKSUM", vm_RTE_MBUF_F_TX_TCP_CKSUM, RTE_MBUF_F_TX_TCP_CKSUM),
                ("RTE_MBUF_F_TX_TCP_SEG", vm_RTE_MBUF_F_TX_TCP_SEG, RTE_MBUF_F_TX_TCP_SEG),
                ("RTE_ETH_TX_OFFLOAD_TCP_TSO", vm_RTE_ETH_TX_OFFLOAD_TCP_TSO, RTE_ETH_TX_OFFLOAD_TCP_TSO),
                ("RTE_ETH_TX_OFFLOAD_MULTI_SEGS", vm_RTE_ETH_TX_OFFLOAD_MULTI_SEGS, RTE_ETH_TX_OFFLOAD_MULTI_SEGS),
                ("RTE_ETH_TX_OFFLOAD_IPV4_CKSUM", vm_RTE_ETH_TX_OFFLOAD_IPV4_CKSUM, RTE_ETH_TX_OFFLOAD_IPV4_CKSUM),
                ("RTE_ETH_TX_OFFLOAD_TCP_CKSUM", vm_RTE_ETH_TX_OFFLOAD_TCP_CKSUM, RTE_ETH_TX_OFFLOAD_TCP_CKSUM),
                ("RTE_ETH_RX_OFFLOAD_IPV4_CKSUM", vm_RTE_ETH_RX_OFFLOAD_IPV4_CKSUM, RTE_ETH_RX_OFFLOAD_IPV4_CKSUM),
                ("RTE_ETH_RX_OFFLOAD_TCP_CKSUM", vm_RTE_ETH_RX_OFFLOAD_TCP_CKSUM, RTE_ETH_RX_OFFLOAD_TCP_CKSUM),
                ("RTE_ETH_RSS_IP", vm_RTE_ETH_RSS_IP, RTE_ETH_RSS_IP),
                ("RTE_ETH_RSS_TCP", vm_RTE_ETH_RSS_TCP, RTE_ETH_RSS_TCP),
                ("RTE_PKTMBUF_HEADROOM", u64::from(vm_RTE_PKTMBUF_HEADROOM), u64::from(RTE_PKTMBUF_HEADROOM)),
                (
                    "RTE_MBUF_DEFAULT_BUF_SIZE",
                    u64::from(vm_RTE_MBUF_DEFAULT_BUF_SIZE),
                    u64::from(RTE_MBUF_DEFAULT_BUF_SIZE),
                ),
                (
                    "RTE_GRO_MAX_BURST_ITEM_NUM",
                    u64::from(vm_RTE_GRO_MAX_BURST_ITEM_NUM),
                    RTE_GRO_MAX_BURST_ITEM_NUM as u64,
                ),
                ("SOCKET_ID_ANY", vm_SOCKET_ID_ANY as u64, SOCKET_ID_ANY as u64),
            ]
        };
        for (name, header, ours) in exported {
            assert_eq!(ours, header, "{name}: ours {ours:#x}, DPDK's headers {header:#x}");
        }
    }

    #[test]
    fn the_library_links_and_names_its_version() {
        // SAFETY: rte_version returns a static C string and needs no initialisation.
        let version = unsafe { std::ffi::CStr::from_ptr(rte_version()) }.to_string_lossy().into_owned();
        assert!(version.starts_with("DPDK "), "unexpected version string {version:?}");
        let release: Vec<u32> =
            version["DPDK ".len()..].split('.').take(2).filter_map(|part| part.parse().ok()).collect();
        assert!(release >= vec![22, 11], "DPDK {version} is older than 22.11");
    }
}

#[cfg(all(test, not(dpdk)))]
mod tests {
    #[test]
    fn every_constant_matches_the_headers() {
        eprintln!("SKIPPED every_constant_matches_the_headers: built without DPDK (install libdpdk-dev)");
    }
}
