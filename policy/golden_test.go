package policy_test

import (
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/explain"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// TestGolden compiles realistic stores and compares the MapState with a
// reviewed text rendering. Run with -update after an intended change and
// read the diff.
func TestGolden(t *testing.T) {
	dirs, err := filepath.Glob("testdata/stores/*")
	if err != nil || len(dirs) == 0 {
		t.Fatalf("no stores: %v", err)
	}
	for _, dir := range dirs {
		name := filepath.Base(dir)
		t.Run(name, func(t *testing.T) {
			res, err := store.Load(dir, store.Options{AllLocal: true})
			if err != nil {
				t.Fatal(err)
			}
			ms, err := policy.Compile(res.Snapshot)
			if err != nil {
				t.Fatal(err)
			}
			got := explain.Dump(ms)
			// Deterministic: a second compile gives the same text.
			ms2, _ := policy.Compile(res.Snapshot)
			if again := explain.Dump(ms2); again != got {
				t.Fatalf("two compiles of the same snapshot differ")
			}
			path := filepath.Join("testdata", "golden", name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if got != string(want) {
				t.Errorf("%s differs from the golden file (run with -update and review):\n%s", name, got)
			}
		})
	}
}
