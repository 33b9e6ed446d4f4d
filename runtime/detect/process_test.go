package detect

import (
	"fmt"
	"testing"
)

func execEv(pid, ppid uint32, start uint64, exe string) Event {
	return Event{Kind: KindExec, PID: pid, PPID: ppid, StartNs: start, Exe: exe, Argv: []string{exe}}
}

func TestProcessCacheLineage(t *testing.T) {
	c := NewProcessCache(16)
	c.Exec(execEv(10, 1, 100, "/pause"))
	c.Exec(execEv(20, 10, 200, "/bin/sh"))
	c.Exec(execEv(30, 20, 300, "/usr/bin/unshare"))
	c.Exec(Event{Kind: KindBPF, PID: 40}) // not an exec: ignored
	if c.Len() != 3 {
		t.Fatalf("len %d, want 3", c.Len())
	}
	self, anc := c.Lineage(Event{PID: 30, PPID: 20, StartNs: 300})
	if self == nil || self.Exe != "/usr/bin/unshare" || len(anc) != 2 || anc[0].Exe != "/bin/sh" || anc[1].Exe != "/pause" {
		t.Fatalf("lineage: %+v %+v", self, anc)
	}
	// The same PID with another start time is another process (reused PID).
	if self, anc := c.Lineage(Event{PID: 30, PPID: 20, StartNs: 999}); self != nil || len(anc) != 2 {
		t.Errorf("reused pid: %+v %+v", self, anc)
	}
	// A forked child that did not exec: no entry, the parent's ancestry.
	if self, anc := c.Lineage(Event{PID: 31, PPID: 30, StartNs: 301}); self != nil || len(anc) != 3 || anc[0].PID != 30 {
		t.Errorf("forked child: %+v %+v", self, anc)
	}
	// A PID loop ends the walk.
	c.Exec(execEv(50, 51, 1, "a"))
	c.Exec(execEv(51, 50, 2, "b"))
	if _, anc := c.Lineage(Event{PID: 52, PPID: 50}); len(anc) != 2 {
		t.Errorf("loop: %+v", anc)
	}
	alerts := []Alert{{RuleID: "x"}}
	c.Annotate(alerts, Event{PID: 30, PPID: 20, StartNs: 300})
	if alerts[0].Process == nil || alerts[0].Process.PID != 30 || len(alerts[0].Ancestors) != 2 {
		t.Errorf("annotate: %+v", alerts[0])
	}
}

func TestProcessCacheBounded(t *testing.T) {
	c := NewProcessCache(100)
	for i := range uint32(1000) {
		c.Exec(execEv(i+1, i, uint64(i), fmt.Sprint("/bin/p", i)))
		// Keep PID 1 in use: the least recently used go, not the oldest.
		c.Lineage(Event{PID: 1, StartNs: 0})
	}
	if c.Len() != 100 {
		t.Fatalf("len %d, want 100", c.Len())
	}
	if self, _ := c.Lineage(Event{PID: 1, StartNs: 0}); self == nil {
		t.Error("a recently used process was evicted")
	}
	if self, _ := c.Lineage(Event{PID: 500, StartNs: 499}); self != nil {
		t.Error("an unused old process is still held")
	}
	// The walk is bounded.
	if _, anc := c.Lineage(Event{PID: 1001, PPID: 1000}); len(anc) != MaxAncestry {
		t.Errorf("ancestry of %d, want %d", len(anc), MaxAncestry)
	}
}
