package author

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy/explain"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

// bigLog is a flow log of n records over 300 pods: each observed
// connection is reported by both of its pod ends, with replies between.
func bigLog(n int) (*world, []conn, string) {
	rng := rand.New(rand.NewPCG(100, 1))
	w := newWorld(rng, 300)
	var b strings.Builder
	var observed []conn
	for records := 0; records < n; {
		c := w.randomConn(rng)
		observed = append(observed, c)
		for _, dir := range []string{"EGRESS", "INGRESS"} {
			if (dir == "EGRESS" && c.src >= 0) || (dir == "INGRESS" && c.dst >= 0) {
				fmt.Fprintln(&b, w.flowLine(c, "FORWARDED", dir, false))
				records++
			}
		}
		fmt.Fprintln(&b, w.flowLine(conn{src: c.dst, dst: c.src, proto: c.proto, port: 40000}, "FORWARDED", "INGRESS", true))
		records++
	}
	return w, observed, b.String()
}

// BenchmarkGenerate100k reads, generates and renders 100,000 records.
func BenchmarkGenerate100k(b *testing.B) {
	_, _, log := bigLog(100_000)
	b.SetBytes(int64(len(log)))
	var g *Generated
	for b.Loop() {
		var out bytes.Buffer
		var err error
		if g, err = RunGenerate(GenerateOptions{}, strings.NewReader(log), "bench", &out); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(g.Stats.Policies), "policies")
	b.ReportMetric(float64(g.Stats.Connections), "connections")
}

// TestGenerate100k is the property test at the size the issue asks about:
// every connection of a 100,000-record log passes under the policies
// generated from it.
func TestGenerate100k(t *testing.T) {
	if testing.Short() {
		t.Skip("100k records")
	}
	w, observed, log := bigLog(100_000)
	var out bytes.Buffer
	g, err := RunGenerate(GenerateOptions{}, strings.NewReader(log), "big", &out)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := store.Parse("store.yaml", []byte(w.yaml))
	if err != nil {
		t.Fatal(err)
	}
	gen, err := store.Parse("gen.yaml", out.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	res, err := store.Build(append(objs, gen...), store.Options{AllLocal: true})
	if err != nil {
		t.Fatal(err)
	}
	off, err := explain.NewOffline(res.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[conn]bool{}
	for _, c := range observed {
		if seen[c] {
			continue
		}
		seen[c] = true
		src, _ := off.Peer(w.name(c.src))
		dst, _ := off.Peer(w.name(c.dst))
		if r := explain.Verdict(off.MapState, src, dst, c.proto, c.port); r.Combined != "allow" {
			t.Fatalf("observed %s -> %s %d/%d: %s", w.name(c.src), w.name(c.dst), c.port, c.proto, r.Combined)
		}
	}
	t.Logf("%d records, %d distinct connections (%d checked), %d policies, %d bytes of YAML",
		g.Stats.Records, g.Stats.Connections, len(seen), g.Stats.Policies, out.Len())
}
