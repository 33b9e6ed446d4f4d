package devca

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// Names of the files in the CA folder. Copying the folder (with its modes)
// to another node shares the CA.
const (
	KeyFile    = "ca.key"     // PKCS#8 PEM, mode 0600
	BundleFile = "bundle.pem" // the self-signed CA certificate, PEM
	lockFile   = "ca.lock"    // flock'ed while loading or creating
)

// maxFileSize bounds what the loader reads: a P-256 key or one certificate
// is far below it, anything larger is not ours.
const maxFileSize = 64 << 10

// lockDir takes an exclusive flock on the folder's lock file, so that two
// processes (or two Opens in one process: flock locks belong to the open
// file, not the process) never both find the folder empty and create two
// CAs. The returned function releases it.
func lockDir(dir string) (func(), error) {
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open ca lock %s: %w", path, err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	// Closing the file drops the lock.
	return func() { _ = f.Close() }, nil
}

// prepareDir creates the folder 0700 when it is missing and refuses one that
// others could write to: whoever can replace the files there can replace
// the CA.
func prepareDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create ca folder %s: %w", dir, err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("ca folder %s: %w", dir, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("ca folder %s: not a directory", dir)
	}
	if st.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("ca folder %s: mode %04o is writable by group or others (want 0700): %w",
			dir, st.Mode().Perm(), ErrInsecurePermissions)
	}
	return nil
}

// writeFileAtomic writes data to dir/name through a 0600 temporary file in
// the same folder that is synced and then renamed over the target, and syncs
// the folder: after a crash the file is either absent or whole.
func writeFileAtomic(dir, name string, data []byte) (err error) {
	tmp, err := os.CreateTemp(dir, "."+name+".*.tmp") // CreateTemp uses 0600
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(0o600); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", name, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("rename %s: %w", name, err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync ca folder %s: %w", dir, err)
	}
	defer func() { _ = d.Close() }()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync ca folder %s: %w", dir, err)
	}
	return nil
}

// readFile reads a file of the CA folder, bounded in size. With private set
// it refuses a file that group or others may read or write, or that belongs
// to another user than us or root. The checks are made on the opened file,
// so a rename between check and read cannot slip another file in.
// A missing file reports fs.ErrNotExist.
func readFile(path string, private bool) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file: %w", path, ErrMalformed)
	}
	if private {
		if perm := st.Mode().Perm(); perm&0o077 != 0 {
			return nil, fmt.Errorf("%s: mode %04o lets group or others at the CA key (want 0600; chmod 600 it): %w",
				path, perm, ErrInsecurePermissions)
		}
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			if euid := uint32(os.Geteuid()); sys.Uid != euid && sys.Uid != 0 {
				return nil, fmt.Errorf("%s: owned by uid %d, not by us (uid %d) or root: %w",
					path, sys.Uid, euid, ErrInsecurePermissions)
			}
		}
	}
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(data) > maxFileSize {
		return nil, fmt.Errorf("%s: larger than %d bytes: %w", path, maxFileSize, ErrMalformed)
	}
	return data, nil
}

// exists reports whether path exists, and an error other than absence.
func exists(path string) (bool, error) {
	_, err := os.Lstat(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	default:
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
}
