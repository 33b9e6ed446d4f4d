package demo

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// The runtime step: a process in frontend tries to leave its namespaces,
// and the agent's syscall hooks (--runtime-detection) report it with the
// pod, its SPIFFE ID and the process's ancestry, in the flow log.

const runtimeTitle = "6. A compromised pod: the syscall hooks see it"

var runtimeStory = []string{
	"A shell in frontend makes a user namespace (unshare -U), the first step",
	"of many container escapes. The agent watches each pod's syscalls by its",
	"network namespace; the alert lands in the flow log next to the flows.",
}

// runtimeCommand runs in frontend's network namespace, as a process of the
// pod would.
var runtimeCommand = []string{"/bin/sh", "-c", "unshare -U true && echo out"}

// alertWithin bounds the wait for the alert line.
const alertWithin = 10 * time.Second

func (r *run) runtimeAlert(ctx context.Context) error {
	r.p.heading(runtimeTitle)
	for _, line := range runtimeStory {
		r.p.say("  " + line)
	}
	front := r.byRef["shop/frontend"]
	r.p.note(fmt.Sprintf("    frontend$ %s", shellQuote(runtimeCommand)))
	since := time.Now()
	err := front.netns.Do(func(ns.NetNS) error {
		// The child is forked from this thread, so it starts in the pod's
		// network namespace.
		out, err := exec.CommandContext(ctx, runtimeCommand[0], runtimeCommand[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %w: %s", shellQuote(runtimeCommand), err, bytes.TrimSpace(out))
		}
		return nil
	})
	if err != nil {
		return err
	}
	al, err := r.waitAlert(ctx, since, func(a *detect.Alert) bool {
		return a.RuleID == detect.RuleUnshareNS.ID && a.Pod.Namespace == "shop" && a.Pod.Pod == "frontend"
	})
	if err != nil {
		return err
	}
	r.showAlert(al)
	chain := []string{processText(al.Process, al.PID, al.Comm)}
	for _, a := range al.Ancestors {
		chain = append(chain, processText(&a, a.PID, ""))
	}
	r.p.say("    process  " + strings.Join(chain, "\n        <- "))
	// The alert must name the program and the shell that started it: the
	// exec cache's work.
	if al.Process == nil || !strings.HasSuffix(al.Process.Exe, "/unshare") || len(al.Ancestors) == 0 ||
		len(al.Ancestors[0].Argv) == 0 || al.Ancestors[0].Argv[0] != runtimeCommand[0] {
		r.p.fail("  check failed: the alert does not carry the process and its shell")
		return fmt.Errorf("runtime alert without its process context: %+v", al)
	}
	r.p.good("  check: the alert names the pod, its SPIFFE ID, the program and its shell")
	r.p.note("  A tracepoint observes: the process asked, and the syscall ran. A")
	r.p.note("  BulkheadRuntimePolicy can answer with Kill here, or Block where a")
	r.p.note("  cgroup hook sees the operation first (see Runtime detection in the README).")
	return nil
}

// showAlert prints an alert's headline and what became of it.
func (r *run) showAlert(al *detect.Alert) {
	r.p.say(r.p.paint(styleBold+styleRed, fmt.Sprintf("  ALERT %s, severity %s", al.RuleID, al.Severity)))
	r.p.say("    id       " + al.ID)
	r.p.say("    attack   " + al.Technique + " " + al.TechniqueName)
	r.p.say("    rule     " + al.Rule)
	r.p.say(fmt.Sprintf("    pod      %s/%s  %s", al.Pod.Namespace, al.Pod.Pod, al.Pod.SPIFFEID))
	if call := fmt.Sprintf("    syscall  %s(%s)", al.Syscall, argsText(al.Args)); len(call) <= 78 {
		r.p.say(call)
	} else {
		// One argument a line, to fit 80 columns.
		r.p.say("    syscall  " + al.Syscall)
		for _, k := range slices.Sorted(maps.Keys(al.Args)) {
			r.p.say(fmt.Sprintf("      %s=%s", k, al.Args[k]))
		}
	}
	answer := al.Action
	if al.ActionResult != "" {
		answer += ": " + al.ActionResult
	}
	if al.Quarantine != "" {
		answer += "; quarantine: " + al.Quarantine
	}
	r.p.say("    answer   " + answer)
}

// waitAlert reads the flow log until an alert after since matches.
func (r *run) waitAlert(ctx context.Context, since time.Time, match func(*detect.Alert) bool) (*detect.Alert, error) {
	deadline := time.Now().Add(alertWithin)
	for {
		if al, err := findAlert(r.flowLog, since, match); err != nil || al != nil {
			return al, err
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no runtime alert in the flow log %s within %v", r.flowLog, alertWithin)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func findAlert(path string, since time.Time, match func(*detect.Alert) bool) (*detect.Alert, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("flow log: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if !bytes.Contains(line, []byte(`"event_kind":"alert"`)) {
			continue
		}
		var al detect.Alert
		if err := json.Unmarshal(line, &al); err != nil {
			return nil, fmt.Errorf("alert line in the flow log: %w", err)
		}
		if !al.Time.Before(since.Add(-time.Second)) && match(&al) {
			return &al, nil
		}
	}
	return nil, sc.Err()
}

func processText(p *detect.Process, pid uint32, comm string) string {
	if p == nil {
		return fmt.Sprintf("%s (pid %d)", comm, pid)
	}
	cmd := p.Exe
	if len(p.Argv) > 0 {
		cmd = strings.Join(p.Argv, " ")
	}
	return fmt.Sprintf("%s (pid %d)", cmd, p.PID)
}

func argsText(args map[string]string) string {
	keys := make([]string, 0, len(args))
	for k := range args {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(k + "=" + args[k])
	}
	return b.String()
}

func shellQuote(argv []string) string {
	out := make([]string, len(argv))
	for i, a := range argv {
		if strings.ContainsAny(a, " '\"$") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		out[i] = a
	}
	return strings.Join(out, " ")
}
