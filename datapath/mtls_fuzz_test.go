package datapath

import (
	"errors"
	"hash/fnv"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/policy"
)

// addMTLS marks some allow entries (chosen from data) mtls: Required.
func addMTLS(ms *policy.MapState, data []byte) {
	p := ms.Endpoints[fuzzEP]
	if p == nil {
		return
	}
	h := fnv.New64a()
	h.Write(data)
	rng := rand.New(rand.NewPCG(h.Sum64(), 7))
	q := *p
	q.Entries = slices.Clone(p.Entries)
	for i := range q.Entries {
		if q.Entries[i].Action == policy.ActionAllow && rng.IntN(2) == 0 {
			q.Entries[i].Flags |= policy.FlagMTLSRequired
		}
	}
	q.Entries = policy.SortEntries(q.Entries)
	ms.Endpoints[fuzzEP] = &q
}

// checkMTLS runs the case's packets as new flows: towards the pod as
// plaintext (the plain view, AUTH_REQUIRED), from the pod in the view the
// datapath judges egress by (tunnelled for TCP). No tunnel listener is
// registered, so an egress flow an mTLS allow admits is dropped with
// TUNNEL_DOWN: that checks the tunnelled view's winner.
func (c *verdictChecker) checkMTLS(t *testing.T, ms *policy.MapState, pkts []fuzzPacket, data []byte) {
	addMTLS(ms, data)
	if _, err := c.d.Apply(ms); err != nil {
		t.Fatalf("apply: %v", err)
	}
	drainEvents(t, c.ev)
	for _, p := range pkts {
		peer := peerIdentity(ms, p.peer)
		tun := p.dir == policy.Egress && p.proto == 6
		want := ms.LookupFlow(fuzzEP, p.dir, peer, p.proto, p.port, tun)
		auth := want.AuthRequired
		wantReason := DropNone
		switch {
		case want.Verdict == policy.VerdictDeny && auth:
			wantReason = DropAuthRequired
		case want.Verdict == policy.VerdictDeny:
			wantReason = DropPolicy
		case tun && want.Verdict == policy.VerdictAllow && want.Flags&policy.FlagMTLSRequired != 0:
			wantReason = DropTunnelDown
		}
		prog := c.d.objs.BulkheadToPod
		if p.dir == policy.Egress {
			prog = c.d.objs.BulkheadFromPod
		}
		got := run(t, prog, p.spec.build())
		key := ctKeyOf(uint32(fuzzEP), p.spec)
		var ct ConntrackItem
		ctErr := c.d.lookupConntrack(key, &ct)
		evs := drainEvents(t, c.ev)
		fail := func(format string, args ...any) {
			t.Helper()
			t.Fatalf("%s %v peer=%d proto=%d port=%d want=%+v auth=%v reason=%s: "+format+"\nentries=%+v",
				append([]any{p.dir, p.spec.src, peer, p.proto, p.port, want, auth, wantReason}, append(args, ms.Endpoints[fuzzEP])...)...)
		}
		if (wantReason == DropNone) != (got == retPass) {
			fail("program returned %#x, events %+v", got, evs)
		}
		_, managed := ms.Endpoints[fuzzEP]
		switch {
		case wantReason == DropAuthRequired:
			c.seen["auth-required"]++
		case wantReason == DropTunnelDown:
			c.seen["tunnel-down"]++
		case auth:
			c.seen["auth-audit"]++
		}
		switch {
		case !managed:
		case wantReason == DropNone:
			if ctErr != nil {
				fail("no conntrack entry: %v", ctErr)
			}
			if ct.RuleId != uint32(want.Rule) && !auth || ct.Verdict != uint8(want.Verdict) {
				fail("conntrack rule %d verdict %d", ct.RuleId, ct.Verdict)
			}
			if auth && (len(evs) != 1 || evs[0].DropReason != DropAuthRequired || evs[0].Rule != want.Rule) {
				fail("audit that needs mTLS: events %+v", evs)
			}
			if err := c.d.deleteConntrack(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Fatal(err)
			}
		default:
			if ctErr == nil {
				fail("a dropped flow has a conntrack entry")
			}
			if len(evs) != 1 || evs[0].Type != EventDrop || evs[0].Rule != want.Rule || evs[0].DropReason != wantReason {
				fail("events %+v", evs)
			}
			if err := c.d.objs.DropEvents.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Fatal(err)
			}
		}
	}
}

// TestDatapathMTLSVerdictRandom: the kernel's two policy views against
// policy.MapState.LookupFlow over seeded random policies with mTLS allows.
func TestDatapathMTLSVerdictRandom(t *testing.T) {
	randomVerdicts(t, true, 5, 17, 200, "auth-required", "tunnel-down", "auth-audit")
}
