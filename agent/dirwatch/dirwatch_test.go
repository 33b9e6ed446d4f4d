package dirwatch

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func yamlFile(name string) bool {
	return strings.HasSuffix(name, ".yaml") || strings.HasSuffix(name, ".yml")
}

// start runs Watch on dir until the test ends, counting reloads; each
// reload calls check, if set, with quiet.
func start(t *testing.T, dir string, debounce time.Duration, check func(quiet func() bool) bool) *atomic.Int32 {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var reloads atomic.Int32
	done := make(chan error, 1)
	go func() {
		done <- Watch(ctx, dir, Options{Debounce: debounce, StoreFile: yamlFile}, func(quiet func() bool) bool {
			reloads.Add(1)
			if check != nil {
				return check(quiet)
			}
			return true
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch returned %v after cancel", err)
		}
	})
	waitFor(t, func() bool { return reloads.Load() >= 1 }, "initial reload")
	return &reloads
}

func TestWatchDebouncesBursts(t *testing.T) {
	dir := t.TempDir()
	reloads := start(t, dir, 150*time.Millisecond, nil)

	// A burst of ten writes is one reload.
	for i := range 10 {
		writeFile(t, filepath.Join(dir, "p.yaml"), i)
		time.Sleep(10 * time.Millisecond)
	}
	waitFor(t, func() bool { return reloads.Load() == 2 }, "reload after burst")
	time.Sleep(400 * time.Millisecond)
	if n := reloads.Load(); n != 2 {
		t.Fatalf("burst of writes gave %d reloads, want 2 (initial + one); reading must not trigger reloads", n)
	}

	// Files that are not YAML, and hidden files, are ignored.
	writeFile(t, filepath.Join(dir, "notes.txt"), 1)
	writeFile(t, filepath.Join(dir, ".p.yaml.swp"), 1)
	writeFile(t, filepath.Join(dir, ".hidden.yaml"), 1)
	time.Sleep(400 * time.Millisecond)
	if n := reloads.Load(); n != 2 {
		t.Fatalf("irrelevant files gave %d reloads, want 2", n)
	}

	// .yml files are store files too.
	writeFile(t, filepath.Join(dir, "q.yml"), 1)
	waitFor(t, func() bool { return reloads.Load() == 3 }, "reload after a .yml write")

	// Removal is a change too.
	if err := os.Remove(filepath.Join(dir, "p.yaml")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return reloads.Load() == 4 }, "reload after remove")

	// So is a rename into place, the atomic way to replace a file.
	writeFile(t, filepath.Join(dir, ".q.yml.tmp"), 2)
	if err := os.Rename(filepath.Join(dir, ".q.yml.tmp"), filepath.Join(dir, "q.yml")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return reloads.Load() == 5 }, "reload after rename")
}

// A file that is open for writing and has been written to is never read:
// its close is what makes it complete.
func TestWatchWaitsForClose(t *testing.T) {
	dir := t.TempDir()
	reloads := start(t, dir, 30*time.Millisecond, nil)
	f, err := os.Create(filepath.Join(dir, "p.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for range 5 {
		if _, err := f.WriteString("a: b\n"); err != nil {
			t.Fatal(err)
		}
		// Another store file changes meanwhile: still no reload.
		writeFile(t, filepath.Join(dir, "other.yaml"), 1)
		time.Sleep(100 * time.Millisecond)
	}
	if n := reloads.Load(); n != 1 {
		t.Fatalf("%d reloads while a file was open for writing, want only the initial one", n)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return reloads.Load() == 2 }, "reload after close")
}

// quiet is false when the folder changed while a reload was reading it,
// and the reload is then repeated.
func TestWatchQuietSeesChangesDuringReload(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	var quietResults []bool
	var calls atomic.Int32
	reloads := start(t, dir, 30*time.Millisecond, func(quiet func() bool) bool {
		if calls.Add(1) == 2 {
			// The second reload: a writer replaces a file meanwhile.
			writeFile(t, filepath.Join(dir, "p.yaml"), 3)
		}
		q := quiet()
		mu.Lock()
		defer mu.Unlock()
		quietResults = append(quietResults, q)
		return true
	})
	writeFile(t, filepath.Join(dir, "p.yaml"), 1)
	waitFor(t, func() bool { return reloads.Load() == 3 }, "reload after the change made during a reload")
	time.Sleep(200 * time.Millisecond)
	if n := reloads.Load(); n != 3 {
		t.Fatalf("%d reloads, want 3", n)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []bool{true, false, true}; len(quietResults) != 3 || quietResults[0] != want[0] || quietResults[1] != want[1] || quietResults[2] != want[2] {
		t.Fatalf("quiet() gave %v, want %v", quietResults, want)
	}
}

// A reload that returns false is repeated after the debounce.
func TestWatchRetries(t *testing.T) {
	dir := t.TempDir()
	var calls atomic.Int32
	reloads := start(t, dir, 20*time.Millisecond, func(func() bool) bool { return calls.Add(1) >= 3 })
	waitFor(t, func() bool { return reloads.Load() == 3 }, "retried reloads")
	time.Sleep(100 * time.Millisecond)
	if n := reloads.Load(); n != 3 {
		t.Fatalf("%d reloads, want 3", n)
	}
}

func TestWatchMissingDir(t *testing.T) {
	err := Watch(context.Background(), filepath.Join(t.TempDir(), "nope"), Options{Debounce: time.Millisecond}, func(func() bool) bool { return true })
	if err == nil {
		t.Fatal("watching a missing directory succeeded")
	}
}

func writeFile(t *testing.T, path string, i int) {
	t.Helper()
	if err := os.WriteFile(path, []byte{byte('a' + i)}, 0o644); err != nil {
		t.Error(err)
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
