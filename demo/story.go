package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/cli"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

// story is what the user watches: workloads, the open matrix, four policy
// steps, a live explain and the last flows, each matrix checked.
func (r *run) story(ctx context.Context) error {
	pods, ports, steps := Refs(ShopPods()), ShopPorts(), ShopSteps()
	expected, err := Expectations(pods, ports, steps)
	if err != nil {
		return err
	}
	if err := r.showWorkloads(ctx); err != nil {
		return err
	}
	if err := r.showSVIDs(ctx); err != nil {
		return err
	}

	r.p.heading("0. No policy: every pod reaches every other pod")
	r.p.note("  measured with real TCP and UDP traffic between the pods' namespaces")
	observed, _, err := r.converge(ctx, expected[0])
	if err != nil {
		return err
	}
	r.p.printf("%s", RenderMatrix(observed, nil, r.p.color))
	if err := r.check(0, expected[0], observed); err != nil {
		return err
	}

	var explainCell *Cell
	for i, s := range steps {
		prev := observed
		r.p.heading(s.Title)
		for _, line := range s.Story {
			r.p.say("  " + line)
		}
		r.p.note(indent(strings.TrimRight(s.YAML, "\n"), "    "))
		rev, err := r.revision(ctx)
		if err != nil {
			return err
		}
		if err := r.writeStore(s.File, s.YAML); err != nil {
			return err
		}
		if err := r.waitApplied(ctx, rev); err != nil {
			return err
		}
		var idx flowIndex
		observed, idx, err = r.converge(ctx, expected[i+1])
		if err != nil {
			return err
		}
		diffs := prev.Diff(observed)
		changed := map[Cell]bool{}
		for _, d := range diffs {
			changed[d.Cell] = true
		}
		r.p.printf("%s", RenderMatrix(observed, changed, r.p.color))
		r.showChanges(diffs, idx)
		if err := r.check(i+1, expected[i+1], observed); err != nil {
			return err
		}
		if s.Explain != nil {
			explainCell = s.Explain
		}
	}

	if explainCell != nil {
		c := *explainCell
		r.p.heading("Why was this dropped?")
		r.p.say(fmt.Sprintf("  $ bulkhead policy explain --from %s --to %s \\\n      --port %d --protocol %s", c.From, c.To, c.Port.Num, c.Port.Proto))
		var b strings.Builder
		if err := cli.Explain(ctx, r.client, &b, c.From, c.To, c.Port.Num, c.Port.Proto, "text"); err != nil {
			return fmt.Errorf("live explain: %w", err)
		}
		r.p.say(indent(strings.TrimRight(b.String(), "\n"), "  "))
		if err := r.checkExplain(ctx, c); err != nil {
			return err
		}
	}
	if err := r.mtls(ctx); err != nil {
		return err
	}
	if err := r.runtimeAlert(ctx); err != nil {
		return err
	}
	if err := r.showLastFlows(ctx, 12); err != nil {
		return err
	}
	// The end: the compromised pod, and the answer.
	return r.quarantine(ctx)
}

func indent(s, prefix string) string {
	return prefix + strings.ReplaceAll(s, "\n", "\n"+prefix)
}

// showWorkloads lists the endpoints the agent enforces on, as `bulkhead
// endpoints` does, narrowed to 80 columns.
func (r *run) showWorkloads(ctx context.Context) error {
	l, err := r.client.ListEndpoints(ctx)
	if err != nil {
		return fmt.Errorf("list endpoints: %w", err)
	}
	r.p.heading("The workloads and their identities (bulkhead endpoints)")
	tw := tabwriter.NewWriter(r.p.w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  POD\tIP\tID\tSPIFFE ID")
	byRef := map[string]string{}
	for _, e := range l.Endpoints {
		ip := ""
		if len(e.IPs) > 0 {
			ip = e.IPs[0].Addr().String()
		}
		if !e.Attached {
			return fmt.Errorf("endpoint %s/%s is not attached", e.Pod.Namespace, e.Pod.Name)
		}
		byRef[e.Pod.Namespace+"/"+e.Pod.Name] = fmt.Sprintf("\t%s\t%d\t%s", ip, e.IdentityID, e.SPIFFEID)
	}
	for _, p := range r.pods {
		line, ok := byRef[p.spec.Ref()]
		if !ok {
			return fmt.Errorf("the agent does not list %s as an endpoint", p.spec.Ref())
		}
		fmt.Fprintf(tw, "  %s%s\n", p.spec.Ref(), line)
	}
	return tw.Flush()
}

// svidsWithin bounds the wait for every pod's SVID: the built-in CA mints
// at once, after the apply that follows each pod's ADD.
const svidsWithin = 10 * time.Second

// showSVIDs waits until every pod holds an X.509-SVID of the built-in CA
// with its endpoint's SPIFFE ID, and lists them as `bulkhead identities`
// does, narrowed to 80 columns (a short serial, the time left).
func (r *run) showSVIDs(ctx context.Context) error {
	eps, err := r.client.ListEndpoints(ctx)
	if err != nil {
		return fmt.Errorf("list endpoints: %w", err)
	}
	want := map[string]string{}
	for _, e := range eps.Endpoints {
		want[e.Pod.Namespace+"/"+e.Pod.Name] = e.SPIFFEID
	}
	deadline := time.Now().Add(svidsWithin)
	var got map[string]api.SVIDInfo
	for {
		l, err := r.client.ListIdentities(ctx)
		if err != nil {
			return fmt.Errorf("list identities: %w", err)
		}
		got = map[string]api.SVIDInfo{}
		for _, s := range l.SVIDs {
			got[s.Pod] = s
		}
		missing := r.missingSVIDs(want, got)
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: no SVID with the endpoint's SPIFFE ID after %v: %s", ErrSelfCheck, svidsWithin, strings.Join(missing, "; "))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	r.p.heading("Their X.509-SVIDs, from the built-in CA (bulkhead identities)")
	tw := tabwriter.NewWriter(r.p.w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  POD\tSPIFFE ID\tSERIAL\tEXPIRES")
	now := time.Now()
	for _, p := range r.pods {
		s := got[p.spec.Ref()]
		serial := s.Serial
		if len(serial) > 6 {
			serial = serial[:6] + "…"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\tin %d min\n", p.spec.Ref(), s.SPIFFEID, serial, int(s.NotAfter.Sub(now).Round(time.Minute).Minutes()))
	}
	return tw.Flush()
}

// missingSVIDs says which pods hold no SVID with their endpoint's ID.
func (r *run) missingSVIDs(want map[string]string, got map[string]api.SVIDInfo) []string {
	var out []string
	for _, p := range r.pods {
		ref := p.spec.Ref()
		s, ok := got[ref]
		switch {
		case !ok:
			out = append(out, ref+": not followed")
		case s.SPIFFEID == "":
			out = append(out, ref+": "+s.NoSVIDReason)
		case s.SPIFFEID != want[ref]:
			out = append(out, fmt.Sprintf("%s: SVID for %s, endpoint is %s", ref, s.SPIFFEID, want[ref]))
		}
	}
	return out
}

// revision is the agent's current policy revision.
func (r *run) revision(ctx context.Context) (uint64, error) {
	st, err := r.client.Status(ctx)
	if err != nil {
		return 0, fmt.Errorf("agent status: %w", err)
	}
	return st.PolicyRevision, nil
}

// waitApplied waits until the agent's policy revision moves past rev, so
// the probes test the new policy; a store error fails the step at once.
func (r *run) waitApplied(ctx context.Context, rev uint64) error {
	deadline := time.Now().Add(applyTimeout)
	for {
		st, err := r.client.Status(ctx)
		if err != nil {
			return fmt.Errorf("agent status: %w", err)
		}
		if len(st.StoreErrors) > 0 {
			e := st.StoreErrors[0]
			return fmt.Errorf("the agent rejected the store: %s:%d: %s", e.File, e.Line, e.Message)
		}
		if st.PolicyRevision > rev {
			return nil
		}
		if time.Now().After(deadline) {
			// The matrix check below still decides; this only says why.
			r.p.note(fmt.Sprintf("  (policy revision still %d after %s)", st.PolicyRevision, applyTimeout))
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// converge probes rounds until the observed matrix equals want or
// convergeWithin passes, and returns the last round. Retrying covers the
// moment between the agent's revision and the last map update, and a lost
// UDP datagram; a datapath that disagrees for longer fails the check.
func (r *run) converge(ctx context.Context, want *Matrix) (*Matrix, flowIndex, error) {
	deadline := time.Now().Add(convergeWithin)
	for {
		m, idx, err := r.observe(ctx, want)
		if err != nil {
			return nil, nil, err
		}
		if len(want.Diff(m)) == 0 || time.Now().After(deadline) {
			return m, idx, nil
		}
	}
}

// observe probes every cell once, in parallel, then reads the agent's flow
// records for the round: an AUDIT record turns a passing cell into Audited.
func (r *run) observe(ctx context.Context, shape *Matrix) (*Matrix, flowIndex, error) {
	// Flow times come from the kernel clock converted to wall time; a little
	// slack keeps the round's first records.
	since := time.Now().Add(-20 * time.Millisecond)
	m := NewMatrix(shape.Pods, shape.Ports)
	cells := m.Cells()
	results := make([]bool, len(cells))
	errs := make([]error, len(cells))
	var wg sync.WaitGroup
	for i, c := range cells {
		wg.Go(func() {
			results[i], errs[i] = r.byRef[c.From].probe(r.addr(c.To), c.Port, probeTimeout)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	for i, c := range cells {
		if !results[i] {
			_ = m.Set(c, Denied)
		}
	}
	// Records reach the stream shortly after the packets; wait until every
	// cell has the record of the decision that matters (a drop, or the
	// ingress side's verdict) or a bound passes.
	var idx flowIndex
	deadline := time.Now().Add(flowsWithin)
	for {
		fs, err := fetchFlows(ctx, r.client, since)
		if err != nil {
			return nil, nil, err
		}
		idx = indexFlows(fs)
		complete := true
		for _, c := range cells {
			o, _ := m.Get(c)
			if !idx.decided(c, o) {
				complete = false
				break
			}
		}
		if complete || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	for _, c := range cells {
		if o, _ := m.Get(c); o == Allowed && idx.has(c, flows.VerdictAudit) {
			_ = m.Set(c, Audited)
		}
	}
	return m, idx, nil
}

// decided reports whether a cell has the record that settles it.
func (idx flowIndex) decided(c Cell, o Outcome) bool {
	for _, f := range idx[c] {
		if o == Denied && f.Verdict == flows.VerdictDropped {
			return true
		}
		if o != Denied && len(f.IngressAllowedBy)+len(f.IngressDeniedBy) > 0 {
			return true
		}
	}
	return false
}

// check compares the observed matrix, and the offline compiler's
// prediction for the same store, with the expectation.
func (r *run) check(step int, want, observed *Matrix) error {
	offline, err := OfflineMatrix(r.store, want.Pods, want.Ports)
	if err != nil {
		return fmt.Errorf("offline engine: %w", err)
	}
	var problems []string
	for _, d := range want.Diff(observed) {
		problems = append(problems, fmt.Sprintf("  datapath: %s: expected %s, observed %s", d.Cell, d.Before, d.After))
	}
	for _, d := range want.Diff(offline) {
		problems = append(problems, fmt.Sprintf("  compiler: %s: expected %s, policy explain says %s", d.Cell, d.Before, d.After))
	}
	if len(problems) > 0 {
		r.p.fail(fmt.Sprintf("  self-check FAILED at step %d:", step))
		for _, line := range problems {
			r.p.fail(line)
		}
		return fmt.Errorf("%w at step %d: %d difference(s), first: %s", ErrSelfCheck, step, len(problems), strings.TrimSpace(problems[0]))
	}
	r.p.good(fmt.Sprintf("  check: %d cells as expected, and as `policy explain` predicts", len(want.Cells())))
	return nil
}

// showChanges lists the cells that changed, each with the record that
// decided it.
func (r *run) showChanges(diffs []Diff, idx flowIndex) {
	if len(diffs) == 0 {
		r.p.say("  no cell changed")
		return
	}
	r.p.say("  changed, and the flow record that decided it:")
	for _, d := range diffs {
		from, to := d.Before.String(), d.After.String()
		r.p.say(fmt.Sprintf("  %-38s %s -> %s", d.Cell.String(), from, r.p.paint(outcomeStyle(d.After), to)))
		if f := idx.deciding(d.Cell, d.After); f != nil {
			r.p.note(fmt.Sprintf("      %s by %s", f.Verdict, deciderText(f)))
		} else {
			r.p.note("      (no flow record for it yet)")
		}
	}
}

// showLastFlows prints the most recent flow records in table form, the
// records `bulkhead observe --last N -o table` prints, in columns that fit
// 80 characters.
func (r *run) showLastFlows(ctx context.Context, n int) error {
	fs, err := fetchFlows(ctx, r.client, time.Time{})
	if err != nil {
		return err
	}
	// Connection ends and replies repeat what the first record said, and
	// a record from a side no policy selects says nothing about policy.
	fs = slices.DeleteFunc(fs, func(f *flows.Flow) bool {
		p := f.DecidingPolicy()
		return f.IsReply || f.EventKind == "end" || p == nil || p.Name == "no-policy-selects"
	})
	if len(fs) > n {
		fs = fs[len(fs)-n:]
	}
	r.p.heading(fmt.Sprintf("The last %d flows a policy decided (bulkhead observe)", len(fs)))
	tw := tabwriter.NewWriter(r.p.w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  FROM\tTO\tPORT\tVERDICT\tDECIDED BY")
	for _, f := range fs {
		c, ok := cellOf(f)
		if !ok {
			continue
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", c.From, c.To, c.Port, f.Verdict, shortDecider(f))
	}
	return tw.Flush()
}

// shortDecider names the deciding policy without its rule index.
func shortDecider(f *flows.Flow) string {
	p := namedPolicy(f)
	if p == nil {
		p = f.DecidingPolicy()
	}
	if p == nil {
		return "-"
	}
	if p.Kind == "default" {
		return p.Name
	}
	name := p.Name
	if p.Namespace != "" {
		name = p.Namespace + "/" + p.Name
	}
	return p.Kind + " " + name
}

// namedPolicy is the first policy a record names, denials first, skipping
// the "default" entries of directions no policy selects.
func namedPolicy(f *flows.Flow) *flows.Policy {
	for _, ps := range [][]*flows.Policy{f.IngressDeniedBy, f.EgressDeniedBy, f.IngressAllowedBy, f.EgressAllowedBy} {
		for _, p := range ps {
			if p.Kind != "default" {
				return p
			}
		}
	}
	return nil
}

// checkExplain compares the live agent's explanation of a cell with the
// offline engine's on the same store: the same verdict, decided by the same
// rule on each side. The cell was chosen because it is dropped.
func (r *run) checkExplain(ctx context.Context, c Cell) error {
	sns, sname, _ := strings.Cut(c.From, "/")
	dns, dname, _ := strings.Cut(c.To, "/")
	resp, err := r.client.Explain(ctx, api.ExplainRequest{
		Source:      api.Peer{Pod: &api.PodRef{Namespace: sns, Name: sname}},
		Destination: api.Peer{Pod: &api.PodRef{Namespace: dns, Name: dname}},
		Protocol:    c.Port.Proto, Port: c.Port.Num,
	})
	if err != nil {
		return fmt.Errorf("live explain: %w", err)
	}
	var live explain.Result
	if err := json.Unmarshal(resp.Detail, &live); err != nil {
		return fmt.Errorf("decode live explain: %w", err)
	}
	offline, err := OfflineExplain(r.store, c)
	if err != nil {
		return err
	}
	switch {
	case live.Combined != "deny":
		return fmt.Errorf("%w: the live explain of %s says %s, not deny", ErrSelfCheck, c, live.Combined)
	case live.Combined != offline.Combined,
		!reflect.DeepEqual(live.Ingress.Rule, offline.Ingress.Rule),
		!reflect.DeepEqual(live.Egress.Rule, offline.Egress.Rule):
		return fmt.Errorf("%w: live and offline explain of %s differ: live %s (ingress %v, egress %v), offline %s (ingress %v, egress %v)",
			ErrSelfCheck, c, live.Combined, live.Ingress.Rule, live.Egress.Rule, offline.Combined, offline.Ingress.Rule, offline.Egress.Rule)
	}
	return nil
}
