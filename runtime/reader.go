package runtime

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
	"unsafe"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// EventSize is the size of one struct sysmon_event record.
const EventSize = int(unsafe.Sizeof(sysmonSysmonEvent{}))

// ErrShortEvent is returned for a record shorter than EventSize.
var ErrShortEvent = errors.New("short sysmon event")

// The event flags (enum sysmon_flag in bpf/include/sysmon.h).
const (
	smfTargetOwn  = 1 << 0
	smfBlocked    = 1 << 1
	smfKilled     = 1 << 2
	smfKillFailed = 1 << 3
)

// Reader reads the monitor's events. One goroutine reads; Close from
// another unblocks it.
type Reader struct {
	rd *ringbuf.Reader
	// monoToWall converts the kernel's CLOCK_MONOTONIC stamps.
	monoToWall time.Duration
}

// NewReader opens a reader on the event ring buffer. There is one ring
// buffer: open one reader per Monitor.
func (m *Monitor) NewReader() (*Reader, error) {
	rd, err := ringbuf.NewReader(m.objs.SysmonEvents)
	if err != nil {
		return nil, fmt.Errorf("open sysmon ring buffer: %w", err)
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		rd.Close()
		return nil, fmt.Errorf("read CLOCK_MONOTONIC: %w", err)
	}
	return &Reader{rd: rd, monoToWall: time.Duration(time.Now().UnixNano() - ts.Nano())}, nil
}

// SetDeadline makes Read return os.ErrDeadlineExceeded after t; the zero
// time blocks.
func (r *Reader) SetDeadline(t time.Time) { r.rd.SetDeadline(t) }

// Read blocks for the next event. After Close it returns ringbuf.ErrClosed.
func (r *Reader) Read() (detect.Event, error) {
	rec, err := r.rd.Read()
	if err != nil {
		return detect.Event{}, err
	}
	ev, mono, err := DecodeEvent(rec.RawSample)
	if err != nil {
		return ev, err
	}
	ev.Time = time.Unix(0, int64(mono)+int64(r.monoToWall))
	return ev, nil
}

// Close stops the reader.
func (r *Reader) Close() error { return r.rd.Close() }

// DecodeEvent decodes one ring-buffer record. Time is left zero; mono is
// the kernel's CLOCK_MONOTONIC stamp, which the reader converts. Events arrive at syscall rates that a rule would care
// about, not packet rates, so binary.Read's allocation is fine here.
func DecodeEvent(raw []byte) (ev detect.Event, mono uint64, err error) {
	if len(raw) < EventSize {
		return ev, 0, fmt.Errorf("decode sysmon event: %w: %d bytes, want %d", ErrShortEvent, len(raw), EventSize)
	}
	var s sysmonSysmonEvent
	if err := binary.Read(bytes.NewReader(raw[:EventSize]), binary.NativeEndian, &s); err != nil {
		return ev, 0, fmt.Errorf("decode sysmon event: %w", err)
	}
	ev = detect.Event{
		Kind: detect.Kind(s.Kind), Syscall: syscallName(s.SyscallNr), Netns: s.Netns, CgroupID: s.CgroupId,
		PID: s.Pid, TID: s.Tid, PPID: s.Ppid, UID: s.Uid, StartNs: s.StartNs, Comm: cString(s.Comm[:]), Args: s.Args,
		TargetNS: s.TargetIno, TargetOwn: s.Flags&smfTargetOwn != 0,
		Blocked: s.Flags&smfBlocked != 0, Killed: s.Flags&smfKilled != 0, KillFailed: s.Flags&smfKillFailed != 0,
	}
	switch ev.Kind {
	case detect.KindMount:
		ev.Source, ev.Target, ev.FSType = cString(s.Str[0][:]), cString(s.Str[1][:]), cString(s.Str[2][:])
	case detect.KindExec:
		ev.Syscall = "execve"
		ev.Exe = cString(s.Str[0][:])
		ev.Argv, ev.ArgvTruncated = splitArgv(s.Str[1][:], s.Str[2][:], s.Args[0])
		ev.Rules, ev.KillRules = s.Rules, s.KillRules
		ev.ExeLinks, ev.ExeInode = uint32(s.Args[1]), s.TargetIno
		ev.StdioSocket, ev.SocketFamily = int(int64(s.Args[2])), uint16(s.Args[3])
		if ev.StdioSocket < 0 {
			ev.StdioSocket, ev.SocketFamily = -1, 0
		}
		ev.Args, ev.TargetNS = [4]uint64{}, 0
	case detect.KindOpen:
		ev.Target = cString(append(append([]int8{}, s.Str[0][:]...), s.Str[1][:]...))
		ev.Rules = s.Rules
	case detect.KindConnectMetadata:
		ev.Syscall = "connect"
		var b [16]byte
		for i := range b {
			b[i] = byte(s.Str[0][i])
		}
		ev.Target = netip.AddrFrom16(b).Unmap().String()
	case detect.KindConnectUnix:
		ev.Syscall = "connect"
		ev.Target = cString(append(append([]int8{}, s.Str[0][:]...), s.Str[1][:]...))
	case detect.KindSockCreate, detect.KindPacketSocket:
		ev.Syscall = "socket"
	case detect.KindChroot:
		ev.Target = cString(s.Str[0][:])
	case detect.KindPivotRoot:
		ev.Target, ev.Source = cString(s.Str[0][:]), cString(s.Str[1][:])
	case detect.KindCapset:
		ev.CapPermitted, ev.TargetNS = s.TargetIno, 0
	case detect.KindSysctl:
		ev.Syscall = "write"
		ev.Target = cString(append(append([]int8{}, s.Str[0][:]...), s.Str[1][:]...))
		ev.Source = strings.TrimRight(cString(s.Str[2][:]), "\n")
	}
	return ev, s.TsNs, nil
}

// splitArgv splits the NUL-separated argv the kernel copied (its first
// len(a)+len(b) bytes of full bytes). A last argument cut short is kept as
// far as it goes.
func splitArgv(a, b []int8, full uint64) ([]string, bool) {
	n := min(full, uint64(len(a)+len(b)))
	raw := make([]byte, 0, n)
	for _, c := range append(append([]int8{}, a...), b...)[:n] {
		raw = append(raw, byte(c))
	}
	raw = bytes.TrimSuffix(raw, []byte{0})
	var argv []string
	if len(raw) > 0 {
		for _, f := range bytes.Split(raw, []byte{0}) {
			argv = append(argv, string(f))
		}
	}
	return argv, full > n
}

func cString(b []int8) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		out = append(out, byte(c))
	}
	return string(out)
}

func syscallName(nr int64) string {
	switch nr {
	case unix.SYS_SETNS:
		return "setns"
	case unix.SYS_UNSHARE:
		return "unshare"
	case unix.SYS_MOUNT:
		return "mount"
	case unix.SYS_PTRACE:
		return "ptrace"
	case unix.SYS_BPF:
		return "bpf"
	case unix.SYS_INIT_MODULE:
		return "init_module"
	case unix.SYS_FINIT_MODULE:
		return "finit_module"
	case unix.SYS_CHROOT:
		return "chroot"
	case unix.SYS_PIVOT_ROOT:
		return "pivot_root"
	case unix.SYS_SETUID:
		return "setuid"
	case unix.SYS_SETREUID:
		return "setreuid"
	case unix.SYS_SETRESUID:
		return "setresuid"
	case unix.SYS_CAPSET:
		return "capset"
	case unix.SYS_OPEN:
		return "open"
	case unix.SYS_OPENAT:
		return "openat"
	case unix.SYS_OPENAT2:
		return "openat2"
	}
	return fmt.Sprintf("syscall-%d", nr)
}
