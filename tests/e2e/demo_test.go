package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// demoCommand is `bin/bulkhead demo` as `make demo` runs it.
func demoCommand(ctx context.Context, t *testing.T) *exec.Cmd {
	t.Helper()
	privileged.Require(t)
	root := cnichain.RepoRoot(t)
	bin := filepath.Join(root, "bin", "bulkhead")
	fi, err := os.Stat(bin)
	if err != nil {
		t.Fatalf("bin/bulkhead missing (run `make build`): %v", err)
	}
	// A stale binary would test a demo that no longer exists.
	srcs, _ := filepath.Glob(filepath.Join(root, "demo", "*.go"))
	for _, s := range srcs {
		if si, err := os.Stat(s); err == nil && !strings.HasSuffix(s, "_test.go") && si.ModTime().After(fi.ModTime()) {
			t.Fatalf("bin/bulkhead is older than %s; run `make build`", s)
		}
	}
	cniBin := os.Getenv("BULKHEAD_CNI_BIN")
	if cniBin == "" {
		cniBin = cnichain.DefaultCNIBin
	}
	cmd := exec.CommandContext(ctx, bin, "demo", "--cni-bin", cniBin, "--bin-dir", filepath.Join(root, "bin"))
	// On timeout, Ctrl-C rather than SIGKILL, so that a hung demo still
	// cleans up what it made.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGINT) }
	cmd.WaitDelay = 30 * time.Second
	return cmd
}

var (
	demoPinsRE   = regexp.MustCompile(`(?m)^  pins    (/sys/fs/bpf/bulkhead-demo-([0-9a-f]+))$`)
	demoStoreRE  = regexp.MustCompile(`(?m)^  store   (\S+)/store$`)
	demoSubnetRE = regexp.MustCompile(`(?m)^  subnet  (\S+)$`)
)

// assertDemoLeftNothing checks, from what a demo run printed, that its
// namespaces, veths, routes, pins, agent, temporary files and subnet lock
// are gone. It looks only for what that run created (its ID, its subnet),
// because other packages' tests create namespaces and veths concurrently.
func assertDemoLeftNothing(t *testing.T, out string, demoPID int) {
	t.Helper()
	pins := demoPinsRE.FindStringSubmatch(out)
	store := demoStoreRE.FindStringSubmatch(out)
	subnetM := demoSubnetRE.FindStringSubmatch(out)
	if pins == nil || store == nil || subnetM == nil {
		t.Fatalf("demo output lacks its setup lines (pins, store, subnet):\n%s", out)
	}
	id := pins[2]
	subnet, err := netip.ParsePrefix(subnetM[1])
	if err != nil {
		t.Fatalf("subnet %q: %v", subnetM[1], err)
	}
	if _, err := os.Stat(pins[1]); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin dir %s left behind (%v)", pins[1], err)
	}
	if _, err := os.Stat(store[1]); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temp dir %s left behind (%v)", store[1], err)
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "bh-"+id+"-") {
			t.Errorf("netns /run/netns/%s left behind", e.Name())
		}
	}
	// ptp gives each host-side veth the gateway address of the pod subnet
	// and routes each pod's /32 to it: either one outliving the run is a
	// leaked veth. The kernel tears a deleted namespace down (and a veth
	// with it) asynchronously, so this waits a little before it complains.
	var leaks []string
	eventually(5*time.Second, func() bool {
		leaks = subnetLeaks(t, subnet)
		return len(leaks) == 0
	})
	for _, l := range leaks {
		t.Error(l)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), "bulkhead-demo-"+id) {
			t.Errorf("process %s still runs: %s", filepath.Base(filepath.Dir(p)), strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	lock := filepath.Join(os.TempDir(), "bulkhead-cnichain-subnets", strconv.Itoa(int(subnet.Addr().As4()[2])))
	if b, err := os.ReadFile(lock); err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(demoPID) {
		t.Errorf("subnet lock %s still held by the demo (pid %d)", lock, demoPID)
	}
}

// subnetLeaks lists links with an address in subnet, and routes into it.
func subnetLeaks(t *testing.T, subnet netip.Prefix) []string {
	t.Helper()
	var out []string
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_V4)
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && subnet.Contains(ip.Unmap()) {
				out = append(out, fmt.Sprintf("link %s (%s) left behind with %s from the demo subnet", l.Attrs().Name, l.Type(), ip))
			}
		}
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		if ip, ok := netip.AddrFromSlice(r.Dst.IP); ok && subnet.Contains(ip.Unmap()) {
			out = append(out, fmt.Sprintf("route %s left behind", r.Dst))
		}
	}
	return out
}

// TestMakeDemo runs the demo twice in a row, as a user who runs `make demo`
// again does: each run must pass its own self-check (exit 0) and leave
// nothing behind.
func TestMakeDemo(t *testing.T) {
	for run := 1; run <= 2; run++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		cmd := demoCommand(ctx, t)
		var out syncBuffer
		cmd.Stdout, cmd.Stderr = &out, &out
		start := time.Now()
		err := cmd.Run()
		cancel()
		if err != nil {
			t.Fatalf("run %d: bulkhead demo: %v\n%s", run, err, out.String())
		}
		t.Logf("run %d took %v", run, time.Since(start).Round(time.Millisecond))
		for _, want := range []string{"self-check passed", "spiffe://cluster.local/ns/ops/sa/debug", "DROPPED by BulkheadPolicy shop/no-ops ingress[0]", "AUDIT", "DENY",
			"ALERT BH-RT-002", "process  unshare -U true (pid", "<- /bin/sh -c unshare -U true"} {
			if !strings.Contains(out.String(), want) {
				t.Errorf("run %d: output lacks %q:\n%s", run, want, out.String())
			}
		}
		assertDemoSVIDTable(t, run, out.String())
		// Not a TTY: plain text.
		if strings.Contains(out.String(), "\x1b[") {
			t.Errorf("run %d: colour escapes in non-terminal output", run)
		}
		for i, line := range strings.Split(out.String(), "\n") {
			if len([]rune(line)) > 80 {
				t.Errorf("run %d: output line %d is %d columns: %q", run, i+1, len([]rune(line)), line)
			}
		}
		assertDemoLeftNothing(t, out.String(), cmd.Process.Pid)
	}
}

// demoSVIDHeading starts the demo's table of the pods' SVIDs.
const demoSVIDHeading = "== Their X.509-SVIDs, from the built-in CA"

// assertDemoSVIDTable checks that the demo printed, after the workloads,
// one SVID line per demo pod with its derived SPIFFE ID, a serial and the
// time left.
func assertDemoSVIDTable(t *testing.T, run int, out string) {
	t.Helper()
	_, table, ok := strings.Cut(out, demoSVIDHeading)
	if !ok {
		t.Errorf("run %d: no SVID table (%q) in:\n%s", run, demoSVIDHeading, out)
		return
	}
	table, _, _ = strings.Cut(table, "\n\n")
	pods := map[string]string{
		"shop/frontend": "spiffe://cluster.local/ns/shop/sa/frontend",
		"shop/api":      "spiffe://cluster.local/ns/shop/sa/api",
		"shop/db":       "spiffe://cluster.local/ns/shop/sa/db",
		"ops/debug":     "spiffe://cluster.local/ns/ops/sa/debug",
	}
	lineRE := regexp.MustCompile(`^  (\S+)\s+(spiffe://\S+)\s+([0-9a-f]+…?)\s+in \d+ min$`)
	seen := map[string]bool{}
	for _, l := range strings.Split(table, "\n") {
		m := lineRE.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		if want, ok := pods[m[1]]; ok && m[2] == want {
			seen[m[1]] = true
		}
	}
	for pod, id := range pods {
		if !seen[pod] {
			t.Errorf("run %d: SVID table lacks %s with %s:\n%s%s", run, pod, id, demoSVIDHeading, table)
		}
	}
}

// TestDemoInterrupted sends Ctrl-C (SIGINT) in the middle of the policy
// steps: the demo must stop with a non-zero exit and still clean up.
func TestDemoInterrupted(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := demoCommand(ctx, t)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	reached := make(chan struct{})
	scanned := make(chan struct{})
	var once sync.Once
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			out.Write([]byte(sc.Text() + "\n"))
			if strings.HasPrefix(sc.Text(), "== 2.") {
				once.Do(func() { close(reached) })
			}
		}
	}()
	select {
	case <-reached:
	case <-time.After(90 * time.Second):
		t.Fatalf("demo never reached step 2:\n%s", out.String())
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	pw.Close()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 0 {
		t.Fatalf("interrupted demo exited with %v, want a non-zero exit:\n%s", err, out.String())
	}
	<-scanned
	if !strings.Contains(out.String(), "interrupted") {
		t.Errorf("output does not say it was interrupted:\n%s", out.String())
	}
	assertDemoLeftNothing(t, out.String(), cmd.Process.Pid)
}
