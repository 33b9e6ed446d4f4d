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
		{"open of a disk", Event{Kind: KindOpen, Syscall: "openat", Target: "/dev/nvme0n1", Rules: Bit("BH-RT-018"),
			Args: [4]uint64{unix.O_RDWR}}, "BH-RT-018", SeverityHigh, map[string]string{"path": "/dev/nvme0n1", "flags": "O_RDWR"}},
		{"open of the kernel's core", Event{Kind: KindOpen, Syscall: "open", Target: "/proc/kcore", Rules: Bit("BH-RT-018")},
			"BH-RT-018", SeverityCritical, map[string]string{"path": "/proc/kcore", "flags": "O_RDONLY"}},
		{"the pod's shadow", Event{Kind: KindOpen, Syscall: "openat2", Target: "/etc/shadow", Rules: Bit("BH-RT-019")},
			"BH-RT-019", SeverityHigh, map[string]string{"path": "/etc/shadow"}},
		{"a host's shadow", Event{Kind: KindOpen, Syscall: "openat", Target: "/host/etc/shadow", Rules: Bit("BH-RT-019"),
			Args: [4]uint64{unix.O_WRONLY | unix.O_TRUNC}}, "BH-RT-019", SeverityCritical,
			map[string]string{"path": "/host/etc/shadow", "flags": "O_WRONLY|O_TRUNC"}},
		{"chroot", Event{Kind: KindChroot, Syscall: "chroot", Target: "/host"}, "BH-RT-011", SeverityHigh,
			map[string]string{"path": "/host"}},
		{"pivot_root", Event{Kind: KindPivotRoot, Syscall: "pivot_root", Target: "/new", Source: "/new/old"}, "BH-RT-011", SeverityHigh,
			map[string]string{"new_root": "/new", "put_old": "/new/old"}},
		{"setuid(0)", Event{Kind: KindSetuid, Syscall: "setuid", UID: 1000, Args: [4]uint64{0, 5, 5, 1000}}, "BH-RT-015", SeverityHigh,
			map[string]string{"target_uid": "0", "caller_euid": "1000"}},
		{"setreuid(-1, 0)", Event{Kind: KindSetuid, Syscall: "setreuid", UID: 1000, Args: [4]uint64{0xffffffff, 0, 0, 1000}}, "BH-RT-015", SeverityHigh,
			map[string]string{"target_ruid": "-1", "target_euid": "0"}},
		{"setresuid(0, 0, 0) from a setuid-root program", Event{Kind: KindSetuid, Syscall: "setresuid", UID: 1000, Args: [4]uint64{0, 0, 0, 0}},
			"BH-RT-015", SeverityHigh, map[string]string{"target_ruid": "0", "target_euid": "0", "target_suid": "0", "caller_euid": "0"}},
		{"capset of CAP_SYS_ADMIN", Event{Kind: KindCapset, Syscall: "capset", UID: 65534,
			Args: [4]uint64{1 << unix.CAP_SYS_ADMIN, 1<<unix.CAP_SYS_ADMIN | 1<<unix.CAP_NET_RAW, 0, 0}, CapPermitted: 1 << unix.CAP_NET_RAW},
			"BH-RT-015", SeverityHigh, map[string]string{"effective": "0x200000", "permitted": "0x202000", "added": "0x200000",
				"caps": "CAP_SYS_ADMIN", "caller_permitted": "0x2000", "pid": "0"}},
		// The exec rules: the kernel's match (Rules) decides.
		{"plain exec", Event{Kind: KindExec, Syscall: "execve", Exe: "/usr/bin/true", ExeLinks: 1, StdioSocket: -1}, "", "", nil},
		{"memfd exec", Event{Kind: KindExec, Syscall: "execve", Exe: "/dev/fd/3", ExeInode: 77, StdioSocket: -1,
			Rules: Bit("BH-RT-012")}, "BH-RT-012", SeverityCritical, map[string]string{"exe": "/dev/fd/3", "links": "0", "inode": "77"}},
		{"exec from /dev/shm", Event{Kind: KindExec, Syscall: "execve", Exe: "/dev/shm/x", ExeLinks: 1, StdioSocket: -1,
			Rules: Bit("BH-RT-013")}, "BH-RT-013", SeverityHigh, map[string]string{"exe": "/dev/shm/x", "dir": "/dev/shm"}},
		{"exec from /tmp", Event{Kind: KindExec, Syscall: "execve", Exe: "/tmp/.x/y", ExeLinks: 1, StdioSocket: -1,
			Rules: Bit("BH-RT-013")}, "BH-RT-013", SeverityHigh, map[string]string{"dir": "/tmp"}},
		{"shell on a TCP socket", Event{Kind: KindExec, Syscall: "execve", Exe: "/bin/bash", Comm: "bash", ExeLinks: 1, StdioSocket: 0,
			SocketFamily: unix.AF_INET6, Rules: Bit("BH-RT-014")}, "BH-RT-014", SeverityCritical,
			map[string]string{"exe": "/bin/bash", "shell": "bash", "fd": "0", "family": "AF_INET6"}},
		{"shell on a unix socket", Event{Kind: KindExec, Syscall: "execve", Exe: "/bin/sh", Comm: "sh", ExeLinks: 1, StdioSocket: 1,
			SocketFamily: unix.AF_UNIX, Rules: Bit("BH-RT-014")}, "BH-RT-014", SeverityHigh, map[string]string{"fd": "1", "family": "AF_UNIX"}},
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

// One exec can match several rules; each alert says what was done for its
// own rule (the kill was for the rules in KillRules).
func TestDetectExecSeveralRules(t *testing.T) {
	fileless, tmp := Bit(RuleFilelessExec.ID), Bit(RuleTmpExec.ID)
	ev := Event{Kind: KindExec, Syscall: "execve", Exe: "/tmp/x", StdioSocket: -1, Rules: fileless | tmp,
		Killed: true, KillRules: tmp}
	got := Detect(ev, Endpoint{})
	if len(got) != 2 || got[0].RuleID != RuleFilelessExec.ID || got[1].RuleID != RuleTmpExec.ID {
		t.Fatalf("alerts %+v, want BH-RT-012 and BH-RT-013", got)
	}
	if got[0].Action != ActionAlert || got[1].Action != ActionKill || got[1].ActionResult != "sigkill queued" {
		t.Errorf("actions %s/%s, %s/%s; want alert, kill", got[0].Action, got[0].ActionResult, got[1].Action, got[1].ActionResult)
	}
	ev.Killed, ev.KillFailed = false, true
	if got := Detect(ev, Endpoint{}); got[1].ActionResult != "sigkill failed" || got[0].Action != ActionAlert {
		t.Errorf("failed kill: %+v", got)
	}
}

func TestCapNames(t *testing.T) {
	for set, want := range map[uint64]string{
		0: "", 1: "CAP_CHOWN", 1<<unix.CAP_SYS_ADMIN | 1<<unix.CAP_BPF: "CAP_SYS_ADMIN|CAP_BPF",
		1 << unix.CAP_CHECKPOINT_RESTORE: "CAP_CHECKPOINT_RESTORE", 1 << 63: "63",
	} {
		if got := capNames(set); got != want {
			t.Errorf("capNames(%#x) = %q, want %q", set, got, want)
		}
	}
}
