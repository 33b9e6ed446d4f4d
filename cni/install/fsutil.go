package install

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// tempPattern names this package's temporary files. They are hidden, so
// neither a runtime (which reads only *.conf, *.conflist and *.json) nor the
// primary search here ever reads one half written.
const tempPattern = ".bulkhead-*.tmp"

// writeAtomic replaces path with data: a temporary file in the same folder
// is written, synced, given mode perm, and renamed over path, so a reader
// sees the old content or the new, never a mix. The folder is synced so the
// rename survives a crash.
func writeAtomic(path string, data []byte, perm fs.FileMode) error {
	return writeAtomicFrom(path, bytes.NewReader(data), perm)
}

func writeAtomicFrom(path string, r io.Reader, perm fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, tempPattern)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = io.Copy(f, r); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	// Chmod, not the umask-filtered mode of create: an executable must be
	// 0755 whatever the installer's umask.
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("chmod %s: %w", tmp, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s to %s: %w", tmp, path, err)
	}
	return syncDir(dir)
}

// removeSynced removes path (absent is fine) and syncs its folder.
func removeSynced(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// copyBinary installs src at dst with mode 0755. An identical dst is left
// alone, so a restart of the installer does not replace the binary under a
// runtime that is executing it.
func copyBinary(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("open plugin binary: %w", err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return fmt.Errorf("open plugin binary: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("plugin binary %s is not a regular file", src)
	}
	if same, err := sameContent(in, dst); err == nil && same {
		return nil
	}
	if _, err := in.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("read plugin binary %s: %w", src, err)
	}
	return writeAtomicFrom(dst, in, 0o755)
}

// sameContent says whether dst is a 0755 regular file with src's content.
func sameContent(src *os.File, dst string) (bool, error) {
	st, err := os.Stat(dst)
	if err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != 0o755 {
		return false, err
	}
	sst, err := src.Stat()
	if err != nil || sst.Size() != st.Size() {
		return false, err
	}
	a, err := io.ReadAll(src)
	if err != nil {
		return false, err
	}
	b, err := os.ReadFile(dst)
	if err != nil {
		return false, err
	}
	return bytes.Equal(a, b), nil
}
