package runtime

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// blockSetup is a monitor whose cgroup hooks are attached to a cgroup of
// the test's own (so nothing else on the machine runs them), a watched
// throwaway netns, and a reader.
type blockSetup struct {
	m     *Monitor
	rd    *Reader
	pod   *netns.NS
	ns    string
	ino   uint32
	cg    string
	ep    detect.Endpoint
	hooks map[string]error
}

func newBlockSetup(t *testing.T) *blockSetup {
	t.Helper()
	privileged.Require(t)
	cg, _ := testCgroup(t)
	m := newTestMonitor(t, Config{Cgroup: cg, NoModuleHook: true})
	for hook, err := range m.CgroupHooks() {
		if err != nil {
			privileged.Unsupported(t, "%s: %v", hook, err)
		}
	}
	pod := netns.New(t)
	s := &blockSetup{m: m, pod: pod, ns: pod.Path(), ino: nsInode(t, pod.Path()), cg: cg, hooks: m.CgroupHooks(),
		ep: detect.Endpoint{ID: "ep-b", Namespace: "shop", Pod: "cart-0", SPIFFEID: "spiffe://cluster.local/ns/shop/sa/cart"}}
	s.watch(t, detect.Actions{})
	rd, err := m.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	s.rd = rd
	return s
}

func (s *blockSetup) watch(t *testing.T, a detect.Actions) {
	t.Helper()
	ep := s.ep
	ep.Actions = a
	if err := s.m.Watch(s.ino, ep); err != nil {
		t.Fatal(err)
	}
}

// run runs the helper in the pod's netns and cgroup, expecting outcome
// ("ok" or "eperm"), and returns the alert of rule for its PID.
func (s *blockSetup) run(t *testing.T, action, outcome string, rule detect.Rule, env ...string) detect.Alert {
	t.Helper()
	env = append(env, helperCgroupEnv+"="+s.cg, helperExpectEnv+"="+outcome)
	pid := uint32(helper(t, action, s.ns, env...)[0])
	var alert detect.Alert
	waitEvent(t, s.rd, rule.ID+" from pid "+fmt.Sprint(pid), func(ev detect.Event) bool {
		if ev.PID != pid {
			return false
		}
		ep, _ := s.m.Endpoint(ev.Netns)
		for _, a := range detect.Detect(ev, ep) {
			if a.RuleID == rule.ID {
				alert = a
				return true
			}
		}
		return false
	})
	if alert.Pod.Pod != s.ep.Pod || alert.Pod.Netns != s.ino || alert.Technique != rule.Technique {
		t.Errorf("alert %+v: want pod %s netns %d technique %s", alert, s.ep.Pod, s.ino, rule.Technique)
	}
	return alert
}

// listen makes a unix socket listening at dir/name, closed when t ends.
func listen(t *testing.T, dir, name string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return path
}

// TestBlockRuntimeSocket: a connect to a socket named like containerd's
// (one the test made, never the real one) is reported, and denied with
// EPERM when the pod's action is Block. Other sockets pass untouched.
func TestBlockRuntimeSocket(t *testing.T) {
	s := newBlockSetup(t)
	dir := t.TempDir()
	sock := listen(t, dir, "containerd.sock")
	other := listen(t, dir, "mycontainerd.sock") // not a runtime socket: the name must follow a "/"
	rule := detect.RuleRuntimeSocket

	a := s.run(t, "connect-unix", "ok", rule, helperPathEnv+"="+sock)
	if a.Action != detect.ActionAlert || a.Args["path"] != sock || a.Syscall != "connect" {
		t.Errorf("alert-only: %+v", a)
	}
	s.watch(t, detect.Actions{Block: detect.Bit(rule.ID)})
	before, _ := s.m.Counters()
	a = s.run(t, "connect-unix", "eperm", rule, helperPathEnv+"="+sock)
	if a.Action != detect.ActionBlock || a.ActionResult != "denied" || a.Args["path"] != sock {
		t.Errorf("block: %+v", a)
	}
	if after, _ := s.m.Counters(); after.Blocked != before.Blocked+1 {
		t.Errorf("blocked counter %d → %d, want +1", before.Blocked, after.Blocked)
	}
	// Neither other sockets nor other namespaces are touched: a marker
	// event after them shows no alert came before it.
	pid := uint32(helper(t, "connect-unix", s.ns, helperCgroupEnv+"="+s.cg, helperExpectEnv+"=ok", helperPathEnv+"="+other)[0])
	unwatched := netns.New(t)
	helper(t, "connect-unix", unwatched.Path(), helperCgroupEnv+"="+s.cg, helperExpectEnv+"=ok", helperPathEnv+"="+sock)
	marker := uint32(helper(t, "bpf", s.ns)[0])
	_, seen := waitEvent(t, s.rd, "marker", func(ev detect.Event) bool { return ev.PID == marker })
	for _, ev := range seen {
		if ev.Kind == detect.KindConnectUnix {
			t.Errorf("connect_unix event for pid %d (other socket's pid %d): %+v", ev.PID, pid, ev)
		}
	}
}

// TestBlockRawSocket: raw IP sockets are reported, and denied under Block.
// AF_PACKET sockets (BH-RT-010, a tracepoint: sock_create does not run
// for them) are reported, and that rule's Block bit changes nothing.
func TestBlockRawSocket(t *testing.T) {
	s := newBlockSetup(t)
	rule := detect.RuleRawSocket
	a := s.run(t, "raw-socket", "ok", rule)
	if a.Action != detect.ActionAlert || a.Args["family"] != "AF_INET" || a.Args["type"] != "SOCK_RAW" {
		t.Errorf("alert-only raw: %+v", a)
	}
	a = s.run(t, "packet-socket", "ok", detect.RulePacketSocket)
	if a.Action != detect.ActionAlert || a.Args["family"] != "AF_PACKET" {
		t.Errorf("alert-only packet: %+v", a)
	}
	s.watch(t, detect.Actions{Block: detect.Bit(rule.ID)})
	a = s.run(t, "raw-socket", "eperm", rule)
	if a.Action != detect.ActionBlock || a.Syscall != "socket" || a.Args["type"] != "SOCK_RAW" {
		t.Errorf("block raw: %+v", a)
	}
}

// TestBlockSysctl: a write to a per-netns sysctl in the pod's throwaway
// netns is reported with its name and value, and denied under Block; the
// host's value never changes.
func TestBlockSysctl(t *testing.T) {
	s := newBlockSetup(t)
	const host = "/proc/sys/net/ipv4/tcp_fin_timeout"
	hostBefore, err := os.ReadFile(host)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if now, _ := os.ReadFile(host); string(now) != string(hostBefore) {
			t.Errorf("the host's %s changed: %q → %q", host, hostBefore, now)
		}
	}()
	rule := detect.RuleSysctlWrite
	a := s.run(t, "sysctl-write", "ok", rule)
	if a.Action != detect.ActionAlert || a.Args["name"] != "net/ipv4/tcp_fin_timeout" || a.Args["value"] == "" {
		t.Errorf("alert-only: %+v", a)
	}
	s.watch(t, detect.Actions{Block: detect.Bit(rule.ID)})
	a = s.run(t, "sysctl-write", "eperm", rule)
	if a.Action != detect.ActionBlock || a.Args["name"] != "net/ipv4/tcp_fin_timeout" {
		t.Errorf("block: %+v", a)
	}
}

// TestKill: with Kill for BH-RT-005, the process calling bpf() dies of
// SIGKILL and the alert says so.
func TestKill(t *testing.T) {
	m := newTestMonitor(t, Config{NoModuleHook: true})
	pod := netns.New(t)
	ino := nsInode(t, pod.Path())
	if err := m.Watch(ino, detect.Endpoint{Pod: "victim", Actions: detect.Actions{Kill: detect.Bit(detect.RuleBPF.ID)}}); err != nil {
		t.Fatal(err)
	}
	rd, err := m.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	pids, stderr, runErr := helperRun(t, "bpf", pod.Path())
	var ee *exec.ExitError
	if !errors.As(runErr, &ee) {
		t.Fatalf("helper: %v, want killed (stderr %s)", runErr, stderr)
	}
	ws := ee.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("helper ended with %v, want SIGKILL", ws)
	}
	pid := uint32(pids[0])
	var alert detect.Alert
	waitEvent(t, rd, "bpf alert", func(ev detect.Event) bool {
		if ev.PID != pid {
			return false
		}
		for _, a := range detect.Detect(ev, detect.Endpoint{Pod: "victim"}) {
			alert = a
			return true
		}
		return false
	})
	if alert.RuleID != detect.RuleBPF.ID || alert.Action != detect.ActionKill || alert.ActionResult != "sigkill queued" {
		t.Errorf("alert %+v", alert)
	}
	// An AF_PACKET socket under Kill for BH-RT-010.
	if err := m.Watch(ino, detect.Endpoint{Pod: "victim", Actions: detect.Actions{Kill: detect.Bit(detect.RulePacketSocket.ID)}}); err != nil {
		t.Fatal(err)
	}
	_, stderr, runErr = helperRun(t, "packet-socket", pod.Path(), helperExpectEnv+"=ok")
	if !errors.As(runErr, &ee) || !ee.Sys().(syscall.WaitStatus).Signaled() || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("packet-socket helper: %v, want SIGKILL (stderr %s)", runErr, stderr)
	}
	// An exec rule under Kill (BH-RT-012): the memfd program dies at exec,
	// before it runs, and its alert says kill; the process that exec'd
	// from disk before it lives.
	if err := m.Watch(ino, detect.Endpoint{Pod: "victim", Actions: detect.Actions{Kill: detect.Bit(detect.RuleFilelessExec.ID)}}); err != nil {
		t.Fatal(err)
	}
	pids, stderr, runErr = helperRun(t, "memfd-exec", pod.Path())
	if runErr == nil || !strings.Contains(stderr, "signal: killed") {
		t.Errorf("memfd-exec helper: %v, want its child killed (stderr %s)", runErr, stderr)
	}
	helperPID := uint32(pids[0])
	waitEvent(t, rd, "memfd exec alert", func(ev detect.Event) bool {
		if ev.PPID != helperPID || ev.Kind != detect.KindExec {
			return false
		}
		as := detect.Detect(ev, detect.Endpoint{Pod: "victim"})
		if len(as) == 0 {
			return false
		}
		alert = as[0]
		return true
	})
	if alert.RuleID != detect.RuleFilelessExec.ID || alert.Action != detect.ActionKill || alert.ActionResult != "sigkill queued" {
		t.Errorf("alert %+v", alert)
	}
	// A pod without Kill lives on through the same syscall.
	other := netns.New(t)
	if err := m.Watch(nsInode(t, other.Path()), detect.Endpoint{Pod: "alert-only"}); err != nil {
		t.Fatal(err)
	}
	helper(t, "bpf", other.Path())
}

// TestBlockMetadata: a connect to a cloud instance metadata address (over
// IPv4 and IPv6; the test serves them on the pod's own loopback, never a
// real one) is reported with the address and port, and denied with EPERM
// under Block. A connect to another address passes untouched.
func TestBlockMetadata(t *testing.T) {
	s := newBlockSetup(t)
	netns.Addr(t, s.pod, "lo", "169.254.169.254/32", "fd00:ec2::254/128", "10.213.9.9/32")
	s.pod.Do(t, func() error {
		for _, a := range []string{"169.254.169.254:80", "[fd00:ec2::254]:80", "10.213.9.9:80"} {
			l, err := net.Listen("tcp", a)
			if err != nil {
				return err
			}
			t.Cleanup(func() { l.Close() })
		}
		return nil
	})
	rule := detect.RuleMetadata
	for _, c := range []struct{ target, addr string }{
		{"169.254.169.254:80", "169.254.169.254"}, {"[fd00:ec2::254]:80", "fd00:ec2::254"},
	} {
		a := s.run(t, "connect-tcp", "ok", rule, helperPathEnv+"="+c.target)
		if a.Action != detect.ActionAlert || a.Args["address"] != c.addr || a.Args["port"] != "80" || a.Syscall != "connect" {
			t.Errorf("alert-only %s: %+v", c.target, a)
		}
	}
	s.watch(t, detect.Actions{Block: detect.Bit(rule.ID)})
	a := s.run(t, "connect-tcp", "eperm", rule, helperPathEnv+"=169.254.169.254:80")
	if a.Action != detect.ActionBlock || a.ActionResult != "denied" || a.Args["address"] != "169.254.169.254" {
		t.Errorf("block: %+v", a)
	}
	helper(t, "connect-tcp", s.ns, helperCgroupEnv+"="+s.cg, helperExpectEnv+"=ok", helperPathEnv+"=10.213.9.9:80")
	marker := uint32(helper(t, "bpf", s.ns)[0])
	_, seen := waitEvent(t, s.rd, "marker", func(ev detect.Event) bool { return ev.PID == marker })
	for _, ev := range seen {
		if ev.Kind == detect.KindConnectMetadata {
			t.Errorf("a connect to another address was reported: %+v", ev)
		}
	}
}
