package detect

import (
	"container/list"
	"sync"
)

// Process is what the cache knows of one process: from its exec inside a
// watched namespace.
type Process struct {
	PID     uint32   `json:"pid"`
	PPID    uint32   `json:"ppid"`
	UID     uint32   `json:"uid"`
	StartNs uint64   `json:"start_ns"`
	Exe     string   `json:"exe"`
	Argv    []string `json:"argv,omitempty"`
	// ArgvTruncated: only the argv's first bytes were kept.
	ArgvTruncated bool `json:"argv_truncated,omitempty"`
}

// MaxAncestry bounds the ancestry walk (and so an alert's size).
const MaxAncestry = 8

// ProcessCache remembers the latest execs, at most a fixed number: the
// least recently used process goes first. Safe for concurrent use.
type ProcessCache struct {
	mu    sync.Mutex
	max   int
	order *list.List // of *Process, most recently used first
	byPID map[uint32]*list.Element
}

// NewProcessCache makes a cache of at most size processes (at least 1).
func NewProcessCache(size int) *ProcessCache {
	return &ProcessCache{max: max(size, 1), order: list.New(), byPID: map[uint32]*list.Element{}}
}

// Len is the number of processes held.
func (c *ProcessCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.order.Len()
}

// Exec records ev, a KindExec event; other kinds are ignored. A later exec
// of the same PID (the same process running a new program, or a new
// process reusing the PID) replaces the entry.
func (c *ProcessCache) Exec(ev Event) {
	if ev.Kind != KindExec {
		return
	}
	p := &Process{PID: ev.PID, PPID: ev.PPID, UID: ev.UID, StartNs: ev.StartNs, Exe: ev.Exe, Argv: ev.Argv,
		ArgvTruncated: ev.ArgvTruncated}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.byPID[ev.PID]; ok {
		el.Value = p
		c.order.MoveToFront(el)
		return
	}
	c.byPID[ev.PID] = c.order.PushFront(p)
	for c.order.Len() > c.max {
		last := c.order.Back()
		delete(c.byPID, last.Value.(*Process).PID)
		c.order.Remove(last)
	}
}

// Lineage returns the process of ev, if it exec'd in a watched namespace
// (its PID and start time match, so a reused PID is not taken for it), and
// its known ancestors, parent first, up to MaxAncestry. A forked child that
// did not exec has no entry of its own; its ancestry starts at its parent.
func (c *ProcessCache) Lineage(ev Event) (*Process, []Process) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var self *Process
	if el, ok := c.byPID[ev.PID]; ok {
		if p := el.Value.(*Process); p.StartNs == ev.StartNs {
			cp := *p
			self = &cp
			c.order.MoveToFront(el)
		}
	}
	var anc []Process
	// Ancestors are matched by PID only: the event does not carry their
	// start times. The walk stops at a PID loop or an unknown parent.
	seen := map[uint32]bool{ev.PID: true}
	for pid := ev.PPID; pid != 0 && !seen[pid] && len(anc) < MaxAncestry; {
		el, ok := c.byPID[pid]
		if !ok {
			break
		}
		p := el.Value.(*Process)
		anc = append(anc, *p)
		seen[pid] = true
		pid = p.PPID
	}
	return self, anc
}
