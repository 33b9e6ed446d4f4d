package datapath

import (
	"fmt"

	"github.com/bulkhead-io/bulkhead/policy"
)

// Counter indexes (bpf/include/bulkhead.h).
const (
	cntVerdictBase = 0
	cntDropBase    = 8
	cntEvents      = 30
	cntEventsLost  = 31
	cntMax         = 32
)

// Counters are the datapath's packet and byte counts summed over CPUs.
type Counters struct {
	// ByVerdict is keyed by policy.Verdict, plus VerdictPass.
	ByVerdict map[policy.Verdict]Counter
	ByDrop    map[DropReason]Counter
	// Events counts events written to the ring buffer; EventsLost those
	// the full ring refused.
	Events, EventsLost uint64
}

// Counters reads the per-CPU counters.
func (d *Datapath) Counters() (Counters, error) {
	c := Counters{ByVerdict: map[policy.Verdict]Counter{}, ByDrop: map[DropReason]Counter{}}
	var perCPU []Counter
	for idx := uint32(0); idx < cntMax; idx++ {
		if err := d.objs.Counters.Lookup(idx, &perCPU); err != nil {
			return c, fmt.Errorf("read counter %d: %w", idx, err)
		}
		var sum Counter
		for _, v := range perCPU {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
		switch {
		case idx == cntEventsLost:
			c.EventsLost = sum.Packets
		case idx == cntEvents:
			c.Events = sum.Packets
		case idx >= cntDropBase && idx < cntDropBase+16:
			if sum.Packets > 0 {
				c.ByDrop[DropReason(idx-cntDropBase)] = sum
			}
		case idx < cntDropBase:
			if sum.Packets > 0 {
				c.ByVerdict[policy.Verdict(idx-cntVerdictBase)] = sum
			}
		}
	}
	return c, nil
}
