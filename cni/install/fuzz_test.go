package install

import (
	"bytes"
	"encoding/json"
	"slices"
	"testing"
)

// FuzzInsert feeds arbitrary config files to the insertion: it never
// panics, and when it succeeds the result parses, holds our entry exactly
// once with the socket asked for, keeps every other plugin as written and
// in order, and a second insertion changes nothing.
func FuzzInsert(f *testing.F) {
	f.Add([]byte(ptpList), true, "")
	f.Add([]byte(ptpConf), false, "/run/bulkhead/agent.sock")
	f.Add([]byte(`{"cniVersion":"1.1.0","plugins":[{"type":"ptp"},{"type":"bulkhead-cni","x":1},{"type":"bulkhead-cni"}]}`), true, "/s")
	f.Add([]byte(`{"cniVersion":"0.3.1","name":"\u003c","plugins":[{"type":"a","n":1e400}]}`), true, "")
	f.Add([]byte(`{"cniVersion":"1.0.0","type":"bridge","name":"x"}`), false, "<&>")
	f.Fuzz(func(t *testing.T, data []byte, isList bool, socket string) {
		out, changed, err := insert(data, isList, socket)
		if err != nil {
			return
		}
		if !changed && !bytes.Equal(out, data) {
			t.Fatal("unchanged but different output")
		}
		l, err := parseList(out)
		if err != nil {
			t.Fatalf("output does not parse: %v\n%s", err, out)
		}
		if n := len(l.ours()); n != 1 {
			t.Fatalf("%d entries:\n%s", n, out)
		}
		if !entryMatches(l.plugins[l.ours()[0]], socket) {
			t.Fatalf("entry %s, want socket %q", l.plugins[l.ours()[0]], socket)
		}
		var in []json.RawMessage
		if isList {
			il, err := parseList(data)
			if err != nil {
				t.Fatalf("input failed to parse after insert succeeded: %v", err)
			}
			for i, p := range il.plugins {
				if il.types[i] != PluginType {
					in = append(in, p)
				}
			}
		} else {
			in = []json.RawMessage{bytes.TrimSpace(data)}
		}
		var want, got []string
		for _, p := range in {
			want = append(want, compactOrFail(t, p))
		}
		for i, p := range l.plugins {
			if l.types[i] != PluginType {
				got = append(got, compactOrFail(t, p))
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("other plugins changed:\n got %q\nwant %q", got, want)
		}
		again, changed, err := insert(out, true, socket)
		if err != nil || changed || !bytes.Equal(again, out) {
			t.Fatalf("second insert: changed %v, err %v", changed, err)
		}
	})
}

func compactOrFail(t *testing.T, raw []byte) string {
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		t.Fatalf("compact %q: %v", raw, err)
	}
	return b.String()
}
