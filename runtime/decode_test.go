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
		sysmonSysmonKindSM_EXEC: detect.KindExec,
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

func copy8(dst []int8, s string) {
	for i := range min(len(s), len(dst)-1) {
		dst[i] = int8(s[i])
	}
}
