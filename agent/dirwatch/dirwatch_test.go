package dirwatch

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

func TestWatchDebouncesBursts(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var reloads atomic.Int32
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, dir, 150*time.Millisecond, func() { reloads.Add(1) }) }()

	waitFor(t, func() bool { return reloads.Load() == 1 }, "initial reload")

	// A burst of ten writes is one reload.
	for i := range 10 {
		writeFile(t, filepath.Join(dir, "p.yaml"), i)
		time.Sleep(10 * time.Millisecond)
	}
	waitFor(t, func() bool { return reloads.Load() == 2 }, "reload after burst")
	time.Sleep(400 * time.Millisecond)
	if n := reloads.Load(); n != 2 {
		t.Fatalf("burst of writes gave %d reloads, want 2 (initial + one)", n)
	}

	// Files that are not YAML, and hidden files, are ignored.
	writeFile(t, filepath.Join(dir, "notes.txt"), 1)
	writeFile(t, filepath.Join(dir, ".p.yaml.swp"), 1)
	time.Sleep(400 * time.Millisecond)
	if n := reloads.Load(); n != 2 {
		t.Fatalf("irrelevant files gave %d reloads, want 2", n)
	}

	// Removal is a change too.
	if err := os.Remove(filepath.Join(dir, "p.yaml")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return reloads.Load() == 3 }, "reload after remove")

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Watch returned %v after cancel", err)
	}
}

func TestWatchMissingDir(t *testing.T) {
	err := Watch(context.Background(), filepath.Join(t.TempDir(), "nope"), time.Millisecond, func() {})
	if err == nil {
		t.Fatal("watching a missing directory succeeded")
	}
}

func writeFile(t *testing.T, path string, i int) {
	t.Helper()
	if err := os.WriteFile(path, []byte{byte('a' + i)}, 0o644); err != nil {
		t.Fatal(err)
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
