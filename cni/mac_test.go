package cni

import (
	"net"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"
)

func TestEndpointMAC(t *testing.T) {
	res := func(ifaces ...*current.Interface) *current.Result { return &current.Result{Interfaces: ifaces} }
	sandbox := &current.Interface{Name: "eth0", Mac: "aa:bb:cc:dd:ee:02", Sandbox: "/var/run/netns/pod"}
	hostSide := &current.Interface{Name: "eth0", Mac: "aa:bb:cc:dd:ee:01"} // same name, not in the sandbox
	noMAC := &current.Interface{Name: "eth0", Sandbox: "/var/run/netns/pod"}
	link := net.HardwareAddr{0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x02}
	other := net.HardwareAddr{0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x09}
	for _, c := range []struct {
		name string
		res  *current.Result
		link net.HardwareAddr
		want string // "" means an error
	}{
		{"result and link agree", res(hostSide, sandbox), link, "aa:bb:cc:dd:ee:02"},
		{"result only", res(sandbox), nil, "aa:bb:cc:dd:ee:02"},
		{"link only", res(noMAC), link, "aa:bb:cc:dd:ee:02"},
		{"host-side interface ignored", res(hostSide), link, "aa:bb:cc:dd:ee:02"},
		{"result and link differ", res(sandbox), other, ""},
		{"none", res(noMAC), nil, ""},
		{"bad MAC in result", res(&current.Interface{Name: "eth0", Mac: "zz", Sandbox: "/x"}), link, ""},
	} {
		got, err := endpointMAC(c.res, "eth0", c.link)
		if c.want == "" {
			if err == nil {
				t.Errorf("%s: got %q, want an error", c.name, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s: got %q, %v; want %q", c.name, got, err, c.want)
		}
	}
}
