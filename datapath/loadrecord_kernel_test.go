package datapath

import (
	"errors"
	"os"
	"strings"
	"testing"
)

// A datapath re-opened from pins with another tunnel mark than it was
// loaded with is refused (the programs would keep the old mark while the
// agent routed the new one); the same mark re-opens, and pins without a
// record (an older version's) are migrated to the mark asked for.
func TestReopenWithAnotherTunnelMarkIsRefused(t *testing.T) {
	d := newTestDatapath(t, Config{})
	bpffs := d.cfg.BPFFS
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := New(Config{BPFFS: bpffs, TunnelMark: 0xc00, TunnelMask: 0xf00})
	if !errors.Is(err, ErrLoadedOtherwise) {
		t.Fatalf("re-open with mark 0xc00: %v, want ErrLoadedOtherwise", err)
	}
	if !strings.Contains(err.Error(), "0xb00") || !strings.Contains(err.Error(), "0xc00") {
		t.Errorf("error does not name both marks: %v", err)
	}
	same, err := New(Config{BPFFS: bpffs})
	if err != nil {
		t.Fatalf("re-open with the same mark: %v", err)
	}
	if err := same.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(d.mapPin(versionPin)); err != nil {
		t.Fatal(err)
	}
	old, err := New(Config{BPFFS: bpffs, TunnelMark: 0xc00, TunnelMask: 0xf00})
	if err != nil {
		t.Fatalf("re-open pins without a record: %v", err)
	}
	if v := old.Version(); v.Migration == nil || v.Migration.From.Serial != 0 || v.TunnelMark != 0xc00 {
		t.Errorf("pins without a record: version %+v, want a migration from version 0 to mark 0xc00", v)
	}
	// Remove (by newTestDatapath's cleanup) needs a live datapath.
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
}
