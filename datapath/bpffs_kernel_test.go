package datapath

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// mountCount counts the mounts at mp in this mount namespace.
func mountCount(t *testing.T, mp string) int {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && fields[4] == mp {
			n++
		}
	}
	return n
}

// TestEnsureBPFFSMounts plays a fresh node on a mount point of its own: the
// node's /sys/fs/bpf is never mounted or unmounted here.
func TestEnsureBPFFSMounts(t *testing.T) {
	privileged.Require(t)
	root := t.TempDir()
	mp := filepath.Join(root, "bpf")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	pins := filepath.Join(mp, "bulkhead", "sub")
	if on, at, err := onBPFFS(pins); err != nil || on || at != mp {
		t.Fatalf("before mounting: on %v at %s, %v; want false at %s", on, at, err, mp)
	}
	t.Cleanup(func() {
		for mountCount(t, mp) > 0 {
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", mp, err)
				return
			}
		}
	})
	if err := ensureBPFFS(pins, mp); err != nil {
		t.Fatal(err)
	}
	if on, _, err := onBPFFS(pins); err != nil || !on {
		t.Fatalf("after EnsureBPFFS: on %v, %v", on, err)
	}
	// Pinning works there: mkdir on bpffs, as the datapath does.
	if err := os.MkdirAll(pins, 0o700); err != nil {
		t.Fatalf("mkdir on the new bpffs: %v", err)
	}
	if err := ensureBPFFS(pins, mp); err != nil {
		t.Fatal(err)
	}
	if n := mountCount(t, mp); n != 1 {
		t.Errorf("%d mounts at %s after a second call, want 1", n, mp)
	}
}

func TestEnsureBPFFSRefusesOtherPaths(t *testing.T) {
	privileged.Require(t)
	root := t.TempDir()
	mp := filepath.Join(root, "bpf")
	other := filepath.Join(root, "elsewhere", "bulkhead")
	err := ensureBPFFS(other, mp)
	if err == nil || !strings.Contains(err.Error(), other+" is not on a bpffs mount") || !strings.Contains(err.Error(), root+" is not bpffs") {
		t.Fatalf("error %v; want one naming %s and %s", err, other, root)
	}
	if n := mountCount(t, mp); n != 0 {
		t.Errorf("mounted something at %s for a path outside it", mp)
	}
}

// The node's own bpffs is recognised (read only: nothing is mounted).
func TestBPFFSDetectsTheNodes(t *testing.T) {
	privileged.Require(t)
	var st unix.Statfs_t
	if err := unix.Statfs(StandardBPFFS, &st); err != nil || uint32(st.Type) != unix.BPF_FS_MAGIC {
		privileged.Unsupported(t, "%s is not a bpffs mount on this machine", StandardBPFFS)
	}
	if on, _, err := onBPFFS(filepath.Join(StandardBPFFS, "no-such-dir", "bulkhead")); err != nil || !on {
		t.Fatalf("onBPFFS under %s: %v, %v", StandardBPFFS, on, err)
	}
	if err := EnsureBPFFS(filepath.Join(StandardBPFFS, "no-such-dir")); err != nil {
		t.Fatal(err)
	}
	if on, _, _ := onBPFFS(os.TempDir()); on {
		t.Errorf("%s reported as bpffs", os.TempDir())
	}
}
