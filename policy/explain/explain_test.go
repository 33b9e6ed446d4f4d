package explain

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

func testState() *policy.MapState {
	return &policy.MapState{
		AllowHostIngress: true,
		IPCache: map[netip.Prefix]identity.NumericID{
			netip.MustParsePrefix("10.0.0.1/32"): 300,
			netip.MustParsePrefix("10.0.0.2/32"): 301,
			netip.MustParsePrefix("10.9.0.0/16"): identity.MinCIDRID,
		},
		Endpoints: map[policy.EndpointID]*policy.EndpointPolicy{
			1: {Identity: 300, Default: [2]policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultAllow}, Entries: policy.SortEntries([]policy.Entry{
				{Direction: policy.Ingress, Peer: 301, Proto: policy.ProtoTCP, PortLo: 80, PortHi: 80, Action: policy.ActionAllow, Rule: 1},
				{Direction: policy.Ingress, Peer: identity.IDNone, Proto: 0, PortLo: 0, PortHi: 65535, Action: policy.ActionAllow, Rule: 3},
				{Direction: policy.Ingress, Peer: identity.MinCIDRID, Proto: 0, PortLo: 0, PortHi: 65535, Action: policy.ActionDeny, Flags: policy.FlagAudit, Rule: 2},
			})},
		},
		Rules: map[policy.RuleID]policy.RuleInfo{
			1: {Kind: "NetworkPolicy", Namespace: "a", Name: "web", Index: 0, Action: policy.ActionAllow},
			2: {Kind: "BulkheadPolicy", Namespace: "a", Name: "audit", Index: 0, Action: policy.ActionDeny, Audit: true},
			3: {Kind: "NetworkPolicy", Namespace: "a", Name: "all", Index: 0, Action: policy.ActionAllow},
		},
	}
}

func TestVerdict(t *testing.T) {
	ms := testState()
	dst := PeerOfEndpoint(ms, "a/one", 1, []netip.Addr{netip.MustParseAddr("10.0.0.1")})
	// A non-local pod: only the local side (ingress at one) is enforced.
	src := PeerOfAddr(ms, netip.MustParseAddr("10.0.0.2"))
	r := Verdict(ms, src, dst, policy.ProtoTCP, 80)
	if r.Combined != "allow" || r.Ingress.Rule == nil || r.Ingress.Rule.Name != "web" || r.Egress.Enforced {
		t.Fatalf("got %+v", r)
	}
	if len(r.Ingress.Matching) != 2 || len(r.AllowedBy) != 1 {
		t.Fatalf("want web decided and all listed as matching: %+v", r)
	}
	// Deny with FlagAudit beats the wildcard allow, and passes as audit.
	r = Verdict(ms, PeerOfAddr(ms, netip.MustParseAddr("10.9.1.1")), dst, policy.ProtoUDP, 53)
	if r.Combined != "audit" || !r.Passes() || len(r.DeniedBy) != 1 || !r.DeniedBy[0].Audit {
		t.Fatalf("got %+v", r)
	}
	// Egress from the endpoint is not selected: allowed by default.
	r = Verdict(ms, dst, PeerOfAddr(ms, netip.MustParseAddr("192.0.2.1")), policy.ProtoTCP, 443)
	if r.Combined != "allow" || r.Egress.Default != "allow" {
		t.Fatalf("got %+v", r)
	}
}

func TestMatrixAndPorts(t *testing.T) {
	if _, err := ParsePorts("80/TCP,x"); err == nil {
		t.Fatal("bad port accepted")
	}
	if _, err := ParsePorts("80/ICMP"); err == nil {
		t.Fatal("bad protocol accepted")
	}
	ports, err := ParsePorts("80/TCP, 53/udp,81")
	if err != nil || len(ports) != 3 || ports[1] != (PortProto{53, policy.ProtoUDP}) || ports[2].Proto != policy.ProtoTCP {
		t.Fatalf("got %v %v", ports, err)
	}
	ms := testState()
	ws := []Workload{{Name: "a/one", Endpoint: 1, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
		{Name: "a/two", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}}}
	cells := Matrix(ms, ws, ports)
	// No pod-to-self cells: two ordered pairs on each of 3 ports.
	if len(cells) != 6 || cells[0].From != "a/one" || cells[0].To != "a/two" || cells[1].From != "a/two" || cells[1].To != "a/one" {
		t.Fatalf("got %+v", cells)
	}
	table := Table(cells, ws, ports)
	if !strings.Contains(table, "1 a/one   -   .") || !strings.Contains(table, "2 a/two") {
		t.Fatalf("table:\n%s", table)
	}
}

// TestMatchesAgreesWithLookup: the entry Lookup picks always Matches, and a
// packet no entry Matches gets the default.
func TestMatchesAgreesWithLookup(t *testing.T) {
	ms := testState()
	ep := ms.Endpoints[1]
	for _, peer := range []identity.NumericID{300, 301, identity.MinCIDRID, identity.IDWorld} {
		for _, proto := range []uint8{policy.ProtoTCP, policy.ProtoUDP} {
			for _, port := range []uint16{0, 53, 80, 81, 65535} {
				for _, dir := range []policy.Direction{policy.Ingress, policy.Egress} {
					d := ms.Lookup(1, dir, peer, proto, port)
					matched := false
					for i := range ep.Entries {
						e := &ep.Entries[i]
						if e.Matches(dir, peer, proto, port) {
							matched = true
						}
						if e.Rule == d.Rule && d.Rule != policy.RuleDefault && !e.Matches(dir, peer, proto, port) && e.Direction == dir {
							t.Errorf("winner %+v does not match %v %v %d/%d", e, dir, peer, proto, port)
						}
					}
					if !matched && d.Rule != policy.RuleDefault {
						t.Errorf("nothing matches but rule %d decided", d.Rule)
					}
				}
			}
		}
	}
}
