package netns

import (
	"net"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

func TestVethAddrAndCleanup(t *testing.T) {
	privileged.Require(t)
	var paths []string
	t.Run("build", func(t *testing.T) {
		a, b := New(t), NewUnnamed(t)
		if a.Name == "" || b.Name != "" {
			t.Fatalf("names %q %q", a.Name, b.Name)
		}
		paths = append(paths, a.Path())
		ifindex := Veth(t, a, "vh0", b, "vp0")
		if ifindex <= 0 {
			t.Fatalf("ifindex %d", ifindex)
		}
		Addr(t, a, "vh0", "10.213.250.1/24", "fd00:213:250::1/64")
		Addr(t, b, "vp0", "10.213.250.2/24", "fd00:213:250::2/64")
		// Traffic across the pair, from inside the namespaces.
		var ln net.Listener
		b.Do(t, func() error {
			var err error
			ln, err = net.Listen("tcp", "[fd00:213:250::2]:7000")
			return err
		})
		defer ln.Close()
		go func() {
			if c, err := ln.Accept(); err == nil {
				c.Close()
			}
		}()
		a.Do(t, func() error {
			c, err := net.DialTimeout("tcp", "[fd00:213:250::2]:7000", 2*time.Second)
			if err != nil {
				return err
			}
			return c.Close()
		})
		// The host end is not visible outside its namespace.
		if _, err := netlink.LinkByName("vh0"); err == nil {
			t.Fatal("veth end leaked into the test's own namespace")
		}
	})
	for _, p := range paths {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("netns %s survived its test: %v", p, err)
		}
	}
}
