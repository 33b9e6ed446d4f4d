/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types and constants shared between the BPF programs and Go. Every struct
 * here is a bpf2go -type, so Go never mirrors one by hand. Keep them free of
 * implicit padding: Go sees the same bytes. */
#pragma once

#include "vmlinux.h"

/* Return codes. TCX_NEXT (-1) equals TC_ACT_UNSPEC, so the same value lets the
 * packet continue under both TCX and a clsact/cls_bpf direct-action filter. */
#define BH_PASS TCX_NEXT
#define TC_ACT_SHOT 2

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8

#define IPPROTO_ICMP_ 1
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_ICMPV6_ 58
#define IPPROTO_SCTP_ 132

/* Reserved identities, as in identity/numeric.go. */
#define ID_NONE 0
#define ID_WORLD 2

/* Directions, as policy.Direction: seen from the endpoint. */
enum bh_direction {
	DIR_INGRESS = 0, /* towards the pod: TCX egress on the host veth */
	DIR_EGRESS = 1,  /* from the pod: TCX ingress on the host veth */
};

/* Verdicts; 1-3 equal policy.Verdict. */
enum bh_verdict {
	VERDICT_NONE = 0,
	VERDICT_ALLOW = 1,
	VERDICT_DENY = 2,
	VERDICT_AUDIT = 3,
	/* Not judged: unmanaged endpoint, non-IP, IPv6 neighbour discovery. */
	VERDICT_PASS = 4,
};

enum bh_drop_reason {
	DROP_NONE = 0,
	DROP_POLICY = 1,         /* new flow denied by policy (rule or default) */
	DROP_POLICY_REVISED = 2, /* established flow denied after a policy change */
	DROP_MALFORMED = 3,      /* truncated or inconsistent IP/L4 header */
	/* Source validation at the pod's egress (bpf/lib/srcval.h). */
	DROP_INVALID_SOURCE = 4,  /* IP source or ARP sender IP not the pod's */
	DROP_INVALID_SMAC = 5,    /* Ethernet source or ARP/NDP link-layer address not the pod's MAC */
	DROP_FORBIDDEN_ICMP6 = 6, /* RA, redirect, or NDP/MLD outside its link-local rules */
	DROP_UNSUPPORTED_L2 = 7,  /* an ethertype a pod has no use for, or stacked VLAN tags */
	/* mTLS (issue 12). */
	/* plaintext TCP that only an mtls: Required allow would admit, or new
	 * plaintext TCP to an enrolled pod from an enrolled peer (rule 0) */
	DROP_AUTH_REQUIRED = 8,
	/* a flow that must be tunnelled, and no tunnel listener, or no
	 * endpoint_addrs slot to tell whether the pod is a bridge port */
	DROP_TUNNEL_DOWN = 9,
	/* the endpoint is quarantined (ep_quarantine): everything in and out
	 * is dropped but DNS to the resolvers in quarantine_dns; the event's
	 * rule_id is the quarantine's number */
	DROP_QUARANTINED = 10,
};

enum bh_event_type {
	EVENT_FLOW_NEW = 1,
	EVENT_DROP = 2,
	EVENT_FLOW_END = 3,
};

/* Policy actions and flags, as policy.Action / policy.Flags. */
#define ACTION_ALLOW 1
#define ACTION_DENY 2
#define FLAG_AUDIT (1 << 0)
#define FLAG_MTLS_REQUIRED (1 << 1)

/* ep_config.flags */
#define EP_AUDIT (1 << 0)
/* The endpoint's policy has entries with a specific peer (EXACT) or with
 * the wildcard peer (WILD) in a direction; shift by the direction. A policy
 * lookup that cannot match is skipped: it costs as much as the rest of a
 * new flow's judgement. Written with the slot, so they always describe the
 * live slot. */
#define EP_EXACT_PEER (1 << 1) /* << dir: bit 1 ingress, bit 2 egress */
#define EP_WILD_PEER (1 << 3)  /* << dir: bit 3 ingress, bit 4 egress */
/* The endpoint's pod is enrolled in mTLS: its TCP to an enrolled peer goes
 * through the node's tunnel. */
#define EP_ENROLLED (1 << 5)

/* id_flags values: per generation and identity. */
#define ID_ENROLLED (1 << 0)

/* globals.flags */
#define GLOBAL_ALLOW_HOST_INGRESS (1 << 0)

/* ct_entry.state */
#define CT_SYN_A (1 << 0)
#define CT_SYN_B (1 << 1)
#define CT_FIN_A (1 << 2)
#define CT_FIN_B (1 << 3)
#define CT_CLOSED (1 << 4) /* RST seen, or FIN from both sides */
/* Denied at a policy change: the entry stays as a tombstone that drops the
 * flow in both directions until it expires or a later revision allows it
 * again. Removing it instead would let the first packet the other side
 * sends (a retransmission, a keepalive) start a "new" flow in the reverse
 * direction, which its own policy may allow, and so revive the connection. */
#define CT_DENIED (1 << 5)
/* Redirected into the node's tunnel at the source pod: the pod's packets
 * of the flow get the tunnel mark (and, on a bridge, go to the bridge's L3
 * ingress), so they reach the tunnel's socket, never the wire. */
#define CT_REDIRECT (1 << 6)
/* Delivered by the tunnel to the destination pod: peer_id is the identity
 * the tunnel verified, not what the source address maps to. */
#define CT_TUNNEL (1 << 7)

/* TCP flags as in the header's 13th byte. */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* Counter indexes: verdicts, then drop reasons, then lost events. */
#define CNT_VERDICT_BASE 0
#define CNT_DROP_BASE 8
#define CNT_EVENTS 30 /* events written to the ring (packets field) */
#define CNT_EVENTS_LOST 31
#define CNT_MAX 32

/* Policy LPM key. Bytes after prefixlen, in order: ep_id, peer, slot, dir,
 * pad (all always fully matched: 88 bits), then proto (8 bits) and dport
 * (16 bits, big endian) which may be cut by the prefix. prefixlen 88 is "any
 * protocol", 96 "this protocol, any port", 96+n a port prefix of n bits.
 * slot is the generation (see global_config) the entry belongs to. */
struct policy_key {
	__u32 prefixlen;
	__u32 ep_id;
	__u32 peer;
	__u8 slot;
	__u8 dir;
	__u8 pad;
	__u8 proto;
	__u16 dport; /* network byte order */
	__u16 pad2;  /* outside every prefix */
};

#define POLICY_FIXED_BITS 88
#define POLICY_FULL_BITS 112

/* A policy entry holds the winner of two views of the same key (see
 * policy.MapState.LookupFlow): the plain view (rule_id, action, flags), in
 * which allows with FLAG_MTLS_REQUIRED do not match, and the tunnelled view
 * (tun_*), in which they match TCP. action 0 in a view: no entry there. */
struct policy_value {
	__u32 rule_id;
	__u32 tun_rule_id;
	__u8 action;
	__u8 flags;
	__u8 tun_action;
	__u8 tun_flags;
};

/* ipcache key: the generation (see global_config), always matched, then
 * the address; IPv4 is stored v4-mapped (::ffff:a.b.c.d). prefixlen is
 * IPCACHE_GEN_BITS plus the address prefix (plus 96 for IPv4). */
struct ipcache_key {
	__u32 prefixlen;
	__u32 gen;
	__u32 addr[4];
};

#define IPCACHE_GEN_BITS 32

struct ipcache_value {
	__u32 identity;
};


/* Exact-match tables in front of the two LPM tries. ipcache_hosts holds the
 * ipcache's full-length entries (IPv4 /32, stored v4-mapped, and IPv6 /128)
 * again; policy_exact holds the policy entries whose prefix covers the whole
 * key (one protocol, one port) again. Each is an array of buckets of
 * EXACT_WAYS slots found by the conntrack hash of the key: a lookup there is
 * inlined, where an LPM lookup is a call that walks the trie. Only Go writes
 * them (seq odd while it does); a slot whose value is all zero is empty. A
 * key that did not fit is found in its trie, which holds every entry, and
 * a full-length entry is the longest match for its key: the tables change
 * how fast a lookup is, never what it finds. */
#define EXACT_WAYS 4

struct ipcache_host_slot {
	__u32 seq;
	__u32 gen; /* with addr, the key */
	__u32 addr[4];
	__u32 identity;
};

struct ipcache_host_bucket {
	struct ipcache_host_slot way[EXACT_WAYS];
};

/* The key is policy_key after prefixlen: ep_id, peer, slot..proto,
 * dport..pad2. */
struct policy_exact_slot {
	__u32 seq;
	__u32 key[4];
	struct policy_value value;
};

struct policy_exact_bucket {
	struct policy_exact_slot way[EXACT_WAYS];
};

/* Per-endpoint policy configuration, one per generation (see
 * global_config), at gen * MAX_ENDPOINTS + endpoint ID. Written by Apply
 * into the generation that is not live. Exactly 8 bytes: it is written and
 * read whole, atomically. Identity 0: unmanaged. */
struct ep_config {
	__u32 identity;
	__u8 pad;
	__u8 flags;
	__u8 def_ingress; /* policy.DefaultVerdict */
	__u8 def_egress;
};

/* An endpoint's quarantine (ep_quarantine, by endpoint ID): id 0 is none,
 * else the agent's number for the quarantine, reported as the rule_id of
 * every DROP_QUARANTINED event. Written by Go with one aligned 4-byte store
 * into the mapped array, independent of the policy generations: it takes
 * effect at the next packet and stays across applies. */
struct quarantine {
	__u32 id;
};

/* quarantine_dns key: a resolver's address (IPv4 stored v4-mapped) that a
 * quarantined endpoint may still reach on port 53. */
struct quarantine_dns_key {
	__u32 addr[4];
};

/* The addresses an endpoint may send from, keyed by endpoint ID
 * (endpoint_addrs). Go writes a slot before it attaches the programs and clears
 * it when the endpoint is detached. A slot with no address (n4 == n6 == 0)
 * is an endpoint whose addresses are unknown: everything it sends is
 * dropped, never passed. Addresses are in network byte order; only the
 * first n4 / n6 are valid. ll holds the first nll of the pod interface's
 * IPv6 link-local addresses: they are valid only as the source of
 * neighbour discovery and MLD and as an NA's or DAD probe's target
 * (srcval_nd), never for ordinary traffic, so they are kept apart from v6.
 * nll == 0 means they are unknown (IPv6 off in the pod): any link-local
 * address is accepted there. */
#define EP_MAX_V4 4
#define EP_MAX_V6 4
#define EP_MAX_LL 2

struct ep_addrs {
	__u8 mac[6];
	__u8 n4;
	__u8 n6;
	__u32 v4[EP_MAX_V4];
	__u32 v6[EP_MAX_V6][4];
	__u32 nll;
	__u32 ll[EP_MAX_LL][4];
	/* For a pod whose host veth is a bridge port: the bridge's ifindex and
	 * MAC (0: not a bridge port). Tunnelled flows are sent to the bridge's
	 * L3 ingress, which would otherwise switch them at L2. */
	__u32 br_ifindex;
	__u8 br_mac[6];
	__u16 pad_br;
};

/* A registered tunnel listener: its socket's inode number (0: none) and
 * the port it listens on, in the node's netns. */
struct tunnel_lsn {
	__u64 ino;
	__u16 port;
	__u16 pad[3];
};

/* id_flags key: an identity's flags (ID_*) in a generation. */
struct id_flags_key {
	__u32 gen;
	__u32 identity;
};

/* The policy state exists twice, as generations 0 and 1: the ipcache
 * (gen in its keys), every endpoint's ep_config and policy entries (slot in
 * their keys) and the global flags. revision is the one word that selects
 * the live generation, revision & 1: Apply writes the whole new state into
 * the other generation, then publishes it by storing revision + 1 with one
 * atomic store (globals is mmapped). A packet reads revision once and
 * judges with that generation only, so it sees the old state or the new
 * one, never a mix. Conntrack entries checked at another revision are
 * re-evaluated. */
struct global_config {
	__u64 revision;
	__u32 flags[2]; /* GLOBAL_*, per generation */
	/* Seeds the conntrack hash; random, chosen when the maps are created. */
	__u32 ct_seed;
	__u32 pad;
};

/* Conntrack key: both directions of a flow normalise to the same key, the
 * lower (address, port) pair first. ep_id separates the two endpoints a
 * pod-to-pod flow passes. IPv6 flows use it in conntrack6 (and every flow in
 * drop_events); IPv4 flows use ct4_key in conntrack4: the map hashes and
 * compares the whole key on every packet, and half the bytes cost half. */
struct ct_key {
	__u32 addr_a[4];
	__u32 addr_b[4];
	__u32 ep_id;
	__u16 port_a;
	__u16 port_b;
	__u8 proto;
	__u8 pad[3];
};

/* IPv4 conntrack key: ct_key with plain IPv4 addresses (network byte
 * order), ordered the same way. */
struct ct4_key {
	__u32 addr_a;
	__u32 addr_b;
	__u32 ep_id;
	__u16 port_a;
	__u16 port_b;
	__u8 proto;
	__u8 pad[3];
};

struct ct_entry {
	/* In the conntrack clock (ct_now: jiffies in ns), not CLOCK_MONOTONIC. */
	__u64 created;
	__u64 last_seen;
	__u64 revision;
	__u32 rule_id;
	__u32 peer_id;
	__u16 dport;     /* the originator's destination port, as judged */
	__u8 dir;        /* direction of the originating packet */
	__u8 orig_is_a;  /* the originator is side a of the key */
	__u8 state;      /* CT_* */
	__u8 verdict;    /* ALLOW or AUDIT */
	__u8 flags;      /* policy flags of the deciding entry */
	__u8 pad;
};

/* The conntrack tables are set-associative: an array of buckets of CT_WAYS
 * slots, a flow's bucket chosen by a seeded hash of its key (see
 * bpf/lib/ct.h). A slot's seq is even while it is stable and odd while a
 * writer holds it; every write bumps it twice. A slot whose key has ep_id 0
 * is empty. */
#define CT_WAYS 4

struct ct4_slot {
	__u32 seq;
	struct ct4_key key;
	struct ct_entry entry;
};

struct ct6_slot {
	__u32 seq;
	struct ct_key key;
	struct ct_entry entry;
};

struct ct4_bucket {
	struct ct4_slot way[CT_WAYS];
};

struct ct6_bucket {
	struct ct6_slot way[CT_WAYS];
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

struct frag_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 id;
	__u8 proto;
	__u8 pad[3];
};

struct frag_value {
	__u16 sport;
	__u16 dport;
};

struct flow_event {
	__u64 timestamp; /* the conntrack clock (ct_now); EventReader converts it */
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 ep_id;
	__u32 ifindex;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 rule_id;
	__u16 sport;
	__u16 dport;
	__u8 type;
	__u8 verdict;
	__u8 drop_reason;
	__u8 dir;
	__u8 proto;
	__u8 tcp_flags; /* TCP flags; for ICMP and ICMPv6, which have none, the type */
	__u8 flags;     /* EVF_* */
	__u8 ipv6;
};

/* flow_event.flags */
#define EVF_REPLY (1 << 0)     /* the packet went against the flow */
#define EVF_TUNNELLED (1 << 1) /* redirected into the tunnel at the source pod */
#define EVF_MTLS (1 << 2)      /* delivered by the tunnel: the peer identity is verified */
#define EVF_PICKUP (1 << 3)    /* a reply whose flow had no entry, picked up (see handle_flow) */
