package demo

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// netnsRunDir is where `ip netns` keeps named namespaces, so that users can
// inspect the demo's pods with `ip netns exec` while it runs with --keep.
const netnsRunDir = "/run/netns"

// createNetns creates a named network namespace, persisted by a bind mount
// under /run/netns as `ip netns add` does, without switching the caller.
func createNetns(name string) (ns.NetNS, error) {
	if err := os.MkdirAll(netnsRunDir, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", netnsRunDir, err)
	}
	// The bind mounts must propagate to mount namespaces created later
	// (runtimes, `ip netns exec`), so the directory has to be a shared
	// mount point; bind it onto itself first when it is not a mount point.
	if err := unix.Mount("", netnsRunDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		if !errors.Is(err, unix.EINVAL) {
			return nil, fmt.Errorf("make %s shared: %w", netnsRunDir, err)
		}
		if err := unix.Mount(netnsRunDir, netnsRunDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return nil, fmt.Errorf("bind %s onto itself: %w", netnsRunDir, err)
		}
		if err := unix.Mount("", netnsRunDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
			return nil, fmt.Errorf("make %s shared: %w", netnsRunDir, err)
		}
	}
	path := filepath.Join(netnsRunDir, name)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return nil, fmt.Errorf("create netns file: %w", err)
	}
	f.Close()

	errc := make(chan error, 1)
	// Unshare changes the calling thread only, so it runs on a thread of
	// its own, locked to this goroutine.
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			errc <- fmt.Errorf("open current netns: %w", err)
			return // the thread stays locked, so Go discards it
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		err = unix.Mount(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), path, "none", unix.MS_BIND, "")
		if err != nil {
			err = fmt.Errorf("bind mount netns at %s: %w", path, err)
		}
		// Only a thread back in the original namespace may be reused by
		// other goroutines; one that cannot return stays locked and dies.
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		_ = os.Remove(path)
		return nil, err
	}
	n, err := ns.GetNS(path)
	if err != nil {
		_ = removeNetns(path)
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	return n, nil
}

// removeNetns unmounts and removes a namespace created by createNetns. The
// kernel frees it, and the pod end of its veth with it (which takes the
// host end along), once no socket or process holds it any more.
func removeNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}
