package agent

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/tunnel"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// mtlsFixture is a node (192.168.0.1) with two local pods: db (endpoint 1,
// identity 300) and web-local (endpoint 2, identity 301); and two remote
// pods: web-1 on node 192.168.0.2 (identity 301) and web-debug on node
// 192.168.0.3 (identity 302). Identities 301 and 302 hold the same SPIFFE
// ID (one service account, different labels); db admits 301 on TCP 5432
// over the tunnel only.
var (
	mtSelf    = netip.MustParseAddr("192.168.0.1")
	mtNode2   = netip.MustParseAddr("192.168.0.2")
	mtNode3   = netip.MustParseAddr("192.168.0.3")
	dbIP      = netip.MustParseAddr("10.0.1.10")
	webLocal  = netip.MustParseAddr("10.0.1.11")
	web1IP    = netip.MustParseAddr("10.0.2.5")
	webDbgIP  = netip.MustParseAddr("10.0.3.7")
	webID     = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	dbID      = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/db")
	strangeID = spiffeid.RequireFromString("spiffe://cluster.local/ns/other/sa/stranger")
)

const (
	mtDB     identity.NumericID = 300
	mtWeb    identity.NumericID = 301
	mtWebDbg identity.NumericID = 302
)

func mtlsFixture(t *testing.T) (*Agent, tunnel.Pod) {
	t.Helper()
	host := func(ip netip.Addr) netip.Prefix { return netip.PrefixFrom(ip, ip.BitLen()) }
	ms := &policy.MapState{
		IPCache: map[netip.Prefix]identity.NumericID{
			host(dbIP): mtDB, host(webLocal): mtWeb, host(web1IP): mtWeb, host(webDbgIP): mtWebDbg,
		},
		Endpoints: map[policy.EndpointID]*policy.EndpointPolicy{
			1: {Identity: mtDB, Enrolled: true, Default: [2]policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultAllow},
				Entries: []policy.Entry{{Direction: policy.Ingress, Peer: mtWeb, Proto: policy.ProtoTCP, PortLo: 5432, PortHi: 5432,
					Action: policy.ActionAllow, Flags: policy.FlagMTLSRequired, Rule: 9}}},
			2: {Identity: mtWeb, Enrolled: true},
		},
		Enrolled: map[identity.NumericID]bool{mtDB: true, mtWeb: true, mtWebDbg: true},
	}
	ids := map[uint32]policy.IdentityInfo{
		uint32(mtDB):     {ID: mtDB, SPIFFEID: dbID.String()},
		uint32(mtWeb):    {ID: mtWeb, SPIFFEID: webID.String()},
		uint32(mtWebDbg): {ID: mtWebDbg, SPIFFEID: webID.String()},
	}
	a := &Agent{storePods: map[podRef]policy.Pod{
		{"shop", "db"}:        {Namespace: "shop", Name: "db", IPs: []netip.Addr{dbIP}, HostIPs: []netip.Addr{mtSelf}},
		{"shop", "web-local"}: {Namespace: "shop", Name: "web-local", IPs: []netip.Addr{webLocal}, HostIPs: []netip.Addr{mtSelf}},
		{"shop", "web-1"}:     {Namespace: "shop", Name: "web-1", IPs: []netip.Addr{web1IP}, HostIPs: []netip.Addr{mtNode2}},
		{"shop", "web-debug"}: {Namespace: "shop", Name: "web-debug", IPs: []netip.Addr{webDbgIP}, HostIPs: []netip.Addr{mtNode3}},
	}}
	v := &view{ms: ms, identities: ids,
		endpoints: map[policy.EndpointID]*endpointRecord{
			1: {ID: 1, IPs: []netip.Prefix{host(dbIP)}, Pod: api.PodRef{Namespace: "shop", Name: "db"}},
			2: {ID: 2, IPs: []netip.Prefix{host(webLocal)}, Pod: api.PodRef{Namespace: "shop", Name: "web-local"}},
		},
		pods: map[policy.EndpointID]podRef{1: {"shop", "db"}, 2: {"shop", "web-local"}},
	}
	v.mtls = a.buildMTLSView(ms, ids, v, []netip.Addr{mtSelf, netip.MustParseAddr("fd00::1")})
	a.view.Store(v)
	dst, ok := tunnelDirectory{a}.PodByIP(dbIP)
	if !ok || !dst.Local() || dst.SPIFFEID != dbID {
		t.Fatalf("destination pod: %+v, %v", dst, ok)
	}
	return a, dst
}

func TestTunnelAdmit(t *testing.T) {
	a, dst := mtlsFixture(t)
	d := tunnelDirectory{a}
	cases := []struct {
		name      string
		id        spiffeid.ID
		src, from netip.Addr
		wantID    identity.NumericID
		allowed   bool
	}{
		// web-1's own node speaks for it: judged as web-1's identity.
		{"claim from the pod's node", webID, web1IP, mtNode2, mtWeb, true},
		// Node 3 names node 2's pod: the claim is ignored, and the ID's
		// identities are judged; web-debug (302) is denied, so it is.
		{"forged source from another node", webID, web1IP, mtNode3, mtWebDbg, false},
		{"forged source from a v4-mapped address", webID, web1IP, netip.AddrFrom16(mtNode3.As16()), mtWebDbg, false},
		// No claim that helps: every identity of the ID must be allowed.
		{"source unknown, one identity of the id denied", webID, netip.MustParseAddr("10.9.9.9"), mtNode2, mtWebDbg, false},
		{"claim of a pod with another id", webID, webDbgIP, mtNode3, mtWebDbg, false},
		// A local source pod is this node's to speak for, over loopback
		// or one of its addresses, but no other node's.
		{"local source over loopback", webID, webLocal, netip.MustParseAddr("127.0.0.1"), mtWeb, true},
		{"local source from this node's address", webID, webLocal, mtSelf, mtWeb, true},
		{"local source claimed by another node", webID, webLocal, mtNode2, mtWebDbg, false},
		// An ID no workload holds is world.
		{"unknown id", strangeID, web1IP, mtNode2, identity.IDWorld, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id, dec := d.Admit(dst, tc.id, tc.src, tc.from, 5432)
			if id != tc.wantID || dec.Verdict.Passes() != tc.allowed {
				t.Errorf("admit: %s %+v, want %s allowed=%v", id, dec, tc.wantID, tc.allowed)
			}
		})
	}
}

func TestTunnelIsNode(t *testing.T) {
	var empty Agent
	empty.view.Store(&view{})
	if !(tunnelDirectory{&empty}).IsNode(netip.MustParseAddr("127.0.0.1")) {
		t.Error("loopback is not a node before the first view")
	}
	if (tunnelDirectory{&empty}).IsNode(mtNode2) {
		t.Error("an address is a node before the first view")
	}

	a, _ := mtlsFixture(t)
	d := tunnelDirectory{a}
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"192.168.0.1", true}, // this node
		{"fd00::1", true},     // this node, v6
		{"192.168.0.2", true}, // a store pod's hostIP
		{"192.168.0.3", true},
		{"::ffff:192.168.0.3", true},
		{"127.0.0.1", true},
		{"127.0.0.5", true},
		{"::1", true},
		{"10.0.2.5", false},    // a pod
		{"10.0.1.11", false},   // a local pod
		{"192.168.0.9", false}, // unknown
	} {
		if got := d.IsNode(netip.MustParseAddr(tc.addr)); got != tc.want {
			t.Errorf("IsNode(%s) = %v, want %v", tc.addr, got, tc.want)
		}
	}
}

func TestTunnelDropReasonOfCause(t *testing.T) {
	for c, want := range map[tunnel.Cause]datapath.DropReason{
		tunnel.CauseNotTunnelable: datapath.DropAuthRequired,
		tunnel.CauseTunnelDown:    datapath.DropTunnelDown,
		tunnel.CausePolicy:        datapath.DropPolicy,
	} {
		if got, ok := dropReasonOf(c); !ok || got != want {
			t.Errorf("drop reason of %s: %v %v, want %v", c, got, ok, want)
		}
	}
	if _, ok := dropReasonOf(tunnel.CauseNone); ok {
		t.Error("a refusal without a cause has a drop reason")
	}
}
