package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// StandardBPFFS is where systemd and most distributions mount bpffs, and
// where EnsureBPFFS mounts it on a node that has none.
const StandardBPFFS = "/sys/fs/bpf"

// EnsureBPFFS makes sure dir (the --bpffs pin folder, which may not exist
// yet) lies on a bpffs mount. On a fresh node without one, a dir under
// /sys/fs/bpf gets bpffs mounted at /sys/fs/bpf; any other dir that is not
// on bpffs is an error naming it, since pins there would fail later with a
// less helpful error.
func EnsureBPFFS(dir string) error { return ensureBPFFS(dir, StandardBPFFS) }

// ensureBPFFS is EnsureBPFFS with the mount point to use (tests give their
// own, so that they never touch the node's /sys/fs/bpf).
func ensureBPFFS(dir, mountpoint string) error {
	on, at, err := onBPFFS(dir)
	if err != nil {
		return err
	}
	if on {
		return nil
	}
	if !within(dir, mountpoint) || filepath.Clean(at) != filepath.Clean(mountpoint) && within(at, mountpoint) {
		// Outside the standard place, or below it on some other mount:
		// mounting at mountpoint would not put dir on bpffs.
		return fmt.Errorf("%s is not on a bpffs mount (%s is not bpffs); mount one (mount -t bpf bpf %s) or use a folder under %s",
			dir, at, at, mountpoint)
	}
	// mode=0700 as systemd mounts it: pins are root's.
	if err := unix.Mount("bpf", mountpoint, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("%s is not on a bpffs mount, and mounting bpffs at %s failed: %w", dir, mountpoint, err)
	}
	if on, _, err := onBPFFS(dir); err != nil || !on {
		return fmt.Errorf("mounted bpffs at %s, but %s is still not on it (%v)", mountpoint, dir, err)
	}
	return nil
}

// onBPFFS reports whether dir, or (while it does not exist) its nearest
// existing ancestor, is on bpffs; at is the folder it checked.
func onBPFFS(dir string) (on bool, at string, err error) {
	at = filepath.Clean(dir)
	for {
		var st unix.Statfs_t
		err := unix.Statfs(at, &st)
		if err == nil {
			return uint32(st.Type) == unix.BPF_FS_MAGIC, at, nil
		}
		if !errors.Is(err, fs.ErrNotExist) || at == filepath.Dir(at) {
			return false, at, fmt.Errorf("statfs %s: %w", at, err)
		}
		at = filepath.Dir(at)
	}
}

// within reports whether p is root or below it.
func within(p, root string) bool {
	rel, err := filepath.Rel(filepath.Clean(root), filepath.Clean(p))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(os.PathSeparator))
}
