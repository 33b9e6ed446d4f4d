package store

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/tests/kubeletvol"
)

func nsDoc(name string) string {
	return "apiVersion: v1\nkind: Namespace\nmetadata: {name: " + name + "}\n"
}

func refs(res *Result) []string {
	var out []string
	for _, o := range res.Objects {
		out = append(out, o.Ref())
	}
	return out
}

// .yml files are store files; hidden files are not (editor lock files, and
// the ..data and timestamped folders of a ConfigMap volume).
func TestLoadYmlNotHidden(t *testing.T) {
	dir := t.TempDir()
	for name, doc := range map[string]string{"a.yaml": nsDoc("a"), "b.yml": nsDoc("b"), ".c.yaml": nsDoc("c"), "d.yaml.bak": nsDoc("d")} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	res, err := Load(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := refs(res), []string{"Namespace a", "Namespace b"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("loaded %v, want %v", got, want)
	}
}

// A ConfigMap volume: every key is read once, through its visible name.
func TestLoadConfigMapVolume(t *testing.T) {
	dir := t.TempDir()
	kubeletvol.Write(t, dir, map[string]string{"a.yaml": nsDoc("a")})
	kubeletvol.Write(t, dir, map[string]string{"a.yaml": nsDoc("a2"), "b.yml": nsDoc("b")})
	res, err := Load(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := refs(res), []string{"Namespace a2", "Namespace b"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("loaded %v, want %v", got, want)
	}
}

// A file that changes while it is read gives ErrChanged and no result, so
// the caller reads it again rather than use half of a write.
func TestLoadDetectsChangeDuringRead(t *testing.T) {
	tests := map[string]func(t *testing.T, dir, path string){
		"appended": func(t *testing.T, dir, path string) {
			f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteString("---\n" + nsDoc("more")); err != nil {
				t.Fatal(err)
			}
		},
		"rewritten in place, same size": func(t *testing.T, dir, path string) {
			if err := os.WriteFile(path, []byte(nsDoc("z")), 0o644); err != nil {
				t.Fatal(err)
			}
		},
		"replaced by rename": func(t *testing.T, dir, path string) {
			tmp := filepath.Join(dir, ".tmp")
			if err := os.WriteFile(tmp, []byte(nsDoc("z")), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, path); err != nil {
				t.Fatal(err)
			}
		},
		"ConfigMap updated": func(t *testing.T, dir, path string) {
			kubeletvol.Write(t, dir, map[string]string{"a.yaml": nsDoc("z")})
		},
	}
	for name, change := range tests {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			kubeletvol.Write(t, dir, map[string]string{"a.yaml": nsDoc("a")})
			changed := false
			res, err := Load(dir, Options{afterRead: func(path string) {
				if !changed {
					changed = true
					change(t, dir, path)
				}
			}})
			if !errors.Is(err, ErrChanged) || res != nil {
				t.Fatalf("got %v, %v; want no result and ErrChanged", refsOrNil(res), err)
			}
			// Read again, it is stable.
			if res, err = Load(dir, Options{}); err != nil || len(res.Objects) == 0 {
				t.Fatalf("reading again: %v, %v", refsOrNil(res), err)
			}
		})
	}
}

func refsOrNil(res *Result) []string {
	if res == nil {
		return nil
	}
	return refs(res)
}

func TestLoadMissingDir(t *testing.T) {
	if _, err := Load(filepath.Join(t.TempDir(), "nope"), Options{}); err == nil {
		t.Fatal("loading a missing folder succeeded")
	}
}

// TestLoadRuntimePolicy: a BulkheadRuntimePolicy reaches the snapshot; an
// invalid one is reported at its field's line and left out.
func TestLoadRuntimePolicy(t *testing.T) {
	dir := t.TempDir()
	good := `apiVersion: bulkhead.io/v1alpha1
kind: BulkheadRuntimePolicy
metadata: {name: guard, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: cart}}}
  detections:
  - {rule: BH-RT-007, action: Block}
  - {rule: BH-RT-005, action: Kill}
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadRuntimePolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {podSelector: {}}
  detections:
  - rule: BH-RT-001
    action: Block
`
	if err := os.WriteFile(filepath.Join(dir, "rt.yaml"), []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := Load(dir, Options{})
	if err == nil || !strings.Contains(err.Error(), "rt.yaml:17:") || !strings.Contains(err.Error(), "Block is only possible") {
		t.Errorf("error %v: want rt.yaml:17 (the action) and Block refused for a tracepoint rule", err)
	}
	if res == nil || len(res.Snapshot.RuntimePolicies) != 1 || res.Snapshot.RuntimePolicies[0].Name != "guard" {
		t.Fatalf("runtime policies: %+v", res)
	}
	// A misspelt field is an error, never ignored.
	if err := os.WriteFile(filepath.Join(dir, "rt.yaml"), []byte(strings.Replace(good, "action: Block", "acton: Block", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir, Options{}); err == nil || !strings.Contains(err.Error(), "acton") {
		t.Errorf("misspelt field: %v", err)
	}
}
