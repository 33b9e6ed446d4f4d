package install

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// lockName is the lock file in the state folder.
const lockName = "lock"

// lock takes the installer's exclusive lock: two installers (an init
// container and a sidecar, two pods of a rollout) must not both read the
// primary's file and both write it. flock is per open file, so goroutines of
// one process exclude each other too; the kernel drops it when the process
// dies. Uninstall removes the lock file, so a lock taken on a file that is no
// longer at its path is retaken on the new one.
func lock(stateDir string) (unlock func(), err error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create state folder: %w", err)
	}
	path := filepath.Join(stateDir, lockName)
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("open lock %s: %w", path, err)
		}
		if err := flock(f); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		held, herr := f.Stat()
		cur, cerr := os.Stat(path)
		if herr == nil && cerr == nil && os.SameFile(held, cur) {
			return func() { f.Close() }, nil
		}
		// Removed (or replaced) while we waited: the holder finished an
		// uninstall. Lock what is at the path now.
		f.Close()
		if cerr != nil && !os.IsNotExist(cerr) {
			return nil, fmt.Errorf("lock %s: %w", path, cerr)
		}
		if err := os.MkdirAll(stateDir, 0o700); err != nil {
			return nil, fmt.Errorf("create state folder: %w", err)
		}
	}
}

func flock(f *os.File) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != syscall.EINTR {
			return err
		}
	}
}
