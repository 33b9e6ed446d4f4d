package demo

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/demo/wiretap"
)

// The mTLS step: api and db are enrolled, and db takes frontend only through
// the tunnel. What it shows: a tunnelled connection with its verified
// SPIFFE ID in the flow record, a plaintext attempt dropped in the kernel
// with AUTH_REQUIRED, and only TLS on the tunnel's port.

// mtlsTitle and the rest are the step as the user reads it.
const mtlsTitle = "5. mTLS: api and db talk through the tunnel; plaintext is dropped"

var mtlsStory = []string{
	"api and db get the label bulkhead.io/mtls=enabled: their TCP goes",
	"through the node's tunnel (TLS 1.3, each pod's own SVID, HTTP/2",
	"CONNECT on port 15008), and db judges it by the verified SPIFFE ID.",
	"db also takes frontend, which is not enrolled, with mtls: Required:",
	"its plaintext is dropped in the kernel.",
}

// mtlsWorkloads is workloadsYAML with api and db enrolled.
func mtlsWorkloads() string {
	out := workloadsYAML
	for _, app := range []string{"api", "db"} {
		old := fmt.Sprintf("namespace: shop, labels: {app: %s}}", app)
		out = strings.Replace(out, old, fmt.Sprintf("namespace: shop, labels: {app: %s, bulkhead.io/mtls: enabled}}", app), 1)
	}
	return out
}

const mtlsPolicyFile = "50-bhp-db-mtls.yaml"

const mtlsPolicyYAML = `apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: db-mtls, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: db}}}
  ingress:
  - from: [{spiffeID: "spiffe://cluster.local/ns/shop/sa/frontend"}]
    ports: [{port: 8080, protocol: TCP}]
    mtls: Required
`

// mtlsWithin bounds the wait for the tunnelled connection to work after
// the store changed (the labels change identities, then the policy applies).
const mtlsWithin = 10 * time.Second

func (r *run) mtls(ctx context.Context) error {
	r.p.heading(mtlsTitle)
	for _, line := range mtlsStory {
		r.p.say("  " + line)
	}
	r.p.note(indent(strings.TrimRight(mtlsPolicyYAML, "\n"), "    "))
	rev, err := r.revision(ctx)
	if err != nil {
		return err
	}
	if err := r.writeStore("00-workloads.yaml", mtlsWorkloads()); err != nil {
		return err
	}
	if err := r.writeStore(mtlsPolicyFile, mtlsPolicyYAML); err != nil {
		return err
	}
	if err := r.waitApplied(ctx, rev); err != nil {
		return err
	}
	api, db, frontend := r.byRef["shop/api"], r.byRef["shop/db"], r.byRef["shop/frontend"]

	// The tunnel between the pods of one node is the node's own: it dials
	// its listener over loopback, so that is where the bytes are.
	tap, err := wiretap.Open("lo")
	if err != nil {
		return err
	}
	secret := fmt.Appendf(nil, "demo-secret-%s", r.id)
	since := time.Now().Add(-20 * time.Millisecond)
	deadline := time.Now().Add(mtlsWithin)
	var echoed bool
	for !echoed && time.Now().Before(deadline) {
		echoed = sendSecret(api, db.ip, secret) == nil
		if !echoed {
			time.Sleep(200 * time.Millisecond)
		}
	}
	tap.Stop()
	if !echoed {
		return fmt.Errorf("%w: api -> db 8080/TCP did not work through the tunnel within %v", ErrSelfCheck, mtlsWithin)
	}
	tunnelled, err := r.waitFlow(ctx, since, func(f *flows.Flow) bool {
		return f.MTLS && f.TrafficDirection == flows.DirectionIngress && f.Verdict == flows.VerdictForwarded &&
			isPod(f.Destination, "shop", "db") && f.Source != nil && f.Source.SPIFFEID == "spiffe://cluster.local/ns/shop/sa/api"
	})
	if err != nil {
		return err
	}
	r.p.say("  api -> db 8080/TCP works; db's record, judged by the verified ID:")
	r.p.note(fmt.Sprintf("    %s %s, \"mtls\":true, from %s", tunnelled.Verdict, tunnelled.TrafficDirection, tunnelled.IP.Source))
	r.p.note("    source.spiffe_id " + tunnelled.Source.SPIFFEID)
	r.p.note("    decided by " + tunnelled.Decider())

	hs, data := tlsRecords(tap.Segments(), 15008)
	if hs+data == 0 || tap.Contains(secret) {
		return fmt.Errorf("%w: on port 15008 %d TLS handshake and %d data records; payload in the clear: %v",
			ErrSelfCheck, hs, data, tap.Contains(secret))
	}
	r.p.say(fmt.Sprintf("  on the wire (port 15008): %d TLS handshake and %d application-data", hs, data))
	r.p.say(fmt.Sprintf("  records; %q never appears in the clear", secret))

	since = time.Now().Add(-20 * time.Millisecond)
	if ok, err := frontend.probe(db.ip, Port{8080, "TCP"}, probeTimeout); err != nil {
		return err
	} else if ok {
		return fmt.Errorf("%w: frontend reached db in plaintext, which only an mtls: Required rule allows", ErrSelfCheck)
	}
	dropped, err := r.waitFlow(ctx, since, func(f *flows.Flow) bool {
		return f.Verdict == flows.VerdictDropped && f.DropReasonDesc == "AUTH_REQUIRED" && isPod(f.Destination, "shop", "db")
	})
	if err != nil {
		return err
	}
	r.p.say("  frontend -> db 8080/TCP in plaintext: dropped by db's datapath:")
	r.p.note(fmt.Sprintf("    %s %s, drop_reason_desc %s", dropped.Verdict, dropped.TrafficDirection, dropped.DropReasonDesc))
	r.p.note("    the rule that wants mTLS: " + dropped.Decider())
	r.p.good("  check: tunnelled and verified, TLS only on the wire, plaintext dropped")
	return nil
}

// tlsRecords counts the segments to or from port that begin with a TLS
// record header (handshake 0x16 or application data 0x17, version 3.x).
// Loopback shows each segment twice, leaving and arriving: both counts
// are doubled alike.
func tlsRecords(segs []wiretap.Segment, port uint16) (handshake, data int) {
	for _, s := range segs {
		if !s.Port(port) || len(s.Payload) < 5 || s.Payload[1] != 3 {
			continue
		}
		switch s.Payload[0] {
		case 0x16:
			handshake++
		case 0x17:
			data++
		}
	}
	return handshake, data
}

// sendSecret sends secret from p to to:8080 and expects it echoed.
func sendSecret(p *pod, to netip.Addr, secret []byte) error {
	var c net.Conn
	err := p.netns.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout("tcp4", netip.AddrPortFrom(to, 8080).String(), time.Second)
		return err
	})
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write(secret); err != nil {
		return err
	}
	buf := make([]byte, len(secret))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != string(secret) {
		return fmt.Errorf("echo differs")
	}
	return nil
}

func isPod(e *flows.Endpoint, ns, name string) bool {
	return e != nil && e.Namespace == ns && e.PodName == name
}

// waitFlow waits up to flowsWithin for a record since a time that match
// accepts.
func (r *run) waitFlow(ctx context.Context, since time.Time, match func(*flows.Flow) bool) (*flows.Flow, error) {
	deadline := time.Now().Add(flowsWithin)
	for {
		fs, err := fetchFlows(ctx, r.client, since)
		if err != nil {
			return nil, err
		}
		for _, f := range fs {
			if match(f) {
				return f, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: no matching flow record within %v", ErrSelfCheck, flowsWithin)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
