/* See shim.h. Every function is a plain call of the DPDK inline it wraps. */
#include "shim.h"

uint16_t vm_rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **rx_pkts, uint16_t nb_pkts)
{
    return rte_eth_rx_burst(port_id, queue_id, rx_pkts, nb_pkts);
}

uint16_t vm_rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts, uint16_t nb_pkts)
{
    return rte_eth_tx_burst(port_id, queue_id, tx_pkts, nb_pkts);
}

struct rte_mbuf *vm_rte_pktmbuf_alloc(struct rte_mempool *mp) { return rte_pktmbuf_alloc(mp); }

void vm_rte_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

char *vm_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_append(m, len); }

void *vm_rte_pktmbuf_mtod(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, void *); }

uint16_t vm_rte_pktmbuf_data_len(const struct rte_mbuf *m) { return rte_pktmbuf_data_len(m); }

uint32_t vm_rte_pktmbuf_pkt_len(const struct rte_mbuf *m) { return rte_pktmbuf_pkt_len(m); }

uint64_t vm_rte_mbuf_ol_flags(const struct rte_mbuf *m) { return m->ol_flags; }

void vm_rte_mbuf_set_tx_offload(struct rte_mbuf *m, uint64_t ol_flags, uint16_t l2_len, uint16_t l3_len,
                                uint16_t l4_len)
{
    m->ol_flags |= ol_flags;
    m->l2_len = l2_len;
    m->l3_len = l3_len;
    m->l4_len = l4_len;
}

unsigned int vm_rte_mempool_avail_count(const struct rte_mempool *mp) { return rte_mempool_avail_count(mp); }

int vm_rte_errno(void) { return rte_errno; }

const uint64_t vm_RTE_MBUF_F_RX_IP_CKSUM_MASK = RTE_MBUF_F_RX_IP_CKSUM_MASK;
const uint64_t vm_RTE_MBUF_F_RX_IP_CKSUM_GOOD = RTE_MBUF_F_RX_IP_CKSUM_GOOD;
const uint64_t vm_RTE_MBUF_F_RX_IP_CKSUM_BAD = RTE_MBUF_F_RX_IP_CKSUM_BAD;
const uint64_t vm_RTE_MBUF_F_RX_L4_CKSUM_MASK = RTE_MBUF_F_RX_L4_CKSUM_MASK;
const uint64_t vm_RTE_MBUF_F_RX_L4_CKSUM_GOOD = RTE_MBUF_F_RX_L4_CKSUM_GOOD;
const uint64_t vm_RTE_MBUF_F_RX_L4_CKSUM_BAD = RTE_MBUF_F_RX_L4_CKSUM_BAD;
const uint64_t vm_RTE_MBUF_F_TX_IPV4 = RTE_MBUF_F_TX_IPV4;
const uint64_t vm_RTE_MBUF_F_TX_IP_CKSUM = RTE_MBUF_F_TX_IP_CKSUM;
const uint64_t vm_RTE_MBUF_F_TX_TCP_CKSUM = RTE_MBUF_F_TX_TCP_CKSUM;
const uint64_t vm_RTE_ETH_TX_OFFLOAD_IPV4_CKSUM = RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
const uint64_t vm_RTE_ETH_TX_OFFLOAD_TCP_CKSUM = RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
const uint64_t vm_RTE_ETH_RX_OFFLOAD_IPV4_CKSUM = RTE_ETH_RX_OFFLOAD_IPV4_CKSUM;
const uint64_t vm_RTE_ETH_RX_OFFLOAD_TCP_CKSUM = RTE_ETH_RX_OFFLOAD_TCP_CKSUM;
const uint64_t vm_RTE_ETH_RSS_IP = RTE_ETH_RSS_IP;
const uint64_t vm_RTE_ETH_RSS_TCP = RTE_ETH_RSS_TCP;
const uint32_t vm_RTE_MBUF_DEFAULT_BUF_SIZE = RTE_MBUF_DEFAULT_BUF_SIZE;
const uint32_t vm_RTE_PKTMBUF_HEADROOM = RTE_PKTMBUF_HEADROOM;
const int vm_SOCKET_ID_ANY = SOCKET_ID_ANY;
