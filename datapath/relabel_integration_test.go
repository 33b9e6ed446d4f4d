package datapath

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// TestIntegrationRelabelUnderTraffic is the example on real veths:
// pod x is relabelled back and forth between identities 257 and 258 under
// db's "allow all, deny tier=untrusted", and x is untrusted throughout, so
// both states drop every datagram x sends to db. x sends without pause while
// the applies run; not one datagram may arrive. Pod y, trusted in both
// states, sends too, and its datagrams must arrive: the probe works.
// db's policy also names many peers whose identities change with every
// apply, as a real relabel renumbers rules: each apply rewrites thousands
// of db's entries, which is when the old apply sequence had x's new identity
// live and db's old policy judging it.
func TestIntegrationRelabelUnderTraffic(t *testing.T) {
	tp := newTopo(t, 3)
	x, db, y := tp.pods[0], tp.pods[1], tp.pods[2]
	const port = 7000
	// Three sets of fillers in turn: the generation an apply writes always
	// holds another set, so every apply rewrites thousands of entries.
	state := func(xid identity.NumericID, round int) *policy.MapState {
		entries := []policy.Entry{
			{Direction: policy.Ingress, Peer: identity.IDNone, PortHi: 65535, Action: policy.ActionAllow, Rule: 1},
			{Direction: policy.Ingress, Peer: xid, PortHi: 65535, Action: policy.ActionDeny, Rule: 2},
		}
		entries = append(entries, fillers(identity.NumericID(10000+round%3*3000), 2000)...)
		ms := tp.state(uint64(xid), entries...)
		ms.IPCache[netip.PrefixFrom(x.ip4, 32)] = xid
		ms.IPCache[netip.PrefixFrom(x.ip6, 128)] = xid
		ms.Endpoints[x.ep].Identity = xid
		return ms
	}
	d := newTestDatapath(t, Config{})
	if _, err := d.Apply(state(257, 0)); err != nil {
		t.Fatal(err)
	}
	attach(t, d, tp)

	// db counts datagrams per source.
	var fromX, fromY atomic.Int64
	var pc net.PacketConn
	db.ns.Do(t, func() error {
		var err error
		pc, err = net.ListenPacket("udp4", netip.AddrPortFrom(db.ip4, port).String())
		return err
	})
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 64)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			switch netip.MustParseAddrPort(from.String()).Addr() {
			case x.ip4:
				fromX.Add(1)
			case y.ip4:
				fromY.Add(1)
			}
		}
	})
	t.Cleanup(func() { pc.Close(); wg.Wait() })

	var stop atomic.Bool
	var sent [2]atomic.Int64
	var senders sync.WaitGroup
	for i, p := range []*testPod{x, y} {
		var c net.Conn
		p.ns.Do(t, func() error {
			var err error
			c, err = net.Dial("udp4", netip.AddrPortFrom(db.ip4, port).String())
			return err
		})
		senders.Go(func() {
			defer c.Close()
			for n := 0; !stop.Load(); n++ {
				if _, err := c.Write([]byte("probe")); err == nil {
					sent[i].Add(1)
				}
				switch {
				case i == 1:
					time.Sleep(time.Millisecond) // y only shows the path works
				case n%32 == 31:
					// x leaves the applies some CPU: the machine may
					// have only two.
					time.Sleep(50 * time.Microsecond)
				}
			}
		})
	}

	start := time.Now()
	applies := 0
	var applying time.Duration
	for xid := identity.NumericID(258); applies < 16 || time.Since(start) < time.Second; xid = 257 + 258 - xid {
		t0 := time.Now()
		_, err := d.Apply(state(xid, applies+1))
		applying += time.Since(t0)
		if err != nil {
			stop.Store(true)
			senders.Wait()
			t.Fatal(err)
		}
		applies++
		time.Sleep(5 * time.Millisecond)
	}
	stop.Store(true)
	senders.Wait()
	time.Sleep(100 * time.Millisecond) // datagrams in flight
	t.Logf("%d relabels in %s (%s in Apply); x sent %d datagrams, %d arrived; y sent %d, %d arrived",
		applies, time.Since(start).Round(time.Millisecond), applying.Round(time.Millisecond),
		sent[0].Load(), fromX.Load(), sent[1].Load(), fromY.Load())
	if fromY.Load() == 0 {
		t.Fatal("no datagram from y arrived: the probe does not work")
	}
	if sent[0].Load() < 1000 {
		t.Fatalf("x sent only %d datagrams", sent[0].Load())
	}
	if n := fromX.Load(); n > 0 {
		t.Errorf("%d datagrams from x reached db, which both the old and the new state deny", n)
	}
}
