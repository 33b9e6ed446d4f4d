// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Segmentation: the TC programs on each pod's host-side veth.
 *
 * bulkhead_from_pod runs at TCX ingress of the host veth (packets leaving the
 * pod: the pod's egress, the peer is the destination); bulkhead_to_pod runs
 * at TCX egress (packets entering the pod: its ingress, the peer is the
 * source). One loaded copy serves every endpoint; the host veth's ifindex
 * selects the endpoint.
 *
 * Per packet: parse; conntrack lookup on the normalised 5-tuple; an
 * established flow passes unless its entry was checked at another policy
 * revision, in which case it is re-judged (and, when the policy now denies
 * it, dropped, with the entry kept as a tombstone: see CT_DENIED; each
 * drop keeps the tombstone alive, and only the original client's new SYN
 * or a revision that allows the flow again ends it). A new flow is judged by up to two LPM lookups
 * in the policy map (exact peer, wildcard peer; one the endpoint's policy
 * cannot match is skipped), combined enforcing deny first, then audit deny,
 * then specific peer; see datapath's package doc for how Go encodes the map.
 *
 * Defined behaviour for the odd cases:
 *  - from the pod, a frame must first pass source validation (see
 *    bpf/lib/srcval.h): the pod's MAC, its own addresses, ARP and NDP that
 *    claim only what is the pod's, no other ethertype;
 *  - non-IP (ARP, ...) passes, uncounted by policy (VERDICT_PASS); towards
 *    the pod every ethertype passes: such frames come from the node or from
 *    pods whose egress validated them, and ARP answers must reach the pod;
 *  - IPv6 neighbour discovery (ICMPv6 133-137) passes (VERDICT_PASS): without
 *    it no IPv6 works under default deny; so does multicast listener
 *    discovery (MLD, ICMPv6 130-132 and 143), which every IPv6 interface
 *    sends from :: or its link-local address as it comes up, and which is
 *    link-local control traffic, not a flow between workloads. Both pass
 *    only while they stay on the link (nd_link_scoped: a link-scope
 *    destination and the hop limit their RFCs require); sent anywhere else
 *    they are judged like other ICMPv6;
 *  - an ICMP error (destination unreachable, including fragmentation
 *    needed, time exceeded, parameter problem; ICMPv6 1-4) about a tracked,
 *    allowed flow passes as part of that flow, as netfilter's RELATED does:
 *    path MTU discovery must work under default deny. Other ICMP errors are
 *    judged like any new flow;
 *  - an unknown L4 protocol is judged with port 0 under its protocol number;
 *  - a first fragment stores its ports in `fragments` keyed by (addresses,
 *    protocol, IP ID); later fragments take the ports from there and so
 *    follow the first fragment's flow. A later fragment whose first one was
 *    not seen is judged with ports 0;
 *  - a truncated header on a managed endpoint is dropped (DROP_MALFORMED);
 *  - mTLS (see handle_flow): plaintext TCP between an enrolled pod and an
 *    enrolled peer other than the node is dropped at the destination
 *    (AUTH_REQUIRED) when new and at either end (POLICY_REVISED) when a
 *    revision re-judges it; a redirected packet whose endpoint_addrs slot
 *    is gone is dropped (TUNNEL_DOWN), never left to a bridge.
 */
#include "include/vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "include/bulkhead.h"
#include "lib/parse.h"
#include "lib/maps.h"
#include "lib/ct.h"
#include "lib/srcval.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Load-time settings (ebpf.Variable). */
const volatile __u32 host_identity = 1;
const volatile __u64 ct_timeout_tcp_ns = 21600ULL * 1000000000ULL;
const volatile __u64 ct_timeout_closing_ns = 10ULL * 1000000000ULL;
const volatile __u64 ct_timeout_other_ns = 60ULL * 1000000000ULL;
/* A tombstone's (CT_DENIED) life after the last packet it dropped: longer
 * than TCP's longest retransmission gap (TCP_RTO_MAX, 120 s), or a revoked
 * connection whose ends keep retransmitting would outlive it and start
 * over as a new flow. */
const volatile __u64 ct_timeout_denied_ns = 150ULL * 1000000000ULL;
/* How stale an entry's last_seen may get before a packet rewrites it: a
 * refresh is a write to a slot other CPUs read, so it is rare. Go keeps it
 * well below every timeout. */
const volatile __u64 ct_refresh_ns = 1000000000ULL;
const volatile __u64 drop_event_interval_ns = 1000000000ULL;
/* A jiffy (1/HZ) in ns, measured by Go at load: see ct_now. */
const volatile __u64 jiffy_ns = 4000000;
/* Each CPU wakes the event reader once per ring_wakeup_mask+1 events it
 * emits. Asking the ring how much it holds instead cost 28 ns per event here,
 * and waking the reader every 512 events 17 ns per event. Go sizes the mask so that all CPUs together
 * fill about half the ring between wakeups. The reader also polls (see
 * datapath's EventReader), so a quiet ring is still drained promptly. */
const volatile __u64 ring_wakeup_mask = 511;
/* The mark of packets redirected into the node's mTLS tunnel, within
 * tunnel_mark_mask: the agent's policy route (fwmark -> a table whose
 * default is local) makes them local, and bpf_sk_assign hands a SYN to the
 * tunnel's transparent listener. */
const volatile __u32 tunnel_mark = 0xb00;
const volatile __u32 tunnel_mark_mask = 0xf00;

/* Types only Go reads; referenced so that they land in BTF for bpf2go. */
struct flow_event *unused_flow_event __attribute__((unused));

struct decision {
	__u32 rule;
	__u8 verdict;
	__u8 flags;
	/* Plaintext TCP that only an mtls: Required allow admits (rule is
	 * that allow's); see policy.Decision.AuthRequired. */
	__u8 auth;
};

static __always_inline void count(__u32 idx, __u32 len)
{
	struct counter *c = bpf_map_lookup_elem(&counters, &idx);
	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

static __always_inline void count_verdict(__u8 verdict, __u32 len)
{
	count(CNT_VERDICT_BASE + (verdict & 7), len);
}

static __always_inline void count_drop(__u8 reason, __u32 len)
{
	count(CNT_VERDICT_BASE + VERDICT_DENY, len);
	count(CNT_DROP_BASE + (reason & 15), len);
}

/* Bucket counts of ipcache_hosts and policy_exact minus one; set by the Go
 * loader. */
const volatile __u32 ipcache_host_mask = 16383;
const volatile __u32 policy_exact_mask = 65535;

/* ipcache_lookup resolves an address to its identity in generation gen: a
 * host entry from ipcache_hosts, else the longest prefix from the trie, else
 * world. */
static __always_inline __u32 ipcache_lookup(const __u32 *addr, __u32 gen, __u32 seed)
{
	const __u32 w[5] = { gen, addr[0], addr[1], addr[2], addr[3] };
	__u32 idx = ct_hash(w, 5, seed) & ipcache_host_mask;
	struct ipcache_host_bucket *b = bpf_map_lookup_elem(&ipcache_hosts, &idx);
	struct ipcache_key k = { .prefixlen = IPCACHE_GEN_BITS + 128, .gen = gen };
	struct ipcache_value *v;

	if (b) {
#pragma unroll
		for (int i = 0; i < EXACT_WAYS; i++) {
			struct ipcache_host_slot *sl = &b->way[i];
			__u32 s = CT_READ_ONCE(sl->seq), id;

			if ((s & 1) || ((sl->gen ^ gen) | (sl->addr[0] ^ addr[0]) | (sl->addr[1] ^ addr[1]) |
					(sl->addr[2] ^ addr[2]) | (sl->addr[3] ^ addr[3])))
				continue;
			id = sl->identity;
			ct_compiler_barrier();
			if (id && CT_READ_ONCE(sl->seq) == s)
				return id;
		}
	}
	__builtin_memcpy(k.addr, addr, 16);
	v = bpf_map_lookup_elem(&ipcache, &k);
	return v ? v->identity : ID_WORLD;
}

/* ep_config_at copies endpoint ep_id's configuration in generation gen with
 * one load (Go writes it with one store) and returns 0 for an unmanaged
 * endpoint. */
static __always_inline int ep_config_at(__u32 gen, __u32 ep_id, struct ep_config *out)
{
	__u32 idx = gen * MAX_ENDPOINTS + ep_id;
	__u64 *raw, v;

	if (ep_id >= MAX_ENDPOINTS)
		return 0;
	raw = bpf_map_lookup_elem(&ep_configs, &idx);
	if (!raw)
		return 0;
	v = *(volatile __u64 *)raw;
	__builtin_memcpy(out, &v, sizeof(v));
	return out->identity != 0;
}

/* live_revision reads the live word once: the revision, whose low bit is
 * the live generation (see global_config). */
static __always_inline __u64 live_revision(const struct global_config *g)
{
	return g ? CT_READ_ONCE(g->revision) : 0;
}

/* ep_config_of is ep_config_at in the live generation, for callers that
 * judge nothing else. */
static __always_inline int ep_config_of(__u32 ep_id, struct ep_config *out)
{
	__u32 zero = 0;

	return ep_config_at(live_revision(bpf_map_lookup_elem(&globals, &zero)) & 1, ep_id, out);
}

_Static_assert(sizeof(struct ep_config) == 8, "ep_config is read and written as one word");

/* policy_get copies the value of policy key k (a full-length key: one
 * protocol, one port) into *out and returns 1, or returns 0: from
 * policy_exact when it is there, else from the trie's longest match. */
static __always_inline int policy_get(const struct policy_key *k, __u32 seed,
				      struct policy_value *out)
{
	const __u32 *w = (const __u32 *)&k->ep_id;
	__u32 idx = ct_hash(w, 4, seed) & policy_exact_mask;
	struct policy_exact_bucket *b = bpf_map_lookup_elem(&policy_exact, &idx);
	struct policy_value *v;

	if (b) {
#pragma unroll
		for (int i = 0; i < EXACT_WAYS; i++) {
			struct policy_exact_slot *sl = &b->way[i];
			__u32 s = CT_READ_ONCE(sl->seq);

			if ((s & 1) || ((sl->key[0] ^ w[0]) | (sl->key[1] ^ w[1]) | (sl->key[2] ^ w[2]) |
					(sl->key[3] ^ w[3])))
				continue;
			*out = sl->value;
			ct_compiler_barrier();
			if ((out->action | out->tun_action) && CT_READ_ONCE(sl->seq) == s)
				return 1;
		}
	}
	v = bpf_map_lookup_elem(&policy, k);
	if (!v)
		return 0;
	*out = *v;
	return 1;
}

/* rank is the first criterion of policy.MapState.Lookup's order: an
 * enforcing deny (2) beats an audit deny (1), which beats an allow (0). An
 * audit policy only reports, so however specific it is it must not turn an
 * enforcing drop into AUDIT. No entry (or none in the view: action 0) ranks
 * below everything. tun selects the view (see struct policy_value). */
static __always_inline int rank(const struct policy_value *v, int tun)
{
	__u8 action, flags;

	if (!v)
		return -1;
	action = tun ? v->tun_action : v->action;
	flags = tun ? v->tun_flags : v->flags;
	if (!action)
		return -1;
	if (action != ACTION_DENY)
		return 0;
	return (flags & FLAG_AUDIT) ? 1 : 2;
}

/* decide_view combines the exact-peer and wildcard-peer entries in one
 * view: an enforcing deny beats an audit deny, which beats an allow; then a
 * specific peer beats the wildcard. Inside each peer dimension Go already
 * resolved the rest of the order (policy.Entry.Beats). */
static __always_inline void decide_view(const struct ep_config *cfg, __u8 dir,
					const struct policy_value *exact,
					const struct policy_value *wild, int tun, struct decision *d)
{
	int re = rank(exact, tun), rw = rank(wild, tun);
	const struct policy_value *win = rw > re ? wild : exact;
	__u8 def, action;

	d->rule = 0;
	d->flags = 0;
	if ((rw > re ? rw : re) < 0) {
		def = dir == DIR_INGRESS ? cfg->def_ingress : cfg->def_egress;
		if (def == 0)
			d->verdict = VERDICT_ALLOW;
		else if (def == 2 || (cfg->flags & EP_AUDIT))
			d->verdict = VERDICT_AUDIT;
		else
			d->verdict = VERDICT_DENY;
		return;
	}
	d->rule = tun ? win->tun_rule_id : win->rule_id;
	d->flags = tun ? win->tun_flags : win->flags;
	action = tun ? win->tun_action : win->action;
	if (action != ACTION_DENY)
		d->verdict = VERDICT_ALLOW;
	else if ((d->flags & FLAG_AUDIT) || (cfg->flags & EP_AUDIT))
		d->verdict = VERDICT_AUDIT;
	else
		d->verdict = VERDICT_DENY;
}

/* policy_decide is the BPF twin of policy.MapState.LookupFlow: tun is the
 * tunnelled view (egress TCP, and ingress from the tunnel's socket). */
static __always_inline void policy_decide(__u32 ep_id, const struct ep_config *cfg, __u8 gen,
					  __u32 gflags, __u32 seed, __u8 dir, __u32 peer,
					  __u8 proto, __u16 port, int tun, struct decision *d)
{
	struct policy_key k = {
		.prefixlen = POLICY_FULL_BITS,
		.ep_id = ep_id,
		.peer = peer,
		.slot = gen,
		.dir = dir,
		.proto = proto,
		.dport = bpf_htons(port),
	};
	struct policy_value ev, wv, *exact, *wild, *win;
	int re, rw;

	d->auth = 0;
	if (dir == DIR_INGRESS && peer == host_identity &&
	    (gflags & GLOBAL_ALLOW_HOST_INGRESS)) {
		d->rule = 0;
		d->flags = 0;
		d->verdict = VERDICT_ALLOW;
		return;
	}
	exact = NULL;
	if ((cfg->flags & (EP_EXACT_PEER << dir)) && policy_get(&k, seed, &ev))
		exact = &ev;
	wild = NULL;
	if (cfg->flags & (EP_WILD_PEER << dir)) {
		k.peer = ID_NONE;
		if (policy_get(&k, seed, &wv))
			wild = &wv;
	}
	decide_view(cfg, dir, exact, wild, tun, d);
	if (tun || proto != IPPROTO_TCP_ || d->verdict == VERDICT_ALLOW)
		return;
	/* Plaintext TCP that does not pass: would an mTLS allow admit it? It
	 * would when the tunnelled view's winner is an allow (rank 0) with
	 * FLAG_MTLS_REQUIRED. */
	re = rank(exact, 1);
	rw = rank(wild, 1);
	win = rw > re ? wild : exact;
	if ((rw > re ? rw : re) == 0 && (win->tun_flags & FLAG_MTLS_REQUIRED)) {
		d->auth = 1;
		d->rule = win->tun_rule_id;
	}
}

/* pickup_decide's working memory: its frame must fit in the 32 bytes of
 * stack the programs' frame leaves. */
struct pickup_scratch {
	struct policy_key k;
	struct ep_config cfg;
	struct decision d;
	__u32 ep_id;
	__u32 peer;
	__u32 port_dir_gen;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct pickup_scratch);
	__uint(max_entries, 1);
} pickup_scratch SEC(".maps");

/* pickup_decide judges, in the plaintext view and in generation gen, the
 * TCP flow from peer to port in direction dir (port_dir_gen: the port in
 * bits 0-15, dir in 16-23, gen in 24) of endpoint ep_id, for handle_flow's
 * pick-up of a lost reply. It returns the decision packed (verdict in bits
 * 0-7, flags in 8-15, rule in 32-63), or 0 (no verdict) when it cannot
 * tell.
 *
 * It is policy_decide for that one case, as a global function, which the
 * verifier checks once, on its own: inlined, a third policy lookup in
 * handle_flow took the program past the verifier's budget of a million
 * instructions. Its state lives in pickup_scratch (the programs' frame
 * leaves it 32 bytes of stack), and it reads the trie's values in place:
 * the trie holds every entry, policy_exact only speeds lookups up. */
__attribute__((noinline)) __u64 pickup_decide(__u32 ep_id, __u32 peer, __u32 port_dir_gen)
{
	const struct policy_value *exact = NULL, *wild = NULL;
	struct pickup_scratch *s;
	struct global_config *g;
	__u32 zero = 0, gen;
	__u8 dir;

	s = bpf_map_lookup_elem(&pickup_scratch, &zero);
	if (!s)
		return 0;
	s->ep_id = ep_id;
	s->peer = peer;
	s->port_dir_gen = port_dir_gen;
	g = bpf_map_lookup_elem(&globals, &zero);
	gen = (s->port_dir_gen >> 24) & 1;
	if (!g || !ep_config_at(gen, s->ep_id, &s->cfg))
		return 0;
	dir = (s->port_dir_gen >> 16) & 0xff;
	if (dir == DIR_INGRESS && s->peer == host_identity && (g->flags[gen] & GLOBAL_ALLOW_HOST_INGRESS))
		return VERDICT_ALLOW;
	s->k.prefixlen = POLICY_FULL_BITS;
	s->k.ep_id = s->ep_id;
	s->k.slot = gen;
	s->k.dir = dir;
	s->k.proto = IPPROTO_TCP_;
	s->k.dport = bpf_htons(s->port_dir_gen & 0xffff);
	if (s->cfg.flags & (EP_EXACT_PEER << dir)) {
		s->k.peer = s->peer;
		exact = bpf_map_lookup_elem(&policy, &s->k);
	}
	if (s->cfg.flags & (EP_WILD_PEER << dir)) {
		s->k.peer = ID_NONE;
		wild = bpf_map_lookup_elem(&policy, &s->k);
	}
	decide_view(&s->cfg, dir, exact, wild, 0, &s->d);
	return s->d.verdict | (__u64)s->d.flags << 8 | (__u64)s->d.rule << 32;
}

/* ct_normalise builds the IPv6 (or v4-mapped) key and reports whether the
 * packet's source is side a. */
static __always_inline int ct_normalise(const struct pkt *p, __u32 ep_id, struct ct_key *k)
{
	int src_first = 1;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 s = bpf_ntohl(p->saddr[i]), d = bpf_ntohl(p->daddr[i]);
		if (s != d) {
			src_first = s < d;
			goto done;
		}
	}
	src_first = p->sport <= p->dport;
done:
	k->ep_id = ep_id;
	k->proto = p->proto;
	if (src_first) {
		__builtin_memcpy(k->addr_a, p->saddr, 16);
		__builtin_memcpy(k->addr_b, p->daddr, 16);
		k->port_a = p->sport;
		k->port_b = p->dport;
	} else {
		__builtin_memcpy(k->addr_a, p->daddr, 16);
		__builtin_memcpy(k->addr_b, p->saddr, 16);
		k->port_a = p->dport;
		k->port_b = p->sport;
	}
	return src_first;
}

/* ct_normalise4 is ct_normalise for IPv4, in the same order (the
 * v4-mapped prefix is equal on both sides). */
static __always_inline int ct_normalise4(const struct pkt *p, __u32 ep_id, struct ct4_key *k)
{
	__u32 s = bpf_ntohl(p->saddr[3]), d = bpf_ntohl(p->daddr[3]);
	int src_first = s != d ? s < d : p->sport <= p->dport;

	k->ep_id = ep_id;
	k->proto = p->proto;
	if (src_first) {
		k->addr_a = p->saddr[3];
		k->addr_b = p->daddr[3];
		k->port_a = p->sport;
		k->port_b = p->dport;
	} else {
		k->addr_a = p->daddr[3];
		k->addr_b = p->saddr[3];
		k->port_a = p->dport;
		k->port_b = p->sport;
	}
	return src_first;
}

/* ct_now is the conntrack clock in ns, for timeouts and drop-event rate
 * limits: jiffies scaled to ns. It has the coarse clock's resolution (a
 * tick), but bpf_jiffies64 is inlined into a load while the coarse clock is
 * two calls, which cost a fifth of an established packet. Go reads the same
 * clock through bulkhead_clock. */
static __always_inline __u64 ct_now(void)
{
	return bpf_jiffies64() * jiffy_ns;
}

static __always_inline int ct_expired(const struct ct_entry *ct, const struct pkt *p, int pkt_is_a,
				      __u64 now)
{
	__u64 timeout = ct_timeout_other_ns;

	if (ct->state & CT_DENIED) {
		/* Only the original client's new handshake ends a tombstone:
		 * a bare SYN from the other end must not turn the revoked
		 * connection into an allowed flow the other way round. */
		if (p->proto == IPPROTO_TCP_ && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN &&
		    pkt_is_a == ct->orig_is_a)
			return 1;
		timeout = ct_timeout_denied_ns;
	} else if (ct->state & CT_CLOSED) {
		/* A new SYN on a closed flow starts a new flow. */
		if (p->proto == IPPROTO_TCP_ && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
			return 1;
		timeout = ct_timeout_closing_ns;
	} else if (p->proto == IPPROTO_TCP_) {
		timeout = ct_timeout_tcp_ns;
	}
	return now - ct->last_seen > timeout;
}

/* ct_track updates TCP state in ct (a copy), setting *dirty when it changed
 * something; it returns 1 when this packet closed the flow. */
static __always_inline int ct_track(struct ct_entry *ct, const struct pkt *p, int pkt_is_a, __u64 now,
				    int *dirty)
{
	__u8 st = ct->state, f = p->tcp_flags;

	/* Refresh rarely (ct_refresh_ns): timeouts are coarse, and a refresh
	 * is a write to a slot other CPUs read. */
	if (now - ct->last_seen >= ct_refresh_ns) {
		ct->last_seen = now;
		*dirty = 1;
	}
	if (p->proto != IPPROTO_TCP_ || (st & CT_CLOSED))
		return 0;
	if (f & TCP_RST)
		st |= CT_CLOSED;
	if (f & TCP_FIN)
		st |= pkt_is_a ? CT_FIN_A : CT_FIN_B;
	if (f & TCP_SYN)
		st |= pkt_is_a ? CT_SYN_A : CT_SYN_B;
	if ((st & (CT_FIN_A | CT_FIN_B)) == (CT_FIN_A | CT_FIN_B))
		st |= CT_CLOSED;
	if (st == ct->state)
		return 0;
	ct->state = st;
	*dirty = 1;
	if (!(st & CT_CLOSED))
		return 0;
	ct->last_seen = now;
	return 1;
}

static __always_inline void emit(const struct pkt *p, __u64 now, __u8 type, __u8 verdict,
				 __u8 reason, __u32 rule, __u8 flow_dir, __u8 pkt_from_pod,
				 __u32 ep_id, __u32 ifindex, __u32 ep_identity, __u32 peer,
				 __u8 evflags)
{
	struct flow_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count(CNT_EVENTS_LOST, 0);
		return;
	}
	/* The conntrack clock, which this packet already read: the monotonic
	 * clock cost 31 ns per event here. EventReader
	 * turns it into CLOCK_MONOTONIC, to a tick's resolution. */
	e->timestamp = now;
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->ep_id = ep_id;
	e->ifindex = ifindex;
	e->src_identity = pkt_from_pod ? ep_identity : peer;
	e->dst_identity = pkt_from_pod ? peer : ep_identity;
	e->rule_id = rule;
	e->sport = p->sport;
	e->dport = p->dport;
	e->type = type;
	e->verdict = verdict;
	e->drop_reason = reason;
	e->dir = flow_dir;
	e->proto = p->proto;
	/* ICMP has no flags: the byte carries its type, so that records can
	 * say echo request, echo reply, unreachable, ... */
	e->tcp_flags = (p->proto == IPPROTO_ICMP_ || p->proto == IPPROTO_ICMPV6_) ? p->icmp_type
										  : p->tcp_flags;
	e->flags = evflags;
	e->ipv6 = p->ipv6;
	__u32 idx = CNT_EVENTS;
	struct counter *c = bpf_map_lookup_elem(&counters, &idx);
	__u64 wake = BPF_RB_NO_WAKEUP;

	if (c && (c->packets++ & ring_wakeup_mask) == ring_wakeup_mask)
		wake = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(e, wake);
}

/* drop_event_due rate-limits drop events per flow. */
static __always_inline int drop_event_due(const struct ct_key *k, __u64 now)
{
	__u64 *last = bpf_map_lookup_elem(&drop_events, k);

	if (last && now - *last < drop_event_interval_ns)
		return 0;
	bpf_map_update_elem(&drop_events, k, &now, BPF_ANY);
	return 1;
}

static __always_inline int has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP_ || proto == IPPROTO_UDP_ || proto == IPPROTO_SCTP_;
}

static __always_inline void resolve_fragment(struct pkt *p)
{
	struct frag_key fk = { .id = p->frag_id, .proto = p->proto };
	struct frag_value *fv;

	__builtin_memcpy(fk.saddr, p->saddr, 16);
	__builtin_memcpy(fk.daddr, p->daddr, 16);
	if (p->frag == FRAG_FIRST) {
		struct frag_value v = { .sport = p->sport, .dport = p->dport };
		bpf_map_update_elem(&fragments, &fk, &v, BPF_ANY);
		return;
	}
	fv = bpf_map_lookup_elem(&fragments, &fk);
	if (!fv)
		return; /* judged with ports 0 */
	p->sport = fv->sport;
	p->dport = fv->dport;
	p->policy_port = has_ports(p->proto) ? fv->dport : 0;
}

static __always_inline __u32 endpoint_of(__u32 ifindex)
{
	__u32 *ep;

	if (ifindex < ENDPOINTS_ARRAY_SIZE) {
		ep = bpf_map_lookup_elem(&endpoints_array, &ifindex);
		/* Keeps clang from sharing one lookup call between the two
		 * maps: the verifier inlines a lookup only when its call site
		 * sees one map, and the shared call cost an indirect call per
		 * packet. */
		barrier_var(ep);
	} else {
		ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	}
	return ep ? *ep : 0;
}

/* peer_enrolled reports whether identity id is enrolled in mTLS in
 * generation gen. */
static __attribute__((noinline)) int peer_enrolled(__u32 gen, __u32 id)
{
	struct id_flags_key k = { .gen = gen, .identity = id };
	__u32 *f = bpf_map_lookup_elem(&id_flags, &k);

	return f && (*f & ID_ENROLLED);
}

/* tunnel_listening hands a redirected flow's SYN to the tunnel's transparent
 * listener (bpf_sk_assign; the mark's policy route makes the packet local)
 * and reports whether the registered listener is there: without it the
 * flow is dropped, never forwarded in plaintext. Later packets of the flow
 * find the accepted socket by the usual lookup. The listener is found by
 * its port and recognised by its socket's inode number: on this kernel the
 * socket cookie that SO_COOKIE reports for a listener is not the one its
 * struct sock in the listening hash holds. */
static __attribute__((noinline)) int tunnel_listening(struct __sk_buff *skb, const struct pkt *p)
{
	__u32 slot = p->ipv6;
	struct tunnel_lsn *l = bpf_map_lookup_elem(&tunnel_listener, &slot);
	struct bpf_sock_tuple *t;
	struct bpf_sock *sk;
	struct tcp_sock *tp;
	__u64 ino = 0, want;
	int ok = 0;

	if (l && !l->ino && slot) {
		slot = 0; /* one dual-stack listener */
		l = bpf_map_lookup_elem(&tunnel_listener, &slot);
	}
	if (!l || !l->ino)
		return 0;
	want = l->ino;
	slot = 0;
	t = bpf_map_lookup_elem(&tunnel_scratch, &slot);
	if (!t)
		return 0;
	/* The listener's port, the packet's addresses: a listener bound to
	 * the wildcard address matches any destination. */
	if (p->ipv6) {
		__builtin_memcpy(t->ipv6.saddr, p->saddr, 16);
		__builtin_memcpy(t->ipv6.daddr, p->daddr, 16);
		t->ipv6.sport = bpf_htons(p->sport);
		t->ipv6.dport = bpf_htons(l->port);
		sk = bpf_sk_lookup_tcp(skb, t, sizeof(t->ipv6), BPF_F_CURRENT_NETNS, 0);
	} else {
		t->ipv4.saddr = p->saddr[3];
		t->ipv4.daddr = p->daddr[3];
		t->ipv4.sport = bpf_htons(p->sport);
		t->ipv4.dport = bpf_htons(l->port);
		sk = bpf_sk_lookup_tcp(skb, t, sizeof(t->ipv4), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return 0;
	if (sk->state == BPF_TCP_LISTEN) {
		tp = bpf_skc_to_tcp_sock(sk);
		if (tp) {
			struct socket *so = tp->inet_conn.icsk_inet.sk.sk_socket;
			struct file *f = so ? so->file : NULL;
			struct inode *in = f ? f->f_inode : NULL;

			if (in)
				ino = in->i_ino;
		}
	}
	if (ino == want) {
		ok = 1;
		if ((p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
			ok = bpf_sk_assign(skb, sk, 0) == 0;
	}
	bpf_sk_release(sk);
	return ok;
}

/* tunnel_forward sends a redirected flow's packet from the pod towards the
 * tunnel: the mark makes it local. A bridge would switch it at L2 to the
 * destination pod's port, so on a bridge port the frame is addressed to the
 * bridge itself, which passes it up to IP. Whether the pod is a bridge port
 * is in its endpoint_addrs slot; without a slot (none, or one Go cleared
 * as it detached the endpoint) that is unknown, and passing the frame
 * could let a bridge switch it in plaintext: it is dropped (TUNNEL_DOWN).
 * It passes unchanged only for an endpoint known not to be a bridge
 * port. */
static __always_inline int tunnel_forward(struct __sk_buff *skb, __u32 ep_id, __u32 len)
{
	struct ep_addrs *a = bpf_map_lookup_elem(&endpoint_addrs, &ep_id);

	if (!a || !(a->n4 | a->n6)) {
		count_drop(DROP_TUNNEL_DOWN, len);
		return TC_ACT_SHOT;
	}
	skb->mark = (skb->mark & ~tunnel_mark_mask) | tunnel_mark;
	if (!a->br_ifindex)
		return BH_PASS;
	if (bpf_skb_store_bytes(skb, 0, a->br_mac, 6, 0) < 0)
		return TC_ACT_SHOT;
	return BH_PASS;
}

/* enrolled_pair reports whether plaintext TCP between endpoint cfg and
 * peer must not exist: both are enrolled in mTLS in generation gen, so
 * their TCP goes through the tunnel and nothing else. The node itself
 * (host_identity: kubelet probes, the tunnel's own connections) is never
 * held to it. */
static __always_inline int enrolled_pair(const struct ep_config *cfg, __u32 gen, __u32 peer)
{
	return (cfg->flags & EP_ENROLLED) && peer != host_identity && peer_enrolled(gen, peer);
}

/* ct_evflags are the event flags a flow's conntrack state implies. */
static __always_inline __u8 ct_evflags(__u8 state)
{
	return ((state & CT_REDIRECT) ? EVF_TUNNELLED : 0) | ((state & CT_TUNNEL) ? EVF_MTLS : 0);
}

/* handle_flow judges an IP packet of a managed (or formerly managed)
 * endpoint: conntrack, then policy for a new flow.
 *
 * mTLS: a new TCP flow from an enrolled pod to an enrolled peer, or one
 * whose egress allow has FLAG_MTLS_REQUIRED, is redirected into the node's
 * tunnel (CT_REDIRECT). Towards the pod, a new flow sent by a socket the
 * tunnel registered in tunnel_socks is judged as coming from the identity
 * the tunnel verified (CT_TUNNEL), in the tunnelled view; every other flow
 * towards the pod is plaintext, in which mtls: Required allows do not
 * match, and plaintext TCP to an enrolled pod from an enrolled peer (not
 * the node) is dropped (AUTH_REQUIRED) even where policy allows it. A
 * policy revision ends (POLICY_REVISED, tombstone) a plaintext TCP flow
 * whose pair is now enrolled, at either end. */
static __always_inline int handle_flow(struct __sk_buff *skb, struct pkt *p, __u32 ep_id,
				       __u8 dir, const int v6)
{
	__u32 ifindex = skb->ifindex, zero = 0;
	__u8 from_pod = dir == DIR_EGRESS;
	struct ep_config cfgv, *cfg = &cfgv;
	struct global_config *g;
	struct decision d;
	struct ct4_key k4 = {};
	struct ct_key k6 = {};
	struct ct4_bucket *b4 = NULL;
	struct ct6_bucket *b6 = NULL;
	struct ct_ref r;
	__u64 now, rev;
	__u32 gflags = 0, seed = 0, peer_id, gen;
	int pkt_is_a, found, hint = -1, tun = 0, pickup = 0;
	__u8 st = 0, reason;

	/* One read of the live word selects the generation of everything this
	 * packet consults: its endpoint's configuration and policy, the
	 * ipcache, the flags. */
	g = bpf_map_lookup_elem(&globals, &zero);
	rev = live_revision(g);
	gen = rev & 1;
	if (g) {
		gflags = g->flags[gen];
		seed = g->ct_seed;
	}

	now = ct_now();
	if (v6) {
		pkt_is_a = ct_normalise(p, ep_id, &k6);
		b6 = ct6_bucket(&k6, seed);
		found = b6 && ct6_find(b6, &k6, &r, 1);
	} else {
		pkt_is_a = ct_normalise4(p, ep_id, &k4);
		b4 = ct4_bucket(&k4, seed);
		found = b4 && ct4_find(b4, &k4, &r, 1);
	}
	if (found && ct_expired(&r.e, p, pkt_is_a, now)) {
		/* Judged as new; an allowed flow's insert reuses the slot. */
		hint = r.way;
		found = 0;
	}
	if (found) {
		__u8 is_reply = pkt_is_a != r.e.orig_is_a;
		int dirty = 0;

		if (r.e.revision != rev) {
			const __u32 *peer_addr;

			if (!ep_config_at(gen, ep_id, cfg)) {
				/* No longer managed: everything passes, untracked. */
				ct_remove(&r);
				count_verdict(VERDICT_PASS, p->len);
				return BH_PASS;
			}
			/* Re-judge the flow as its first packet was judged: the
			 * peer is the originator's destination (egress) or
			 * source (ingress); a tunnel-delivered flow keeps the
			 * identity the tunnel verified. */
			if (r.e.state & CT_TUNNEL) {
				peer_id = r.e.peer_id;
				tun = 1;
			} else {
				if ((r.e.dir == DIR_EGRESS) == !is_reply)
					peer_addr = p->daddr;
				else
					peer_addr = p->saddr;
				peer_id = ipcache_lookup(peer_addr, gen, seed);
				tun = r.e.dir == DIR_EGRESS && p->proto == IPPROTO_TCP_;
			}
			policy_decide(ep_id, cfg, gen, gflags, seed, r.e.dir, peer_id, p->proto, r.e.dport,
				      tun, &d);
			r.e.revision = rev;
			r.e.rule_id = d.rule;
			r.e.flags = d.flags;
			r.e.peer_id = peer_id;
			/* A plaintext flow whose egress allow now requires mTLS
			 * cannot move into the tunnel: it ends. So does a
			 * plaintext TCP flow (neither redirected at the source
			 * nor delivered by the tunnel) between a pair that is
			 * now enrolled, in either direction: an enrolled pair
			 * never talks plaintext TCP. */
			if (d.verdict == VERDICT_DENY ||
			    (tun && r.e.dir == DIR_EGRESS && !(r.e.state & CT_REDIRECT) &&
			     d.verdict == VERDICT_ALLOW && (d.flags & FLAG_MTLS_REQUIRED)) ||
			    (p->proto == IPPROTO_TCP_ && !(r.e.state & (CT_REDIRECT | CT_TUNNEL)) &&
			     enrolled_pair(cfg, gen, peer_id))) {
				/* Becomes a tombstone (see CT_DENIED). */
				r.e.state |= CT_DENIED;
				r.e.last_seen = now;
				ct_commit(&r);
				count_drop(DROP_POLICY_REVISED, p->len);
				emit(p, now, EVENT_DROP, VERDICT_DENY, DROP_POLICY_REVISED, d.rule,
				     r.e.dir, from_pod, ep_id, ifindex, cfg->identity, peer_id,
				     is_reply | ct_evflags(r.e.state));
				return TC_ACT_SHOT;
			}
			r.e.state &= ~CT_DENIED;
			r.e.verdict = d.verdict;
			dirty = 1;
		}
		if (r.e.state & CT_DENIED) {
			/* Every drop keeps the tombstone alive: while either
			 * end still sends, its packets must not find the flow
			 * forgotten and start it over as a new one. */
			if (now - r.e.last_seen >= ct_refresh_ns) {
				r.e.last_seen = now;
				ct_commit(&r);
			}
			count_drop(DROP_POLICY_REVISED, p->len);
			return TC_ACT_SHOT;
		}
		int closed = ct_track(&r.e, p, pkt_is_a, now, &dirty);
		if (dirty)
			ct_commit(&r);
		if (closed) {
			if (!ep_config_at(gen, ep_id, cfg))
				cfg->identity = 0;
			emit(p, now, EVENT_FLOW_END, r.e.verdict, DROP_NONE, r.e.rule_id, r.e.dir,
			     from_pod, ep_id, ifindex, cfg->identity, r.e.peer_id,
			     is_reply | ct_evflags(r.e.state));
		}
		count_verdict(r.e.verdict, p->len);
		if (from_pod && (r.e.state & CT_REDIRECT))
			return tunnel_forward(skb, ep_id, p->len);
		return BH_PASS;
	}

	/* A new flow. */
	if (!ep_config_at(gen, ep_id, cfg)) {
		count_verdict(VERDICT_PASS, p->len);
		return BH_PASS;
	}
	if (from_pod) {
		peer_id = ipcache_lookup(p->daddr, gen, seed);
		/* Egress TCP may still be tunnelled: mTLS allows count. */
		tun = p->proto == IPPROTO_TCP_;
	} else {
		__u32 *tid = NULL;

		if (p->proto == IPPROTO_TCP_) {
			__u64 cookie = bpf_get_socket_cookie(skb);

			if (cookie)
				tid = bpf_map_lookup_elem(&tunnel_socks, &cookie);
		}
		if (tid) {
			peer_id = *tid;
			tun = 1;
			st = CT_TUNNEL;
		} else {
			peer_id = ipcache_lookup(p->saddr, gen, seed);
		}
	}
	policy_decide(ep_id, cfg, gen, gflags, seed, dir, peer_id, p->proto, p->policy_port, tun, &d);
	reason = DROP_NONE;
	if (d.verdict == VERDICT_DENY) {
		reason = d.auth ? DROP_AUTH_REQUIRED : DROP_POLICY;
	} else if (!from_pod) {
		/* Plaintext TCP between an enrolled pair is refused here too,
		 * whatever policy says: the source may not have tunnelled it
		 * (its ipcache did not know the peer yet, the connection
		 * predates enrollment, the sender is spoofed or unmanaged).
		 * Rule 0: no rule decided it. */
		if (st != CT_TUNNEL && p->proto == IPPROTO_TCP_ && enrolled_pair(cfg, gen, peer_id)) {
			reason = DROP_AUTH_REQUIRED;
			d.rule = 0;
		}
	} else if (tun &&
		   ((d.verdict == VERDICT_ALLOW && (d.flags & FLAG_MTLS_REQUIRED)) ||
		    ((cfg->flags & EP_ENROLLED) && peer_enrolled(gen, peer_id)))) {
		st = CT_REDIRECT;
		if (!tunnel_listening(skb, p))
			reason = DROP_TUNNEL_DOWN;
	}
	/* A TCP segment in the middle of a connection (ACK without SYN) that
	 * its own direction denies may belong to a flow whose entry was lost
	 * (evicted, expired, flushed): judged as a new flow the wrong way
	 * round, the reply of an allowed connection would be dropped as
	 * denied and the connection would hang. Judge it in the direction its
	 * connection was opened (towards this segment's source port, in the
	 * plaintext view) and, when that is allowed, pick the connection up
	 * as netfilter's loose TCP tracking does. Only TCP: its handshake
	 * cannot be skipped, so no new connection starts this way, whereas a
	 * datagram has nothing that tells a reply from a new flow. A revoked
	 * connection's tombstone is found before this, and its original
	 * direction is denied anyway. */
	if (reason == DROP_POLICY && p->proto == IPPROTO_TCP_ && st == 0 &&
	    (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_ACK) {
		__u8 rdir = from_pod ? DIR_INGRESS : DIR_EGRESS;
		__u64 rd = pickup_decide(ep_id, peer_id, p->sport | (__u32)rdir << 16 | gen << 24);
		__u8 rv = rd & 0xff;

		if (rv != VERDICT_NONE && rv != VERDICT_DENY && !enrolled_pair(cfg, gen, peer_id)) {
			d.verdict = rv;
			d.flags = (rd >> 8) & 0xff;
			d.rule = rd >> 32;
			d.auth = 0;
			dir = rdir;
			pickup = 1;
			reason = DROP_NONE;
		}
	}
	if (reason != DROP_NONE) {
		count_drop(reason, p->len);
		/* drop_events is keyed by the family-independent key. */
		if (!v6)
			ct_normalise(p, ep_id, &k6);
		if (drop_event_due(&k6, now))
			emit(p, now, EVENT_DROP, VERDICT_DENY, reason, d.rule, dir, from_pod,
			     ep_id, ifindex, cfg->identity, peer_id, ct_evflags(st));
		return TC_ACT_SHOT;
	}

	struct ct_entry e = {
		.created = now,
		.last_seen = now,
		.revision = rev,
		.rule_id = d.rule,
		.peer_id = peer_id,
		.dport = p->policy_port,
		.dir = dir,
		.orig_is_a = pkt_is_a,
		.state = st,
		.verdict = d.verdict,
		.flags = d.flags,
	};
	if (pickup) {
		/* The connection was opened the other way: this segment is
		 * its reply, and the handshake is long done. */
		e.dport = p->sport;
		e.orig_is_a = !pkt_is_a;
		e.state = CT_SYN_A | CT_SYN_B;
	}
	if (p->proto == IPPROTO_TCP_) {
		if (p->tcp_flags & TCP_SYN)
			e.state |= pkt_is_a ? CT_SYN_A : CT_SYN_B;
		if (p->tcp_flags & (TCP_RST | TCP_FIN))
			e.state |= CT_CLOSED;
	}
	if (v6) {
		if (b6)
			ct6_insert(b6, &k6, &e, hint);
	} else if (b4) {
		ct4_insert(b4, &k4, &e, hint);
	}
	/* An audit verdict that only an mTLS allow would have turned into an
	 * allow says so. */
	emit(p, now, EVENT_FLOW_NEW, d.verdict, d.auth ? DROP_AUTH_REQUIRED : DROP_NONE, d.rule, dir,
	     from_pod, ep_id, ifindex, cfg->identity, peer_id,
	     pickup ? (EVF_REPLY | EVF_PICKUP) : ct_evflags(st));
	count_verdict(d.verdict, p->len);
	if (st & CT_REDIRECT)
		return tunnel_forward(skb, ep_id, p->len);
	return BH_PASS;
}

/* icmp_error reports whether p is an ICMP error, which quotes the packet it
 * is about after its 8-byte header. */
static __always_inline int icmp_error(const struct pkt *p)
{
	if (p->frag == FRAG_LATER)
		return 0;
	if (p->proto == IPPROTO_ICMP_)
		return p->icmp_type == 3 || p->icmp_type == 11 || p->icmp_type == 12;
	if (p->proto == IPPROTO_ICMPV6_)
		return p->icmp_type >= 1 && p->icmp_type <= 4;
	return 0;
}

/* icmp_related reports whether the ICMP error p is about a flow that
 * conntrack tracks for ep_id and that is not denied. Only TCP, UDP and SCTP
 * quotes are matched; the quoted IPv6 header's extension headers are not
 * walked. */
static __always_inline int icmp_related(struct __sk_buff *skb, const struct pkt *p, __u32 ep_id)
{
	struct pkt in = {};
	struct ct4_key k4 = {};
	struct ct_key k6 = {};
	struct global_config *g;
	struct ct_ref r;
	__u32 off = p->l4_off + 8, zero = 0, seed;
	int found;
	__u8 *l4;

	if (!p->ipv6) {
		struct iphdr *ip = hdr(skb, off, sizeof(*ip));

		if (!ip || ip->version != 4 || ip->ihl < 5)
			return 0;
		v4_mapped(in.saddr, ip->saddr);
		v4_mapped(in.daddr, ip->daddr);
		in.proto = ip->protocol;
		off += ip->ihl * 4;
	} else {
		struct ipv6hdr *ip6 = hdr(skb, off, sizeof(*ip6));

		if (!ip6 || ip6->version != 6)
			return 0;
		__builtin_memcpy(in.saddr, &ip6->saddr, 16);
		__builtin_memcpy(in.daddr, &ip6->daddr, 16);
		in.proto = ip6->nexthdr;
		in.ipv6 = 1;
		off += sizeof(*ip6);
	}
	if (in.proto != IPPROTO_TCP_ && in.proto != IPPROTO_UDP_ && in.proto != IPPROTO_SCTP_)
		return 0;
	l4 = hdr(skb, off, 4);
	if (!l4)
		return 0;
	in.sport = ((__u16)l4[0] << 8) | l4[1];
	in.dport = ((__u16)l4[2] << 8) | l4[3];
	g = bpf_map_lookup_elem(&globals, &zero);
	seed = g ? g->ct_seed : 0;
	if (in.ipv6) {
		struct ct6_bucket *b6;

		ct_normalise(&in, ep_id, &k6);
		b6 = ct6_bucket(&k6, seed);
		found = b6 && ct6_find(b6, &k6, &r, 1);
	} else {
		struct ct4_bucket *b4;

		ct_normalise4(&in, ep_id, &k4);
		b4 = ct4_bucket(&k4, seed);
		found = b4 && ct4_find(b4, &k4, &r, 1);
	}
	return found && !(r.e.state & CT_DENIED);
}

/* drop_from_pod drops a frame that source validation refused: counted
 * always, reported at most once per drop_event_interval per (addresses,
 * ports). The event names the sending endpoint, whatever address it
 * claimed. */
static __always_inline int drop_from_pod(struct __sk_buff *skb, struct pkt *p, __u32 ep_id,
						   __u8 reason)
{
	struct ep_config cfg;
	struct ct_key k = {};
	__u64 now = ct_now();

	count_drop(reason, skb->len);
	ct_normalise(p, ep_id, &k);
	if (drop_event_due(&k, now)) {
		if (!ep_config_of(ep_id, &cfg))
			cfg.identity = 0;
		emit(p, now, EVENT_DROP, VERDICT_DENY, reason, 0, DIR_EGRESS, 1, ep_id, skb->ifindex,
		     cfg.identity, ID_NONE, 0);
	}
	return TC_ACT_SHOT;
}

/* nd_link_scoped reports whether neighbour discovery or MLD packet p stays
 * on the link: a link-scope destination (fe80::/10, ff02::/16) and the hop
 * limit its RFC requires, 255 for ND (RFC 4861: never forwarded at that
 * value) and 1 for MLD (RFC 3810). Only such packets pass without policy;
 * one of these types sent to a routable address is judged like any other
 * ICMPv6, or it would carry data past egress policy. */
static __always_inline int nd_link_scoped(const struct pkt *p)
{
	__u32 d0 = bpf_ntohl(p->daddr[0]);

	if ((d0 & 0xffc00000) != 0xfe800000 && (d0 >> 16) != 0xff02)
		return 0;
	if (p->icmp_type >= 133 && p->icmp_type <= 137)
		return p->hop_limit == 255;
	return p->hop_limit == 1;
}

/* quarantine_dns_exempt reports whether p, a packet of a quarantined
 * endpoint, is DNS between the pod and one of the resolvers in
 * quarantine_dns: a query to port 53 (egress) or its answer (ingress). It is
 * then judged by policy like any packet; the quarantine takes nothing
 * else away from it. */
static __always_inline int quarantine_dns_exempt(const struct pkt *p, __u8 dir)
{
	struct quarantine_dns_key k;

	/* A later fragment has the ports its first fragment had (ports 0 when
	 * that was not seen, which never match). */
	if (p->proto != IPPROTO_UDP_ && p->proto != IPPROTO_TCP_)
		return 0;
	if (dir == DIR_EGRESS) {
		if (p->dport != 53)
			return 0;
		__builtin_memcpy(k.addr, p->daddr, 16);
	} else {
		if (p->sport != 53)
			return 0;
		__builtin_memcpy(k.addr, p->saddr, 16);
	}
	return bpf_map_lookup_elem(&quarantine_dns, &k) != NULL;
}

/* drop_quarantined drops a quarantined endpoint's packet: counted always,
 * reported at most once per drop_event_interval per flow, with the
 * quarantine's number as the rule. Established flows die here too: the
 * check comes before conntrack. */
static __always_inline int drop_quarantined(struct __sk_buff *skb, struct pkt *p, __u32 ep_id,
					    __u8 dir, __u32 qid)
{
	struct ep_config cfg;
	struct ct_key k = {};
	__u64 now = ct_now();
	__u8 from_pod = dir == DIR_EGRESS;
	__u32 peer, gen, zero = 0;
	const struct global_config *g;

	count_drop(DROP_QUARANTINED, skb->len);
	ct_normalise(p, ep_id, &k);
	if (!drop_event_due(&k, now))
		return TC_ACT_SHOT;
	g = bpf_map_lookup_elem(&globals, &zero);
	gen = live_revision(g) & 1;
	if (!ep_config_at(gen, ep_id, &cfg))
		cfg.identity = 0;
	peer = ipcache_lookup(from_pod ? p->daddr : p->saddr, gen, g ? g->ct_seed : 0);
	emit(p, now, EVENT_DROP, VERDICT_DENY, DROP_QUARANTINED, qid, dir, from_pod, ep_id, skb->ifindex,
	     cfg.identity, peer, 0);
	return TC_ACT_SHOT;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct pkt p = {};
	int r;

	__u32 ep_id = endpoint_of(skb->ifindex);
	if (!ep_id)
		return BH_PASS;

	r = parse_packet(skb, &p);
	if (dir == DIR_EGRESS) {
		__u8 bad = srcval_from_pod(skb, ep_id, &p, r);

		if (bad)
			return drop_from_pod(skb, &p, ep_id, bad);
	}
	if (r == PARSE_NOT_IP) {
		count_verdict(VERDICT_PASS, skb->len);
		return BH_PASS;
	}
	if (r == PARSE_BAD) {
		struct ep_config cfg;

		if (!ep_config_of(ep_id, &cfg)) {
			count_verdict(VERDICT_PASS, skb->len);
			return BH_PASS;
		}
		count_drop(DROP_MALFORMED, skb->len);
		return TC_ACT_SHOT;
	}
	if (p.frag != FRAG_NONE)
		resolve_fragment(&p);
	if (p.proto == IPPROTO_ICMPV6_ && p.frag == FRAG_NONE && icmp6_nd_or_mld(p.icmp_type) &&
	    nd_link_scoped(&p)) {
		count_verdict(VERDICT_PASS, p.len);
		return BH_PASS;
	}
	{
		const struct quarantine *q = bpf_map_lookup_elem(&ep_quarantine, &ep_id);

		if (q && q->id && !quarantine_dns_exempt(&p, dir))
			return drop_quarantined(skb, &p, ep_id, dir, q->id);
	}
	if (icmp_error(&p) && icmp_related(skb, &p, ep_id)) {
		count_verdict(VERDICT_ALLOW, p.len);
		return BH_PASS;
	}
	if (p.ipv6)
		return handle_flow(skb, &p, ep_id, dir, 1);
	return handle_flow(skb, &p, ep_id, dir, 0);
}

SEC("tc")
int bulkhead_from_pod(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}

SEC("tc")
int bulkhead_to_pod(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}

/* bulkhead_tunnel_bridge runs at TCX ingress of a bridge whose ports are pod
 * veths. A redirected flow's SYN from a bridge pod reaches the node's IP
 * stack through the bridge (tunnel_forward addresses it to the bridge),
 * which drops the socket bulkhead_from_pod assigned; here, where the frame
 * enters IP, it is assigned again. Only marked packets are looked at: the
 * mark cannot come from a pod (it is cleared when a packet leaves the pod's
 * netns). */
SEC("tc")
int bulkhead_tunnel_bridge(struct __sk_buff *skb)
{
	struct pkt p = {};

	if ((skb->mark & tunnel_mark_mask) != tunnel_mark)
		return BH_PASS;
	if (parse_packet(skb, &p) != PARSE_OK || p.proto != IPPROTO_TCP_ ||
	    (p.tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN)
		return BH_PASS;
	if (tunnel_listening(skb, &p))
		return BH_PASS;
	count_drop(DROP_TUNNEL_DOWN, skb->len);
	return TC_ACT_SHOT;
}

/* Go's view of the conntrack clock (BPF_PROG_TEST_RUN only): ct_now() in
 * the first 8 bytes of the packet. */
SEC("tc")
int bulkhead_clock(struct __sk_buff *skb)
{
	__u64 now = ct_now();

	bpf_skb_store_bytes(skb, 0, &now, sizeof(now), 0);
	return BH_PASS;
}

/* Tests only (BPF_PROG_TEST_RUN): tunnel_forward for the endpoint whose ID
 * is in the packet's first 4 bytes (native byte order). Through the pod
 * programs an empty endpoint_addrs slot never gets that far (source
 * validation drops first), except in a race with a detach; this reaches
 * it. */
SEC("tc")
int bulkhead_tunnel_forward_test(struct __sk_buff *skb)
{
	__u32 ep_id;

	if (bpf_skb_load_bytes(skb, 0, &ep_id, sizeof(ep_id)) < 0)
		return TC_ACT_SHOT;
	return tunnel_forward(skb, ep_id, skb->len);
}

/* The benchmark baseline: what a program costs that does nothing. */
SEC("tc")
int bulkhead_passthrough(struct __sk_buff *skb)
{
	return BH_PASS;
}
