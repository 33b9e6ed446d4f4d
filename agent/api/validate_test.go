package api

import (
	"net/netip"
	"testing"
)

func TestCheckPodIPs(t *testing.T) {
	for _, ok := range []string{"10.0.0.5/24", "10.0.0.5/32", "10.0.0.0/31", "10.0.0.1/31", "fd00::5/64", "fd00::5/128", "192.168.1.1/30"} {
		if err := CheckPodIPs([]netip.Prefix{netip.MustParsePrefix(ok)}); err != nil {
			t.Errorf("%s refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"0.0.0.0/0", "::/0", "10.0.0.5/0", "0.0.0.0/32", "127.0.0.1/8", "224.0.0.1/32", "ff02::1/128",
		"169.254.1.1/16", "fe80::1/64", "255.255.255.255/32", "10.0.0.0/24", "10.0.0.255/24", "fd00::/64", "::ffff:10.0.0.5/128"} {
		if err := CheckPodIPs([]netip.Prefix{netip.MustParsePrefix(bad)}); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	if err := CheckPodIPs(nil); err == nil {
		t.Error("no address accepted")
	}
}
