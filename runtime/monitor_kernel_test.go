package runtime

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// newTestMonitor mounts tracefs if the node has none (and unmounts it at
// the end if this test mounted it), and loads a monitor closed at the end.
func newTestMonitor(t *testing.T, cfg Config) *Monitor {
	t.Helper()
	ensureTestTracefs(t)
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("new monitor: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("close monitor: %v", err)
		}
	})
	return m
}

// ensureTestTracefs mounts tracefs at its standard place when the node has
// none, and unmounts it when t ends (cleanups run last-in first-out, so
// after the monitor's links are gone).
func ensureTestTracefs(t *testing.T) {
	t.Helper()
	privileged.Require(t)
	mounted, err := EnsureTracefs()
	if err != nil {
		t.Fatal(err)
	}
	if mounted {
		t.Cleanup(func() {
			if err := unix.Unmount(StandardTracefs, 0); err != nil {
				t.Errorf("unmount the tracefs this test mounted: %v", err)
			}
		})
	}
}

func nsInode(t testing.TB, path string) uint32 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return uint32(st.Ino)
}

// testCgroup mounts a cgroup2 hierarchy of the test's own (the node may
// have none mounted; it then carries no controllers, so it changes no
// limits), makes a child cgroup in it, and returns the cgroup's folder and
// ID (the folder's inode). Helpers given it move into it before acting, as
// a pod's processes live in the pod's cgroup. Everything goes when t ends.
func testCgroup(t *testing.T) (string, uint64) {
	t.Helper()
	root := t.TempDir()
	if err := unix.Mount("cgroup2", root, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		t.Fatalf("mount cgroup2: %v", err)
	}
	dir := filepath.Join(root, fmt.Sprintf("bulkhead-sysmon-test-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		unix.Unmount(root, unix.MNT_DETACH)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(dir); err != nil {
			t.Errorf("remove test cgroup: %v", err)
		}
		if err := unix.Unmount(root, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount test cgroup2: %v", err)
		}
	})
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	return dir, st.Ino
}

// waitEvent reads events until one satisfies want, and returns it with
// every event read before it. It fails t after 10 s without one: a bound on
// waiting, not a latency assertion.
func waitEvent(t testing.TB, rd *Reader, what string, want func(detect.Event) bool) (detect.Event, []detect.Event) {
	t.Helper()
	rd.SetDeadline(time.Now().Add(10 * time.Second))
	defer rd.SetDeadline(time.Time{})
	var seen []detect.Event
	for {
		ev, err := rd.Read()
		if err != nil {
			t.Fatalf("waiting for %s: %v (saw %d other events: %+v)", what, err, len(seen), seen)
		}
		if want(ev) {
			return ev, seen
		}
		seen = append(seen, ev)
	}
}

func TestMonitorDetections(t *testing.T) {
	want, cfg := modulePath(StandardTracefs), Config{}
	if want == ModuleNone {
		// This kernel cannot load modules, so by default nothing is
		// hooked for them; the raw path is tested here all the same.
		want, cfg.ModulePath = ModuleRawSysEnter, ModuleRawSysEnter
	}
	m := newTestMonitor(t, cfg)
	if m.ModulePath() != want {
		t.Fatalf("module path %q, want %q", m.ModulePath(), want)
	}
	// The optional tracepoints (BH-RT-011, 015) exist on this kernel.
	if hooks := m.OptionalHooks(); len(hooks) != len(optionalTracepoints) {
		t.Errorf("optional hooks %v, want %d", hooks, len(optionalTracepoints))
	} else {
		for hook, err := range hooks {
			if err != nil && privileged.Required() {
				t.Errorf("unsupported under BULKHEAD_PRIVILEGED=1: %s: %v", hook, err)
			} else if err != nil {
				t.Logf("%s: %v (its rule is silent here)", hook, err)
			}
		}
	}
	pod := netns.New(t)
	ino := nsInode(t, pod.Path())
	ep := detect.Endpoint{ID: "ep-1", Namespace: "shop", Pod: "cart-0", SPIFFEID: "spiffe://cluster.local/ns/shop/sa/cart"}
	if err := m.Watch(ino, ep); err != nil {
		t.Fatal(err)
	}
	rd, err := m.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	cgDir, cgroup := testCgroup(t)
	// The helper's "host" is this process's netns: the node's, as far as
	// the test is concerned (/proc/1 may be out of reach in a sandbox).
	var hostNet unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &hostNet); err != nil {
		t.Fatal(err)
	}

	// Folders the new rules' helpers act on; all removed at the end.
	chrootDir := t.TempDir()
	tmpDir := scratchDir(t, "/tmp")
	shmDir := scratchDir(t, "/dev/shm")

	cases := []struct {
		action string
		rule   detect.Rule
		// pid picks which of the helper's PIDs made the syscall.
		pid     int
		syscall string
		args    map[string]string // a subset the alert must carry
		env     []string          // more for the helper
		sev     detect.Severity   // "": the rule's own
	}{
		{"setns-host", detect.RuleSetnsOutsidePod, 0, "setns",
			map[string]string{"nstype": "CLONE_NEWNET", "target_ns_inode": fmt.Sprint(hostNet.Ino)}, nil, ""},
		{"unshare-user", detect.RuleUnshareNS, 1, "unshare", map[string]string{"flags": "CLONE_NEWUSER"}, nil, ""},
		{"mount-tmpfs", detect.RuleMount, 0, "mount", map[string]string{"source": "bulkhead-test", "fstype": "tmpfs"}, nil, ""},
		{"ptrace", detect.RulePtraceAttach, 0, "ptrace", map[string]string{"request": "PTRACE_ATTACH"}, nil, ""},
		{"bpf", detect.RuleBPF, 0, "bpf", map[string]string{"cmd": "BPF_MAP_CREATE"}, nil, ""},
		{"finit-module", detect.RuleModuleLoad, 0, "finit_module", map[string]string{"flags": "0x0"}, nil, ""},
		{"chroot", detect.RuleChroot, 0, "chroot", map[string]string{"path": chrootDir},
			[]string{helperPathEnv + "=" + chrootDir}, ""},
		{"pivot-root", detect.RuleChroot, 0, "pivot_root", map[string]string{"new_root": chrootDir, "put_old": chrootDir},
			[]string{helperPathEnv + "=" + chrootDir}, ""},
		{"memfd-exec", detect.RuleFilelessExec, 1, "execve", map[string]string{"exe": "/proc/self/fd/3", "links": "0"}, nil, ""},
		{"dir-exec", detect.RuleTmpExec, 1, "execve", map[string]string{"exe": tmpDir + "/payload", "dir": "/tmp"},
			[]string{helperPathEnv + "=" + tmpDir}, ""},
		{"dir-exec", detect.RuleTmpExec, 1, "execve", map[string]string{"exe": shmDir + "/payload", "dir": "/dev/shm"},
			[]string{helperPathEnv + "=" + shmDir}, ""},
		{"reverse-shell", detect.RuleReverseShell, 1, "execve",
			map[string]string{"shell": "sh", "fd": "0", "family": "AF_UNIX"}, nil, detect.SeverityHigh},
		{"reverse-shell-tcp", detect.RuleReverseShell, 1, "execve",
			map[string]string{"shell": "sh", "fd": "1", "family": "AF_INET"}, nil, detect.SeverityCritical},
		{"setuid-root", detect.RuleSetuidToRoot, 0, "setuid", map[string]string{"target_uid": "0", "caller_euid": "65534"}, nil, ""},
		{"open-path", detect.RuleRawDevice, 0, "openat", map[string]string{"path": "/dev/sdzz9", "flags": "O_RDONLY"},
			[]string{helperPathEnv + "=/dev/sdzz9"}, ""},
		{"open-path", detect.RuleRawDevice, 0, "openat", map[string]string{"path": "/dev/mem"},
			[]string{helperPathEnv + "=/dev/mem"}, detect.SeverityCritical},
		{"open-path", detect.RuleShadow, 0, "openat", map[string]string{"path": "/etc/shadow"},
			[]string{helperPathEnv + "=/etc/shadow"}, ""},
		{"open-path", detect.RuleShadow, 0, "openat", map[string]string{"path": chrootDir + "/etc/shadow"},
			[]string{helperPathEnv + "=" + chrootDir + "/etc/shadow"}, detect.SeverityCritical},
		{"capset", detect.RuleSetuidToRoot, 0, "capset",
			map[string]string{"effective": "0x200000", "caps": "CAP_SYS_ADMIN", "added": "0x200000", "caller_permitted": "0x0"}, nil, ""},
	}
	for _, c := range cases {
		t.Run(c.action+"/"+c.rule.ID, func(t *testing.T) {
			pids := helper(t, c.action, pod.Path(), append([]string{helperCgroupEnv + "=" + cgDir}, c.env...)...)
			pid := uint32(pids[c.pid])
			var alert detect.Alert
			// The alert is built as the agent builds it: the pod comes from
			// the monitor's watch table, by the event's netns.
			ev, _ := waitEvent(t, rd, c.rule.ID+" from pid "+fmt.Sprint(pid), func(ev detect.Event) bool {
				got, _ := m.Endpoint(ev.Netns)
				if ev.PID != pid {
					return false
				}
				for _, a := range detect.Detect(ev, got) {
					if a.RuleID == c.rule.ID && hasArgs(a.Args, c.args) {
						alert = a
						return true
					}
				}
				return false
			})
			if ev.Netns != ino || alert.Pod.Netns != ino || alert.Pod.Pod != "cart-0" || alert.Pod.SPIFFEID != ep.SPIFFEID {
				t.Errorf("attribution: event netns %d, alert pod %+v; want netns %d, %+v", ev.Netns, alert.Pod, ino, ep)
			}
			if ev.CgroupID != cgroup {
				t.Errorf("cgroup id %d, want %d", ev.CgroupID, cgroup)
			}
			if alert.Syscall != c.syscall || alert.Technique != c.rule.Technique || alert.EventKind != "alert" {
				t.Errorf("alert %+v: want syscall %s, technique %s", alert, c.syscall, c.rule.Technique)
			}
			if alert.PID != pid || alert.Comm == "" || alert.PPID == 0 {
				t.Errorf("process: pid %d ppid %d comm %q, want pid %d", alert.PID, alert.PPID, alert.Comm, pid)
			}
			if sev := cmp.Or(c.sev, c.rule.Severity); alert.Severity != sev || alert.Action != detect.ActionAlert {
				t.Errorf("severity %s action %s, want %s alert", alert.Severity, alert.Action, sev)
			}
			if c.rule == detect.RuleSetuidToRoot && alert.UID != 65534 {
				t.Errorf("uid %d, want the caller's real uid 65534", alert.UID)
			}
			t.Logf("%s: %+v", c.action, alert)
		})
	}
	// Ordinary execs (binaries from /usr/bin, shells on pipes) raise
	// nothing; a marker from the pod ends the events to look at.
	t.Run("benign-exec", func(t *testing.T) {
		pids := helper(t, "benign-exec", pod.Path(), helperCgroupEnv+"="+cgDir)
		marker := uint32(helper(t, "bpf", pod.Path())[0])
		_, seen := waitEvent(t, rd, "marker", func(ev detect.Event) bool { return ev.PID == marker })
		execs := map[uint32]bool{}
		for _, ev := range seen {
			if ev.Kind == detect.KindExec {
				execs[ev.PID] = true
			}
			if a := detect.Detect(ev, ep); len(a) != 0 {
				t.Errorf("benign event %+v raised %+v", ev, a)
			}
		}
		for _, p := range pids[1:] {
			if !execs[uint32(p)] {
				t.Errorf("no exec event from pid %d (saw %+v)", p, seen)
			}
		}
	})
	t.Run("exec-lineage", func(t *testing.T) {
		pids := helper(t, "sh-unshare", pod.Path(), helperCgroupEnv+"="+cgDir)
		shPID := uint32(pids[1])
		procs := detect.NewProcessCache(64)
		var alert detect.Alert
		waitEvent(t, rd, "unshare(CLONE_NEWUSER) from unshare(1)", func(ev detect.Event) bool {
			if ev.Kind == detect.KindExec {
				procs.Exec(ev)
				return false
			}
			if ev.Comm != "unshare" || ev.PPID != shPID {
				return false
			}
			alerts := detect.Detect(ev, ep)
			procs.Annotate(alerts, ev)
			if len(alerts) != 1 || alerts[0].RuleID != detect.RuleUnshareNS.ID {
				return false
			}
			alert = alerts[0]
			return true
		})
		p := alert.Process
		if p == nil || p.Exe != "/usr/bin/unshare" || p.PID != alert.PID || p.PPID != shPID ||
			strings.Join(p.Argv, " ") != "unshare -U /bin/true" || p.ArgvTruncated {
			t.Errorf("process %+v of alert %+v", p, alert)
		}
		if len(alert.Ancestors) != 2 || alert.Ancestors[0].PID != shPID || !strings.HasSuffix(alert.Ancestors[0].Exe, "/sh") ||
			strings.Join(alert.Ancestors[0].Argv, " ") != "sh -c unshare -U /bin/true; exit 0" ||
			alert.Ancestors[1].PID != alert.Ancestors[0].PPID || alert.Ancestors[1].Exe != "/proc/self/exe" {
			// The helper exec'd itself again once in the pod (as a pod's
			// program, not the runtime's set-up): the ancestry ends there,
			// its first exec having been outside the pod.
			t.Errorf("ancestry %+v", alert.Ancestors)
		}
		t.Logf("process %+v, ancestors %+v", *p, alert.Ancestors)
	})
	if m.ModulePath() == ModuleRawSysEnter {
		t.Logf("module loads hooked through raw_tp sys_enter (no per-syscall tracepoint)")
	}
}

// TestMonitorUnwatched: processes in a namespace nobody watches, and in one
// no longer watched, produce no events; the kernel counts them instead.
func TestMonitorUnwatched(t *testing.T) {
	m := newTestMonitor(t, Config{})
	pod, other := netns.New(t), netns.New(t)
	ino := nsInode(t, pod.Path())
	if err := m.Watch(ino, detect.Endpoint{Pod: "watched"}); err != nil {
		t.Fatal(err)
	}
	rd, err := m.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	before, err := m.Counters()
	if err != nil {
		t.Fatal(err)
	}
	quiet := map[uint32]bool{}
	dir := t.TempDir()
	for _, a := range []string{"bpf", "unshare-user", "finit-module", "chroot", "pivot-root", "memfd-exec", "dir-exec",
		"reverse-shell", "setuid-root", "capset"} {
		env := helperPathEnv + "=" + dir
		if a == "dir-exec" {
			env = helperPathEnv + "=" + scratchDir(t, "/dev/shm")
		}
		for _, p := range helper(t, a, other.Path(), env) {
			quiet[uint32(p)] = true
		}
	}
	after, err := m.Counters()
	if err != nil {
		t.Fatal(err)
	}
	// The hooks ran (at least once per action) and dropped the events.
	if after.Unwatched-before.Unwatched < 10 {
		t.Errorf("unwatched counter rose by %d, want at least 10", after.Unwatched-before.Unwatched)
	}
	// A marker from the watched pod: the ring is FIFO, so any event from
	// the unwatched ones would be read before it.
	marker := uint32(helper(t, "bpf", pod.Path())[0])
	_, seen := waitEvent(t, rd, "marker", func(ev detect.Event) bool { return ev.PID == marker })
	for _, ev := range seen {
		if quiet[ev.PID] || ev.Netns != ino {
			t.Errorf("event from an unwatched process: %+v", ev)
		}
	}

	if err := m.Unwatch(ino); err != nil {
		t.Fatal(err)
	}
	if err := m.Unwatch(ino); !errors.Is(err, ErrNotWatched) {
		t.Errorf("second unwatch: %v, want ErrNotWatched", err)
	}
	c1, _ := m.Counters()
	helper(t, "bpf", pod.Path())
	c2, _ := m.Counters()
	if c2.Sent != c1.Sent || c2.Unwatched == c1.Unwatched {
		t.Errorf("after Unwatch: sent %d→%d, unwatched %d→%d; want no send and a drop", c1.Sent, c2.Sent, c1.Unwatched, c2.Unwatched)
	}
}

// TestRuntimeSetupIsNotThePod: a process that joins the pod's netns from
// outside and has not exec'd since is the container runtime setting the
// pod up (runc's init unshares, mounts the rootfs, /proc and /dev, and
// pivots into it): its unshare, mount, chroot and pivot_root, and those of
// a child it forks, raise nothing, and a Kill asked for them spares it.
// The same calls from a program exec'd in the pod are the pod's
// (TestMonitorDetections), as is anything else the set-up process does.
func TestRuntimeSetupIsNotThePod(t *testing.T) {
	m := newTestMonitor(t, Config{})
	pod := netns.New(t)
	ino := nsInode(t, pod.Path())
	kill := detect.Bit(detect.RuleUnshareNS.ID) | detect.Bit(detect.RuleMount.ID) | detect.Bit(detect.RuleChroot.ID)
	if err := m.Watch(ino, detect.Endpoint{Pod: "setup", Actions: detect.Actions{Kill: kill}}); err != nil {
		t.Fatal(err)
	}
	rd, err := m.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	quiet := map[uint32]bool{}
	dir := t.TempDir()
	for _, a := range []string{"unshare-user", "mount-tmpfs", "chroot", "pivot-root"} {
		pids, stderr, err := helperRun(t, a, pod.Path(), helperSetupEnv+"=1", helperPathEnv+"="+dir)
		if err != nil {
			t.Fatalf("set-up %s: %v (killed?): %s", a, err, stderr)
		}
		for _, p := range pids {
			quiet[uint32(p)] = true
		}
	}
	// The set-up process is still judged where the runtime has no
	// business: bpf() is the marker, and its event must come.
	marker := uint32(helper(t, "bpf", pod.Path(), helperSetupEnv+"=1")[0])
	_, seen := waitEvent(t, rd, "marker", func(ev detect.Event) bool { return ev.PID == marker })
	for _, ev := range seen {
		// Execs feed the process cache; the exec'd program is the pod's.
		if (quiet[ev.PID] || quiet[ev.PPID]) && ev.Kind != detect.KindExec {
			t.Errorf("event from the runtime's set-up: %+v", ev)
		}
	}
}

// TestMonitorRingOverflow fills a one-page ring buffer that nobody reads:
// every event is either in the ring or counted as lost.
func TestMonitorRingOverflow(t *testing.T) {
	m := newTestMonitor(t, Config{RingSize: uint32(os.Getpagesize()), NoModuleHook: true})
	pod := netns.New(t)
	if err := m.Watch(nsInode(t, pod.Path()), detect.Endpoint{Pod: "noisy"}); err != nil {
		t.Fatal(err)
	}
	const n = 2000
	helper(t, "unshare-noop", pod.Path(), fmt.Sprintf("%s=%d", helperCountEnv, n))
	c, err := m.Counters()
	if err != nil {
		t.Fatal(err)
	}
	capacity := uint64(os.Getpagesize() / EventSize)
	// One more than the unshares: the helper's exec of itself in the pod.
	if c.Lost == 0 || c.Sent+c.Lost != n+1 || c.Sent > capacity {
		t.Fatalf("counters %+v: want sent+lost = %d, sent ≤ %d, lost > 0", c, n+1, capacity)
	}
	rd, err := m.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	for i := range c.Sent {
		rd.SetDeadline(time.Now().Add(5 * time.Second))
		ev, err := rd.Read()
		if err != nil {
			t.Fatalf("event %d of %d in the ring: %v", i, c.Sent, err)
		}
		if i == 0 && ev.Kind == detect.KindExec {
			continue // the helper's exec in the pod, first in the ring
		}
		if ev.Kind != detect.KindUnshare || ev.Args[0] != 0 {
			t.Fatalf("event %d: %+v, want unshare(0)", i, ev)
		}
	}
	t.Logf("counters %+v (ring holds %d events)", c, capacity)
}

func TestEnsureTracefs(t *testing.T) {
	privileged.Require(t)
	dir := t.TempDir()
	mounted, err := ensureTracefs(dir)
	if err != nil || !mounted {
		t.Fatalf("first ensure: mounted %v, %v", mounted, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	if _, err := os.Stat(filepath.Join(dir, "events", "syscalls")); err != nil {
		t.Errorf("tracefs at %s has no syscall events: %v", dir, err)
	}
	if mounted, err := ensureTracefs(dir); err != nil || mounted {
		t.Fatalf("second ensure: mounted %v, %v; want a no-op", mounted, err)
	}
}

func TestProbeFeatures(t *testing.T) {
	ensureTestTracefs(t)
	f := ProbeFeatures()
	for name, err := range f.Available() {
		t.Logf("%-12s %v", name, errOr(err))
	}
	t.Logf("module path: %s", f.ModulePath)
	// What the monitor cannot run without: fail, never skip, under
	// BULKHEAD_PRIVILEGED=1.
	for name, err := range map[string]error{"tracefs": f.Tracefs, "tracepoint": f.Tracepoint, "raw_tp": f.RawTP, "ringbuf": f.RingBuf} {
		if err != nil {
			privileged.Unsupported(t, "%s: %v", name, err)
		}
	}
	if f.ModulePath != modulePath(StandardTracefs) || f.ModulePath == "" {
		t.Errorf("module path %q", f.ModulePath)
	}
}

// scratchDir makes a folder under parent (/tmp, /dev/shm: not t.TempDir,
// which follows TMPDIR) removed when t ends.
func scratchDir(t *testing.T, parent string) string {
	t.Helper()
	dir, err := os.MkdirTemp(parent, "bulkhead-sysmon-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	return dir
}

// hasArgs reports whether got has every argument of want.
func hasArgs(got, want map[string]string) bool {
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}

func errOr(err error) string {
	if err == nil {
		return "available"
	}
	return err.Error()
}
