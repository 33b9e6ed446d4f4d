package policy

import (
	"net/netip"
	"reflect"
	"testing"
)

// TestPodEqual: Equal sees a change of every field; a field added to Pod
// must be added to Equal too (the field count below fails until it is).
func TestPodEqual(t *testing.T) {
	if n := reflect.TypeFor[Pod]().NumField(); n != 11 {
		t.Fatalf("Pod has %d fields: compare the new ones in Pod.Equal, then update this count", n)
	}
	base := Pod{Namespace: "shop", Name: "web", Labels: map[string]string{"app": "web"}, ServiceAccount: "sa",
		Ports: []NamedPort{{Name: "http", Port: 80, Proto: ProtoTCP}}, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")},
		HostIPs: []netip.Addr{netip.MustParseAddr("192.168.0.1")}, Endpoint: 3, SPIFFEID: "spiffe://td/x", UID: "u", NodeName: "n"}
	if !base.Equal(base) {
		t.Fatal("a pod differs from itself")
	}
	changes := []func(*Pod){
		func(p *Pod) { p.Namespace = "x" }, func(p *Pod) { p.Name = "x" },
		func(p *Pod) { p.Labels = map[string]string{"app": "db"} }, func(p *Pod) { p.ServiceAccount = "x" },
		func(p *Pod) { p.Ports = nil }, func(p *Pod) { p.IPs = []netip.Addr{netip.MustParseAddr("10.0.0.2")} },
		func(p *Pod) { p.HostIPs = nil }, func(p *Pod) { p.Endpoint = 4 }, func(p *Pod) { p.SPIFFEID = "" },
		func(p *Pod) { p.UID = "v" }, func(p *Pod) { p.NodeName = "m" },
	}
	for i, change := range changes {
		q := base
		q.Labels = map[string]string{"app": "web"}
		change(&q)
		if base.Equal(q) {
			t.Errorf("change %d not seen", i)
		}
	}
}
