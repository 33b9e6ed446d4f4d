// Package datapath owns Bulkhead's eBPF datapath: loading the segmentation
// programs (bpf/segment.c) and their maps, pinning them under the bpffs
// directory, attaching them to pods' host-side veths (TCX, or clsact+cls_bpf
// where TCX is missing), applying a policy.MapState as a difference against
// the live maps, reading flow events and counters, and garbage-collecting
// conntrack.
//
// # One program set, many endpoints
//
// One loaded copy of the programs and maps serves every endpoint. The maps
// "endpoints_array" (ifindex < 65536, an array whose lookup the verifier
// inlines) and "endpoints" (larger ifindexes, a hash) map a host veth's
// ifindex to its endpoint ID (written by Attach); "ep_configs" maps a
// generation and an endpoint ID to its identity, defaults and audit flag
// (written by Apply). Keeping the two apart lets Apply work without knowing
// interfaces, and lets a restarted agent read all live state back from the
// pinned maps. Attaching a pod is one map
// write plus two TCX attaches of programs that are already loaded.
// ep_configs is an array indexed by generation and endpoint ID (1 to 4095)
// of 8-byte entries, which Go writes through a mapping with one atomic
// store and BPF reads with one load, so a packet never sees half an update. An endpoint
// whose entry has identity 0 is unmanaged: everything passes, as
// policy.MapState.Lookup says for an unknown endpoint.
//
// # Policy map encoding
//
// The policy map is one LPM trie. Its key is {ep_id, peer, slot, dir, proto,
// dport}: the first 88 bits (endpoint, peer identity, slot, which is the
// generation, and direction) always match exactly; the protocol and the big-endian destination port follow and
// may be cut by the prefix length (88: any protocol; 96: this protocol, any
// port; 96+n: a port prefix of n bits). A new flow costs up to two lookups,
// one with the packet's peer identity and one with peer 0 (the wildcard);
// BPF takes an enforcing deny over an audit deny over an allow, then the
// exact peer over the wildcard. ep_configs flags tell, per direction,
// whether the endpoint has entries with a specific peer and with the
// wildcard peer at all, and BPF skips a lookup that cannot match: a trie
// lookup costs as much as the rest of the judgement. The flags belong to
// the generation, as the entries do, so they always describe them.
//
// An LPM trie returns only the longest match, so Go resolves the rest of
// Lookup's order before writing: for each (endpoint, direction, peer) it
// splits each protocol's port space at every entry's bounds into disjoint
// cells, picks each cell's winner among that protocol's entries and the
// any-protocol entries with Lookup's own order, merges neighbouring cells
// with the same outcome, and writes each cell as at most ~30 port prefixes.
// A port range never becomes one entry per port. The fuzz test
// FuzzDatapathVerdict checks the program against MapState.Lookup.
//
// Each value holds two views of its key (MapState.LookupFlow): the plain
// one, in which allows with FlagMTLSRequired do not match, and the
// tunnelled one, in which they match TCP. The keys are the union of both
// views' keys (see encodeEndpoint); an endpoint without mTLS allows gets
// exactly TrieKeys. TestDatapathMTLSVerdictRandom checks both views.
//
// # The mTLS tunnel
//
// An enrolled pod's new TCP flow to an enrolled peer, or one whose egress
// allow has FlagMTLSRequired, is redirected into the node's tunnel at the
// pod's host veth: its packets get the tunnel mark (Config.TunnelMark), a
// policy route (EnsureTunnelRouting) makes marked packets local, and the
// SYN is handed to the tunnel's transparent listener (SetTunnelListener)
// with bpf_sk_assign. The listener is found by its port and recognised by
// its socket's inode; a SOCKMAP would be simpler, but this kernel refuses
// listening sockets in one. A bridge switches a frame at L2 before IP sees
// it, so for a bridge port the frame is addressed to the bridge, and
// bulkhead_tunnel_bridge, at the bridge's TCX ingress, assigns the SYN
// again (the bridge loses the first assignment). No listener: the flow is
// dropped (DropTunnelDown), never forwarded. Whether the pod is a bridge
// port is in its endpoint_addrs slot; a redirected packet whose slot is
// gone (a race with Detach) is dropped (DropTunnelDown) rather than passed
// to a bridge that might switch it in plaintext: only a pod known not to be
// a bridge port gets its packet passed unchanged. Towards a pod, a flow whose
// socket the tunnel registered (MarkTunnelSocket) is judged with the
// identity the tunnel verified, in the tunnelled view; every other flow is
// plaintext, and TCP that only an mTLS allow would admit is dropped with
// DropAuthRequired. A pod cannot forge a registration: what it sends
// reaches the host veth without a local socket. The tunnel's registrations
// live in a pinned map; the agent empties it (ClearTunnelSockets) before
// its tunnel starts, so that a killed agent's leftovers do not fill it.
//
// An enrolled pair never talks plaintext TCP, even where the source did
// not tunnel (its view did not know the peer yet, the connection predates
// enrollment, the sender is spoofed or not managed by Bulkhead): towards an
// enrolled pod, a new plaintext TCP flow from an enrolled identity is
// dropped with DropAuthRequired (rule 0), whatever policy says. When a
// policy revision re-judges an established plaintext TCP flow (neither
// redirected nor tunnel-delivered) whose pair is now enrolled, at either
// end, it ends as revoked flows do (DropPolicyRevised, tombstone). The
// node's own identity is never held to this: kubelet probes and the
// tunnel's connections come from it.
//
// # One switch for a policy change: generations and the revision
//
// The whole policy state exists twice, as generations 0 and 1: the ipcache
// (a generation word in front of the address in every key, in the trie and
// in ipcache_hosts), every endpoint's policy entries (the slot byte of the
// policy key is the generation), every endpoint's ep_configs entry (at
// gen*4096 + endpoint ID) and the global flags (allow host ingress). One
// 64-bit word selects the live generation: the revision in "globals",
// whose low bit is the generation. BPF reads it once per packet, with one
// load, and judges the packet by that generation alone, so a packet sees
// the whole old state or the whole new one: never a new identity judged by
// an endpoint's old policy (the relabel example in TestApplyIntermediateStates,
// where both states deny and the mix allows), never a rule that moved from
// one endpoint's egress to another's ingress open in both.
//
// Apply writes the complete new state into the generation that is not
// live. That generation holds the state from two applies ago, so only the
// difference between that and the new state is written (and an apply that
// flips back and forth writes nothing but the switch). It then publishes
// it by storing revision+1 through a mapping of "globals", one atomic
// 8-byte store. The old generation becomes the next Apply's target. An
// Apply whose state is already live (compared with the live generation's
// mirror, by *EndpointPolicy pointer or by content) writes nothing and
// does not publish, so conntrack is not made to re-judge every flow. When
// an Apply removes endpoints, it clears their entries from the old
// generation too, once no packet can still be judged by it, so that a
// removed endpoint leaves nothing in the maps.
//
// Failure is therefore harmless to enforcement: an error from any write
// (a full trie, ENOMEM), or a crash of the agent mid-Apply, leaves only the
// inactive generation half written, which no packet reads; the old state
// stays live, whole. Go's mirrors record what each generation really holds
// (a write is recorded once it succeeded), so the next Apply finishes the
// job; New rebuilds the mirrors of both generations from the pinned maps
// and reads the live one from the revision. The agent retries a failed
// Apply with backoff and reports it (status, metrics).
// TestApplyFailureLeavesOldState fails every write of many applies in turn.
//
// Within a generation the exact-match tables never hold a value their trie
// does not: an entry is removed from its table before its trie entry is
// rewritten and put back after, so whichever write fails, a lookup that
// misses the table finds the trie's answer.
//
// Conntrack entries record the revision at which their flow was judged. A
// packet of an established flow whose entry has another revision is judged
// again, as its first packet was (original direction, peer, protocol and
// port), by the generation its revision selects: still allowed, the entry
// takes the new revision and rule; now denied, the packet is dropped
// (DROP_POLICY_REVISED) and the entry becomes a tombstone that drops the
// flow's packets in both directions until the original client's new SYN
// starts the flow afresh or a later revision allows it again. Every drop
// keeps the tombstone alive, and it expires only after
// Config.CTTimeoutDenied without a packet (longer than TCP's longest
// retransmission gap); a full bucket evicts it after every live flow. A
// tombstone that expired or was evicted while its ends still sent would
// revive the connection just as a deleted entry would (below).
// Deleting the entry instead would let the peer's next packet (a
// retransmission, a keepalive) start a "new" flow in the reverse direction,
// which that side's policy may allow, and so revive the connection: the
// integration test caught exactly that. The revision compares by
// inequality, so a restarted agent whose MapState revision started again
// from 1 still triggers re-checks.
//
// One window remains: a packet that read the old revision and is still
// inside its lookups when the next Apply starts rewriting that generation.
// The programs run inside RCU read-side sections, so every publish starts
// an RCU grace period in the background (membarrier's
// MEMBARRIER_CMD_GLOBAL is synchronize_rcu), and the next write into the
// generation it made inactive waits for what is left of it (quiesce.go):
// a real quiescence signal, which holds on preemptible and PREEMPT_RT
// kernels too. A grace period is some milliseconds, so only applies that
// follow each other faster wait. Where membarrier is missing, Apply falls
// back to leaving the generation alone for 2 ms, and says so. On weakly ordered CPUs the packet's reads of
// the generation's entries depend on the revision it loaded (they are
// keyed or indexed by it), so they cannot see the inactive generation's
// older contents after it was published.
//
// The cost per packet is the one revision load the program made before
// (now also the generation for the lookups), one more word hashed and
// compared in ipcache_hosts, and a 32-bit generation prefix in the ipcache
// trie. The maps hold both generations: the ipcache trie is twice
// Config.MaxIPCache, ep_configs 8192 entries; the policy trie held two
// slots per endpoint before and still does.
//
// # Conntrack
//
// The conntrack key is the flow's 5-tuple normalised so that the lower
// (address, port) is side a, plus the endpoint ID (a pod-to-pod flow passes
// two endpoints, each with its own entry). IPv4 flows live in "conntrack4"
// with a 20-byte key, IPv6 flows in "conntrack6" with a 44-byte one. Go
// shows both as ConntrackKey, IPv4 v4-mapped. TCP FIN from both sides or an
// RST mark the entry closed, which expires after the closing timeout; a new
// SYN on a closed entry starts a new flow. BPF treats expired entries as
// absent, and GC removes them.
//
// The tables are not kernel hash maps but arrays of 4-way buckets that the
// program searches itself (bpf/lib/ct.h has the details): the array lookup
// is inlined, so an established packet costs no call, and an insert is a
// compare-and-swap and a few stores (6 ns here), where an LRU hash insert
// cost 153 ns. Each slot has a sequence word: readers copy
// an entry between two equal even reads of it, writers take it odd with a
// compare-and-swap from the value they read. Go maps the tables
// (BPF_F_MMAPABLE) and follows the same protocol to scan, look up and
// delete. A full bucket evicts a closed flow first, then the live flow
// seen longest ago, and a tombstone last. The bucket hash is seeded from a random value kept in
// "globals", chosen when the maps are created. Config.MaxConntrack (a power
// of two) sets how many flows each family holds.
//
// Conntrack times (created, last seen) and drop-event rate limits use the
// conntrack clock, jiffies scaled to nanoseconds: bpf_jiffies64 is inlined to
// a load, where the coarse monotonic clock cost two kernel calls, a fifth of
// an established packet. Userspace cannot ask the kernel for HZ, so New
// measures a jiffy when it loads the programs (measureJiffy), and GC reads
// the clock through the bulkhead_clock program so that it compares like with
// like. Flow events carry the same clock, read once per packet anyway (the
// monotonic clock cost 31 ns per event here);
// EventReader converts it to CLOCK_MONOTONIC, so event times have a tick's
// resolution (1/HZ: 4 ms at HZ=250).
//
// # Exact-match tables
//
// Two arrays of 4-way buckets, "ipcache_hosts" and "policy_exact", hold the
// full-length entries of the ipcache trie (/32 and /128) and of the policy
// trie (one protocol, one port) again. BPF looks a key up there first, with
// an inlined array lookup and a few compares, and goes to the trie on a
// miss; an LPM lookup is a call that walks the trie, and the two of a new
// flow were a third of its cost. A full-length entry is always the longest
// match for its key, and every entry stays in its trie, so the tables
// change how fast a lookup is, never its answer: a key that finds no free
// slot is simply found in the trie. Go is their only writer (under d.mu,
// with a per-slot sequence word, as for conntrack), removes a table entry
// before its trie entry changes and writes it after, and re-synchronises
// both tables with the tries when it re-opens pins.
//
// # Packets policy does not see
//
// Non-IP frames (ARP, ...) and IPv6 neighbour discovery pass unjudged. An
// unknown L4 protocol is judged with port 0 under its protocol number, as
// are ICMP and ICMPv6 (conntrack pairs echo requests and replies by
// identifier; ICMP errors are judged as flows of their own). A first
// fragment leaves its ports in the "fragments" map, keyed by addresses,
// protocol and IP ID; later fragments take them from there and so follow
// the first fragment's flow, and a later fragment whose first was not seen
// is judged with ports 0. A truncated header on a managed endpoint is
// dropped (DROP_MALFORMED).
//
// # Events and counters
//
// Ring buffer events: one per new flow, one per drop (at most one per flow per
// drop interval), one when a flow ends (FIN/RST in BPF; timeouts reported by
// GC). Per-CPU counters count packets and bytes by verdict and by drop
// reason, events written and events lost to a full ring. Waking the reader
// costs more than judging a new flow, and so does asking the ring how much
// it holds, so each CPU wakes the reader once per so many events of its own
// (all CPUs together fill about half the ring in between), and
// EventReader also polls every 20 ms.
package datapath
