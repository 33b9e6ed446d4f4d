package detect

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Severity orders alerts for filtering.
type Severity string

const (
	SeverityMedium   Severity = "medium"
	SeverityHigh     Severity = "high"
	SeverityCritical Severity = "critical"
)

// Rule is one detection of the default rule set.
type Rule struct {
	ID            string
	Name          string
	Technique     string // MITRE ATT&CK technique ID
	TechniqueName string
	Severity      Severity
}

// The default rule set. IDs are stable: alerts, metrics and policies name
// them.
var (
	RuleSetnsOutsidePod = Rule{"BH-RT-001", "setns to a namespace outside the pod", "T1611", "Escape to Host", SeverityCritical}
	RuleUnshareNS       = Rule{"BH-RT-002", "unshare of a user or mount namespace", "T1611", "Escape to Host", SeverityHigh}
	RuleMount           = Rule{"BH-RT-003", "mount from inside a pod", "T1611", "Escape to Host", SeverityHigh}
	RulePtraceAttach    = Rule{"BH-RT-004", "ptrace attach to another process", "T1055.008", "Process Injection: Ptrace System Calls", SeverityHigh}
	RuleBPF             = Rule{"BH-RT-005", "bpf() syscall from a pod", "T1014", "Rootkit", SeverityHigh}
	RuleModuleLoad      = Rule{"BH-RT-006", "kernel module load", "T1547.006", "Boot or Logon Autostart Execution: Kernel Modules and Extensions", SeverityCritical}
	// The cgroup hooks' rules: these can block.
	RuleRuntimeSocket = Rule{"BH-RT-007", "connect to a container runtime socket", "T1610", "Deploy Container", SeverityCritical}
	RuleRawSocket     = Rule{"BH-RT-008", "raw IP socket", "T1040", "Network Sniffing", SeverityHigh}
	RuleSysctlWrite   = Rule{"BH-RT-009", "write to /proc/sys", "T1611", "Escape to Host", SeverityHigh}
	// AF_PACKET sockets come from a tracepoint: the sock_create hook does
	// not run for them, so they can be killed but not blocked.
	RulePacketSocket = Rule{"BH-RT-010", "AF_PACKET socket", "T1040", "Network Sniffing", SeverityHigh}
	RuleChroot       = Rule{"BH-RT-011", "chroot or pivot_root from a pod", "T1611", "Escape to Host", SeverityHigh}
	// The exec rules: judged in the kernel at exec (sched_process_exec),
	// where a Kill lands before the new program runs.
	RuleFilelessExec = Rule{"BH-RT-012", "exec of a file with no link on disk", "T1620", "Reflective Code Loading", SeverityCritical}
	// T1059: in a pod, a program exec'd from a scratch folder is a payload
	// that a shell or interpreter fetched and ran (T1204 User Execution
	// needs a user to open it, which a server workload has not).
	RuleTmpExec      = Rule{"BH-RT-013", "exec from /tmp or /dev/shm", "T1059", "Command and Scripting Interpreter", SeverityHigh}
	RuleReverseShell = Rule{"BH-RT-014", "shell with a socket as stdin or stdout", "T1059.004", "Command and Scripting Interpreter: Unix Shell", SeverityCritical}
	RuleSetuidToRoot = Rule{"BH-RT-015", "setuid to root or capset from a non-root process", "T1548", "Abuse Elevation Control Mechanism", SeverityHigh}
	// Seen by the agent in the datapath's drop events (ScanDetector), not
	// by a hook: it has no process, and no kernel bit.
	RuleScan = Rule{"BH-RT-016", "scan from a pod: new connections denied to many destinations", "T1046", "Network Service Discovery", SeverityHigh}
	// The node's instance credentials are one request away from a pod
	// that reaches the metadata service.
	RuleMetadata = Rule{"BH-RT-017", "connect to the cloud instance metadata service", "T1552.005", "Unsecured Credentials: Cloud Instance Metadata API", SeverityHigh}
	// A raw disk gives the node's file systems, past every mount the
	// runtime made; kernel memory gives the kernel.
	RuleRawDevice = Rule{"BH-RT-018", "open of kernel memory or a raw disk device", "T1006", "Direct Volume Access", SeverityHigh}
	RuleShadow    = Rule{"BH-RT-019", "open of a password hash file (etc/shadow, etc/gshadow)", "T1003.008", "OS Credential Dumping: /etc/passwd and /etc/shadow", SeverityHigh}
)

// Rules lists the default rule set, in ID order: rule i (from 0) is
// BH-RT-(i+1), and its kernel bit (Bit) is 1<<i (enum sysmon_rule_bit).
func Rules() []Rule {
	return []Rule{RuleSetnsOutsidePod, RuleUnshareNS, RuleMount, RulePtraceAttach, RuleBPF, RuleModuleLoad,
		RuleRuntimeSocket, RuleRawSocket, RuleSysctlWrite, RulePacketSocket, RuleChroot, RuleFilelessExec,
		RuleTmpExec, RuleReverseShell, RuleSetuidToRoot, RuleScan, RuleMetadata, RuleRawDevice, RuleShadow}
}

// Bit is the rule's bit in Actions and the kernel's masks; 0 for an
// unknown rule.
func Bit(ruleID string) uint32 {
	for i, r := range Rules() {
		if r.ID == ruleID {
			return 1 << i
		}
	}
	return 0
}

// Answers, as alerts carry them.
const (
	ActionAlert = "alert"
	ActionBlock = "block"
	ActionKill  = "kill"
)

// Alert is one rule's match on one event. Field names are the flow log's
// conventions (snake_case, Hubble's where one exists).
type Alert struct {
	EventKind string `json:"event_kind"` // always "alert"
	// ID names this alert line uniquely (the agent sets it as it emits
	// the line); a quarantine and its drop records name it.
	ID        string    `json:"alert_id,omitempty"`
	Time      time.Time `json:"time"`
	RuleID    string    `json:"rule_id"`
	Rule      string    `json:"rule"`
	Technique string    `json:"mitre_technique"`
	// TechniqueName is ATT&CK's name for Technique.
	TechniqueName string            `json:"mitre_technique_name"`
	Severity      Severity          `json:"severity"`
	Pod           Endpoint          `json:"pod"`
	Syscall       string            `json:"syscall"`
	Args          map[string]string `json:"args"`
	PID           uint32            `json:"pid"`
	TID           uint32            `json:"tid"`
	PPID          uint32            `json:"ppid"`
	UID           uint32            `json:"uid"`
	Comm          string            `json:"comm"`
	CgroupID      uint64            `json:"cgroup_id"`
	// Process and Ancestors come from the ProcessCache (Annotate): nil
	// and empty for a process that did not exec in a watched namespace.
	Process   *Process  `json:"process,omitempty"`
	Ancestors []Process `json:"ancestors,omitempty"`
	// Action is what was done: "alert", "block" (the caller saw EPERM) or
	// "kill" (SIGKILL queued at syscall entry: the syscall itself may
	// have taken effect).
	Action string `json:"action"`
	// ActionResult says how the answer went: "denied", "sigkill queued",
	// or "sigkill failed" (the process lives on).
	ActionResult string `json:"action_result,omitempty"`
	// Quarantine says what became of the pod's quarantine, when the rule's
	// answer includes Quarantine: "quarantined", "already quarantined", or
	// "failed: ..." (the pod's traffic is then not cut).
	Quarantine string `json:"quarantine,omitempty"`
	// Count is how many identical events this line stands for (the
	// Aggregator's folding); 1 for a line of its own.
	Count int `json:"count"`
	// FirstTime and LastTime bound a line that folds several events.
	FirstTime *time.Time `json:"first_time,omitempty"`
	LastTime  *time.Time `json:"last_time,omitempty"`
}

// Detect returns the alerts that ev raises for the pod ep; none for benign
// events (unshare(0), ptrace of one's own tracee, setns into one's own
// namespace).
func Detect(ev Event, ep Endpoint) []Alert {
	var hits []hit
	if ev.Kind == KindExec {
		hits = execMatches(ev)
	} else if rule, sev, args, ok := match(ev); ok {
		hits = []hit{{rule, sev, args}}
	}
	var out []Alert
	for _, h := range hits {
		sev := h.sev
		if sev == "" {
			sev = h.rule.Severity
		}
		al := Alert{
			EventKind: "alert", Time: ev.Time, RuleID: h.rule.ID, Rule: h.rule.Name,
			Technique: h.rule.Technique, TechniqueName: h.rule.TechniqueName, Severity: sev,
			Pod: ep, Syscall: ev.Syscall, Args: h.args,
			PID: ev.PID, TID: ev.TID, PPID: ev.PPID, UID: ev.UID, Comm: ev.Comm, CgroupID: ev.CgroupID,
			Action: ActionAlert, Count: 1,
		}
		// An exec may match several rules and be killed for some of them:
		// each alert says what was done for its own rule.
		killed, killFailed := ev.Killed, ev.KillFailed
		if ev.Kind == KindExec && ev.KillRules&Bit(h.rule.ID) == 0 {
			killed, killFailed = false, false
		}
		// The kernel says what it did; the alert reports that, not the policy.
		switch {
		case ev.Blocked:
			al.Action, al.ActionResult = ActionBlock, "denied"
		case killed:
			al.Action, al.ActionResult = ActionKill, "sigkill queued"
		case killFailed:
			al.Action, al.ActionResult = ActionKill, "sigkill failed"
		}
		out = append(out, al)
	}
	return out
}

type hit struct {
	rule Rule
	sev  Severity
	args map[string]string
}

// execMatches are the exec rules the kernel matched (Event.Rules), with
// their arguments. The kernel judges them: it alone sees the executable's
// link count and the shell's stdio, and its Kill must agree with the
// alerts.
func execMatches(ev Event) []hit {
	var hits []hit
	if ev.Rules&Bit(RuleFilelessExec.ID) != 0 {
		hits = append(hits, hit{RuleFilelessExec, "", map[string]string{
			"exe": ev.Exe, "links": strconv.FormatUint(uint64(ev.ExeLinks), 10), "inode": strconv.FormatUint(ev.ExeInode, 10),
		}})
	}
	if ev.Rules&Bit(RuleTmpExec.ID) != 0 {
		dir := "/tmp"
		if strings.HasPrefix(ev.Exe, "/dev/shm/") {
			dir = "/dev/shm"
		}
		hits = append(hits, hit{RuleTmpExec, "", map[string]string{"exe": ev.Exe, "dir": dir}})
	}
	if ev.Rules&Bit(RuleReverseShell.ID) != 0 {
		sev := SeverityHigh
		if ev.SocketFamily == unix.AF_INET || ev.SocketFamily == unix.AF_INET6 {
			// A network peer drives the shell: the classic reverse shell.
			sev = SeverityCritical
		}
		hits = append(hits, hit{RuleReverseShell, sev, map[string]string{
			"exe": ev.Exe, "shell": ev.Comm, "fd": strconv.Itoa(ev.StdioSocket), "family": sockFamily(uint64(ev.SocketFamily)),
		}})
	}
	return hits
}

// Annotate adds the process context the cache holds for ev to each alert.
func (c *ProcessCache) Annotate(alerts []Alert, ev Event) {
	if len(alerts) == 0 {
		return
	}
	self, anc := c.Lineage(ev)
	for i := range alerts {
		alerts[i].Process, alerts[i].Ancestors = self, anc
	}
}

func match(ev Event) (r Rule, sev Severity, args map[string]string, ok bool) {
	a := ev.Args
	switch ev.Kind {
	case KindSetns:
		// fd not open (EBADF) or the pod's own namespace: nothing entered.
		if ev.TargetNS == 0 || ev.TargetOwn {
			return
		}
		return RuleSetnsOutsidePod, "", map[string]string{
			"fd": strconv.FormatInt(int64(int32(a[0])), 10), "nstype": cloneFlags(a[1]),
			"target_ns_inode": strconv.FormatUint(ev.TargetNS, 10),
		}, true
	case KindUnshare:
		if a[0]&(unix.CLONE_NEWUSER|unix.CLONE_NEWNS) == 0 {
			return
		}
		return RuleUnshareNS, "", map[string]string{"flags": cloneFlags(a[0])}, true
	case KindMount:
		sev = SeverityHigh
		if sensitiveMount(ev.Source, ev.Target, ev.FSType, a[3]) {
			sev = SeverityCritical
		}
		return RuleMount, sev, map[string]string{
			"source": ev.Source, "target": ev.Target, "fstype": ev.FSType,
			"flags": "0x" + strconv.FormatUint(a[3], 16),
		}, true
	case KindPtrace:
		req := ptraceRequest(a[0])
		if req == "" {
			return
		}
		return RulePtraceAttach, "", map[string]string{"request": req, "pid": strconv.FormatUint(uint64(int32(a[1])), 10)}, true
	case KindBPF:
		return RuleBPF, "", map[string]string{"cmd": bpfCmd(a[0])}, true
	case KindModule:
		args := map[string]string{}
		if ev.Syscall == "finit_module" {
			args["fd"] = strconv.FormatInt(int64(int32(a[0])), 10)
			args["flags"] = "0x" + strconv.FormatUint(a[2], 16)
		} else {
			args["len"] = strconv.FormatUint(a[1], 10)
		}
		return RuleModuleLoad, "", args, true
	case KindConnectUnix:
		return RuleRuntimeSocket, "", map[string]string{"path": ev.Target}, true
	case KindConnectMetadata:
		return RuleMetadata, "", map[string]string{"address": ev.Target, "port": strconv.FormatUint(a[1], 10)}, true
	case KindOpen:
		args := map[string]string{"path": ev.Target}
		if ev.Syscall != "openat2" {
			args["flags"] = openFlags(a[0])
		}
		if ev.Rules&Bit(RuleShadow.ID) != 0 {
			if ev.Target != "/etc/shadow" && ev.Target != "/etc/gshadow" {
				// Not the container's own: a host's, mounted in.
				sev = SeverityCritical
			}
			return RuleShadow, sev, args, true
		}
		switch {
		case strings.HasPrefix(ev.Target, "/dev/mem"), strings.HasPrefix(ev.Target, "/dev/kmem"),
			strings.HasPrefix(ev.Target, "/dev/port"), strings.HasPrefix(ev.Target, "/proc/kcore"):
			sev = SeverityCritical
		}
		return RuleRawDevice, sev, args, true
	case KindSockCreate, KindPacketSocket:
		r = RuleRawSocket
		if ev.Kind == KindPacketSocket {
			r = RulePacketSocket
		}
		return r, "", map[string]string{
			"family": sockFamily(a[0]), "type": sockType(a[1]), "protocol": strconv.FormatUint(a[2], 10),
		}, true
	case KindSysctl:
		sev = SeverityHigh
		if ev.Target == "kernel/core_pattern" || ev.Target == "kernel/modprobe" || ev.Target == "kernel/hotplug" {
			// A handler the host kernel runs as root: the classic escape.
			sev = SeverityCritical
		}
		return RuleSysctlWrite, sev, map[string]string{"name": ev.Target, "value": ev.Source}, true
	case KindChroot:
		return RuleChroot, "", map[string]string{"path": ev.Target}, true
	case KindPivotRoot:
		return RuleChroot, "", map[string]string{"new_root": ev.Target, "put_old": ev.Source}, true
	case KindSetuid:
		args := map[string]string{"caller_euid": uid(a[3])}
		switch ev.Syscall {
		case "setuid":
			args["target_uid"] = uid(a[0])
		case "setreuid":
			args["target_ruid"], args["target_euid"] = uid(a[0]), uid(a[1])
		default:
			args["target_ruid"], args["target_euid"], args["target_suid"] = uid(a[0]), uid(a[1]), uid(a[2])
		}
		return RuleSetuidToRoot, "", args, true
	case KindCapset:
		added := (a[0] | a[1] | a[2]) &^ ev.CapPermitted
		return RuleSetuidToRoot, "", map[string]string{
			"effective": hex(a[0]), "permitted": hex(a[1]), "inheritable": hex(a[2]),
			"caller_permitted": hex(ev.CapPermitted), "added": hex(added), "caps": capNames(added),
			"pid": strconv.FormatInt(int64(int32(a[3])), 10),
		}, true
	}
	return
}

// uid shows a uid argument; -1 (leave unchanged) as -1.
func uid(u uint64) string {
	if uint32(u) == ^uint32(0) {
		return "-1"
	}
	return strconv.FormatUint(uint64(uint32(u)), 10)
}

func hex(v uint64) string { return "0x" + strconv.FormatUint(v, 16) }

var capabilityNames = []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
	"CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
	"CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
	"CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
	"CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
	"CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
	"CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"}

// capNames names the capabilities in set, in bit order; bits past the
// known ones as their number.
func capNames(set uint64) string {
	var parts []string
	for i := range 64 {
		if set&(1<<i) == 0 {
			continue
		}
		if i < len(capabilityNames) {
			parts = append(parts, capabilityNames[i])
		} else {
			parts = append(parts, strconv.Itoa(i))
		}
	}
	return strings.Join(parts, "|")
}

func sockFamily(f uint64) string {
	switch f {
	case unix.AF_UNIX:
		return "AF_UNIX"
	case unix.AF_PACKET:
		return "AF_PACKET"
	case unix.AF_INET:
		return "AF_INET"
	case unix.AF_INET6:
		return "AF_INET6"
	}
	return strconv.FormatUint(f, 10)
}

func sockType(t uint64) string {
	switch t {
	case unix.SOCK_RAW:
		return "SOCK_RAW"
	case unix.SOCK_DGRAM:
		return "SOCK_DGRAM"
	case unix.SOCK_STREAM:
		return "SOCK_STREAM"
	}
	return strconv.FormatUint(t, 10)
}

// sensitiveMount: the mounts that hand a pod the host (issue 14's list). A
// propagation change (mount --make-private /) mounts nothing new.
func sensitiveMount(source, target, fstype string, flags uint64) bool {
	if flags&(unix.MS_PRIVATE|unix.MS_SHARED|unix.MS_SLAVE|unix.MS_UNBINDABLE) != 0 {
		return false
	}
	switch fstype {
	case "cgroup", "cgroup2", "proc", "sysfs", "devtmpfs", "debugfs", "bpf", "securityfs":
		return true
	}
	return strings.HasPrefix(source, "/dev/") || source == "/" || target == "/"
}

func ptraceRequest(req uint64) string {
	switch req {
	case unix.PTRACE_ATTACH:
		return "PTRACE_ATTACH"
	case unix.PTRACE_SEIZE:
		return "PTRACE_SEIZE"
	}
	return ""
}

var cloneNames = []struct {
	flag uint64
	name string
}{
	{unix.CLONE_NEWUSER, "CLONE_NEWUSER"}, {unix.CLONE_NEWNS, "CLONE_NEWNS"}, {unix.CLONE_NEWNET, "CLONE_NEWNET"},
	{unix.CLONE_NEWPID, "CLONE_NEWPID"}, {unix.CLONE_NEWUTS, "CLONE_NEWUTS"}, {unix.CLONE_NEWIPC, "CLONE_NEWIPC"},
	{unix.CLONE_NEWCGROUP, "CLONE_NEWCGROUP"}, {unix.CLONE_NEWTIME, "CLONE_NEWTIME"},
}

// cloneFlags names the namespace flags in f; other bits are shown in hex.
func cloneFlags(f uint64) string {
	if f == 0 {
		return "0"
	}
	var parts []string
	for _, c := range cloneNames {
		if f&c.flag != 0 {
			parts = append(parts, c.name)
			f &^= c.flag
		}
	}
	if f != 0 {
		parts = append(parts, fmt.Sprintf("0x%x", f))
	}
	return strings.Join(parts, "|")
}

var bpfCmds = []string{"BPF_MAP_CREATE", "BPF_MAP_LOOKUP_ELEM", "BPF_MAP_UPDATE_ELEM", "BPF_MAP_DELETE_ELEM",
	"BPF_MAP_GET_NEXT_KEY", "BPF_PROG_LOAD", "BPF_OBJ_PIN", "BPF_OBJ_GET", "BPF_PROG_ATTACH", "BPF_PROG_DETACH"}

func bpfCmd(c uint64) string {
	if c < uint64(len(bpfCmds)) {
		return bpfCmds[c]
	}
	return strconv.FormatUint(c, 10)
}

// openFlags names an open's access mode and the flags that matter here.
func openFlags(f uint64) string {
	var parts []string
	switch f & unix.O_ACCMODE {
	case unix.O_WRONLY:
		parts = append(parts, "O_WRONLY")
	case unix.O_RDWR:
		parts = append(parts, "O_RDWR")
	default:
		parts = append(parts, "O_RDONLY")
	}
	for _, fl := range []struct {
		bit  uint64
		name string
	}{{unix.O_CREAT, "O_CREAT"}, {unix.O_TRUNC, "O_TRUNC"}, {unix.O_APPEND, "O_APPEND"}, {unix.O_PATH, "O_PATH"}} {
		if f&fl.bit != 0 {
			parts = append(parts, fl.name)
		}
	}
	return strings.Join(parts, "|")
}
