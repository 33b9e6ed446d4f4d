package demo

import (
	"fmt"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

// OfflineMatrix computes the matrix the policy compiler and explain engine
// predict for a store directory, without any datapath. The demo compares it
// with the observed matrix, so the compiler and the datapath check each
// other on every step.
func OfflineMatrix(storeDir string, pods []string, ports []Port) (*Matrix, error) {
	off, err := explain.LoadOffline(storeDir)
	if err != nil {
		return nil, err
	}
	var pps []explain.PortProto
	for _, p := range ports {
		proto, ok := explain.ParseProto(p.Proto)
		if !ok {
			return nil, fmt.Errorf("port %s: unknown protocol", p)
		}
		pps = append(pps, explain.PortProto{Port: p.Num, Proto: proto})
	}
	m := NewMatrix(pods, ports)
	for _, c := range explain.Matrix(off.MapState, off.Workloads, pps) {
		if c.From == c.To {
			continue
		}
		cell := Cell{From: c.From, To: c.To, Port: Port{Num: c.Port, Proto: c.Protocol}}
		o := Allowed
		r := verdictOf(off, c)
		switch {
		case !c.Combined:
			o = Denied
		case r == policy.VerdictAudit.String():
			o = Audited
		}
		if err := m.Set(cell, o); err != nil {
			return nil, fmt.Errorf("offline engine: %w", err)
		}
	}
	return m, nil
}

// verdictOf asks the explain engine for a cell's combined verdict, which
// the matrix cells reduce to a boolean but the demo needs to tell audit
// from allow.
func verdictOf(off *explain.Offline, c explain.Cell) string {
	src, err1 := off.Peer(c.From)
	dst, err2 := off.Peer(c.To)
	proto, ok := explain.ParseProto(c.Protocol)
	if err1 != nil || err2 != nil || !ok {
		return ""
	}
	r := explain.Verdict(off.MapState, src, dst, proto, c.Port)
	return r.Combined
}

// OfflineExplain is `bulkhead policy explain --store` for one cell.
func OfflineExplain(storeDir string, c Cell) (explain.Result, error) {
	off, err := explain.LoadOffline(storeDir)
	if err != nil {
		return explain.Result{}, err
	}
	proto, ok := explain.ParseProto(c.Port.Proto)
	if !ok {
		return explain.Result{}, fmt.Errorf("port %s: unknown protocol", c.Port)
	}
	src, err := off.Peer(c.From)
	if err != nil {
		return explain.Result{}, err
	}
	dst, err := off.Peer(c.To)
	if err != nil {
		return explain.Result{}, err
	}
	return explain.Verdict(off.MapState, src, dst, proto, c.Port.Num), nil
}
