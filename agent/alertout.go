package agent

import (
	"bytes"
	"context"
	"encoding/json"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flowlog"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// alertRing is how many recent alerts the agent keeps for `bulkhead
// observe --alerts`. Alerts are rare next to flows; this is hours of a
// noisy node's alerts, and about 2 MiB at most.
const alertRing = 1024

// emitAlert sends a runtime alert to every output: the metric, the agent's
// log (so that an alert raised while the flow pipeline is down still leaves
// a trace), the alert stream, and one line in --flow-format, to --alert-log
// when it is set, else to the flow log.
func (a *Agent) emitAlert(al detect.Alert) {
	d := a.sysmon
	al.ID = newAlertID()
	a.quarantineOnAlert(&al)
	// A line may stand for several events (the aggregator's count).
	d.alerts.WithLabelValues(al.RuleID, al.Technique, al.Action).Add(float64(max(al.Count, 1)))
	a.log.Warn("runtime alert", "rule", al.RuleID, "technique", al.Technique, "pod", al.Pod.Namespace+"/"+al.Pod.Pod,
		"syscall", al.Syscall, "pid", al.PID, "comm", al.Comm, "action", al.Action, "count", al.Count, "alert", al.ID,
		"quarantine", al.Quarantine)
	d.hub.Publish(&al)
	line, err := encodeAlert(&al, a.cfg.FlowFormat)
	if err != nil {
		a.log.Error("encode runtime alert", "rule", al.RuleID, "error", err)
		return
	}
	if w := d.alertLog.Load(); w != nil {
		if err := writeAlertLine(w, line); err != nil {
			a.log.Warn("write alert to the alert log", "error", err)
		}
		return
	}
	if p := a.pipe.Load(); p != nil {
		p.writeAlert(line)
	}
}

// encodeAlert is one alert line: the native JSON (event_kind "alert"), or
// an OCSF Detection Finding.
func encodeAlert(al *detect.Alert, format string) ([]byte, error) {
	if format == "ocsf" {
		return flows.AppendAlertOCSF(nil, al)
	}
	return json.Marshal(al)
}

// writeAlertLine appends and flushes one line: alerts are rare, and one
// should not wait for a tick.
func writeAlertLine(w *flowlog.Writer, line []byte) error {
	if err := w.WriteLine(line); err != nil {
		return err
	}
	return w.Flush()
}

// writeAlert appends one alert line to the flow log and flushes it.
func (p *flowPipe) writeAlert(line []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.flowLog == nil {
		return
	}
	if err := writeAlertLine(p.flowLog, line); err != nil {
		p.log.Warn("write alert to the flow log", "error", err)
	}
}

// openAlertLog opens --alert-log, rotated like the flow log; nothing
// without it.
func (a *Agent) openAlertLog() error {
	if a.sysmon == nil || a.cfg.AlertLog == "" {
		return nil
	}
	w, err := flowlog.Open(flowlog.Config{Path: a.cfg.AlertLog, MaxSize: a.cfg.AlertLogMaxSize, MaxFiles: a.cfg.AlertLogMaxFiles})
	if err != nil {
		return err
	}
	a.sysmon.alertLog.Store(w)
	return nil
}

// closeAlertLog closes --alert-log once the runtime service has stopped
// (its last aggregated alerts are written first).
func (a *Agent) closeAlertLog() {
	if a.sysmon == nil {
		return
	}
	if w := a.sysmon.alertLog.Swap(nil); w != nil {
		if err := w.Close(); err != nil {
			a.log.Warn("close the alert log", "error", err)
		}
	}
}

var _ api.AlertStreamer = (*Agent)(nil)

// ObserveAlerts streams recent runtime alerts, then new ones while
// req.Follow. Without --runtime-detection there are none to stream: that is
// an error, not an empty stream.
func (a *Agent) ObserveAlerts(ctx context.Context, req api.AlertObserveRequest, write func([]byte) error) error {
	var f flows.AlertFilter
	if len(req.Filter) > 0 {
		dec := json.NewDecoder(bytes.NewReader(req.Filter))
		dec.DisallowUnknownFields() // a misspelt field must not widen the filter
		if err := dec.Decode(&f); err != nil {
			return api.Errorf(api.CodeInvalidRequest, "alert filter: %w", err)
		}
	}
	if err := f.Validate(); err != nil {
		return api.Errorf(api.CodeInvalidRequest, "alert filter: %w", err)
	}
	if a.sysmon == nil {
		return api.Errorf(api.CodeUnsupported, "runtime detection is off: start the agent with --runtime-detection to get alerts")
	}
	var buf []byte
	emit := func(it flows.AlertItem) error {
		var err error
		if buf, err = json.Marshal(it); err != nil {
			return err
		}
		return write(buf)
	}
	hub := a.sysmon.hub
	if !req.Follow {
		for _, al := range hub.Last(req.Last, &f) {
			if err := emit(flows.AlertItem{Alert: al}); err != nil {
				return err
			}
		}
		return nil
	}
	backlog, sub := hub.Subscribe(req.Last, f, followBuffer)
	defer sub.Close()
	for _, al := range backlog {
		if err := emit(flows.AlertItem{Alert: al}); err != nil {
			return err
		}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.stopping:
			return nil
		case it := <-sub.C():
			if err := emit(it); err != nil {
				return err
			}
		}
	}
}
