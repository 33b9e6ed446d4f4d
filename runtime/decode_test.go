package runtime

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// The Go kinds are the C enum's: a renumbering in bpf/include/sysmon.h fails
// here instead of mislabelling events.
func TestKindsMatchC(t *testing.T) {
	for c, g := range map[sysmonSysmonKind]detect.Kind{
		sysmonSysmonKindSM_SETNS: detect.KindSetns, sysmonSysmonKindSM_UNSHARE: detect.KindUnshare,
		sysmonSysmonKindSM_MOUNT: detect.KindMount, sysmonSysmonKindSM_PTRACE: detect.KindPtrace,
		sysmonSysmonKindSM_BPF: detect.KindBPF, sysmonSysmonKindSM_MODULE: detect.KindModule,
		sysmonSysmonKindSM_EXEC: detect.KindExec, sysmonSysmonKindSM_CONNECT_UNIX: detect.KindConnectUnix,
		sysmonSysmonKindSM_SOCK_CREATE: detect.KindSockCreate, sysmonSysmonKindSM_SYSCTL: detect.KindSysctl,
		sysmonSysmonKindSM_PACKET_SOCKET: detect.KindPacketSocket, sysmonSysmonKindSM_CHROOT: detect.KindChroot,
		sysmonSysmonKindSM_PIVOT_ROOT: detect.KindPivotRoot, sysmonSysmonKindSM_SETUID: detect.KindSetuid,
		sysmonSysmonKindSM_CAPSET: detect.KindCapset,
	} {
		if uint16(c) != uint16(g) {
			t.Errorf("C kind %d is Go kind %d (%s)", c, g, g)
		}
	}
}

func TestDecodeEvent(t *testing.T) {
	var s sysmonSysmonEvent
	s.TsNs, s.CgroupId, s.Netns, s.Pid, s.Tid, s.Ppid, s.Uid = 42, 7, 4026532174, 100, 101, 1, 0
	s.Kind, s.SyscallNr, s.Flags = uint16(sysmonSysmonKindSM_MOUNT), unix.SYS_MOUNT, 0
	s.Args = [4]uint64{1, 2, 3, 4}
	copy8(s.Comm[:], "sh")
	copy8(s.Str[0][:], "/dev/sda1")
	copy8(s.Str[1][:], "/mnt")
	copy8(s.Str[2][:], "ext4")
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.NativeEndian, &s); err != nil {
		t.Fatal(err)
	}
	if buf.Len() != EventSize {
		t.Fatalf("record is %d bytes, EventSize %d", buf.Len(), EventSize)
	}
	ev, mono, err := DecodeEvent(append(buf.Bytes(), 0xff)) // trailing bytes are ignored
	if err != nil {
		t.Fatal(err)
	}
	want := detect.Event{Kind: detect.KindMount, Syscall: "mount", Netns: 4026532174, CgroupID: 7, PID: 100, TID: 101,
		PPID: 1, Comm: "sh", Args: [4]uint64{1, 2, 3, 4}, Source: "/dev/sda1", Target: "/mnt", FSType: "ext4"}
	if !reflect.DeepEqual(ev, want) || mono != 42 {
		t.Errorf("decoded %+v (mono %d), want %+v (mono 42)", ev, mono, want)
	}
	if _, _, err := DecodeEvent(buf.Bytes()[:EventSize-1]); !errors.Is(err, ErrShortEvent) {
		t.Errorf("short record: %v, want ErrShortEvent", err)
	}
}

func TestDecodeExec(t *testing.T) {
	encode := func(s sysmonSysmonEvent) []byte {
		var buf bytes.Buffer
		if err := binary.Write(&buf, binary.NativeEndian, &s); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	var s sysmonSysmonEvent
	s.Kind, s.SyscallNr, s.StartNs = uint16(sysmonSysmonKindSM_EXEC), -1, 99
	copy8(s.Str[0][:], "/usr/bin/unshare")
	argv := "unshare\x00-U\x00/bin/true\x00"
	for i := range len(argv) {
		s.Str[1][i] = int8(argv[i])
	}
	s.Args[0] = uint64(len(argv))
	ev, _, err := DecodeEvent(encode(s))
	if err != nil {
		t.Fatal(err)
	}
	if ev.Kind != detect.KindExec || ev.Exe != "/usr/bin/unshare" || ev.StartNs != 99 || ev.ArgvTruncated ||
		!reflect.DeepEqual(ev.Argv, []string{"unshare", "-U", "/bin/true"}) || ev.Args != [4]uint64{} {
		t.Errorf("exec: %+v", ev)
	}
	// An argv longer than the two strings the kernel fills: cut, and said so.
	for i := range s.Str[1] {
		s.Str[1][i], s.Str[2][i] = 'a', 'b'
	}
	s.Args[0] = 4096
	ev, _, err = DecodeEvent(encode(s))
	if err != nil {
		t.Fatal(err)
	}
	if !ev.ArgvTruncated || len(ev.Argv) != 1 || len(ev.Argv[0]) != 2*len(s.Str[1]) {
		t.Errorf("long argv: truncated %v, %q", ev.ArgvTruncated, ev.Argv)
	}
}

// The exec rules' fields: the kernel's matches, the executable's links and
// inode, the shell's socket.
func TestDecodeExecRules(t *testing.T) {
	var s sysmonSysmonEvent
	s.Kind, s.SyscallNr = uint16(sysmonSysmonKindSM_EXEC), -1
	copy8(s.Str[0][:], "/bin/sh")
	s.Args = [4]uint64{0, 0, 1, unix.AF_INET}
	s.TargetIno, s.Rules, s.KillRules, s.Flags = 1234, 0x3800, 0x2000, smfKilled
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.NativeEndian, &s); err != nil {
		t.Fatal(err)
	}
	ev, _, err := DecodeEvent(buf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if ev.Rules != 0x3800 || ev.KillRules != 0x2000 || !ev.Killed || ev.ExeLinks != 0 || ev.ExeInode != 1234 ||
		ev.StdioSocket != 1 || ev.SocketFamily != unix.AF_INET || ev.TargetNS != 0 || ev.Args != [4]uint64{} {
		t.Errorf("exec: %+v", ev)
	}
	// No socket: fd -1 from the kernel.
	buf.Reset()
	s.Args, s.Rules = [4]uint64{0, 1, ^uint64(0), ^uint64(0)}, 0
	if err := binary.Write(&buf, binary.NativeEndian, &s); err != nil {
		t.Fatal(err)
	}
	if ev, _, _ = DecodeEvent(buf.Bytes()); ev.StdioSocket != -1 || ev.SocketFamily != 0 || ev.ExeLinks != 1 {
		t.Errorf("exec without a socket: %+v", ev)
	}
}

func TestDecodeNewKinds(t *testing.T) {
	decode := func(s sysmonSysmonEvent) detect.Event {
		var buf bytes.Buffer
		if err := binary.Write(&buf, binary.NativeEndian, &s); err != nil {
			t.Fatal(err)
		}
		ev, _, err := DecodeEvent(buf.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		return ev
	}
	var s sysmonSysmonEvent
	s.Kind, s.SyscallNr = uint16(sysmonSysmonKindSM_PIVOT_ROOT), unix.SYS_PIVOT_ROOT
	copy8(s.Str[0][:], "/new")
	copy8(s.Str[1][:], "/new/old")
	if ev := decode(s); ev.Syscall != "pivot_root" || ev.Target != "/new" || ev.Source != "/new/old" {
		t.Errorf("pivot_root: %+v", ev)
	}
	s = sysmonSysmonEvent{Kind: uint16(sysmonSysmonKindSM_CHROOT), SyscallNr: unix.SYS_CHROOT}
	copy8(s.Str[0][:], "/host")
	if ev := decode(s); ev.Syscall != "chroot" || ev.Target != "/host" {
		t.Errorf("chroot: %+v", ev)
	}
	for nr, name := range map[int64]string{unix.SYS_SETUID: "setuid", unix.SYS_SETREUID: "setreuid", unix.SYS_SETRESUID: "setresuid"} {
		s = sysmonSysmonEvent{Kind: uint16(sysmonSysmonKindSM_SETUID), SyscallNr: nr, Args: [4]uint64{0, 1, 2, 3}}
		if ev := decode(s); ev.Syscall != name || ev.Args != [4]uint64{0, 1, 2, 3} {
			t.Errorf("%s: %+v", name, ev)
		}
	}
	s = sysmonSysmonEvent{Kind: uint16(sysmonSysmonKindSM_CAPSET), SyscallNr: unix.SYS_CAPSET, Args: [4]uint64{1, 2, 3, 0}, TargetIno: 0x2000}
	if ev := decode(s); ev.Syscall != "capset" || ev.CapPermitted != 0x2000 || ev.TargetNS != 0 || ev.Args != [4]uint64{1, 2, 3, 0} {
		t.Errorf("capset: %+v", ev)
	}
}

func copy8(dst []int8, s string) {
	for i := range min(len(s), len(dst)-1) {
		dst[i] = int8(s[i])
	}
}
