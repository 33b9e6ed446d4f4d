package datapath

import (
	"strings"
	"testing"
	"time"
)

// Every change to the BPF object appends a line to versions.txt: without
// it, a new agent would take the pinned programs of an older one for its
// own, or an older agent would not know it is older.
func TestVersionsListThisObject(t *testing.T) {
	known, last, err := knownVersions()
	if err != nil {
		t.Fatal(err)
	}
	serial, ok := known[objectDigest()]
	if !ok {
		t.Fatalf("segment_bpfel.o (sha256 %s) is not in datapath/versions.txt: append the line\n%d %s",
			objectDigest(), last+1, objectDigest())
	}
	if serial != last {
		t.Fatalf("segment_bpfel.o is version %d of versions.txt, but the last is %d: an object may not go back", serial, last)
	}
	if currentSerial() != last {
		t.Fatalf("currentSerial %d, want %d", currentSerial(), last)
	}
}

func TestVersionsFileErrors(t *testing.T) {
	saved := versionsTxt
	t.Cleanup(func() { versionsTxt = saved })
	hash := strings.Repeat("ab", 32)
	for name, text := range map[string]string{
		"gap":      "1 " + hash + "\n3 " + strings.Repeat("cd", 32) + "\n",
		"short":    "1 abcd\n",
		"fields":   "1\n",
		"not a no": "x " + hash + "\n",
	} {
		versionsTxt = text
		if _, _, err := knownVersions(); err == nil {
			t.Errorf("%s: versions.txt %q accepted", name, text)
		}
	}
	versionsTxt = "# comment\n\n1 " + hash + "\n"
	if known, last, err := knownVersions(); err != nil || last != 1 || known[hash] != 1 {
		t.Errorf("a good versions.txt: %v %d %v", known, last, err)
	}
	// An object not listed is newer than every listed one.
	if got := currentSerial(); got != 2 {
		t.Errorf("serial of an unlisted object: %d, want 2", got)
	}
}

func TestVersionRecordRoundTrip(t *testing.T) {
	v := Version{Serial: 3, Object: objectDigest(), Settings: "0123", TunnelMark: 0xb00, TunnelMask: 0xf00,
		LoadedAt: time.Unix(1700000000, 0).UTC(), Migration: &Migration{From: Version{Serial: 2}, Duration: time.Millisecond,
			Reused: []string{"policy"}, Removed: []string{"load_record"}, LinksSwapped: 4}}
	b, err := encodeVersion(v)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != versionValueSize {
		t.Fatalf("record of %d bytes, want %d", len(b), versionValueSize)
	}
	got, err := decodeVersion(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Serial != 3 || got.Migration == nil || got.Migration.LinksSwapped != 4 || got.Migration.Removed[0] != "load_record" ||
		!got.LoadedAt.Equal(v.LoadedAt) || got.TunnelMark != 0xb00 {
		t.Fatalf("round trip: %+v", got)
	}
	for name, bad := range map[string][]byte{"short": {1}, "length past the end": {0xff, 0xff, '{', '}'},
		"not json": {3, 0, 'a', 'b', 'c'}} {
		if _, err := decodeVersion(bad); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
}

// Every pinned map has a migration role: a map added without one would be
// refused by the first migration that found it changed.
func TestEveryPinnedMapHasAMigrationRole(t *testing.T) {
	var d Datapath
	for name := range d.pinnedMaps() {
		if _, ok := mapRoles[name]; !ok {
			t.Errorf("map %s has no entry in mapRoles", name)
		}
	}
	if len(mapRoles) != len(d.pinnedMaps()) {
		t.Errorf("mapRoles has %d entries, the layout %d maps", len(mapRoles), len(d.pinnedMaps()))
	}
}

func FuzzDecodeVersion(f *testing.F) {
	b, _ := encodeVersion(Version{Serial: 1, Migration: &Migration{}})
	f.Add(b[:64])
	f.Add([]byte{2, 0, '{', '}'})
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := decodeVersion(b)
		if err != nil {
			return
		}
		enc, err := encodeVersion(v)
		if err != nil {
			return // too long once re-encoded (JSON escapes grow)
		}
		again, err := decodeVersion(enc)
		if err != nil || again.Serial != v.Serial || again.Object != v.Object {
			t.Fatalf("re-decoded %+v, %v; want %+v", again, err, v)
		}
	})
}
