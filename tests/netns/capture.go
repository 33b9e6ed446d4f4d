package netns

import (
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/bulkhead-io/bulkhead/demo/wiretap"
)

// Capture and Segment are the demo's wire recorder, which the tests share.
type (
	Capture = wiretap.Capture
	Segment = wiretap.Segment
)

// TCP flag bits, as in the TCP header.
const (
	TCPFin = wiretap.TCPFin
	TCPSyn = wiretap.TCPSyn
	TCPRst = wiretap.TCPRst
	TCPPsh = wiretap.TCPPsh
	TCPAck = wiretap.TCPAck
)

// StartCapture records every frame that crosses ifname in namespace n (the
// socket is made on a locked thread that entered n) until Stop or the end
// of the test.
func StartCapture(t testing.TB, n ns.NetNS, ifname string) *Capture {
	t.Helper()
	var c *Capture
	err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = wiretap.Open(ifname)
		return err
	})
	if err != nil {
		t.Fatalf("capture in %s: %v", n.Path(), err)
	}
	t.Cleanup(c.Stop)
	return c
}
