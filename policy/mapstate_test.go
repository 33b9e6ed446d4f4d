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

// TestLookupFlowMTLS pins how entries with FlagMTLSRequired decide: only
// for tunnelled TCP, and plaintext TCP they alone would allow is denied
// with AuthRequired.
func TestLookupFlowMTLS(t *testing.T) {
	const (
		app   identity.NumericID = 300 // allowed by an mTLS rule only
		web   identity.NumericID = 301 // allowed in plaintext, and with mTLS on one port
		bad   identity.NumericID = 302 // denied, and allowed by an mTLS rule
		other identity.NumericID = 303
		anyID identity.NumericID = 304 // only the wildcard peer's rules match it
	)
	mt := FlagMTLSRequired
	ms := &MapState{
		Endpoints: map[EndpointID]*EndpointPolicy{
			1: {
				Identity: 400,
				Default:  [2]DefaultVerdict{DefaultDeny, DefaultDeny},
				Entries: SortEntries([]Entry{
					{Direction: Ingress, Peer: app, Proto: tcp, PortLo: 5432, PortHi: 5432, Action: ActionAllow, Flags: mt, Rule: 1},
					// Any protocol: the mTLS rule still only ever matches TCP.
					{Direction: Ingress, Peer: app, Proto: 0, PortLo: 0, PortHi: 65535, Action: ActionAllow, Flags: mt, Rule: 2},
					{Direction: Ingress, Peer: web, Proto: tcp, PortLo: 0, PortHi: 65535, Action: ActionAllow, Rule: 3},
					{Direction: Ingress, Peer: web, Proto: tcp, PortLo: 8080, PortHi: 8080, Action: ActionAllow, Flags: mt, Rule: 4},
					{Direction: Ingress, Peer: bad, Proto: tcp, PortLo: 22, PortHi: 22, Action: ActionDeny, Rule: 5},
					{Direction: Ingress, Peer: bad, Proto: 0, PortLo: 0, PortHi: 65535, Action: ActionAllow, Flags: mt, Rule: 6},
					// Wildcard peer with mTLS; the exact-peer plain rule 8 is
					// more specific.
					{Direction: Ingress, Peer: identity.IDNone, Proto: tcp, PortLo: 9000, PortHi: 9000, Action: ActionAllow, Flags: mt, Rule: 7},
					{Direction: Ingress, Peer: other, Proto: tcp, PortLo: 9000, PortHi: 9000, Action: ActionAllow, Rule: 8},
					{Direction: Egress, Peer: app, Proto: tcp, PortLo: 443, PortHi: 443, Action: ActionAllow, Flags: mt, Rule: 9},
				}),
			},
			// Audit mode: what is dropped passes as AUDIT, and the
			// reason is still reported.
			2: {
				Identity: 401,
				Default:  [2]DefaultVerdict{DefaultDeny, DefaultDeny},
				Audit:    true,
				Entries: []Entry{
					{Direction: Ingress, Peer: app, Proto: tcp, PortLo: 80, PortHi: 80, Action: ActionAllow, Flags: mt, Rule: 10},
				},
			},
			// Only an audit-mode policy selects it (DefaultAudit).
			3: {
				Identity: 402,
				Default:  [2]DefaultVerdict{DefaultAudit, DefaultAllow},
				Entries: []Entry{
					{Direction: Ingress, Peer: app, Proto: tcp, PortLo: 80, PortHi: 80, Action: ActionAllow, Flags: mt, Rule: 11},
				},
			},
		},
	}
	type want struct{ plain, tunnel Decision }
	deny, allow, audit := VerdictDeny, VerdictAllow, VerdictAudit
	for _, tc := range []struct {
		name  string
		ep    EndpointID
		dir   Direction
		peer  identity.NumericID
		proto uint8
		port  uint16
		want  want
	}{
		{"mTLS-only allow: plaintext needs auth, tunnelled passes", 1, Ingress, app, tcp, 5432, want{
			Decision{Verdict: deny, Rule: 1, Flags: mt, AuthRequired: true},
			Decision{Verdict: allow, Rule: 1, Flags: mt}}},
		{"any-protocol mTLS rule on another TCP port", 1, Ingress, app, tcp, 22, want{
			Decision{Verdict: deny, Rule: 2, Flags: mt, AuthRequired: true},
			Decision{Verdict: allow, Rule: 2, Flags: mt}}},
		{"UDP never matches an mTLS rule", 1, Ingress, app, udp, 5432, want{
			Decision{Verdict: deny}, Decision{Verdict: deny}}},
		{"SCTP never matches an mTLS rule", 1, Ingress, app, 132, 5432, want{
			Decision{Verdict: deny}, Decision{Verdict: deny}}},
		{"mTLS narrower than a plain allow: plaintext allowed by the plain rule", 1, Ingress, web, tcp, 8080, want{
			Decision{Verdict: allow, Rule: 3}, Decision{Verdict: allow, Rule: 4, Flags: mt}}},
		{"plain allow elsewhere", 1, Ingress, web, tcp, 80, want{
			Decision{Verdict: allow, Rule: 3}, Decision{Verdict: allow, Rule: 3}}},
		{"deny beats the mTLS allow", 1, Ingress, bad, tcp, 22, want{
			Decision{Verdict: deny, Rule: 5}, Decision{Verdict: deny, Rule: 5}}},
		{"deny does not cover: mTLS allow", 1, Ingress, bad, tcp, 23, want{
			Decision{Verdict: deny, Rule: 6, Flags: mt, AuthRequired: true}, Decision{Verdict: allow, Rule: 6, Flags: mt}}},
		{"wildcard mTLS peer", 1, Ingress, anyID, tcp, 9000, want{
			Decision{Verdict: deny, Rule: 7, Flags: mt, AuthRequired: true}, Decision{Verdict: allow, Rule: 7, Flags: mt}}},
		{"exact plain peer beats wildcard mTLS peer", 1, Ingress, other, tcp, 9000, want{
			Decision{Verdict: allow, Rule: 8}, Decision{Verdict: allow, Rule: 8}}},
		{"egress mTLS rule", 1, Egress, app, tcp, 443, want{
			Decision{Verdict: deny, Rule: 9, Flags: mt, AuthRequired: true}, Decision{Verdict: allow, Rule: 9, Flags: mt}}},
		{"egress elsewhere", 1, Egress, app, tcp, 444, want{Decision{Verdict: deny}, Decision{Verdict: deny}}},
		{"endpoint audit mode", 2, Ingress, app, tcp, 80, want{
			Decision{Verdict: audit, Rule: 10, Flags: mt, AuthRequired: true}, Decision{Verdict: allow, Rule: 10, Flags: mt}}},
		{"audit default", 3, Ingress, app, tcp, 80, want{
			Decision{Verdict: audit, Rule: 11, Flags: mt, AuthRequired: true}, Decision{Verdict: allow, Rule: 11, Flags: mt}}},
		{"audit default, UDP", 3, Ingress, app, udp, 80, want{Decision{Verdict: audit}, Decision{Verdict: audit}}},
		{"unmanaged endpoint", 9, Ingress, app, tcp, 80, want{Decision{Verdict: allow}, Decision{Verdict: allow}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ms.LookupFlow(tc.ep, tc.dir, tc.peer, tc.proto, tc.port, false); got != tc.want.plain {
				t.Errorf("plaintext: got %+v, want %+v", got, tc.want.plain)
			}
			if got := ms.Lookup(tc.ep, tc.dir, tc.peer, tc.proto, tc.port); got != tc.want.plain {
				t.Errorf("Lookup: got %+v, want %+v", got, tc.want.plain)
			}
			if got := ms.LookupFlow(tc.ep, tc.dir, tc.peer, tc.proto, tc.port, true); got != tc.want.tunnel {
				t.Errorf("tunnelled: got %+v, want %+v", got, tc.want.tunnel)
			}
		})
	}
}
