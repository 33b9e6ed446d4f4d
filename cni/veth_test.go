package cni_test

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"path/filepath"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/bulkhead-io/bulkhead/cni"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

func newNS(t *testing.T) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() {
		_ = n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			t.Errorf("remove netns: %v", err)
		}
	})
	return n
}

func linkName(t *testing.T, prefix string) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return prefix + hex.EncodeToString(b)
}

// vethInto creates a veth pair in the current netns named host/tmp, moves
// tmp into target and renames it to ifName there. The host end is deleted
// when t ends (which deletes both ends).
func vethInto(t *testing.T, host string, target ns.NetNS, ifName string) (hostIndex, podIndex int) {
	t.Helper()
	tmp := linkName(t, "bht")
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: host}, PeerName: tmp}); err != nil {
		t.Fatalf("add veth %s: %v", host, err)
	}
	hl, err := netlink.LinkByName(host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByIndex(hl.Attrs().Index); err == nil && l.Attrs().Name == host {
			_ = netlink.LinkDel(l)
		}
	})
	pl, err := netlink.LinkByName(tmp)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetNsFd(pl, int(target.Fd())); err != nil {
		t.Fatalf("move %s: %v", tmp, err)
	}
	err = target.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(tmp)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetName(l, ifName); err != nil {
			return err
		}
		podIndex = l.Attrs().Index
		return netlink.LinkSetUp(l)
	})
	if err != nil {
		t.Fatalf("set up %s in netns: %v", ifName, err)
	}
	return hl.Attrs().Index, podIndex
}

func TestFindVethPeer(t *testing.T) {
	privileged.Require(t)
	podA, podB := newNS(t), newNS(t)
	hostA, hostB := linkName(t, "bhva"), linkName(t, "bhvb")
	idxA, podIdxA := vethInto(t, hostA, podA, "eth0")
	idxB, _ := vethInto(t, hostB, podB, "eth0")

	for _, tt := range []struct {
		netns     ns.NetNS
		host      string
		hostIndex int
	}{{podA, hostA, idxA}, {podB, hostB, idxB}} {
		p, err := cni.FindVethPeer(tt.netns.Path(), "eth0")
		if err != nil {
			t.Fatalf("FindVethPeer(%s): %v", tt.netns.Path(), err)
		}
		if p.HostIfName != tt.host || p.HostIfIndex != tt.hostIndex || p.PodIfName != "eth0" || p.PodIfIndex <= 0 {
			t.Errorf("FindVethPeer(%s) = %+v, want host %s/%d", tt.netns.Path(), p, tt.host, tt.hostIndex)
		}
	}

	// Names are not trusted: renaming the host side changes nothing but
	// the reported name.
	renamed := linkName(t, "zz")
	l, err := netlink.LinkByIndex(idxA)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetName(l, renamed); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(renamed); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	p, err := cni.FindVethPeer(podA.Path(), "eth0")
	if err != nil || p.HostIfName != renamed || p.HostIfIndex != idxA || p.PodIfIndex != podIdxA {
		t.Errorf("after rename: %+v, %v; want %s/%d", p, err, renamed, idxA)
	}
}

func TestFindVethPeerRejects(t *testing.T) {
	privileged.Require(t)
	pod, other := newNS(t), newNS(t)

	// A veth whose peer is in another pod's netns, not the host: the
	// peer index means nothing in the host netns.
	err := pod.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth1"}, PeerName: "peer1"}); err != nil {
			return err
		}
		l, err := netlink.LinkByName("peer1")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(l, int(other.Fd())); err != nil {
			return err
		}
		return netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}})
	})
	if err != nil {
		t.Fatalf("set up netns: %v", err)
	}

	tests := []struct {
		name   string
		netns  string
		ifName string
		want   error
	}{
		{"peer in another netns", pod.Path(), "eth1", cni.ErrPeerMismatch},
		{"not a veth", pod.Path(), "br0", cni.ErrNotVeth},
		{"no such interface", pod.Path(), "eth9", cni.ErrLinkNotFound},
		{"no such netns", filepath.Join(t.TempDir(), "gone"), "eth0", cni.ErrNetnsGone},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := cni.FindVethPeer(tt.netns, tt.ifName)
			if !errors.Is(err, tt.want) {
				t.Fatalf("FindVethPeer = %+v, %v; want %v", p, err, tt.want)
			}
		})
	}
}
