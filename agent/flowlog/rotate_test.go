package flowlog

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// TestRotationUnderLoadLosesNothing writes from several goroutines through
// many rotations and then reads every file back: each line must be whole
// JSON, and every (writer, seq) pair must appear exactly once.
func TestRotationUnderLoadLosesNothing(t *testing.T) {
	const writers, perWriter = 4, 5000
	path := filepath.Join(t.TempDir(), "flows.json")
	w, err := Open(Config{Path: path, MaxSize: 64 << 10, MaxFiles: 1000, BufferSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range writers {
		wg.Go(func() {
			for i := range perWriter {
				line := fmt.Sprintf(`{"writer":%d,"seq":%d,"pad":"%0*d"}`, g, i, i%97, 0)
				if err := w.WriteLine([]byte(line)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if w.Rotations() < 10 {
		t.Fatalf("only %d rotations; the test must exercise rotation", w.Rotations())
	}

	files, _ := filepath.Glob(path + "*")
	seen := map[[2]int]bool{}
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() > 64<<10 {
			t.Errorf("%s is %d bytes, over the limit", f, st.Size())
		}
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			var rec struct{ Writer, Seq int }
			if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
				t.Fatalf("%s: split or corrupt line %q: %v", f, sc.Text(), err)
			}
			k := [2]int{rec.Writer, rec.Seq}
			if seen[k] {
				t.Fatalf("line %v written twice", k)
			}
			seen[k] = true
		}
		fh.Close()
	}
	if len(seen) != writers*perWriter {
		t.Fatalf("read back %d lines, generated %d", len(seen), writers*perWriter)
	}
}

func TestRotationKeepsMaxFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.json")
	w, err := Open(Config{Path: path, MaxSize: 100, MaxFiles: 2})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if err := w.WriteLine(fmt.Appendf(nil, `{"i":%02d,"x":"0123456789"}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(path + "*")
	if len(files) != 3 {
		t.Fatalf("files = %v, want live + 2 rotated", files)
	}
	// The newest lines are in the live file, the ones before in .1.
	live, _ := os.ReadFile(path)
	prev, _ := os.ReadFile(path + ".1")
	if want := `{"i":49,`; !containsLine(live, want) || containsLine(prev, want) {
		t.Fatalf("newest line not in the live file: live=%q prev=%q", live, prev)
	}
}

func TestOversizedLineIsNotCut(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.json")
	w, err := Open(Config{Path: path, MaxSize: 10, MaxFiles: 3})
	if err != nil {
		t.Fatal(err)
	}
	long := []byte(`{"long":"0123456789012345678901234567890"}`)
	for range 2 {
		if err := w.WriteLine(long); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{path, path + ".1"} {
		got, _ := os.ReadFile(f)
		if string(got) != string(long)+"\n" {
			t.Fatalf("%s = %q, want the whole line alone", f, got)
		}
	}
}

func TestOpenRejectsBadConfig(t *testing.T) {
	if _, err := Open(Config{}); err == nil {
		t.Fatal("empty path accepted")
	}
	if _, err := Open(Config{Path: filepath.Join(t.TempDir(), "x"), MaxSize: -1}); err == nil {
		t.Fatal("negative size accepted")
	}
}

func containsLine(data []byte, prefix string) bool {
	for line := range bytes.Lines(data) {
		if bytes.HasPrefix(line, []byte(prefix)) {
			return true
		}
	}
	return false
}
