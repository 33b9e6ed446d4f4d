package runtime

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// StandardTracefs is where the kernel's tracefs lives on a modern system,
// and where EnsureTracefs mounts it when nothing is there.
const StandardTracefs = "/sys/kernel/tracing"

// EnsureTracefs makes sure tracefs is mounted at StandardTracefs, which
// attaching a tracepoint needs (the perf event is opened by the ID found
// there). A fresh node often has none. mounted tells whether this call
// mounted it.
func EnsureTracefs() (mounted bool, err error) { return ensureTracefs(StandardTracefs) }

// ensureTracefs is EnsureTracefs at another mount point (tests use their own
// folder, so that they never touch the node's).
func ensureTracefs(dir string) (bool, error) {
	on, err := isTracefs(dir)
	if err != nil {
		return false, err
	}
	if on {
		return false, nil
	}
	// As the kernel's own automount of /sys/kernel/debug/tracing does:
	// root-only, no devices, no setuid, no exec.
	if err := unix.Mount("tracefs", dir, "tracefs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700"); err != nil {
		return false, fmt.Errorf("mount tracefs at %s: %w", dir, err)
	}
	if on, err := isTracefs(dir); err != nil || !on {
		return true, fmt.Errorf("mounted tracefs at %s, but statfs does not see it (%v)", dir, err)
	}
	return true, nil
}

func isTracefs(dir string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		if os.IsNotExist(err) {
			return false, fmt.Errorf("statfs %s: %w (is the kernel built with CONFIG_TRACING?)", dir, err)
		}
		return false, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return uint32(st.Type) == unix.TRACEFS_MAGIC, nil
}
