package detect

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestDetect(t *testing.T) {
	ep := Endpoint{Namespace: "shop", Pod: "cart-0", Netns: 4026532174}
	cases := []struct {
		name string
		ev   Event
		rule string // "" for no alert
		sev  Severity
		args map[string]string
	}{
		{"setns to another namespace", Event{Kind: KindSetns, Syscall: "setns", Args: [4]uint64{3, unix.CLONE_NEWNET}, TargetNS: 4026531833},
			"BH-RT-001", SeverityCritical, map[string]string{"fd": "3", "nstype": "CLONE_NEWNET", "target_ns_inode": "4026531833"}},
		{"setns into its own namespace", Event{Kind: KindSetns, Args: [4]uint64{3, 0}, TargetNS: 4026532174, TargetOwn: true}, "", "", nil},
		{"setns with a closed fd", Event{Kind: KindSetns, Args: [4]uint64{99, 0}}, "", "", nil},
		{"unshare user ns", Event{Kind: KindUnshare, Args: [4]uint64{unix.CLONE_NEWUSER | unix.CLONE_NEWNS}},
			"BH-RT-002", SeverityHigh, map[string]string{"flags": "CLONE_NEWUSER|CLONE_NEWNS"}},
		{"unshare of nothing", Event{Kind: KindUnshare}, "", "", nil},
		{"unshare of the uts ns only", Event{Kind: KindUnshare, Args: [4]uint64{unix.CLONE_NEWUTS}}, "", "", nil},
		{"mount of tmpfs", Event{Kind: KindMount, Source: "x", Target: "/mnt", FSType: "tmpfs"}, "BH-RT-003", SeverityHigh,
			map[string]string{"fstype": "tmpfs"}},
		{"mount of cgroupfs", Event{Kind: KindMount, Source: "cgroup", Target: "/mnt", FSType: "cgroup"}, "BH-RT-003", SeverityCritical, nil},
		{"mount of a block device", Event{Kind: KindMount, Source: "/dev/vda1", Target: "/mnt", FSType: "ext4"}, "BH-RT-003", SeverityCritical, nil},
		{"propagation change of /", Event{Kind: KindMount, Target: "/", Args: [4]uint64{0, 0, 0, unix.MS_REC | unix.MS_PRIVATE}}, "BH-RT-003", SeverityHigh, nil},
		{"ptrace attach", Event{Kind: KindPtrace, Args: [4]uint64{unix.PTRACE_ATTACH, 1234}}, "BH-RT-004", SeverityHigh,
			map[string]string{"request": "PTRACE_ATTACH", "pid": "1234"}},
		{"ptrace seize", Event{Kind: KindPtrace, Args: [4]uint64{unix.PTRACE_SEIZE, 1}}, "BH-RT-004", SeverityHigh, nil},
		{"ptrace traceme", Event{Kind: KindPtrace, Args: [4]uint64{unix.PTRACE_TRACEME}}, "", "", nil},
		{"ptrace peek of a tracee", Event{Kind: KindPtrace, Args: [4]uint64{unix.PTRACE_PEEKDATA, 1}}, "", "", nil},
		{"bpf prog load", Event{Kind: KindBPF, Args: [4]uint64{5}}, "BH-RT-005", SeverityHigh, map[string]string{"cmd": "BPF_PROG_LOAD"}},
		{"finit_module", Event{Kind: KindModule, Syscall: "finit_module", Args: [4]uint64{4, 0, 2}}, "BH-RT-006", SeverityCritical,
			map[string]string{"fd": "4", "flags": "0x2"}},
		{"init_module", Event{Kind: KindModule, Syscall: "init_module", Args: [4]uint64{0x1000, 17}}, "BH-RT-006", SeverityCritical,
			map[string]string{"len": "17"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := Detect(c.ev, ep)
			if c.rule == "" {
				if len(got) != 0 {
					t.Fatalf("alerts %+v, want none", got)
				}
				return
			}
			if len(got) != 1 {
				t.Fatalf("%d alerts, want 1 of %s", len(got), c.rule)
			}
			a := got[0]
			if a.RuleID != c.rule || a.Severity != c.sev || a.Pod != ep || a.EventKind != "alert" || a.Action != "alert" || a.Technique == "" {
				t.Errorf("alert %+v: want rule %s, severity %s, pod %+v", a, c.rule, c.sev, ep)
			}
			for k, v := range c.args {
				if a.Args[k] != v {
					t.Errorf("arg %s = %q, want %q", k, a.Args[k], v)
				}
			}
		})
	}
}

// Rule IDs are unique and each names a technique.
func TestRules(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range Rules() {
		if seen[r.ID] || r.Technique == "" || r.TechniqueName == "" || r.Severity == "" {
			t.Errorf("rule %+v: duplicate or incomplete", r)
		}
		seen[r.ID] = true
	}
}
