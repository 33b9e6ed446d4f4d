/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Bounded packet parsing for TC programs: Ethernet (up to two 802.1Q/AD
 * tags; a third is PARSE_BAD), IPv4 with options, IPv6 with up to IPV6_MAX_EXT extension headers, and
 * the ports of TCP, UDP and SCTP, the echo identifier of ICMP/ICMPv6.
 *
 * Headers are read with direct packet access; when a header is not in the
 * linear part of the skb, it is pulled in once and read again. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "../include/bulkhead.h"

#define IPV6_MAX_EXT 6

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IP = 1, /* pass untouched: ARP, LLDP, ... */
	PARSE_BAD = 2,    /* drop: DROP_MALFORMED */
};

enum frag_kind {
	FRAG_NONE = 0,
	FRAG_FIRST = 1, /* offset 0, more fragments follow: carries the ports */
	FRAG_LATER = 2, /* offset > 0: no L4 header */
};

struct pkt {
	__u32 saddr[4]; /* v4-mapped for IPv4 */
	__u32 daddr[4];
	__u32 frag_id;
	__u32 len;
	/* Conntrack ports: TCP/UDP/SCTP ports; for ICMP echo the identifier is
	 * the source port of a request and the destination port of a reply, so
	 * that a reply reverses its request. */
	__u16 sport;
	__u16 dport;
	/* The port policy judges: the destination port for TCP/UDP/SCTP,
	 * 0 for everything else. */
	__u16 policy_port;
	__u8 proto;
	__u8 ipv6;
	__u8 tcp_flags;
	__u8 frag;
	__u8 icmp_type;
	__u8 vlans; /* VLAN tags in the packet data (not one the skb carries) */
	/* Offset of the ICMP header, for the original packet an ICMP error
	 * carries (icmp_related in segment.c). */
	__u16 l4_off;
	/* The ethertype after the VLAN tags (network byte order) and the
	 * offset of the header it names: source validation reads ARP and the
	 * IPv6 hop limit there. */
	__u16 eth_proto;
	__u16 l3_off;
	/* IPv6 hop limit (IPv4 TTL is not needed): neighbour discovery and
	 * MLD pass policy only at the values that keep them on the link. */
	__u8 hop_limit;
	__u8 pad2[3];
};

static __always_inline void v4_mapped(__u32 *dst, __u32 addr)
{
	dst[0] = 0;
	dst[1] = 0;
	dst[2] = bpf_htonl(0xffff);
	dst[3] = addr;
}

#define HDR_MAX_OFF 256

/* Read skb->data and skb->data_end with plain loads from the context
 * pointer: clang likes to fold the field offset into the pointer, which the
 * verifier rejects ("dereference of modified ctx ptr"). */
static __always_inline void *skb_data(struct __sk_buff *skb)
{
	void *v;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(v) : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data)));
	return v;
}

static __always_inline void *skb_data_end(struct __sk_buff *skb)
{
	void *v;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(v) : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data_end)));
	return v;
}

static __always_inline void *hdr_at(struct __sk_buff *skb, __u32 off, __u32 len)
{
	void *data = skb_data(skb);
	void *end = skb_data_end(skb);
	void *p;

	if (off > HDR_MAX_OFF)
		return NULL;
	/* Keeps clang from adding off to data before the check above, which
	 * leaves the verifier an offset it cannot bound. */
	barrier_var(off);
	p = data + off;
	if (p + len > end)
		return NULL;
	return p;
}

/* hdr returns a pointer to len bytes at off, or NULL when the packet is
 * shorter. It invalidates earlier pointers into the packet. */
static __always_inline void *hdr(struct __sk_buff *skb, __u32 off, __u32 len)
{
	void *p = hdr_at(skb, off, len);

	if (p || off + len > skb->len)
		return p;
	if (bpf_skb_pull_data(skb, off + len) < 0)
		return NULL;
	return hdr_at(skb, off, len);
}

/* parse_l4 fills ports for protocols that have them, from offset off. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p, __u32 off)
{
	if (p->frag == FRAG_LATER)
		return PARSE_OK; /* the caller resolves ports through frag_map */

	switch (p->proto) {
	case IPPROTO_TCP_: {
		__u8 *h = hdr(skb, off, 14);
		if (!h)
			return PARSE_BAD;
		p->sport = ((__u16)h[0] << 8) | h[1];
		p->dport = ((__u16)h[2] << 8) | h[3];
		p->tcp_flags = h[13];
		p->policy_port = p->dport;
		return PARSE_OK;
	}
	case IPPROTO_UDP_:
	case IPPROTO_SCTP_: {
		__u8 *h = hdr(skb, off, 4);
		if (!h)
			return PARSE_BAD;
		p->sport = ((__u16)h[0] << 8) | h[1];
		p->dport = ((__u16)h[2] << 8) | h[3];
		p->policy_port = p->dport;
		return PARSE_OK;
	}
	case IPPROTO_ICMP_:
	case IPPROTO_ICMPV6_: {
		__u8 *h = hdr(skb, off, 8);
		__u16 id;
		if (!h)
			return PARSE_BAD;
		p->l4_off = off;
		p->icmp_type = h[0];
		id = ((__u16)h[4] << 8) | h[5];
		/* echo request: 8 / 128, echo reply: 0 / 129 */
		if (h[0] == 8 || h[0] == 128)
			p->sport = id;
		else if (h[0] == 0 || h[0] == 129)
			p->dport = id;
		return PARSE_OK;
	}
	}
	/* Unknown L4: judged with port 0 under its protocol number. */
	return PARSE_OK;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p, __u32 off)
{
	struct iphdr *ip = hdr(skb, off, sizeof(*ip));
	__u16 frag;
	__u32 hlen;

	if (!ip)
		return PARSE_BAD;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_BAD;
	hlen = ip->ihl * 4;
	v4_mapped(p->saddr, ip->saddr);
	v4_mapped(p->daddr, ip->daddr);
	p->proto = ip->protocol;
	frag = bpf_ntohs(ip->frag_off);
	if (frag & 0x1fff)
		p->frag = FRAG_LATER;
	else if (frag & 0x2000)
		p->frag = FRAG_FIRST;
	p->frag_id = bpf_ntohs(ip->id);
	return parse_l4(skb, p, off + hlen);
}

static __always_inline int ipv6_is_ext(__u8 nh)
{
	return nh == 0 /* hop-by-hop */ || nh == 43 /* routing */ ||
	       nh == 44 /* fragment */ || nh == 60 /* destination options */ ||
	       nh == 51 /* AH */;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct pkt *p, __u32 off)
{
	struct ipv6hdr *ip6 = hdr(skb, off, sizeof(*ip6));
	__u8 nh;

	if (!ip6)
		return PARSE_BAD;
	if (ip6->version != 6)
		return PARSE_BAD;
	p->ipv6 = 1;
	p->hop_limit = ip6->hop_limit;
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	nh = ip6->nexthdr;
	off += sizeof(*ip6);

#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT; i++) {
		__u8 *ext;
		if (!ipv6_is_ext(nh))
			break;
		ext = hdr(skb, off, 8);
		if (!ext)
			return PARSE_BAD;
		if (nh == 44) {
			__u16 fo = ((__u16)ext[2] << 8) | ext[3];
			if (fo & 0xfff8)
				p->frag = FRAG_LATER;
			else if (fo & 1)
				p->frag = FRAG_FIRST;
			p->frag_id = ((__u32)ext[4] << 24) | ((__u32)ext[5] << 16) |
				     ((__u32)ext[6] << 8) | ext[7];
			nh = ext[0];
			off += 8;
		} else if (nh == 51) {
			nh = ext[0];
			off += ((__u32)ext[1] + 2) * 4;
		} else {
			nh = ext[0];
			off += ((__u32)ext[1] + 1) * 8;
		}
	}
	if (ipv6_is_ext(nh))
		return PARSE_BAD; /* more extension headers than we walk */
	p->proto = nh;
	return parse_l4(skb, p, off);
}

/* parse_packet fills p from skb. */
static __always_inline int parse_packet(struct __sk_buff *skb, struct pkt *p)
{
	void *data = skb_data(skb);
	void *data_end = skb_data_end(skb);
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);
	__u16 proto;

	if ((void *)(eth + 1) > data_end)
		return PARSE_NOT_IP;
	proto = eth->h_proto;
	/* Up to two tags (802.1ad QinQ): a double-tagged frame that passed as
	 * "not IP" would carry IP past policy and source validation. */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		__be16 *inner;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		inner = hdr(skb, off, 4); /* TCI, encapsulated protocol */
		if (!inner)
			return PARSE_BAD;
		proto = inner[1];
		off += 4;
		p->vlans++;
	}
	p->eth_proto = proto;
	p->l3_off = off;
	p->len = skb->len;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		return PARSE_BAD; /* a third tag */
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, p, off);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, p, off);
	return PARSE_NOT_IP;
}
