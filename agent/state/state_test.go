package state

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

type rec struct {
	Netns string `json:"netns"`
	ID    uint32 `json:"id"`
}

func TestDirRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "endpoints")
	d, err := Open[rec](path)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Put("c1_eth0", rec{Netns: "/run/netns/a", ID: 7}); err != nil {
		t.Fatal(err)
	}
	if err := d.Put("c2_eth0", rec{Netns: "/run/netns/b", ID: 8}); err != nil {
		t.Fatal(err)
	}
	if err := d.Put("c1_eth0", rec{Netns: "/run/netns/a", ID: 9}); err != nil {
		t.Fatal(err)
	}
	got, err := d.Get("c1_eth0")
	if err != nil || got.ID != 9 {
		t.Fatalf("Get = %+v, %v; want ID 9", got, err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("state dir mode: %v %v", st.Mode(), err)
	}

	// A reopened dir (the restarted agent) sees the same records.
	d2, err := Open[rec](path)
	if err != nil {
		t.Fatal(err)
	}
	good, bad, err := d2.LoadAll()
	if err != nil || len(bad) != 0 || len(good) != 2 || good["c2_eth0"].ID != 8 {
		t.Fatalf("LoadAll = %v, %v, %v", good, bad, err)
	}

	if err := d2.Delete("c1_eth0"); err != nil {
		t.Fatal(err)
	}
	if err := d2.Delete("c1_eth0"); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if _, err := d2.Get("c1_eth0"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after delete: %v, want ErrNotFound", err)
	}
}

func TestDirCorruptRecordIsIsolated(t *testing.T) {
	path := t.TempDir()
	d, err := Open[rec](path)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Put("ok", rec{ID: 1}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(path, "torn.json"), []byte(`{"id":`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(path, ".tmp-123"), []byte(`x`), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err = Open[rec](path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(path, ".tmp-123")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temp leftover not removed: %v", err)
	}
	good, bad, err := d.LoadAll()
	if err != nil || len(good) != 1 || bad["torn"] == nil {
		t.Fatalf("LoadAll = %v, %v, %v; want one good, torn bad", good, bad, err)
	}
}

func TestDirRejectsPathKeys(t *testing.T) {
	d, err := Open[rec](t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"", "../x", "a/b", ".hidden", "a\x00b"} {
		if err := d.Put(k, rec{}); err == nil {
			t.Errorf("Put(%q) succeeded", k)
		}
	}
}

// A quarantined record keeps its bytes, leaves LoadAll, and is listed.
func TestQuarantine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "endpoints")
	d, err := Open[rec](path)
	if err != nil {
		t.Fatal(err)
	}
	torn := []byte(`{"netns":"/run/ne`)
	if err := os.WriteFile(filepath.Join(path, "c1_eth0.json"), torn, 0o600); err != nil {
		t.Fatal(err)
	}
	_, bad, err := d.LoadAll()
	if err != nil || len(bad) != 1 {
		t.Fatalf("bad records %v, %v", bad, err)
	}
	moved, err := d.Quarantine("c1_eth0")
	if err != nil {
		t.Fatal(err)
	}
	if data, err := os.ReadFile(moved); err != nil || string(data) != string(torn) {
		t.Fatalf("quarantined file %s: %q %v", moved, data, err)
	}
	if good, bad, err := d.LoadAll(); err != nil || len(good)+len(bad) != 0 {
		t.Fatalf("LoadAll after quarantine: %v %v %v", good, bad, err)
	}
	if q, err := d.Quarantined(); err != nil || len(q) != 1 || q[0] != moved {
		t.Fatalf("Quarantined() = %v, %v", q, err)
	}
}
