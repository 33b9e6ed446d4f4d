package explain

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/bulkhead-io/bulkhead/policy"
)

// Dump renders a MapState as stable text: golden tests compare it, and
// people read it when the datapath and the compiler disagree.
func Dump(ms *policy.MapState) string {
	var b strings.Builder
	fmt.Fprintf(&b, "revision %d allowHostIngress %v\n", ms.Revision, ms.AllowHostIngress)
	b.WriteString("ipcache:\n")
	prefixes := slices.Collect(maps.Keys(ms.IPCache))
	slices.SortFunc(prefixes, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	for _, p := range prefixes {
		fmt.Fprintf(&b, "  %s -> %s\n", p, ms.IPCache[p])
	}
	b.WriteString("rules:\n")
	for _, id := range slices.Sorted(maps.Keys(ms.Rules)) {
		r := ms.Rules[id]
		fmt.Fprintf(&b, "  %d: %s %s/%s %s[%d] %s audit=%v", id, r.Kind, r.Namespace, r.Name, r.Direction, r.Index, r.Action, r.Audit)
		// Only when set, so that dumps without mTLS read as before.
		if r.MTLS {
			b.WriteString(" mtls=Required")
		}
		b.WriteString("\n")
	}
	if len(ms.Enrolled) > 0 {
		b.WriteString("enrolled:")
		for _, id := range slices.Sorted(maps.Keys(ms.Enrolled)) {
			fmt.Fprintf(&b, " %s", id)
		}
		b.WriteString("\n")
	}
	for _, ep := range slices.Sorted(maps.Keys(ms.Endpoints)) {
		e := ms.Endpoints[ep]
		fmt.Fprintf(&b, "endpoint %d identity %s default ingress=%s egress=%s audit=%v", ep, e.Identity,
			defaultName(e.Default[policy.Ingress]), defaultName(e.Default[policy.Egress]), e.Audit)
		if e.Enrolled {
			b.WriteString(" enrolled")
		}
		b.WriteString("\n")
		for _, en := range e.Entries {
			proto := "any"
			if en.Proto != 0 {
				proto = ProtoName(en.Proto)
			}
			fmt.Fprintf(&b, "  %-7s peer=%-8s %s %d-%d %s flags=%d rule=%d\n", en.Direction, en.Peer, proto, en.PortLo, en.PortHi, en.Action, en.Flags, en.Rule)
		}
	}
	return b.String()
}

func defaultName(d policy.DefaultVerdict) string {
	switch d {
	case policy.DefaultDeny:
		return "deny"
	case policy.DefaultAudit:
		return "audit"
	}
	return "allow"
}
