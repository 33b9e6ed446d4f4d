package detect

import (
	"testing"
	"time"
)

// TestAggregator: a burst of identical alerts from one process is one line
// at once and one line with the count of the rest; different arguments,
// processes or answers are never folded together; nothing is dropped.
func TestAggregator(t *testing.T) {
	t0 := time.Unix(1000, 0)
	g := NewAggregator(10 * time.Second)
	base := Alert{RuleID: RuleBPF.ID, Syscall: "bpf", PID: 42, Comm: "sh", Pod: Endpoint{ID: "ep", Netns: 7},
		Args: map[string]string{"cmd": "BPF_MAP_CREATE"}, Action: ActionAlert}
	var lines []Alert
	at := func(d time.Duration, a Alert) {
		a.Time = t0.Add(d)
		lines = append(lines, g.Add(a, t0.Add(d))...)
	}
	const n = 500
	for i := range n {
		at(time.Duration(i)*time.Millisecond, base)
	}
	other := base
	other.Args = map[string]string{"cmd": "BPF_PROG_LOAD"}
	at(time.Second, other)
	otherPID := base
	otherPID.PID = 43
	at(time.Second, otherPID)
	blocked := base
	blocked.Action = ActionBlock
	at(time.Second, blocked)
	if len(lines) != 4 {
		t.Fatalf("%d lines before the window ends, want 4 (one per distinct alert): %+v", len(lines), lines)
	}
	if got := g.Flush(t0.Add(9 * time.Second)); len(got) != 0 {
		t.Fatalf("flush inside the window: %+v", got)
	}
	rest := g.Flush(t0.Add(10 * time.Second))
	if len(rest) != 1 || rest[0].Count != n-1 || rest[0].PID != 42 || rest[0].Args["cmd"] != "BPF_MAP_CREATE" ||
		!rest[0].FirstTime.Equal(t0.Add(time.Millisecond)) || !rest[0].LastTime.Equal(t0.Add((n-1)*time.Millisecond)) {
		t.Fatalf("repeat line %+v, want count %d", rest, n-1)
	}
	total := 0
	for _, l := range append(lines, rest...) {
		total += l.Count
	}
	if total != n+3 {
		t.Errorf("counts add up to %d, want %d events", total, n+3)
	}
	// After the window, the same alert starts a new run, shown at once.
	lines = nil
	at(11*time.Second, base)
	if len(lines) != 1 || lines[0].Count != 1 {
		t.Errorf("after the window: %+v", lines)
	}
	// A run with repeats is never lost at shutdown.
	at(12*time.Second, base)
	if all := g.FlushAll(); len(all) != 1 || all[0].Count != 1 {
		t.Errorf("FlushAll: %+v", all)
	}
}
