/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The conntrack tables: arrays of buckets of CT_WAYS slots, searched in the
 * program.
 *
 * Why not a kernel hash map: an LRU hash lookup is a call that hashes and
 * compares in the kernel, and an LRU insert takes a lock and walks free
 * lists; on a machine with return-thunk mitigations the insert alone cost
 * four times what a packet that does nothing costs. Here the array lookup is
 * inlined by the verifier, the bucket is searched with plain loads, and an
 * insert is one compare-and-swap and a few stores.
 *
 * Concurrency. A slot's seq is even when stable, odd while a writer holds
 * it. A reader copies the entry between two reads of seq and uses the copy
 * only when both reads are equal and even, so it never sees half of one flow
 * and half of another. A writer takes the slot with a compare-and-swap from
 * the seq it read (so it fails if anything wrote in between) and releases it
 * with an atomic add; BPF atomics are full barriers. Userspace (GC, Forget)
 * follows the same protocol on the mmapped table. A packet that meets a slot
 * being written, and finds its flow nowhere else in the bucket, waits for
 * that slot (bounded, see CT_READ_TRIES) and reads it again, since it may
 * be its flow's; only then is the flow absent for that packet. Two CPUs
 * that miss one new flow at once may both store it, in two ways: the
 * insert then removes the copy in the higher way (PFX_dedup), so that
 * later lookups and re-judges see one entry, in one direction.
 * The reader's ordering relies on loads not being reordered with loads
 * (x86); weakly ordered CPUs need load-acquire, which clang 19 cannot emit
 * for BPF yet, so the Go loader refuses to run anywhere but amd64.
 *
 * Eviction. An insert takes, in order: the slot that held the same flow
 * (expired or closed), an empty slot, a closed flow's slot, the live flow
 * seen longest ago, and only then the oldest tombstone (CT_DENIED). The
 * bucket hash is seeded with a random value
 * chosen when the maps are created (globals.ct_seed), so that which flows
 * share a bucket cannot be predicted from outside. It is not a keyed
 * cryptographic hash: someone who learns the seed can fill chosen buckets.
 * datapath/conntrack.go holds the Go twin of ct_hash. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "../include/bulkhead.h"
#include "maps.h"

/* Bucket count minus one, a power of two minus one; set by the Go loader
 * from the tables' sizes. */
const volatile __u32 ct4_bucket_mask = 16383;
const volatile __u32 ct6_bucket_mask = 16383;

#define CT_READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define ct_compiler_barrier() asm volatile("" ::: "memory")

static __always_inline __u32 ct_rotl(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

/* ct_hash hashes the key's 32-bit words: each word, xored with the seed,
 * is multiplied by its own odd 64-bit constant into a 64-bit sum, whose
 * high half, folded and multiplied once more, is the hash. The products do
 * not depend on each other, so the CPU runs them side by side; a
 * multiply-rotate chain through the words (murmur3's) cost about 5 ns per
 * lookup here, a seventh of a new flow. datapath's TestCTHashSpreads checks
 * that structured keys spread like random ones. */
static const __u64 ct_hash_muls[11] = {
	0x9e3779b97f4a7c15ULL, 0xbf58476d1ce4e5b9ULL, 0x94d049bb133111ebULL, 0xd6e8feb86659fd93ULL,
	0xa0761d6478bd642fULL, 0xe7037ed1a0b428dbULL, 0x8ebc6af09c88c6e3ULL, 0x589965cc75374cc3ULL,
	0x1d8e4e27c47d124fULL, 0xc2b2ae3d27d4eb4fULL, 0x165667b19e3779f9ULL,
};

static __always_inline __u32 ct_hash(const __u32 *w, const int n, __u32 seed)
{
	__u64 sum = 0;

#pragma unroll
	for (int i = 0; i < n; i++)
		sum += (__u64)(w[i] ^ seed) * ct_hash_muls[i];
	sum ^= sum >> 32;
	return (__u32)((sum * 0x9e3779b97f4a7c15ULL) >> 32);
}

/* ct_launder returns i, a way index, in a form the verifier cannot tell
 * from any other way index (s is any value it does not know). The paths
 * that found a flow in way 0, 1, 2 or 3 then hold the same state and are
 * verified once, not four times over for all the code that follows. */
static __always_inline int ct_launder(int i, __u32 s)
{
	__u32 t = (__u32)i + s;

	barrier_var(t);
	return (t - s) & (CT_WAYS - 1);
}

/* ct_ref is a consistent copy of one slot's entry and where it came from. */
struct ct_ref {
	struct ct_entry e;
	struct ct_entry *slot; /* the slot's entry, for ct_commit */
	__u32 *seq;
	__u32 *ep_id; /* the slot key's ep_id: 0 empties the slot */
	__u32 seen;   /* seq when e was copied */
	int way;
};

/* ct_commit writes r->e back if the slot has not changed since it was read;
 * it returns 0 when it lost a race (the update is skipped). */
static __always_inline int ct_commit(struct ct_ref *r)
{
	if (__sync_val_compare_and_swap(r->seq, r->seen, r->seen + 1) != r->seen)
		return 0;
	*r->slot = r->e;
	__sync_fetch_and_add(r->seq, 1);
	r->seen += 2;
	return 1;
}

/* ct_remove empties r's slot if it has not changed since it was read. */
static __always_inline void ct_remove(struct ct_ref *r)
{
	if (__sync_val_compare_and_swap(r->seq, r->seen, r->seen + 1) != r->seen)
		return;
	*r->ep_id = 0;
	__sync_fetch_and_add(r->seq, 1);
}

/* victim_rank orders eviction candidates: lower goes first. Tombstones
 * (CT_DENIED) go last, after every live flow: an evicted tombstone lets
 * the revoked connection's next packet start over as a new flow, so a
 * burst of new flows into its bucket would revive it. */
static __always_inline __u64 victim_rank(__u32 ep_id, const struct ct_entry *e)
{
	if (ep_id == 0)
		return 0;
	if (e->state & CT_DENIED)
		return (1ULL << 62) + (1ULL << 61) + (e->last_seen >> 3);
	if (e->state & CT_CLOSED)
		return 1ULL + (e->last_seen >> 3);
	return (1ULL << 62) + (e->last_seen >> 3);
}

/* A reader that meets a slot being written (odd seq), or one that changed
 * while it was copied, and finds its flow in no other slot, waits for that
 * slot, re-reading its seq up to CT_READ_TRIES times, and copies it again,
 * twice at most: it may hold the flow, refreshed by another CPU, and a
 * reply that took its flow for absent would be judged as a new flow the
 * other way. A BPF writer holds a slot for a few stores; the bound is for
 * the rare writer that is interrupted, or a userspace one preempted. Only
 * one slot is waited for (the last busy one of the bucket): two writes
 * rarely overlap in one bucket. This costs the main programs code, about
 * 75 instructions each: as subprograms these paths put the stack over 512
 * bytes (the programs use 496), loops around the scan made clang spill
 * past it, and more re-reads made the verifier walk every one of them. */
#define CT_READ_TRIES 64

/* CT_SETTLE_COPY is one wait-and-copy of PFX_find's way w: wait while it
 * is odd, check its key, copy it; a slot written again meanwhile goes to
 * the next CT_SETTLE_COPY when more is 1, and is given up on when 0. Two
 * in a row, unrolled: a loop around them made clang spill past the stack. */
#define CT_SETTLE_COPY(PFX, more)                                                                \
	{                                                                                        \
		s = CT_READ_ONCE(b->way[w].seq);                                                 \
		_Pragma("nounroll") for (int t = 0; (s & 1) && t < CT_READ_TRIES; t++)           \
			s = CT_READ_ONCE(b->way[w].seq);                                         \
		if ((s & 1) || !PFX##_key_eq(&b->way[w].key, k))                                 \
			return 0;                                                                \
		r->e = b->way[w].entry;                                                          \
		ct_compiler_barrier();                                                           \
		if (CT_READ_ONCE(b->way[w].seq) == s)                                            \
			goto found;                                                              \
		if (!(more))                                                                     \
			return 0;                                                                \
	}

/* CT_TABLE defines PFX_bucket, PFX_find, PFX_dedup and PFX_insert for one
 * family. */
#define CT_TABLE(PFX, KEY, BUCKET, MAP, MASK)                                                  \
	static __always_inline struct BUCKET *PFX##_bucket(const struct KEY *k, __u32 seed)      \
	{                                                                                        \
		__u32 idx = ct_hash((const __u32 *)k, sizeof(*k) / 4, seed) & MASK;              \
		return bpf_map_lookup_elem(&MAP, &idx);                                          \
	}                                                                                        \
                                                                                                 \
	static __always_inline int PFX##_key_eq(const struct KEY *a, const struct KEY *b)       \
	{                                                                                        \
		const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;                        \
		__u32 diff = 0;                                                                  \
		_Pragma("unroll") for (int i = 0; i < (int)(sizeof(*a) / 4); i++) diff |=        \
			x[i] ^ y[i];                                                             \
		return diff == 0;                                                                \
	}                                                                                        \
                                                                                                 \
	/* PFX_find fills r from k's slot and returns 1, or returns 0. With                     \
	 * wait, it waits for a slot being written (see CT_READ_TRIES). The                      \
	 * entry is copied through the laundered way index, so that the                          \
	 * verifier sees one kind of stack whichever way it was found. */                        \
	static __always_inline int PFX##_find(struct BUCKET *b, const struct KEY *k,            \
					      struct ct_ref *r, const int wait)                  \
	{                                                                                        \
		__u32 busy = 0, s = 0;                                                           \
		int w, bi = 0;                                                                   \
		_Pragma("unroll") for (int i = 0; i < CT_WAYS; i++)                              \
		{                                                                                \
			s = CT_READ_ONCE(b->way[i].seq);                                         \
			if (s & 1) {                                                             \
				busy = s;                                                        \
				bi = i;                                                          \
				continue;                                                        \
			}                                                                        \
			if (PFX##_key_eq(&b->way[i].key, k)) {                                   \
				w = ct_launder(i, s);                                            \
				goto copy;                                                       \
			}                                                                        \
		}                                                                                \
		if (!wait || !busy)                                                              \
			return 0;                                                                \
		/* busy, a seq read, is unknown to the verifier: w is one state,                 \
		 * not four. */                                                                  \
		w = ct_launder(bi, busy);                                                        \
		goto settle;                                                                     \
	copy:                                                                                    \
		r->e = b->way[w].entry;                                                          \
		ct_compiler_barrier();                                                           \
		if (CT_READ_ONCE(b->way[w].seq) == s)                                            \
			goto found;                                                              \
		if (!wait)                                                                       \
			return 0;                                                                \
	settle: /* written while scanned or copied: wait for it, read it again */                \
		CT_SETTLE_COPY(PFX, 1)                                                           \
		CT_SETTLE_COPY(PFX, 0)                                                           \
	found:                                                                                   \
		r->slot = &b->way[w].entry;                                                      \
		r->seq = &b->way[w].seq;                                                         \
		r->ep_id = &b->way[w].key.ep_id;                                                 \
		r->seen = s;                                                                     \
		r->way = w;                                                                      \
		return 1;                                                                        \
	}                                                                                        \
                                                                                                 \
	/* PFX_dedup runs after k was stored in way v, whose seq is now mine:                    \
	 * another CPU that missed k at the same moment may have stored it in                   \
	 * another way. Of two copies the one in the higher way goes, removed by                 \
	 * whichever inserter sees both (a compare-and-swap from the seq it                      \
	 * saw, so only one removal succeeds). The later of two inserts always                   \
	 * sees the earlier one whole, waiting for it if need be; lookups, which                 \
	 * scan from way 0, meanwhile find the copy that stays. */                               \
	static __always_inline void PFX##_dedup(struct BUCKET *b, const struct KEY *k, int v,   \
						__u32 mine)                                      \
	{                                                                                        \
		_Pragma("unroll") for (int j = 0; j < CT_WAYS; j++)                              \
		{                                                                                \
			__u32 s, hs;                                                             \
			int hi;                                                                  \
			if (j == v)                                                              \
				continue;                                                        \
			s = CT_READ_ONCE(b->way[j].seq);                                         \
			if ((s & 1) || !PFX##_key_eq(&b->way[j].key, k))                         \
				continue;                                                        \
			ct_compiler_barrier();                                                   \
			if (CT_READ_ONCE(b->way[j].seq) != s)                                    \
				continue;                                                        \
			hi = (j > v ? j : v) & (CT_WAYS - 1);                                    \
			hs = j > v ? s : mine;                                                   \
			if (__sync_val_compare_and_swap(&b->way[hi].seq, hs, hs + 1) == hs) {    \
				b->way[hi].key.ep_id = 0;                                        \
				__sync_fetch_and_add(&b->way[hi].seq, 1);                        \
			}                                                                        \
			return;                                                                  \
		}                                                                                \
	}                                                                                        \
                                                                                                 \
	/* PFX_insert stores (k, e) in way hint (the way that held k, or -1: the                 \
	 * best victim), then removes a copy another CPU stored at once                          \
	 * (PFX_dedup). It gives up when it loses a race for the slot. */                        \
	static __always_inline void PFX##_insert(struct BUCKET *b, const struct KEY *k,         \
						 const struct ct_entry *e, int hint)             \
	{                                                                                        \
		__u64 best = ~0ULL;                                                              \
		__u32 seen = 0;                                                                  \
		int v = -1;                                                                      \
		_Pragma("unroll") for (int i = 0; i < CT_WAYS; i++)                              \
		{                                                                                \
			__u32 s = CT_READ_ONCE(b->way[i].seq);                                   \
			__u64 rank;                                                              \
			if (s & 1)                                                               \
				continue;                                                        \
			rank = i == hint ? 0 : victim_rank(b->way[i].key.ep_id, &b->way[i].entry) + 1; \
			if (rank < best) {                                                       \
				best = rank;                                                     \
				seen = s;                                                        \
				v = i;                                                           \
			}                                                                        \
		}                                                                                \
		if (v < 0)                                                                       \
			return;                                                                  \
		v = ct_launder(v, seen);                                                         \
		if (__sync_val_compare_and_swap(&b->way[v].seq, seen, seen + 1) != seen)         \
			return;                                                                  \
		b->way[v].key = *k;                                                              \
		b->way[v].entry = *e;                                                            \
		__sync_fetch_and_add(&b->way[v].seq, 1);                                         \
		PFX##_dedup(b, k, v, seen + 2);                                                  \
	}

CT_TABLE(ct4, ct4_key, ct4_bucket, conntrack4, ct4_bucket_mask)
CT_TABLE(ct6, ct_key, ct6_bucket, conntrack6, ct6_bucket_mask)
