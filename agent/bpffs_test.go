package agent

import (
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
)

// New checks the pin folder before loading anything: a --bpffs outside any
// bpffs is named, rather than failing later on a pin.
func TestNewRefusesBPFFSOutsideBPFFS(t *testing.T) {
	dir := t.TempDir()
	bpffs := filepath.Join(dir, "bpf", "bulkhead")
	_, err := New(Config{Store: "dir:" + dir, StateDir: filepath.Join(dir, "state"), Socket: filepath.Join(dir, "sock"),
		BPFFS: bpffs, Logger: slog.New(slog.DiscardHandler)})
	if err == nil || !strings.Contains(err.Error(), bpffs+" is not on a bpffs mount") {
		t.Fatalf("New: %v; want an error naming %s", err, bpffs)
	}
}
