package cli

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// FormatText is the sentence an add or a release prints, for people.
const FormatText = "text"

// ParsePod reads a pod argument. Unlike observe's --pod, a bare POD does not
// default to a namespace: quarantine cuts a pod off, so the pod must be
// named exactly.
func ParsePod(s string) (api.PodRef, error) {
	ns, name, ok := strings.Cut(s, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return api.PodRef{}, fmt.Errorf("pod %q: want NAMESPACE/NAME, for example shop/web-1", s)
	}
	return api.PodRef{Namespace: ns, Name: name}, nil
}

// Quarantines lists the pods quarantined on the agent's node.
func Quarantines(ctx context.Context, c *api.Client, w io.Writer, format string) error {
	if format != FormatTable && format != FormatJSON {
		return fmt.Errorf("-o %q: want table or json", format)
	}
	l, err := c.ListQuarantines(ctx)
	if err != nil {
		return AgentError(c, err)
	}
	if format == FormatJSON {
		// Scripts iterate .quarantines[]; null would make jq fail on an
		// empty node.
		if l.Quarantines == nil {
			l.Quarantines = []api.Quarantine{}
		}
		return writeJSON(w, l)
	}
	return quarantineTable(w, l.Quarantines, time.Now())
}

func quarantineTable(w io.Writer, qs []api.Quarantine, now time.Time) error {
	if len(qs) == 0 {
		_, err := fmt.Fprintln(w, "No pod is quarantined on this node.")
		return err
	}
	// The agent's order is not part of the API; people scan by pod.
	qs = slices.Clone(qs)
	slices.SortStableFunc(qs, func(a, b api.Quarantine) int {
		return cmp.Or(cmp.Compare(podName(a.Pod), podName(b.Pod)), cmp.Compare(endpointName(a.Endpoint), endpointName(b.Endpoint)))
	})
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tENDPOINT\tSINCE\tBY")
	for _, q := range qs {
		since := fmt.Sprintf("%s (%s ago)", q.Since.Local().Format(time.RFC3339), max(now.Sub(q.Since), 0).Round(time.Second))
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", podName(q.Pod), endpointName(q.Endpoint), since, quarantinedBy(q))
	}
	return tw.Flush()
}

// quarantinedBy says who put the pod in quarantine: a detection, named so
// that `observe --alerts` finds it, or an operator with their reason.
func quarantinedBy(q api.Quarantine) string {
	if q.AlertID != "" {
		return strings.TrimSpace("alert " + q.AlertID + " " + q.RuleID)
	}
	return "operator: " + orDash(q.Reason)
}

// Quarantine asks the agent to quarantine pod (NAMESPACE/NAME) for reason.
// The arguments are checked before the agent is asked, so a typo never
// reaches the datapath.
func Quarantine(ctx context.Context, c *api.Client, w io.Writer, pod, reason, format string) error {
	ref, err := ParsePod(pod)
	if err != nil {
		return err
	}
	if strings.TrimSpace(reason) == "" {
		return fmt.Errorf("--reason is required: say why %s is quarantined; it is written into the record of every packet dropped", pod)
	}
	if err := textOrJSON(format); err != nil {
		return err
	}
	req := api.QuarantineRequest{Pod: ref, Reason: reason}
	if err := req.Validate(); err != nil {
		return err
	}
	resp, err := c.Quarantine(ctx, req)
	if err != nil {
		return AgentError(c, err)
	}
	if format == FormatJSON {
		return writeJSON(w, resp)
	}
	name := podName(ref)
	if !resp.Changed {
		_, err = fmt.Fprintf(w, "%s was already quarantined\n", name)
		return err
	}
	_, err = fmt.Fprintf(w, "quarantined %s%s: all its traffic is dropped but DNS to the listed resolvers\n", name, endpointsNote(resp.Quarantines))
	return err
}

// ReleaseQuarantine asks the agent to lift the quarantine of pod
// (NAMESPACE/NAME).
func ReleaseQuarantine(ctx context.Context, c *api.Client, w io.Writer, pod, format string) error {
	ref, err := ParsePod(pod)
	if err != nil {
		return err
	}
	if err := textOrJSON(format); err != nil {
		return err
	}
	resp, err := c.ReleaseQuarantine(ctx, api.QuarantineReleaseRequest{Pod: ref})
	if err != nil {
		return AgentError(c, err)
	}
	if format == FormatJSON {
		return writeJSON(w, resp)
	}
	name := podName(ref)
	if !resp.Changed {
		_, err = fmt.Fprintf(w, "%s was not quarantined\n", name)
		return err
	}
	_, err = fmt.Fprintf(w, "released %s\n", name)
	return err
}

func textOrJSON(format string) error {
	if format != FormatText && format != FormatJSON {
		return fmt.Errorf("-o %q: want text or json", format)
	}
	return nil
}

// endpointsNote names the endpoints a quarantine covers: a pod attached to
// several networks has one per attachment.
func endpointsNote(qs []api.Quarantine) string {
	var names []string
	for _, q := range qs {
		names = append(names, endpointName(q.Endpoint))
	}
	switch len(names) {
	case 0:
		return ""
	case 1:
		return " (endpoint " + names[0] + ")"
	}
	return " (endpoints " + strings.Join(names, ", ") + ")"
}

func podName(p api.PodRef) string { return p.Namespace + "/" + p.Name }

// endpointName shortens the container ID as the agent does in pod names,
// and keeps the interface: a pod attached to several networks has one
// endpoint per interface.
func endpointName(k api.EndpointKey) string {
	id := k.ContainerID
	if len(id) > 12 {
		id = id[:12]
	}
	if k.IfName == "" {
		return orDash(id)
	}
	return orDash(id) + "/" + k.IfName
}
