/* See shim.h. Every function is a plain call of the DPDK inline it wraps. */
/* The checksum helpers over multi-segment mbufs and GRO are experimental in 22.11. */
#define ALLOW_EXPERIMENTAL_API 1
#include "shim.h"
#include <string.h>
#include <rte_devargs.h>
#include <rte_ip.h>
#include <rte_tcp.h>

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

/* The transmit offload flags this shim sets or clears. */
#define VM_TX_FLAGS (RTE_MBUF_F_TX_IPV4 | RTE_MBUF_F_TX_IP_CKSUM | RTE_MBUF_F_TX_TCP_CKSUM | RTE_MBUF_F_TX_TCP_SEG)

static struct rte_ipv4_hdr *ipv4_of(const struct rte_mbuf *m)
{
    return rte_pktmbuf_mtod_offset(m, struct rte_ipv4_hdr *, m->l2_len);
}

static struct rte_tcp_hdr *tcp_of(const struct rte_mbuf *m)
{
    return rte_pktmbuf_mtod_offset(m, struct rte_tcp_hdr *, m->l2_len + m->l3_len);
}

/* DPDK's GSO library: `pkt` cut into frames of at most `mss` payload bytes, each a header
 * mbuf from `direct` chained to an indirect mbuf (from `indirect`) over its part of `pkt`'s
 * data. Returns the number of frames in `out`, 0 when `pkt` needs no cutting, or -errno.
 * The frames' checksums are left to vm_tcp4_checksums; `pkt` stays the caller's to free. */
int vm_gso_tcp4(struct rte_mbuf *pkt, struct rte_mempool *direct, struct rte_mempool *indirect, uint16_t mss,
                struct rte_mbuf **out, uint16_t out_len)
{
    struct rte_gso_ctx ctx = {
        .direct_pool = direct,
        .indirect_pool = indirect,
        .flag = 0, /* incremental IP ids, as a NIC's TSO gives */
        .gso_types = RTE_ETH_TX_OFFLOAD_TCP_TSO,
        .gso_size = (uint16_t)(pkt->l2_len + pkt->l3_len + pkt->l4_len + mss),
    };
    pkt->ol_flags |= RTE_MBUF_F_TX_IPV4 | RTE_MBUF_F_TX_TCP_SEG;
    return rte_gso_segment(pkt, &ctx, out, out_len);
}

/* Asks the device to cut `m` into frames of `mss` payload bytes and fill in every
 * checksum (TSO): the TCP checksum field holds the pseudo-header's sum without the length. */
void vm_request_tso(struct rte_mbuf *m, uint16_t mss)
{
    struct rte_ipv4_hdr *ip = ipv4_of(m);
    m->ol_flags |= VM_TX_FLAGS;
    m->tso_segsz = mss;
    ip->hdr_checksum = 0;
    tcp_of(m)->cksum = rte_ipv4_phdr_cksum(ip, m->ol_flags);
}

/* The IPv4 header and TCP checksums of a frame about to be sent: computed here (over every
 * segment of the mbuf), or, with `device`, readied for the device's checksum offload. */
void vm_tcp4_checksums(struct rte_mbuf *m, int device)
{
    struct rte_ipv4_hdr *ip = ipv4_of(m);
    struct rte_tcp_hdr *tcp = tcp_of(m);
    m->ol_flags &= ~VM_TX_FLAGS;
    ip->hdr_checksum = 0;
    if (device) {
        m->ol_flags |= RTE_MBUF_F_TX_IPV4 | RTE_MBUF_F_TX_IP_CKSUM | RTE_MBUF_F_TX_TCP_CKSUM;
        tcp->cksum = rte_ipv4_phdr_cksum(ip, m->ol_flags);
    } else {
        ip->hdr_checksum = rte_ipv4_cksum(ip);
        tcp->cksum = 0;
        tcp->cksum = rte_ipv4_udptcp_cksum_mbuf(m, ip, m->l2_len + m->l3_len);
    }
}

/* Sets a received frame's packet type and header lengths from its headers (virtual devices
 * mostly leave them unset; GRO and the checksum helpers need them). Returns whether it is
 * an IPv4 TCP frame. */
int vm_classify_tcp4(struct rte_mbuf *m)
{
    struct rte_net_hdr_lens lens = {0};
    m->packet_type = rte_net_get_ptype(m, &lens, RTE_PTYPE_L2_MASK | RTE_PTYPE_L3_MASK | RTE_PTYPE_L4_MASK);
    m->l2_len = lens.l2_len;
    m->l3_len = lens.l3_len;
    m->l4_len = lens.l4_len;
    return RTE_ETH_IS_IPV4_HDR(m->packet_type) && (m->packet_type & RTE_PTYPE_L4_MASK) == RTE_PTYPE_L4_TCP;
}

/* Whether a classified IPv4 TCP frame's header and TCP checksums hold. */
int vm_checksums_ok(const struct rte_mbuf *m)
{
    const struct rte_ipv4_hdr *ip = ipv4_of(m);
    return rte_ipv4_cksum(ip) == 0 && rte_ipv4_udptcp_cksum_mbuf_verify(m, ip, m->l2_len + m->l3_len) == 0;
}

/* DPDK's GRO library on one burst of classified frames: consecutive TCP/IPv4 segments of a
 * flow merged into one chained mbuf (checksums not recomputed). Returns the new count. */
uint16_t vm_gro_tcp4(struct rte_mbuf **pkts, uint16_t count)
{
    struct rte_gro_param param = {
        .gro_types = RTE_GRO_TCP_IPV4,
        .max_flow_num = 16,
        .max_item_per_flow = RTE_GRO_MAX_BURST_ITEM_NUM / 16,
    };
    return rte_gro_reassemble_burst(pkts, count, &param);
}

uint16_t vm_rte_pktmbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }

void vm_rte_mbuf_header_lengths(const struct rte_mbuf *m, uint16_t *l2, uint16_t *l3, uint16_t *l4)
{
    *l2 = m->l2_len;
    *l3 = m->l3_len;
    *l4 = m->l4_len;
}

/* Copies a chained mbuf's data into `out` (at most `capacity` bytes); returns the bytes copied. */
uint32_t vm_pktmbuf_copy_out(const struct rte_mbuf *m, uint8_t *out, uint32_t capacity)
{
    uint32_t copied = 0;
    for (; m != NULL && copied < capacity; m = m->next) {
        uint32_t len = RTE_MIN((uint32_t)m->data_len, capacity - copied);
        rte_memcpy(out + copied, rte_pktmbuf_mtod(m, const void *), len);
        copied += len;
    }
    return copied;
}

unsigned int vm_rte_mempool_avail_count(const struct rte_mempool *mp) { return rte_mempool_avail_count(mp); }

int vm_rte_errno(void) { return rte_errno; }

int vm_port_device_args(uint16_t port_id, char *out, size_t len) {
    struct rte_eth_dev_info info;
    if (len == 0 || rte_eth_dev_info_get(port_id, &info) != 0 || info.device == NULL)
        return -1;
    const struct rte_devargs *devargs = rte_dev_devargs(info.device);
    if (devargs == NULL || devargs->args == NULL)
        return -1;
    size_t needed = strlen(devargs->args) + 1;
    if (needed > len)
        return -1;
    memcpy(out, devargs->args, needed);
    return 0;
}

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
const uint64_t vm_RTE_MBUF_F_TX_TCP_SEG = RTE_MBUF_F_TX_TCP_SEG;
const uint64_t vm_RTE_ETH_TX_OFFLOAD_TCP_TSO = RTE_ETH_TX_OFFLOAD_TCP_TSO;
const uint64_t vm_RTE_ETH_TX_OFFLOAD_MULTI_SEGS = RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
const uint64_t vm_RTE_ETH_RSS_IP = RTE_ETH_RSS_IP;
const uint64_t vm_RTE_ETH_RSS_TCP = RTE_ETH_RSS_TCP;
const uint32_t vm_RTE_MBUF_DEFAULT_BUF_SIZE = RTE_MBUF_DEFAULT_BUF_SIZE;
const uint32_t vm_RTE_PKTMBUF_HEADROOM = RTE_PKTMBUF_HEADROOM;
const uint32_t vm_RTE_GRO_MAX_BURST_ITEM_NUM = RTE_GRO_MAX_BURST_ITEM_NUM;
const int vm_SOCKET_ID_ANY = SOCKET_ID_ANY;
