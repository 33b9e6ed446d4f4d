// Package kubeletvol updates a folder the way kubelet updates a ConfigMap
// volume (pkg/volume/util AtomicWriter), so that tests can mount a store
// as a cluster would. Only tests import it.
package kubeletvol

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// Write makes dir hold exactly files (name → content), in kubelet's order:
// the payload goes into a new timestamped folder, a new ..data_tmp symlink
// to it is renamed over ..data (the one atomic step), visible names are
// created as symlinks through ..data, visible names no longer in the
// payload are removed, and the old timestamped folder is removed last.
func Write(t testing.TB, dir string, files map[string]string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("kubelet volume update of %s: %v", dir, err)
		}
	}
	dataPath := filepath.Join(dir, "..data")
	oldTs, err := os.Readlink(dataPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		must(err)
	}
	var old []string
	if oldTs != "" {
		entries, err := os.ReadDir(filepath.Join(dir, oldTs))
		must(err)
		for _, e := range entries {
			old = append(old, e.Name())
		}
	}
	tsDir, err := os.MkdirTemp(dir, time.Now().UTC().Format("..2006_01_02_15_04_05."))
	must(err)
	must(os.Chmod(tsDir, 0o755))
	for name, content := range files {
		must(os.WriteFile(filepath.Join(tsDir, name), []byte(content), 0o644))
	}
	tmp := filepath.Join(dir, "..data_tmp")
	must(os.Symlink(filepath.Base(tsDir), tmp))
	must(os.Rename(tmp, dataPath))
	for name := range files {
		link := filepath.Join(dir, name)
		if _, err := os.Lstat(link); errors.Is(err, os.ErrNotExist) {
			must(os.Symlink(filepath.Join("..data", name), link))
		}
	}
	for _, name := range old {
		if _, keep := files[name]; !keep && !slices.Contains([]string{"..data", "..data_tmp"}, name) {
			must(os.Remove(filepath.Join(dir, name)))
		}
	}
	if oldTs != "" {
		must(os.RemoveAll(filepath.Join(dir, oldTs)))
	}
}
