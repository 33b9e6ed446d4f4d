/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Source validation at the pod's egress (bulkhead_from_pod): a pod may send
 * only from its own addresses and its own MAC. The receiver judges a packet
 * by ipcache(source address); without this check a pod could claim another
 * pod's (or the node's) address and be judged as that pod. On bridge-based
 * CNIs pod-to-pod frames are switched at L2, so rp_filter never sees them.
 *
 * Every frame from the pod must carry the pod's MAC as Ethernet source
 * (protects bridge FDBs). Then, by ethertype:
 *  - IPv4: the source is one of the pod's IPv4 addresses, except DHCPv4
 *    discovery: UDP 0.0.0.0:68 -> 255.255.255.255:67, unfragmented, which
 *    a DHCP client (the CNI dhcp IPAM runs one in the pod's netns) sends
 *    before it has an address;
 *  - IPv6: the source is one of the pod's IPv6 addresses; neighbour
 *    discovery and MLD follow their own rules (srcval_nd);
 *  - ARP: Ethernet/IPv4 only, sender MAC = the pod's MAC, sender IP = one
 *    of the pod's IPv4 addresses, or 0.0.0.0 in a request (an RFC 5227
 *    probe, which no neighbour learns from);
 *  - anything else, and frames with more than one VLAN tag (counting a tag
 *    the skb carries outside the data), is dropped: a pod has no use for
 *    other ethertypes, and a stacked tag is how a frame hides what it is.
 * One 802.1Q tag is allowed: the inner packet is validated like an
 * untagged one.
 *
 * The caller emits the drop (count, rate-limited event). */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "../include/bulkhead.h"
#include "parse.h"
#include "maps.h"

#define ETH_P_ARP_ 0x0806

/* mac_eq compares two 6-byte MACs with one 4-byte and one 2-byte load. */
static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b && *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

/* own_v4 and own_v6 stop at the first match: a pod's first address is the
 * one it nearly always sends from. */
static __always_inline int own_v4(const struct ep_addrs *a, __u32 addr)
{
	__u8 n = a->n4;

#pragma unroll
	for (int i = 0; i < EP_MAX_V4; i++) {
		if (i >= n)
			return 0;
		if (a->v4[i] == addr)
			return 1;
	}
	return 0;
}

static __always_inline int own_v6(const struct ep_addrs *a, const __u32 *addr)
{
	__u8 n = a->n6;

#pragma unroll
	for (int i = 0; i < EP_MAX_V6; i++) {
		if (i >= n)
			return 0;
		if (!((a->v6[i][0] ^ addr[0]) | (a->v6[i][1] ^ addr[1]) | (a->v6[i][2] ^ addr[2]) |
		      (a->v6[i][3] ^ addr[3])))
			return 1;
	}
	return 0;
}

/* own_ll: addr, a link-local address, is one of the pod's; with none
 * registered (IPv6 off in the pod when it was added) every one is. */
static __always_inline int own_ll(const struct ep_addrs *a, const __u32 *addr)
{
	__u32 n = a->nll;

	if (!n)
		return 1;
#pragma unroll
	for (int i = 0; i < EP_MAX_LL; i++) {
		if (i >= n)
			return 0;
		if (!((a->ll[i][0] ^ addr[0]) | (a->ll[i][1] ^ addr[1]) | (a->ll[i][2] ^ addr[2]) |
		      (a->ll[i][3] ^ addr[3])))
			return 1;
	}
	return 0;
}

static __always_inline int v6_link_local(const __u32 *addr)
{
	return (bpf_ntohl(addr[0]) & 0xffc00000) == 0xfe800000;
}

static __always_inline int v6_unspecified(const __u32 *addr)
{
	return !(addr[0] | addr[1] | addr[2] | addr[3]);
}

static __always_inline int v6_multicast(const __u32 *addr)
{
	return (bpf_ntohl(addr[0]) >> 24) == 0xff;
}

/* ff02::1:ffXX:XXXX, where duplicate address detection asks. */
static __always_inline int v6_solicited_node(const __u32 *addr)
{
	return bpf_ntohl(addr[0]) == 0xff020000 && addr[1] == 0 && bpf_ntohl(addr[2]) == 1 &&
	       (bpf_ntohl(addr[3]) >> 24) == 0xff;
}

static __always_inline int icmp6_nd_or_mld(__u8 t)
{
	return (t >= 130 && t <= 137) || t == 143;
}

#define ND_MAX_OPTS 3

/* srcval_nd judges neighbour discovery and MLD from the pod, which must
 * work before (and besides) the pod's own addresses, and which decide
 * where the neighbours send traffic:
 *  - router advertisements and redirects (134, 137) are dropped: a pod
 *    never routes for others, and either would make the node or other pods
 *    send traffic through it;
 *  - MLD (130-132, 143) needs hop limit 1, a multicast destination, and a
 *    link-local source, or :: for a report sent during DAD (RFC 3590). MLD
 *    with another source is ignored by receivers anyway (RFC 3810 5.1.14);
 *  - RS, NS and NA (133, 135, 136) need hop limit 255 (so they were not
 *    routed, RFC 4861), and come from one of the pod's own addresses or
 *    its link-local address, to anywhere (Linux sends unicast
 *    reachability probes to a neighbour's global address from its
 *    link-local one), or from :: as an NS to a solicited-node group (DAD)
 *    or an RS to a multicast group. An NA from :: is invalid. Sent to a
 *    routable address, they are judged by policy (nd_link_scoped in
 *    segment.c), so this check is about what they claim, not where they go;
 *  - a link-local source (ND and MLD) is one of the pod's link-local
 *    addresses, when the agent registered them: another pod's or the
 *    bridge's would let the pod poison neighbour caches with its MAC;
 *  - an NA's target is one of the pod's addresses or its link-local
 *    address (any link-local one when none is registered): an NA for
 *    another pod's or the gateway's address would redirect its traffic;
 *  - a source or target link-layer address option carries the pod's MAC;
 *  - an ND or MLD message that is fragmented is dropped (RFC 6980).
 * p has been parsed as ICMPv6 of one of these types. */
static __always_inline __u8 srcval_nd(struct __sk_buff *skb, const struct pkt *p,
				      const struct ep_addrs *a)
{
	struct ipv6hdr *ip6;
	__u8 t = p->icmp_type, hl;
	__u32 end, off;
	int own = own_v6(a, p->saddr), ll = v6_link_local(p->saddr),
	    unspec = v6_unspecified(p->saddr), mc = v6_multicast(p->daddr);

	if (p->frag != FRAG_NONE)
		return DROP_FORBIDDEN_ICMP6;
	/* A pod never routes for others (RA, redirect) and never queries
	 * multicast listeners (130): a query would let it win the querier
	 * election on a bridge and steer multicast snooping. */
	if (t == 134 || t == 137 || t == 130)
		return DROP_FORBIDDEN_ICMP6;
	ip6 = hdr(skb, p->l3_off, sizeof(*ip6));
	if (!ip6)
		return DROP_MALFORMED;
	hl = ip6->hop_limit;
	end = (__u32)p->l3_off + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	if (t != 133 && t != 135 && t != 136) {
		/* MLD */
		if (!ll && !(unspec && t != 130))
			return own ? DROP_FORBIDDEN_ICMP6 : DROP_INVALID_SOURCE;
		if (ll && !own_ll(a, p->saddr))
			return DROP_INVALID_SOURCE;
		if (hl != 1 || !mc)
			return DROP_FORBIDDEN_ICMP6;
		return 0;
	}
	if (hl != 255)
		return DROP_FORBIDDEN_ICMP6;
	if (unspec) {
		if (!(t == 135 && v6_solicited_node(p->daddr)) && !(t == 133 && mc))
			return DROP_FORBIDDEN_ICMP6;
	} else if (!own) {
		if (!ll || !own_ll(a, p->saddr))
			return DROP_INVALID_SOURCE;
	}
	off = p->l4_off + 8;
	if (t != 133) {
		/* NS and NA: the target address, then the options. */
		__u32 *tgt = hdr(skb, off, 16);

		if (!tgt)
			return DROP_MALFORMED;
		/* An NA claims its target; a DAD probe (NS from ::) claims it
		 * too, and one for another pod's tentative address would make
		 * that pod give the address up. */
		if ((t == 136 || (t == 135 && unspec)) && !own_v6(a, tgt) &&
		    !(v6_link_local(tgt) && own_ll(a, tgt)))
			return DROP_INVALID_SOURCE;
		off += 16;
	}
#pragma unroll
	for (int i = 0; i < ND_MAX_OPTS; i++) {
		__u8 *o, type, len;

		if (off + 2 > end)
			return 0;
		o = hdr(skb, off, 2);
		if (!o)
			return DROP_MALFORMED;
		/* Copied: the next hdr may pull the skb and move its data. */
		type = o[0];
		len = o[1];
		if (len == 0)
			return DROP_MALFORMED; /* RFC 4861: a zero length is invalid */
		if (type == 1 || type == 2) {
			__u8 *mac;

			if (len != 1)
				return DROP_INVALID_SMAC;
			mac = hdr(skb, off + 2, 6);
			if (!mac)
				return DROP_MALFORMED;
			if (!mac_eq(mac, a->mac))
				return DROP_INVALID_SMAC;
		}
		off += (__u32)len * 8;
	}
	/* More options than walked: one of them could name another MAC. */
	return off < end ? DROP_FORBIDDEN_ICMP6 : 0;
}

struct arp_eth_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 oper;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
} __attribute__((packed));

/* srcval_arp judges an ARP packet; it fills p's addresses with the sender
 * and target IPs, which the drop event reports. */
static __always_inline __u8 srcval_arp(struct __sk_buff *skb, struct pkt *p, const struct ep_addrs *a)
{
	struct arp_eth_ipv4 *arp = hdr(skb, p->l3_off, sizeof(*arp));
	__u32 spa, tpa;

	if (!arp)
		return DROP_MALFORMED;
	__builtin_memcpy(&spa, arp->spa, 4);
	__builtin_memcpy(&tpa, arp->tpa, 4);
	v4_mapped(p->saddr, spa);
	v4_mapped(p->daddr, tpa);
	if (arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != 6 ||
	    arp->plen != 4)
		return DROP_UNSUPPORTED_L2;
	if (!mac_eq(arp->sha, a->mac))
		return DROP_INVALID_SMAC;
	if (own_v4(a, spa) || (spa == 0 && arp->oper == bpf_htons(1)))
		return 0;
	return DROP_INVALID_SOURCE;
}

/* srcval_from_pod returns 0 when the frame from endpoint ep_id may leave
 * the pod, else the drop reason. r is parse_packet's result for p. */
static __always_inline __u8 srcval_from_pod(struct __sk_buff *skb, __u32 ep_id, struct pkt *p, int r)
{
	struct ep_addrs *a = bpf_map_lookup_elem(&endpoint_addrs, &ep_id);
	struct ethhdr *eth;

	/* No slot, or a slot Go never filled: fail closed. */
	if (!a || !(a->n4 | a->n6))
		return DROP_INVALID_SOURCE;
	/* parse_packet read it already: it is in the linear data. */
	eth = hdr_at(skb, 0, sizeof(*eth));
	if (!eth)
		return DROP_MALFORMED;
	if (!mac_eq(eth->h_source, a->mac))
		return DROP_INVALID_SMAC;
	if (r == PARSE_BAD)
		return DROP_MALFORMED;
	if (p->vlans + (skb->vlan_present ? 1 : 0) > 1)
		return DROP_UNSUPPORTED_L2;
	if (r == PARSE_NOT_IP)
		return p->eth_proto == bpf_htons(ETH_P_ARP_) ? srcval_arp(skb, p, a) : DROP_UNSUPPORTED_L2;
	if (!p->ipv6) {
		if (own_v4(a, p->saddr[3]))
			return 0;
		if (p->saddr[3] == 0 && p->daddr[3] == 0xffffffff && p->proto == IPPROTO_UDP_ &&
		    p->sport == 68 && p->dport == 67 && p->frag == FRAG_NONE)
			return 0;
		return DROP_INVALID_SOURCE;
	}
	if (p->proto == IPPROTO_ICMPV6_ && p->frag != FRAG_LATER && icmp6_nd_or_mld(p->icmp_type))
		return srcval_nd(skb, p, a);
	return own_v6(a, p->saddr) ? 0 : DROP_INVALID_SOURCE;
}
