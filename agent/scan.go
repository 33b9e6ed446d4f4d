package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// The scan rule (BH-RT-016) is the one detection that no syscall hook
// makes: the datapath already reports every new connection a pod's policy
// denies, and many of them to distinct destinations in a short while is a
// scan. It runs with runtime detection, and its alerts are the monitor's
// (same outputs, folding, and answers: Alert or Quarantine).

// scanHook is the flow pipe's OnEvent: nil without runtime detection.
func (a *Agent) scanHook() func(*datapath.FlowEvent) {
	if a.sysmon == nil {
		return nil
	}
	var mu sync.Mutex
	d := detect.NewScanDetector(a.cfg.ScanThreshold, a.cfg.ScanWindow)
	var addrsOf *view
	var local map[netip.Addr]policy.EndpointID
	return func(ev *datapath.FlowEvent) {
		// New flows denied by policy (a rule or the default), not a
		// revision's cut of an open one.
		if ev.Type != datapath.EventDrop || ev.DropReason != datapath.DropPolicy || ev.IsReply {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		src := ev.Endpoint
		if ev.Direction == policy.Ingress {
			// Denied at a local pod's ingress: the attempt counts for
			// its source when that is a pod of this node too.
			if v := a.view.Load(); v != addrsOf {
				addrsOf, local = v, v.localAddrs()
			}
			var ok bool
			if src, ok = local[ev.Src.Unmap()]; !ok {
				return
			}
		}
		fired, targets := d.Observe(uint32(src),
			detect.ScanTarget{Addr: ev.Dst.Unmap(), Proto: ev.Proto, Port: ev.DstPort}, time.Now())
		if fired {
			// Off the event path: the answer may write a record.
			go a.raiseScan(src, targets, d.Window)
		}
	}
}

// localAddrs maps this node's endpoints' addresses to them.
func (v *view) localAddrs() map[netip.Addr]policy.EndpointID {
	m := map[netip.Addr]policy.EndpointID{}
	if v == nil {
		return m
	}
	for id, rec := range v.endpoints {
		for _, p := range rec.IPs {
			m[p.Addr().Unmap()] = id
		}
	}
	return m
}

// raiseScan makes the scan alert for endpoint id's pod.
func (a *Agent) raiseScan(id policy.EndpointID, targets []detect.ScanTarget, window time.Duration) {
	v := a.view.Load()
	if v == nil {
		return
	}
	rec, ok := v.endpoints[id]
	if !ok {
		return
	}
	ep := detect.Endpoint{ID: rec.Key.ContainerID, Namespace: rec.Pod.Namespace, Pod: rec.Pod.Name}
	if p := v.ms.Endpoints[id]; p != nil {
		ep.SPIFFEID = v.identities[uint32(p.Identity)].SPIFFEID
	}
	var st unix.Stat_t
	if unix.Stat(rec.Netns, &st) == nil {
		ep.Netns = uint32(st.Ino)
	}
	r := detect.RuleScan
	a.sysmon.svc.Raise(detect.Alert{
		EventKind: "alert", Time: time.Now(), RuleID: r.ID, Rule: r.Name, Technique: r.Technique,
		TechniqueName: r.TechniqueName, Severity: r.Severity, Pod: ep, Syscall: "connect",
		Args: scanArgs(targets, window), Action: "alert", Count: 1,
	})
}

// scanArgs summarise the destinations: how many, which addresses, and the
// ports tried (a sample, for a line of reasonable length).
func scanArgs(targets []detect.ScanTarget, window time.Duration) map[string]string {
	addrs := map[string]bool{}
	ports := map[uint16]bool{}
	for _, t := range targets {
		addrs[t.Addr.String()] = true
		ports[t.Port] = true
	}
	const sample = 8
	list := func(all []string) string {
		if len(all) > sample {
			return strings.Join(all[:sample], ",") + fmt.Sprintf(",... (%d)", len(all))
		}
		return strings.Join(all, ",")
	}
	as := make([]string, 0, len(addrs))
	for s := range addrs {
		as = append(as, s)
	}
	slices.Sort(as)
	ps := make([]uint16, 0, len(ports))
	for p := range ports {
		ps = append(ps, p)
	}
	slices.Sort(ps)
	pss := make([]string, len(ps))
	for i, p := range ps {
		pss[i] = strconv.Itoa(int(p))
	}
	return map[string]string{
		"denied_destinations": strconv.Itoa(len(targets)), "window": window.String(),
		"addresses": list(as), "ports": list(pss),
	}
}
