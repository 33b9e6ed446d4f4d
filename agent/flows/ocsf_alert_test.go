package flows

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

func sampleAlert() *detect.Alert {
	t0 := time.Date(2026, 12, 7, 21, 4, 11, 532e6, time.UTC)
	return &detect.Alert{
		EventKind: "alert", Time: t0, RuleID: "BH-RT-002", Rule: "unshare of a user or mount namespace",
		Technique: "T1611", TechniqueName: "Escape to Host", Severity: detect.SeverityHigh,
		Pod:     detect.Endpoint{ID: "c0ffee", Namespace: "shop", Pod: "frontend", SPIFFEID: "spiffe://cluster.local/ns/shop/sa/frontend", Netns: 4026532999},
		Syscall: "unshare", Args: map[string]string{"flags": "CLONE_NEWUSER"},
		PID: 5121, TID: 5121, PPID: 5000, UID: 0, Comm: "unshare", CgroupID: 77,
		Process: &detect.Process{PID: 5121, PPID: 5000, Exe: "/usr/bin/unshare", Argv: []string{"unshare", "--user"}},
		Ancestors: []detect.Process{
			{PID: 5000, PPID: 4000, UID: 1000, Exe: "/bin/sh", Argv: []string{"sh", "-c", "unshare --user"}},
			{PID: 4000, Exe: "/usr/bin/bash"},
		},
		Action: detect.ActionAlert, Count: 1,
	}
}

// get walks a decoded JSON object along dotted keys; a number key indexes
// an array.
func get(t *testing.T, m any, keys string) any {
	t.Helper()
	cur := m
	for _, k := range strings.Split(keys, ".") {
		switch v := cur.(type) {
		case map[string]any:
			var ok bool
			if cur, ok = v[k]; !ok {
				t.Fatalf("%s: no %q in %v", keys, k, v)
			}
		case []any:
			i := int(k[0] - '0')
			if i >= len(v) {
				t.Fatalf("%s: index %d of %d", keys, i, len(v))
			}
			cur = v[i]
		default:
			t.Fatalf("%s: %q under a %T", keys, k, cur)
		}
	}
	return cur
}

func decodeOCSF(t *testing.T, al *detect.Alert) map[string]any {
	t.Helper()
	b, err := AppendAlertOCSF(nil, al)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	return m
}

// An alert becomes an OCSF 1.1.0 Detection Finding with the rule, the
// technique, the answer, the pod, the process tree and the syscall where
// the schema puts them.
func TestAlertToOCSF(t *testing.T) {
	m := decodeOCSF(t, sampleAlert())
	want := map[string]any{
		"class_uid": 2004.0, "category_uid": 2.0, "type_uid": 200401.0, "activity_id": 1.0, "activity_name": "Create",
		"metadata.version": "1.1.0", "metadata.product.name": "Bulkhead",
		"time":        float64(time.Date(2026, 12, 7, 21, 4, 11, 532e6, time.UTC).UnixMilli()),
		"severity_id": 4.0, "severity": "High", "status_id": 1.0, "count": 1.0,
		"action_id": 1.0, "action": "Allowed", "disposition_id": 19.0, "disposition": "Alert",
		"finding_info.uid": "BH-RT-002", "finding_info.title": "unshare of a user or mount namespace",
		"finding_info.analytic.uid": "BH-RT-002", "finding_info.analytic.type_id": 1.0,
		"finding_info.attacks.0.technique.uid": "T1611", "finding_info.attacks.0.technique.name": "Escape to Host",
		"attacks.0.technique.uid": "T1611",
		"resources.0.name":        "frontend", "resources.0.namespace": "shop", "resources.0.type": "Pod",
		"resources.0.uid":   "spiffe://cluster.local/ns/shop/sa/frontend",
		"actor.process.pid": 5121.0, "actor.process.tid": 5121.0, "actor.process.name": "unshare",
		"actor.process.cmd_line": "unshare --user", "actor.process.file.path": "/usr/bin/unshare",
		"actor.process.user.uid":           "0",
		"actor.process.parent_process.pid": 5000.0, "actor.process.parent_process.cmd_line": "sh -c unshare --user",
		"actor.process.parent_process.user.uid":                 "1000",
		"actor.process.parent_process.parent_process.pid":       4000.0,
		"actor.process.parent_process.parent_process.file.path": "/usr/bin/bash",
		"evidences.0.process.pid":                               5121.0,
		"unmapped.syscall":                                      "unshare", "unmapped.args.flags": "CLONE_NEWUSER", "unmapped.action": "alert",
		"unmapped.netns_inode": 4026532999.0, "unmapped.endpoint": "c0ffee",
	}
	for k, v := range want {
		if got := get(t, m, k); got != v {
			t.Errorf("%s = %v (%T), want %v", k, got, got, v)
		}
	}
	if got := get(t, m, "actor.process.lineage"); !reflect.DeepEqual(got, []any{"/bin/sh", "/usr/bin/bash"}) {
		t.Errorf("lineage %v", got)
	}
	for _, absent := range []string{"start_time", "end_time", "status_detail"} {
		if _, ok := m[absent]; ok {
			t.Errorf("a single alert has %s: %v", absent, m[absent])
		}
	}
}

// Block, Kill, the severities, and an aggregated line.
func TestAlertToOCSFAnswersAndCounts(t *testing.T) {
	for _, tt := range []struct {
		action, result      string
		sev                 detect.Severity
		actionID, dispID    float64
		sevID               float64
		disposition, detail string
	}{
		{detect.ActionBlock, "denied", detect.SeverityCritical, 2, 2, 5, "Blocked", "denied"},
		{detect.ActionKill, "sigkill queued", detect.SeverityMedium, 1, 7, 3, "Custom Action", "sigkill queued"},
		{detect.ActionKill, "sigkill failed", detect.SeverityHigh, 1, 7, 4, "Custom Action", "sigkill failed"},
	} {
		al := sampleAlert()
		al.Action, al.ActionResult, al.Severity = tt.action, tt.result, tt.sev
		m := decodeOCSF(t, al)
		if m["action_id"] != tt.actionID || m["disposition_id"] != tt.dispID || m["disposition"] != tt.disposition ||
			m["severity_id"] != tt.sevID || m["status_detail"] != tt.detail || get(t, m, "unmapped.action") != tt.action {
			t.Errorf("%s/%s: action_id %v disposition %v %v severity_id %v status_detail %v", tt.action, tt.result,
				m["action_id"], m["disposition_id"], m["disposition"], m["severity_id"], m["status_detail"])
		}
	}

	al := sampleAlert()
	first, last := al.Time.Add(-9*time.Second), al.Time.Add(-time.Second)
	al.Count, al.FirstTime, al.LastTime = 49, &first, &last
	al.Process, al.Ancestors = nil, nil
	m := decodeOCSF(t, al)
	if m["count"] != 49.0 || m["start_time"] != float64(first.UnixMilli()) || m["end_time"] != float64(last.UnixMilli()) ||
		get(t, m, "finding_info.first_seen_time") != float64(first.UnixMilli()) ||
		get(t, m, "finding_info.last_seen_time") != float64(last.UnixMilli()) {
		t.Errorf("aggregated: count %v start %v end %v finding_info %v", m["count"], m["start_time"], m["end_time"], m["finding_info"])
	}
	// Without the process cache: the event's own pid, comm and parent.
	if get(t, m, "actor.process.pid") != 5121.0 || get(t, m, "actor.process.name") != "unshare" ||
		get(t, m, "actor.process.parent_process.pid") != 5000.0 {
		t.Errorf("process without the cache: %v", get(t, m, "actor.process"))
	}
}
