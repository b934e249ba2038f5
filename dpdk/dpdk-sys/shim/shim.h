/* vmigrate's shim over DPDK's static inline fast path. DPDK defines rte_eth_rx_burst,
 * rte_pktmbuf_alloc and friends as static inline functions in its headers, so they have no
 * symbol to link against: these out-of-line wrappers give them one. bindgen reads the
 * prototypes here; shim.c is compiled by the build script with DPDK's own flags. */
#ifndef VMIGRATE_DPDK_SHIM_H
#define VMIGRATE_DPDK_SHIM_H

#include <stdint.h>
#include <rte_config.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_version.h>
#include <rte_gro.h>
#include <rte_gso.h>
#include <rte_net.h>
/* Compression devices (compress_isal, compress_zlib, QAT): an experimental API in 22.11,
 * which the build script allows (ALLOW_EXPERIMENTAL_API). */
#include <rte_comp.h>
#include <rte_compressdev.h>

uint16_t vm_rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **rx_pkts, uint16_t nb_pkts);
uint16_t vm_rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts, uint16_t nb_pkts);
struct rte_mbuf *vm_rte_pktmbuf_alloc(struct rte_mempool *mp);
void vm_rte_pktmbuf_free(struct rte_mbuf *m);
char *vm_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
void *vm_rte_pktmbuf_mtod(struct rte_mbuf *m);
uint16_t vm_rte_pktmbuf_data_len(const struct rte_mbuf *m);
uint32_t vm_rte_pktmbuf_pkt_len(const struct rte_mbuf *m);
uint64_t vm_rte_mbuf_ol_flags(const struct rte_mbuf *m);
void vm_rte_mbuf_set_tx_offload(struct rte_mbuf *m, uint64_t ol_flags, uint16_t l2_len, uint16_t l3_len,
                                uint16_t l4_len);
/* Large TCP segments (see shim.c): cutting one into frames (GSO), merging frames back into
 * one (GRO), and the checksums either way. Each works on an IPv4 TCP frame whose l2_len,
 * l3_len and l4_len are set (vm_classify sets them on a received frame). */
int vm_gso_tcp4(struct rte_mbuf *pkt, struct rte_mempool *direct, struct rte_mempool *indirect, uint16_t mss,
                struct rte_mbuf **out, uint16_t out_len);
void vm_request_tso(struct rte_mbuf *m, uint16_t mss);
void vm_tcp4_checksums(struct rte_mbuf *m, int device);
int vm_classify_tcp4(struct rte_mbuf *m);
int vm_checksums_ok(const struct rte_mbuf *m);
uint16_t vm_gro_tcp4(struct rte_mbuf **pkts, uint16_t count);
uint16_t vm_rte_pktmbuf_nb_segs(const struct rte_mbuf *m);
void vm_rte_mbuf_header_lengths(const struct rte_mbuf *m, uint16_t *l2, uint16_t *l3, uint16_t *l4);
uint32_t vm_pktmbuf_copy_out(const struct rte_mbuf *m, uint8_t *out, uint32_t capacity);

unsigned int vm_rte_mempool_avail_count(const struct rte_mempool *mp);
int vm_rte_errno(void);
/* The arguments the port's device was created with (a vdev's `key=value,...` after its
 * name), copied into `out` (at most `len` bytes with the terminating NUL); 0 on success,
 * -1 if the port has none or they do not fit. */
int vm_port_device_args(uint16_t port_id, char *out, size_t len);

/* Constants that are macros of expressions bindgen cannot evaluate (shifts of ULL and the
 * like), exported as values. Rust-side copies are tested against these. */
extern const uint64_t vm_RTE_MBUF_F_RX_IP_CKSUM_MASK;
extern const uint64_t vm_RTE_MBUF_F_RX_IP_CKSUM_GOOD;
extern const uint64_t vm_RTE_MBUF_F_RX_IP_CKSUM_BAD;
extern const uint64_t vm_RTE_MBUF_F_RX_L4_CKSUM_MASK;
extern const uint64_t vm_RTE_MBUF_F_RX_L4_CKSUM_GOOD;
extern const uint64_t vm_RTE_MBUF_F_RX_L4_CKSUM_BAD;
extern const uint64_t vm_RTE_MBUF_F_TX_IPV4;
extern const uint64_t vm_RTE_MBUF_F_TX_IP_CKSUM;
extern const uint64_t vm_RTE_MBUF_F_TX_TCP_CKSUM;
extern const uint64_t vm_RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
extern const uint64_t vm_RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
extern const uint64_t vm_RTE_ETH_RX_OFFLOAD_IPV4_CKSUM;
extern const uint64_t vm_RTE_ETH_RX_OFFLOAD_TCP_CKSUM;
extern const uint64_t vm_RTE_MBUF_F_TX_TCP_SEG;
extern const uint64_t vm_RTE_ETH_TX_OFFLOAD_TCP_TSO;
extern const uint64_t vm_RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
extern const uint64_t vm_RTE_ETH_RSS_IP;
extern const uint64_t vm_RTE_ETH_RSS_TCP;
extern const uint32_t vm_RTE_MBUF_DEFAULT_BUF_SIZE;
extern const uint32_t vm_RTE_PKTMBUF_HEADROOM;
extern const uint32_t vm_RTE_GRO_MAX_BURST_ITEM_NUM;
extern const int vm_SOCKET_ID_ANY;

#endif
