package agent

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// TestQuarantineOnAlert (issue 14): a BulkheadRuntimePolicy answers a rule
// with Quarantine. When a pod breaks the rule, real traffic shows the cut:
// its open connection dies and new ones fail, but DNS to the listed
// resolver still works. The alert says the pod was quarantined; each drop's
// record says QUARANTINED and names the alert. The quarantine survives an
// agent restart; `release` restores the traffic. An operator's quarantine
// names its reason instead.
func TestQuarantineOnAlert(t *testing.T) {
	privileged.Require(t)
	unmountTracefsAfter(t)
	flowLog := filepath.Join(t.TempDir(), "flows.log")
	p := startPodPair(t, 217, `apiVersion: bulkhead.io/v1alpha1
kind: BulkheadRuntimePolicy
metadata: {name: cut-off, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: a}}}
  detections:
  - {rule: BH-RT-005, action: Quarantine}
`, func(c *Config) {
		runtimeTune(c, flowLog)
		c.QuarantineDNS = []netip.Addr{netip.MustParseAddr("10.217.0.2")}
	})
	a, stop, ctx, inPod := p.a, p.stop, context.Background(), p.inPod
	reqA, reqB, ipB := p.reqA, p.reqB, p.ipB
	// b serves TCP on 8080 and answers DNS-sized UDP on 53.
	serveEcho(t, inPod, reqB.Netns, ipB+":8080", ipB+":53")
	dial := func() (net.Conn, error) { return dialFrom(inPod, reqA.Netns, ipB+":8080") }
	echo := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(500 * time.Millisecond))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		_, err := c.Read(make([]byte, 4))
		return err
	}
	dns := func() error {
		var err error
		inPod(reqA.Netns, func() error {
			var c net.Conn
			if c, err = net.Dial("udp", ipB+":53"); err != nil {
				return nil
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(500 * time.Millisecond))
			if _, err = c.Write([]byte("query")); err == nil {
				_, err = c.Read(make([]byte, 16))
			}
			return nil
		})
		return err
	}
	keep, err := dial()
	if err != nil {
		t.Fatalf("dial before the alert: %v", err)
	}
	defer keep.Close()
	if err := echo(keep); err != nil {
		t.Fatalf("echo before the alert: %v", err)
	}

	var nsSt unix.Stat_t
	if err := unix.Stat(reqA.Netns, &nsSt); err != nil {
		t.Fatal(err)
	}
	waitWatched(t, a.sysmon.mon, uint32(nsSt.Ino), true)
	tid := bpfFromPod(t, reqA.Netns)
	al := waitAlert(t, flowLog, func(al detect.Alert) bool { return al.TID == tid })
	if al.RuleID != detect.RuleBPF.ID || al.Quarantine != "quarantined" || al.ID == "" || al.Pod.Pod != "a" {
		t.Fatalf("alert %+v", al)
	}
	if err := echo(keep); err == nil {
		t.Error("the open connection still works after the quarantine")
	}
	if c, err := dial(); err == nil {
		c.Close()
		t.Error("a new connection from the quarantined pod succeeded")
	}
	if err := dns(); err != nil {
		t.Errorf("DNS to the listed resolver while quarantined: %v", err)
	}
	// The drops' records say QUARANTINED and name the alert.
	var drop *flows.Flow
	for deadline := time.Now().Add(5 * time.Second); drop == nil && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		for _, f := range a.hub.Last(0, nil) {
			if f.DropReasonDesc == flows.DropQuarantined && f.Source.PodName == "a" {
				drop = f
			}
		}
	}
	if drop == nil {
		t.Fatal("no QUARANTINED drop of pod a recorded")
	}
	if drop.Quarantine == nil || drop.Quarantine.AlertID != al.ID || drop.Quarantine.RuleID != detect.RuleBPF.ID {
		t.Errorf("drop record's quarantine %+v, want alert %s", drop.Quarantine, al.ID)
	}
	t.Logf("%s", flows.Compact(drop, false))
	if raw := readFile(t, flowLog); !strings.Contains(raw, `"drop_reason_desc":"QUARANTINED"`) || !strings.Contains(raw, `"alert_id":"`+al.ID+`"`) {
		t.Errorf("the flow log has no QUARANTINED record naming alert %s", al.ID)
	}
	list, err := a.ListQuarantines(ctx)
	if err != nil || len(list.Quarantines) != 1 || list.Quarantines[0].Pod.Name != "a" || list.Quarantines[0].AlertID != al.ID {
		t.Fatalf("quarantines: %+v %v", list, err)
	}
	if n := gaugeMetric(t, a, "bulkhead_quarantined_endpoints"); n != 1 {
		t.Errorf("bulkhead_quarantined_endpoints %v, want 1", n)
	}
	// A restarted agent keeps it. b's slot is set as an agent that
	// stopped before writing the record would have left it: it is kept
	// too, with a record that says so.
	var bID policy.EndpointID
	for id, rec := range a.view.Load().endpoints {
		if rec.Pod.Name == "b" {
			bID = id
		}
	}
	if err := a.dp.SetQuarantine(bID, 4242); err != nil {
		t.Fatal(err)
	}
	stop()
	cfg := a.cfg
	a, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	startTestAgent(t, a)
	if c, err := dial(); err == nil {
		c.Close()
		t.Error("a new connection succeeded after the agent restarted")
	}
	if list, err := a.ListQuarantines(ctx); err != nil || len(list.Quarantines) != 2 || list.Quarantines[0].AlertID != al.ID ||
		list.Quarantines[1].Pod.Name != "b" || !strings.Contains(list.Quarantines[1].Reason, "no record") {
		t.Fatalf("quarantines after the restart: %+v %v", list, err)
	}
	if _, err := a.ReleaseQuarantine(ctx, api.QuarantineReleaseRequest{Pod: api.PodRef{Namespace: "shop", Name: "b"}}); err != nil {
		t.Fatal(err)
	}
	resp, err := a.ReleaseQuarantine(ctx, api.QuarantineReleaseRequest{Pod: api.PodRef{Namespace: "shop", Name: "a"}})
	if err != nil || !resp.Changed {
		t.Fatalf("release: %+v %v", resp, err)
	}
	if c, err := dial(); err != nil {
		t.Errorf("dial after release: %v", err)
	} else {
		c.Close()
	}
	if resp, err := a.ReleaseQuarantine(ctx, api.QuarantineReleaseRequest{Pod: api.PodRef{Namespace: "shop", Name: "a"}}); err != nil || resp.Changed {
		t.Errorf("second release: %+v %v", resp, err)
	}

	// By hand: the records name the operator's reason.
	if resp, err := a.Quarantine(ctx, api.QuarantineRequest{Pod: api.PodRef{Namespace: "shop", Name: "b"}, Reason: "incident 7"}); err != nil || !resp.Changed {
		t.Fatalf("quarantine b: %+v %v", resp, err)
	}
	if c, err := dial(); err == nil {
		c.Close()
		t.Error("a connection to a quarantined pod succeeded")
	}
	if _, err := a.Quarantine(ctx, api.QuarantineRequest{Pod: api.PodRef{Namespace: "shop", Name: "nobody"}, Reason: "x"}); err == nil {
		t.Error("quarantining a pod with no endpoint here succeeded")
	}
	// DEL forgets it with the endpoint.
	if _, err := a.DeleteEndpoint(ctx, api.EndpointDelRequest{EndpointKey: reqB.EndpointKey}); err != nil {
		t.Fatal(err)
	}
	if list, _ := a.ListQuarantines(ctx); len(list.Quarantines) != 0 {
		t.Errorf("quarantines after b's DEL: %+v", list)
	}
	if got := a.dp.QuarantinedEndpoints(); len(got) != 0 {
		t.Errorf("datapath slots after b's DEL: %v", got)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func gaugeMetric(t *testing.T, a *Agent, name string) float64 {
	t.Helper()
	mfs, err := a.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	return -1
}

// serveEcho serves TCP echo on tcpAddr and UDP echo on udpAddr (empty:
// none) in the pod's netns, until the test ends.
func serveEcho(t *testing.T, inPod func(string, func() error), netns, tcpAddr, udpAddr string) {
	t.Helper()
	var tcpLn net.Listener
	var udpLn net.PacketConn
	inPod(netns, func() (err error) {
		if tcpLn, err = net.Listen("tcp", tcpAddr); err != nil || udpAddr == "" {
			return err
		}
		udpLn, err = net.ListenPacket("udp", udpAddr)
		return err
	})
	t.Cleanup(func() { tcpLn.Close() })
	go func() {
		for {
			c, err := tcpLn.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	if udpLn == nil {
		return
	}
	t.Cleanup(func() { udpLn.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := udpLn.ReadFrom(buf)
			if err != nil {
				return
			}
			udpLn.WriteTo(buf[:n], from)
		}
	}()
}

// dialFrom connects from the pod's netns, giving up after half a second.
func dialFrom(inPod func(string, func() error), netns, addr string) (net.Conn, error) {
	var c net.Conn
	var err error
	inPod(netns, func() error {
		c, err = net.DialTimeout("tcp", addr, 500*time.Millisecond)
		return nil
	})
	return c, err
}

// TestScanQuarantined (issue 14): pod a knocks on 30 ports of pod b that
// b's policy does not open (denied at b's ingress, on this node). The
// agent sees the scan in the drop events (BH-RT-016, no syscall hook makes
// it) and, as a BulkheadRuntimePolicy asks, quarantines a: its allowed
// connection to b stops working. Fewer denied destinations than the
// threshold raise nothing.
func TestScanQuarantined(t *testing.T) {
	privileged.Require(t)
	unmountTracefsAfter(t)
	flowLog := filepath.Join(t.TempDir(), "flows.log")
	p := startPodPair(t, 218, `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 8080}]
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadRuntimePolicy
metadata: {name: no-scans, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: a}}}
  detections:
  - {rule: BH-RT-016, action: Quarantine}
`, func(c *Config) { runtimeTune(c, flowLog) })
	a, ctx, inPod := p.a, context.Background(), p.inPod
	reqA, reqB, ipB := p.reqA, p.reqB, p.ipB
	serveEcho(t, inPod, reqB.Netns, ipB+":8080", "")
	if c, err := dialFrom(inPod, reqA.Netns, ipB+":8080"); err != nil {
		t.Fatalf("allowed connection before the scan: %v", err)
	} else {
		c.Close()
	}
	knock := func(from, to int) {
		var wg sync.WaitGroup
		for port := from; port < to; port++ {
			wg.Go(func() {
				if c, err := dialFrom(inPod, reqA.Netns, net.JoinHostPort(ipB, strconv.Itoa(port))); err == nil {
					c.Close()
				}
			})
		}
		wg.Wait()
	}
	since := time.Now()
	knock(9000, 9010) // 10 denied destinations: under the threshold
	time.Sleep(300 * time.Millisecond)
	readAlerts(t, flowLog, func(al detect.Alert) {
		if al.RuleID == detect.RuleScan.ID {
			t.Errorf("10 denied destinations raised %+v", al)
		}
	})
	knock(9010, 9030)
	al := waitAlert(t, flowLog, func(al detect.Alert) bool { return al.RuleID == detect.RuleScan.ID && !al.Time.Before(since) })
	if al.Pod.Pod != "a" || al.Quarantine != "quarantined" || al.Technique != "T1046" || al.Args["addresses"] != ipB {
		t.Errorf("scan alert %+v", al)
	}
	if n, _ := strconv.Atoi(al.Args["denied_destinations"]); n < detect.DefaultScanThreshold {
		t.Errorf("scan alert names %d destinations", n)
	}
	if c, err := dialFrom(inPod, reqA.Netns, ipB+":8080"); err == nil {
		c.Close()
		t.Error("the scanning pod still reaches b:8080 after its quarantine")
	}
	if list, err := a.ListQuarantines(ctx); err != nil || len(list.Quarantines) != 1 || list.Quarantines[0].RuleID != detect.RuleScan.ID {
		t.Errorf("quarantines: %+v %v", list, err)
	}
}

// runtimeTune turns runtime detection on, with alerts in flowLog and a
// fast watch reconcile.
func runtimeTune(c *Config, flowLog string) {
	c.RuntimeDetection, c.FlowLog, c.RuntimeResync = true, flowLog, 100*time.Millisecond
}
