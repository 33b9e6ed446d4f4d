// Package detect maps the system monitor's syscall events to alerts: the
// rules, their IDs and MITRE ATT&CK techniques, and the alert record. It is
// pure Go (no BPF): the runtime package decodes ring-buffer records into
// Events, and the tests here feed Events directly.
package detect

import (
	"fmt"
	"time"
)

// Kind is the hooked syscall family (enum sysmon_kind in bpf/include/sysmon.h;
// the runtime package's test checks the two agree).
type Kind uint16

const (
	KindSetns   Kind = 1
	KindUnshare Kind = 2
	KindMount   Kind = 3
	KindPtrace  Kind = 4
	KindBPF     Kind = 5
	// KindModule is init_module or finit_module; Event.Syscall tells which.
	KindModule Kind = 6
	// KindExec is a successful exec; it feeds the ProcessCache and raises
	// no alert by itself.
	KindExec Kind = 7
	// The cgroup hooks' kinds: these can block.
	KindConnectUnix Kind = 8
	KindSockCreate  Kind = 9
	KindSysctl      Kind = 10
	// KindPacketSocket is socket(AF_PACKET), from a tracepoint.
	KindPacketSocket Kind = 11
	// KindChroot and KindPivotRoot change the caller's root.
	KindChroot    Kind = 12
	KindPivotRoot Kind = 13
	// KindSetuid is setuid, setreuid or setresuid (Event.Syscall tells
	// which) asking for root from a caller whose real uid is neither the
	// node's root nor its user namespace's; the kernel sends no other.
	KindSetuid Kind = 14
	// KindCapset is capset asking for a capability the caller lacks, from
	// a caller whose real uid is not root (as for KindSetuid); the kernel
	// sends no other.
	KindCapset Kind = 15
	// KindConnectMetadata is a connect to a cloud instance metadata
	// address (Event.Target the address, Args[1] the port).
	KindConnectMetadata Kind = 16
	// KindOpen is open, openat or openat2 (Event.Syscall tells which) of
	// a path an open rule matched (Event.Rules), Event.Target the path.
	KindOpen Kind = 17
)

func (k Kind) String() string {
	switch k {
	case KindSetns:
		return "setns"
	case KindUnshare:
		return "unshare"
	case KindMount:
		return "mount"
	case KindPtrace:
		return "ptrace"
	case KindBPF:
		return "bpf"
	case KindModule:
		return "module"
	case KindExec:
		return "exec"
	case KindConnectUnix:
		return "connect_unix"
	case KindSockCreate:
		return "sock_create"
	case KindSysctl:
		return "sysctl"
	case KindPacketSocket:
		return "packet_socket"
	case KindChroot:
		return "chroot"
	case KindPivotRoot:
		return "pivot_root"
	case KindSetuid:
		return "setuid"
	case KindCapset:
		return "capset"
	case KindConnectMetadata:
		return "connect_metadata"
	case KindOpen:
		return "open"
	}
	return fmt.Sprintf("kind-%d", uint16(k))
}

// Event is one syscall entry seen by the monitor in a watched namespace.
type Event struct {
	// Time is when the hook ran (converted from CLOCK_MONOTONIC).
	Time     time.Time
	Kind     Kind
	Syscall  string // "setns", "finit_module", ...
	Netns    uint32 // the caller's network namespace inode at entry
	CgroupID uint64
	PID      uint32 // thread group ID
	TID      uint32
	PPID     uint32
	UID      uint32
	// StartNs is the process's start time (CLOCK_MONOTONIC): with PID, it
	// tells a process from a later one that reuses its PID.
	StartNs uint64
	Comm    string
	// Args are the syscall's first four arguments, raw.
	Args [4]uint64
	// TargetNS (setns) is the inode of the file behind the fd: the target
	// namespace's inode for a namespace file; 0 when the fd was not open.
	TargetNS uint64
	// TargetOwn (setns): the target is one of the caller's own namespaces.
	TargetOwn bool
	// Source, Target and FSType are mount's strings (empty for others).
	// Connect_unix puts the socket path in Target; sysctl puts the name
	// (kernel/core_pattern) in Target and the value written in Source;
	// chroot puts its path in Target; pivot_root puts new_root in Target
	// and put_old in Source.
	Source, Target, FSType string
	// Blocked: a cgroup hook denied the operation (the caller saw EPERM).
	Blocked bool
	// Killed: the hook queued SIGKILL for the caller; KillFailed: it was
	// asked to and bpf_send_signal failed.
	Killed, KillFailed bool
	// Exe and Argv are exec's file and arguments; ArgvTruncated tells that
	// the kernel sent only the first bytes of a longer argv.
	Exe           string
	Argv          []string
	ArgvTruncated bool
	// Rules (exec) are the rule bits (Bit) the kernel matched: the exec
	// rules need what only the kernel sees, and one exec can match
	// several. KillRules are those of them the SIGKILL was queued for.
	Rules, KillRules uint32
	// ExeLinks (exec) is the executable's link count: 0 for a file with no
	// name on disk (memfd_create, O_TMPFILE, deleted). ExeInode is its
	// inode number.
	ExeLinks uint32
	ExeInode uint64
	// StdioSocket (exec of a shell) is the fd, 0 or 1, that is a socket;
	// -1 when neither is. SocketFamily is that socket's address family.
	StdioSocket  int
	SocketFamily uint16
	// CapPermitted (capset) is the caller's permitted set at the call;
	// Args are the effective, permitted and inheritable sets asked for
	// and the header's pid.
	CapPermitted uint64
}

// Endpoint is what the agent knows about the pod behind a watched netns.
type Endpoint struct {
	ID        string `json:"endpoint,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	Pod       string `json:"pod_name,omitempty"`
	SPIFFEID  string `json:"spiffe_id,omitempty"`
	Netns     uint32 `json:"netns_inode"`
	// Actions are the kernel's answers for this pod (from its
	// BulkheadRuntimePolicy); the zero value alerts only.
	Actions Actions `json:"-"`
}

// Actions are a pod's answers other than Alert, as rule bits (Rule.Bit):
// the kernel reads them from the watch map.
type Actions struct {
	Block uint32 // denied by a cgroup hook
	Kill  uint32 // SIGKILL at syscall entry
}
