package agent

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/flowlog"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/datapath"
)

// flowPipe moves datapath events to the flow log, the hub and metrics.
type flowPipe struct {
	a        *Agent
	reader   *datapath.EventReader
	enricher *flows.Enricher
	log      *flowlog.Writer // nil without --flow-log

	mu         sync.Mutex // serialises writers of the log and the hub
	buf        []byte
	kernelLost uint64
}

// startFlows opens the event ring and starts the reader, the conntrack GC
// and the loss watcher.
func (a *Agent) startFlows(ctx context.Context, wg *sync.WaitGroup) (*flowPipe, error) {
	rd, err := a.dp.Events()
	if err != nil {
		return nil, err
	}
	p := &flowPipe{a: a, reader: rd, enricher: a.enricher}
	if a.cfg.FlowLog != "" {
		p.log, err = flowlog.Open(flowlog.Config{Path: a.cfg.FlowLog, MaxSize: a.cfg.FlowLogMaxSize, MaxFiles: a.cfg.FlowLogMaxFiles})
		if err != nil {
			rd.Close()
			return nil, err
		}
	}
	if c, err := a.dp.Counters(); err == nil {
		p.kernelLost = c.EventsLost
	}
	wg.Go(func() { p.readLoop() })
	wg.Go(func() { p.tick(ctx) })
	return p, nil
}

func (p *flowPipe) readLoop() {
	for {
		ev, err := p.reader.Read()
		if errors.Is(err, datapath.ErrClosed) {
			return
		}
		if err != nil {
			p.a.log.Warn("read flow event", "error", err)
			continue
		}
		p.emit(&ev)
	}
}

// tick runs conntrack GC (flows that timed out end here), flushes the log,
// and turns kernel-side losses into lost_events records.
func (p *flowPipe) tick(ctx context.Context) {
	flush := time.NewTicker(250 * time.Millisecond)
	gc := time.NewTicker(5 * time.Second)
	defer flush.Stop()
	defer gc.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-gc.C:
			_, ended, err := p.a.dp.GC()
			if err != nil {
				p.a.log.Warn("conntrack gc", "error", err)
			}
			for i := range ended {
				p.emit(&ended[i])
			}
		case <-flush.C:
			p.checkKernelLoss()
			p.mu.Lock()
			if p.log != nil {
				if err := p.log.Flush(); err != nil {
					p.a.log.Warn("flush flow log", "error", err)
				}
			}
			p.mu.Unlock()
		}
	}
}

func (p *flowPipe) checkKernelLoss() {
	c, err := p.a.dp.Counters()
	if err != nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.EventsLost <= p.kernelLost {
		return
	}
	n := c.EventsLost - p.kernelLost
	p.kernelLost = c.EventsLost
	p.a.metrics.LostEvents.WithLabelValues("kernel").Add(float64(n))
	lost := &flows.LostEvents{Time: time.Now(), Source: "kernel", NumEventsLost: n, NodeName: p.a.cfg.NodeName}
	p.a.hub.PublishLost(lost)
	if p.log != nil {
		p.buf = lost.AppendJSON(p.buf[:0])
		if err := p.log.WriteLine(p.buf); err != nil {
			p.a.log.Warn("write flow log", "error", err)
		}
	}
}

func (p *flowPipe) emit(ev *datapath.FlowEvent) {
	f := p.enricher.Enrich(ev)
	m := p.a.metrics
	m.Flows.WithLabelValues(f.Verdict, f.TrafficDirection).Inc()
	if f.DropReasonDesc != "" {
		m.Drops.WithLabelValues(f.DropReasonDesc).Inc()
	}
	if by := f.DecidingPolicy(); by != nil {
		m.PolicyVerdicts.WithLabelValues(by.Kind, by.Namespace, by.Name, f.Verdict).Inc()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.log != nil {
		var err error
		if p.a.cfg.FlowFormat == "ocsf" {
			p.buf, err = f.AppendOCSF(p.buf[:0])
		} else {
			p.buf = f.AppendJSON(p.buf[:0])
		}
		if err == nil {
			err = p.log.WriteLine(p.buf)
		}
		if err != nil {
			p.a.log.Warn("write flow log", "error", err)
		}
	}
	p.a.hub.Publish(f)
}

func (p *flowPipe) close() {
	if p == nil {
		return
	}
	p.reader.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.log != nil {
		if err := p.log.Close(); err != nil {
			p.a.log.Warn("close flow log", "error", err)
		}
	}
}

// podAddrs maps every known pod address to its pod, for flow records.
func (v *view) podAddrs(remote map[podRef][]netip.Addr) map[netip.Addr]flows.PodName {
	out := map[netip.Addr]flows.PodName{}
	for ref, ips := range remote {
		for _, ip := range ips {
			out[ip.Unmap()] = flows.PodName{Namespace: ref.ns, Name: ref.name}
		}
	}
	for id, rec := range v.endpoints {
		ref := v.pods[id]
		for _, ip := range rec.addrs() {
			out[ip.Unmap()] = flows.PodName{Namespace: ref.ns, Name: ref.name}
		}
	}
	return out
}
