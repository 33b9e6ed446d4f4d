/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps shared by every endpoint. Sizes are defaults; the Go loader may change
 * max_entries before load. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "../include/bulkhead.h"

/* Host veth ifindex -> endpoint ID (0: none). Written by Attach. Small
 * ifindexes, the common case, go to an array whose lookup the verifier
 * inlines (a hash lookup was a third of the established path); the rest go
 * to a hash. */
#define ENDPOINTS_ARRAY_SIZE 65536
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, ENDPOINTS_ARRAY_SIZE);
} endpoints_array SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 4096);
} endpoints SEC(".maps");

/* (generation, endpoint ID) -> configuration, at gen * MAX_ENDPOINTS + ID.
 * Written by Apply, through a mapping of the array, with one 8-byte store;
 * read with one 8-byte load (ep_config_at), so a packet sees a whole
 * configuration. Identity 0: the endpoint is unmanaged and everything
 * passes. An array, not a hash: its lookup is inlined, where a hash lookup
 * was a call that cost an eighth of a new flow. */
#define MAX_ENDPOINTS 4096
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ep_config);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 2 * MAX_ENDPOINTS);
} ep_configs SEC(".maps");

/* Endpoint ID -> the addresses and MAC it may send from (struct ep_addrs),
 * checked at the pod's egress (bpf/lib/srcval.h). An array for the same
 * reason as ep_configs: one inlined lookup per packet from a pod. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ep_addrs);
	__uint(max_entries, MAX_ENDPOINTS);
} endpoint_addrs SEC(".maps");

/* Endpoint ID -> its quarantine (struct quarantine), read on every
 * packet of a managed endpoint: an array for an inlined lookup, mapped so
 * that Go sets and lifts a quarantine with one store. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct quarantine);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, MAX_ENDPOINTS);
} ep_quarantine SEC(".maps");

/* The resolvers a quarantined endpoint may still query (port 53, UDP or
 * TCP); looked up only for a quarantined endpoint's packets. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct quarantine_dns_key);
	__type(value, __u8);
	__uint(max_entries, 64);
} quarantine_dns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2 * 65536); /* both generations */
} ipcache SEC(".maps");

/* The full-length entries of ipcache and policy, again, for lookups
 * without a call (see EXACT_WAYS). The Go loader sizes them with their
 * tries. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct policy_exact_bucket);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 65536);
} policy_exact SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ipcache_host_bucket);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 16384);
} ipcache_hosts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct global_config);
	__uint(map_flags, BPF_F_MMAPABLE); /* Go publishes revision with one store */
	__uint(max_entries, 1);
} globals SEC(".maps");

/* Conntrack, one table per address family so that IPv4, the common case,
 * hashes and compares a 20-byte key instead of a 44-byte one. Each is an
 * array of buckets (bpf/lib/ct.h): the array lookup is inlined and the
 * bucket is searched in the program, where a kernel hash map costs a call
 * per lookup (22 ns here) and an LRU insert 153 ns, more than a whole new
 * flow costs now.
 * Userspace maps the tables (BPF_F_MMAPABLE) to scan and delete. The Go
 * loader sets max_entries to the bucket count, a power of two. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ct4_bucket);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 16384);
} conntrack4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ct6_bucket);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 16384);
} conntrack6 SEC(".maps");

/* First fragments leave their ports here for the later fragments. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(max_entries, 8192);
} fragments SEC(".maps");

/* Last drop event per flow, to rate-limit drop events. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, __u64);
	__uint(max_entries, 8192);
} drop_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, CNT_MAX);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* mTLS tunnel (issue 12). */

/* The node tunnel's transparent listener(s) (struct tunnel_lsn): slot
 * 0 takes IPv4 SYNs (and IPv6 ones when slot 1 is empty: a dual-stack
 * socket), slot 1 IPv6 SYNs. A SOCKMAP would hold the socket itself, but
 * this kernel refuses listening sockets in one (EOPNOTSUPP), so the program
 * looks the listener up by its port and accepts it only when its socket's
 * inode is the registered one: when the agent dies its socket goes, and no other
 * process that binds the port gets the pods' plaintext; flows that must be
 * tunnelled are dropped (DROP_TUNNEL_DOWN). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct tunnel_lsn);
	__uint(max_entries, 2);
} tunnel_listener SEC(".maps");

/* Scratch space for tunnel_listening's socket tuple, which the stack has
 * no room for (the programs' stack is near the verifier's limit). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct bpf_sock_tuple);
	__uint(max_entries, 1);
} tunnel_scratch SEC(".maps");

/* Socket cookie -> verified peer identity of the tunnel's connections to
 * local pods, written before they connect. A pod cannot forge an entry: its
 * packets reach the host veth without a local socket. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, __u32);
	__uint(max_entries, 65536);
} tunnel_socks SEC(".maps");

/* (generation, identity) -> ID_* flags, written by Apply with the rest of a
 * generation: enrolled identities. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct id_flags_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2 * 65536);
} id_flags SEC(".maps");
