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

/* Endpoint ID -> configuration with the live policy slot. Written by Apply.
 * No entry: the endpoint is unmanaged and everything passes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct ep_config);
	__uint(max_entries, 4096);
} ep_configs SEC(".maps");

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
	__uint(max_entries, 65536);
} ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct global_config);
	__uint(max_entries, 1);
} globals SEC(".maps");

/* Conntrack, one map per address family so that IPv4, the common case,
 * hashes and compares a 20-byte key instead of a 40-byte one. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct4_key);
	__type(value, struct ct_entry);
	__uint(max_entries, 65536);
} conntrack4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(max_entries, 65536);
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
