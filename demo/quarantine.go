package demo

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/bulkhead-io/bulkhead/agent/cli"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// The quarantine step: frontend, compromised, opens a node's password
// hashes (alerted), reaches for the node's container runtime socket
// (blocked in the kernel) and then scans db. The
// scan (BH-RT-016, seen in the datapath's drops) quarantines it: its
// traffic is cut in the datapath, each drop names the alert, and the
// release gives it back.

const quarantineTitle = "7. The answer: Block, then quarantine"

var quarantineStory = []string{
	"frontend, compromised, grabs credentials, reaches for the node's",
	"container runtime and scans. The shop's BulkheadRuntimePolicy (in the",
	"store since the start) blocks the runtime socket and quarantines a scan.",
}

const runtimePolicyFile = "05-runtime.yaml"

const runtimePolicyYAML = `apiVersion: bulkhead.io/v1alpha1
kind: BulkheadRuntimePolicy
metadata: {name: frontend-lockdown, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: frontend}}}
  detections:
  - {rule: BH-RT-007, action: Block}       # a container runtime socket
  - {rule: BH-RT-016, action: Quarantine}  # a scan
`

// scanPorts are the ports of db that frontend knocks on: none is open to
// it, and there are more than the scan rule's threshold.
const scanFirst, scanPorts = 5400, 30

func (r *run) quarantine(ctx context.Context) error {
	r.p.heading(quarantineTitle)
	for _, line := range quarantineStory {
		r.p.say("  " + line)
	}
	r.p.note(indent(strings.TrimRight(runtimePolicyYAML, "\n"), "    "))
	front, api, db := r.byRef["shop/frontend"], r.byRef["shop/api"], r.byRef["shop/db"]
	web := Port{8080, "TCP"}
	if ok, err := front.probe(api.ip, web, probeTimeout); err != nil || !ok {
		return fmt.Errorf("%w: frontend -> api %s before the quarantine: want allowed (%v)", ErrSelfCheck, web, err)
	}

	// A node's password hashes, as a hostPath mount would show them: a
	// stand-in file the demo makes (the host's own is never opened).
	shadow := filepath.Join(r.dir, "host", "etc", "shadow")
	if err := os.MkdirAll(filepath.Dir(shadow), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(shadow, []byte("root:*:20000:0:99999:7:::\n"), 0o600); err != nil {
		return err
	}
	r.p.note(fmt.Sprintf("    frontend$ cat %s", shadow))
	since := time.Now()
	// A process of the pod: this thread joined the pod's netns from
	// outside, as a runtime's set-up does, and such threads' opens are
	// not the pod's (see Runtime detection in the README).
	err := front.netns.Do(func(ns.NetNS) error {
		return exec.CommandContext(ctx, "cat", shadow).Run()
	})
	if err != nil {
		return fmt.Errorf("read the shadow stand-in: %w", err)
	}
	al, err := r.waitAlert(ctx, since, func(a *detect.Alert) bool {
		return a.RuleID == detect.RuleShadow.ID && a.Pod.Pod == "frontend"
	})
	if err != nil {
		return err
	}
	r.showAlert(al)

	// A runtime socket on the node: a unix socket named as containerd's.
	sock := filepath.Join(r.dir, "containerd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("runtime socket stand-in: %w", err)
	}
	defer ln.Close()
	r.p.note(fmt.Sprintf("    frontend$ connect(%s)", sock))
	since = time.Now()
	err = front.netns.Do(func(ns.NetNS) error {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
		}
		return err
	})
	if !errors.Is(err, syscall.EPERM) {
		return fmt.Errorf("%w: frontend's connect to the runtime socket: %v, want EPERM from the cgroup hook", ErrSelfCheck, err)
	}
	al, err = r.waitAlert(ctx, since, func(a *detect.Alert) bool {
		return a.RuleID == detect.RuleRuntimeSocket.ID && a.Pod.Pod == "frontend"
	})
	if err != nil {
		return err
	}
	r.showAlert(al)
	r.p.good(fmt.Sprintf("  check: connect failed with EPERM, the alert says %s (%s)", al.Action, al.ActionResult))

	r.p.note(fmt.Sprintf("    frontend$ for port in $(seq %d %d); do connect db:$port; done", scanFirst, scanFirst+scanPorts-1))
	since = time.Now()
	var wg sync.WaitGroup
	for i := range scanPorts {
		wg.Go(func() { _, _ = front.probe(db.ip, Port{uint16(scanFirst + i), "TCP"}, probeTimeout) })
	}
	wg.Wait()
	al, err = r.waitAlert(ctx, since, func(a *detect.Alert) bool {
		return a.RuleID == detect.RuleScan.ID && a.Pod.Pod == "frontend"
	})
	if err != nil {
		return err
	}
	r.showAlert(al)
	if al.Quarantine != "quarantined" {
		return fmt.Errorf("%w: the scan alert says quarantine %q, want quarantined", ErrSelfCheck, al.Quarantine)
	}

	// The cut, with real traffic, and its records (looked for from before
	// the scan: a record's time has the kernel tick's resolution, and only
	// this probe goes from frontend to api while it is quarantined).
	if ok, err := front.probe(api.ip, web, probeTimeout); err != nil || ok {
		return fmt.Errorf("%w: frontend -> api %s while quarantined: want dropped (%v)", ErrSelfCheck, web, err)
	}
	f, err := r.waitFlow(ctx, since, func(f *flows.Flow) bool {
		return f.DropReasonDesc == flows.DropQuarantined && isPod(f.Source, "shop", "frontend") && isPod(f.Destination, "shop", "api")
	})
	if err != nil {
		return err
	}
	if f.Quarantine == nil || f.Quarantine.AlertID != al.ID {
		return fmt.Errorf("%w: the drop record does not name alert %s: %+v", ErrSelfCheck, al.ID, f.Quarantine)
	}
	r.p.say("  frontend -> api 8080/TCP, allowed by policy, is now dropped:")
	// The compact line, cut before its verdict to fit 80 columns.
	line := flows.Compact(f, false)
	if i := strings.Index(line, " DROPPED "); i > 0 {
		r.p.say("    " + r.p.paint(styleRed, line[:i]))
		line = "  " + line[i+1:]
	}
	r.p.say("    " + r.p.paint(styleRed, line))
	r.p.good("  check: the pod's allowed traffic is cut, and each drop names the alert")

	// `bulkhead quarantine list`, narrowed to 80 columns.
	l, err := r.client.ListQuarantines(ctx)
	if err != nil {
		return fmt.Errorf("list quarantines: %w", err)
	}
	r.p.say("  $ bulkhead quarantine list")
	tw := tabwriter.NewWriter(r.p.w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  POD\tSINCE\tBY")
	for _, q := range l.Quarantines {
		fmt.Fprintf(tw, "  %s/%s\t%s ago\talert %s %s\n", q.Pod.Namespace, q.Pod.Name,
			time.Since(q.Since).Round(time.Second), q.AlertID, q.RuleID)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var b strings.Builder
	if err := cli.ReleaseQuarantine(ctx, r.client, &b, "shop/frontend", cli.FormatText); err != nil {
		return err
	}
	r.p.say("  $ bulkhead quarantine release shop/frontend")
	r.p.say("  " + strings.TrimRight(b.String(), "\n"))
	if ok, err := front.probe(api.ip, web, probeTimeout); err != nil || !ok {
		return fmt.Errorf("%w: frontend -> api %s after the release: want allowed (%v)", ErrSelfCheck, web, err)
	}
	r.p.good("  check: after the release frontend reaches api again")
	r.p.note("  A quarantine outlives an agent restart (the pinned map keeps it, the")
	r.p.note("  endpoint's record restores it). DNS to --quarantine-dns resolvers")
	r.p.note("  still passes, so the pod can be inspected but reaches nothing else.")
	return nil
}
