package demo

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestApplyAndDiff(t *testing.T) {
	pods := []string{"a/x", "a/y", "b/z"}
	ports := []Port{{80, "TCP"}, {53, "UDP"}}
	m := NewMatrix(pods, ports)
	if n := len(m.Cells()); n != 3*2*2 {
		t.Fatalf("%d cells, want 12 (self pairs excluded)", n)
	}
	next, err := m.Apply([]Change{
		{From: "*", To: "a/y", Port: "*", Outcome: Denied},
		{From: "a/x", To: "a/y", Port: "80/TCP", Outcome: Allowed},
		{From: "a/*", To: "b/z", Port: "53/UDP", Outcome: Audited},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[Cell]Outcome{
		{From: "a/x", To: "a/y", Port: Port{53, "UDP"}}: Denied,
		{From: "b/z", To: "a/y", Port: Port{80, "TCP"}}: Denied,
		{From: "b/z", To: "a/y", Port: Port{53, "UDP"}}: Denied,
		{From: "a/x", To: "b/z", Port: Port{53, "UDP"}}: Audited,
		{From: "a/y", To: "b/z", Port: Port{53, "UDP"}}: Audited,
	}
	diffs := m.Diff(next)
	if len(diffs) != len(want) {
		t.Fatalf("diff %v, want %d cells", diffs, len(want))
	}
	for _, d := range diffs {
		if w, ok := want[d.Cell]; !ok || d.After != w || d.Before != Allowed {
			t.Errorf("unexpected diff %s: %s -> %s", d.Cell, d.Before, d.After)
		}
	}
	// The original is untouched: Apply copies.
	if len(m.Diff(NewMatrix(pods, ports))) != 0 {
		t.Fatal("Apply changed its receiver")
	}
	if _, err := m.Apply([]Change{{From: "a/x", To: "a/x", Port: "*", Outcome: Denied}}); err == nil {
		t.Fatal("a change matching only a self pair (not in the matrix) was accepted")
	}
	if _, err := m.Apply([]Change{{From: "*", To: "*", Port: "81/TCP", Outcome: Denied}}); err == nil {
		t.Fatal("a change for a port outside the matrix was accepted")
	}
	if err := m.Set(Cell{From: "a/x", To: "c/q", Port: ports[0]}, Denied); err == nil {
		t.Fatal("Set accepted a cell outside the matrix")
	}
	// Matrices of different shapes never compare equal.
	if len(m.Diff(NewMatrix(pods[:2], ports))) == 0 {
		t.Fatal("matrices of different shapes compared equal")
	}
}

// TestExpectationsMatchTheCompiler checks the demo's hand-written
// expectations against the offline policy engine on the same stores the
// demo writes: if either changes meaning, this fails before a demo run
// does.
func TestExpectationsMatchTheCompiler(t *testing.T) {
	pods := Refs(ShopPods())
	steps := ShopSteps()
	exp, err := Expectations(pods, ShopPorts(), steps)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "00-workloads.yaml"), []byte(workloadsYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	for i := 0; i <= len(steps); i++ {
		if i > 0 {
			s := steps[i-1]
			if err := os.WriteFile(filepath.Join(dir, s.File), []byte(s.YAML), 0o644); err != nil {
				t.Fatal(err)
			}
			if len(exp[i-1].Diff(exp[i])) == 0 {
				t.Errorf("step %d changes nothing: it would show nothing", i)
			}
		}
		got, err := OfflineMatrix(dir, pods, ShopPorts())
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		for _, d := range exp[i].Diff(got) {
			t.Errorf("step %d: %s: expected %s, the compiler says %s", i, d.Cell, d.Before, d.After)
		}
	}
}

func TestRenderFitsEightyColumns(t *testing.T) {
	exp, err := Expectations(Refs(ShopPods()), ShopPorts(), ShopSteps())
	if err != nil {
		t.Fatal(err)
	}
	last := exp[len(exp)-1]
	changed := map[Cell]bool{}
	for _, d := range exp[len(exp)-2].Diff(last) {
		changed[d.Cell] = true
	}
	out := RenderMatrix(last, changed, false)
	for _, line := range strings.Split(out, "\n") {
		if n := utf8.RuneCountInString(line); n > 80 {
			t.Errorf("line of %d columns: %q", n, line)
		}
	}
	for _, want := range []string{"audit*", "DROP", "ok", "shop/frontend", "debug"} {
		if !strings.Contains(out, want) {
			t.Errorf("matrix lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "\x1b[") {
		t.Errorf("plain rendering has escape codes:\n%s", out)
	}
	if !strings.Contains(RenderMatrix(last, changed, true), "\x1b[") {
		t.Error("colour rendering has no escape codes")
	}
}
