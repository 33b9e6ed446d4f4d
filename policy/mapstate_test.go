package policy

import (
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
)

const (
	tcp = 6
	udp = 17
)

func TestLookupPrecedence(t *testing.T) {
	peer := identity.NumericID(300)
	other := identity.NumericID(301)
	ms := &MapState{
		AllowHostIngress: true,
		Endpoints: map[EndpointID]*EndpointPolicy{
			1: {
				Identity: 400,
				Default:  [2]DefaultVerdict{DefaultDeny, DefaultAllow},
				Entries: SortEntries([]Entry{
					{Direction: Ingress, Peer: peer, Proto: tcp, PortLo: 80, PortHi: 80, Action: ActionAllow, Rule: 1},
					{Direction: Ingress, Peer: identity.IDNone, Proto: tcp, PortLo: 1000, PortHi: 2000, Action: ActionAllow, Rule: 2},
					{Direction: Ingress, Peer: identity.IDNone, Proto: tcp, PortLo: 1500, PortHi: 1500, Action: ActionDeny, Rule: 3},
					{Direction: Ingress, Peer: other, Proto: 0, PortLo: 0, PortHi: 65535, Action: ActionDeny, Flags: FlagAudit, Rule: 4},
					{Direction: Ingress, Peer: other, Proto: udp, PortLo: 53, PortHi: 53, Action: ActionAllow, Rule: 5},
					{Direction: Egress, Peer: identity.IDWorld, Proto: 0, PortLo: 0, PortHi: 65535, Action: ActionDeny, Rule: 6},
					// Less specific than rule 4 in peer and protocol, but enforcing.
					{Direction: Ingress, Peer: identity.IDNone, Proto: udp, PortLo: 5353, PortHi: 5353, Action: ActionDeny, Rule: 7},
					// Narrower than rule 6, but audit only.
					{Direction: Egress, Peer: identity.IDWorld, Proto: tcp, PortLo: 443, PortHi: 443, Action: ActionDeny, Flags: FlagAudit, Rule: 8},
				}),
			},
		},
	}
	for _, tc := range []struct {
		name  string
		dir   Direction
		peer  identity.NumericID
		proto uint8
		port  uint16
		want  Decision
	}{
		{"exact allow", Ingress, peer, tcp, 80, Decision{Verdict: VerdictAllow, Rule: 1}},
		{"default deny", Ingress, peer, tcp, 81, Decision{Verdict: VerdictDeny}},
		{"wildcard peer range", Ingress, peer, tcp, 1999, Decision{Verdict: VerdictAllow, Rule: 2}},
		{"deny beats narrower-or-equal allow", Ingress, peer, tcp, 1500, Decision{Verdict: VerdictDeny, Rule: 3}},
		{"audit deny beats allow", Ingress, other, udp, 53, Decision{Verdict: VerdictAudit, Rule: 4, Flags: FlagAudit}},
		{"host allowed", Ingress, identity.IDHost, tcp, 9, Decision{Verdict: VerdictAllow}},
		{"egress open by default", Egress, peer, udp, 9, Decision{Verdict: VerdictAllow}},
		{"egress deny world", Egress, identity.IDWorld, udp, 9, Decision{Verdict: VerdictDeny, Rule: 6}},
		{"enforcing wildcard-peer deny beats specific-peer audit deny", Ingress, other, udp, 5353, Decision{Verdict: VerdictDeny, Rule: 7}},
		{"enforcing deny beats narrower audit deny", Egress, identity.IDWorld, tcp, 443, Decision{Verdict: VerdictDeny, Rule: 6}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ms.Lookup(1, tc.dir, tc.peer, tc.proto, tc.port); got != tc.want {
				t.Fatalf("Lookup = %+v, want %+v", got, tc.want)
			}
		})
	}
	if got := ms.Lookup(9, Ingress, peer, tcp, 1); got.Verdict != VerdictAllow {
		t.Fatalf("unmanaged endpoint: got %+v, want allow", got)
	}
}
