// Package cli renders the agent's read APIs for people and scripts: the
// logic behind `bulkhead status`, `endpoints`, `identities`, `observe` and
// the live `policy explain`. cmd/bulkhead only wires flags to it.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// Output formats.
const (
	FormatTable = "table"
	FormatJSON  = "json"
)

// AgentError turns "cannot reach the agent" into advice.
func AgentError(c *api.Client, err error) error {
	if errors.Is(err, api.ErrUnavailable) {
		return fmt.Errorf("cannot reach bulkhead-agent at %s: is it running (and are you root)? Start it with `bulkhead-agent --store dir:PATH`, or point --socket at its socket: %w", c.Socket(), err)
	}
	return err
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// Status prints the agent's health. It returns an error when the agent is
// not ready, so scripts can use the exit code.
func Status(ctx context.Context, c *api.Client, w io.Writer, format string) error {
	st, err := c.Status(ctx)
	if err != nil {
		return AgentError(c, err)
	}
	if format == FormatJSON {
		if err := writeJSON(w, st); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		ready := "yes"
		if !st.Ready {
			ready = "no: " + st.Reason
		}
		fmt.Fprintf(tw, "Ready:\t%s\n", ready)
		fmt.Fprintf(tw, "Agent:\t%s on node %q, up %s\n", orDash(st.AgentVersion), st.NodeName, time.Since(st.StartedAt).Round(time.Second))
		fmt.Fprintf(tw, "Datapath:\t%s\n", orDash(st.Datapath))
		for _, f := range st.Features {
			fmt.Fprintf(tw, "  %s:\t%s\n", f.Name, f.State)
		}
		if v := st.DatapathVersion; v != nil {
			fmt.Fprintf(tw, "  version:\t%s\n", datapathVersionLine(v))
			if m := v.Migration; m != nil {
				fmt.Fprintf(tw, "  migrated:\t%s\n", migrationLine(m))
			}
		}
		fmt.Fprintf(tw, "Store:\t%s\n", st.Store)
		fmt.Fprintf(tw, "Endpoints:\t%d\n", st.Endpoints)
		fmt.Fprintf(tw, "Identities:\t%d\n", st.Identities)
		if is := st.IdentitySource; is != nil {
			fmt.Fprintf(tw, "Identity source:\t%s\n", identitySourceLine(is))
		}
		if m := st.MTLS; m != nil {
			fmt.Fprintf(tw, "mTLS tunnel:\t%s\n", mtlsLine(m))
		}
		fmt.Fprintf(tw, "Policy revision:\t%d\n", st.PolicyRevision)
		fmt.Fprintf(tw, "Lost flow events:\t%d in the kernel ring, %d in the agent\n", st.LostEventsKernel, st.LostEventsUserspace)
		if p := st.PolicyApply; p != nil {
			fmt.Fprintf(tw, "Policy apply:\tFAILING since %s (%s ago), %d retries, next in %s; the previous policy stays enforced\n",
				p.FailingSince.Format(time.RFC3339), time.Since(p.FailingSince).Round(time.Second), p.Retries,
				max(time.Until(p.NextRetry), 0).Round(time.Millisecond))
			fmt.Fprintf(tw, "Last apply error:\t%s\n", p.LastError)
		} else {
			fmt.Fprintf(tw, "Policy apply:\tok\n")
		}
		if len(st.StoreErrors) == 0 {
			fmt.Fprintf(tw, "Last store error:\tnone\n")
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		for _, e := range st.StoreErrors {
			fmt.Fprintf(w, "Store error: %s:%d: %s (the last good state stays enforced)\n", e.File, e.Line, e.Message)
		}
		if c := st.StoreConnection; c != nil {
			state := "connected"
			if !c.Connected {
				state = "DISCONNECTED (the last state stays enforced)"
			}
			fmt.Fprintf(w, "Store connection: %s since %s\n", state, c.Since.Local().Format(time.RFC3339))
		}
		if h := st.StoreHeld; h != nil {
			applied := fmt.Sprintf("the last applied state (%d objects, %d policies)", h.AppliedObjects, h.AppliedPolicies)
			if h.AppliedObjects == 0 {
				// Only a baseline the agent has no record of is empty.
				applied = "the state the datapath enforces (not recorded)"
			}
			fmt.Fprintf(w, "Store held: %s; %s stays enforced, and the held one (%d objects, %d policies) is applied at %s (in %s) if the store stays as it is\n",
				h.Reason, applied, h.HeldObjects, h.HeldPolicies,
				h.Until.Local().Format(time.RFC3339), time.Until(h.Until).Round(time.Second))
		}
		for _, m := range st.EndpointWarnings {
			fmt.Fprintf(w, "Endpoint warning: %s\n", m)
		}
		for _, e := range st.PolicyErrors {
			fmt.Fprintf(w, "Policy rejected: %s\n", e.Message)
		}
		for _, u := range st.Unadopted {
			fmt.Fprintf(w, "Pod not enforced: %s/%s is running on this node, and its sandbox was not found (since %s): %s\n",
				u.Pod.Namespace, u.Pod.Name, u.Since.Local().Format(time.RFC3339), u.Reason)
		}
	}
	if !st.Ready {
		return fmt.Errorf("agent not ready: %s", st.Reason)
	}
	return nil
}

// Endpoints lists the endpoints.
func Endpoints(ctx context.Context, c *api.Client, w io.Writer, format string) error {
	l, err := c.ListEndpoints(ctx)
	if err != nil {
		return AgentError(c, err)
	}
	if format == FormatJSON {
		return writeJSON(w, l)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tIDENTITY\tSPIFFE ID\tIPS\tVETH\tENFORCEMENT")
	for _, e := range l.Endpoints {
		pod := e.Pod.Namespace + "/" + e.Pod.Name
		if e.Pod.Name == "" {
			pod = "container " + e.ContainerID
		}
		var ips []string
		for _, p := range e.IPs {
			ips = append(ips, p.Addr().String())
		}
		state := "not attached"
		if e.Attached {
			state = e.AttachMode
		}
		if e.Adopted {
			state += " (adopted)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", pod, e.IdentityID, orDash(e.SPIFFEID), strings.Join(ips, ","), e.HostVeth, state)
	}
	return tw.Flush()
}

// Identities lists the identities.
func Identities(ctx context.Context, c *api.Client, w io.Writer, format string) error {
	l, err := c.ListIdentities(ctx)
	if err != nil {
		return AgentError(c, err)
	}
	if format == FormatJSON {
		return writeJSON(w, l)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSPIFFE ID\tNAMESPACE\tLABELS\tENDPOINTS")
	for _, id := range l.Identities {
		name := id.SPIFFEID
		if id.Reserved != "" {
			name = id.Reserved
		}
		var labels []string
		for _, k := range slices.Sorted(maps.Keys(id.Labels)) {
			labels = append(labels, k+"="+id.Labels[k])
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\n", id.ID, orDash(name), orDash(id.Namespace), orDash(strings.Join(labels, ",")), id.Endpoints)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if l.Source == nil || l.Source.Name == "none" {
		return nil
	}
	fmt.Fprintf(w, "\nSVIDs of this node's pods (source %s):\n", identitySourceLine(l.Source))
	return SVIDTable(w, l.SVIDs, time.Now())
}

// SVIDTable prints one line per local pod: its SVID's SPIFFE ID, serial and
// expiry, or why it holds none.
func SVIDTable(w io.Writer, svids []api.SVIDInfo, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tSPIFFE ID\tSERIAL\tEXPIRES")
	for _, s := range svids {
		if s.SPIFFEID == "" {
			fmt.Fprintf(tw, "%s\t-\t-\tno SVID: %s\n", s.Pod, orDash(s.NoSVIDReason))
			continue
		}
		exp := fmt.Sprintf("%s (in %s)", s.NotAfter.UTC().Format(time.RFC3339), s.NotAfter.Sub(now).Round(time.Second))
		if s.LastError != "" {
			exp += "; source: " + s.LastError
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", s.Pod, s.SPIFFEID, s.Serial, exp)
	}
	return tw.Flush()
}

func mtlsLine(m *api.MTLSStatus) string {
	if !m.Enabled {
		return "off: " + m.Reason
	}
	ktls := "kernel TLS"
	if !m.KernelTLS {
		ktls = "user-space TLS (no kernel TLS: " + m.KernelTLSReason + ")"
	}
	return fmt.Sprintf("port %d, %s; %d out / %d in open, %d pooled and %d inbound TLS connections; %d forwarded, %d refused, %d admitted, %d denied, %d handshake failures",
		m.Port, ktls, m.ActiveOutbound, m.ActiveInbound, m.PooledTLS, m.InboundTLS, m.Forwarded, m.Refused, m.Admitted, m.Denied, m.HandshakeFailures)
}

func identitySourceLine(is *api.IdentitySourceStatus) string {
	if is.Name == "none" {
		return "none (no SVIDs; --identity-source builtin or spire issues them)"
	}
	health := "healthy"
	if !is.Healthy {
		health = "UNAVAILABLE"
		if is.LastError != "" {
			health += ": " + is.LastError
		}
		health += "; held SVIDs stay in use until they expire"
	}
	line := fmt.Sprintf("%s, %s; %d of %d local pods hold an SVID (%d distinct), %d rotations", is.Name, health,
		is.PodsWithSVID, is.PodsFollowed, is.SVIDs, is.Rotations)
	if !is.EarliestExpiry.IsZero() {
		line += fmt.Sprintf(", earliest expiry in %s", time.Until(is.EarliestExpiry).Round(time.Second))
	}
	return line
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func datapathVersionLine(v *api.DatapathVersion) string {
	obj := v.Object
	if len(obj) > 12 {
		obj = obj[:12]
	}
	return fmt.Sprintf("%d (object %s, settings %s), loaded %s", v.Serial, obj, v.Settings,
		v.LoadedAt.Local().Format(time.RFC3339))
}

func migrationLine(m *api.DatapathMigration) string {
	from := fmt.Sprintf("version %d", m.FromSerial)
	if m.FromSerial == 0 {
		from = "version 0 (from before versions were recorded)"
	}
	line := fmt.Sprintf("from %s at %s in %.0f ms; %d attachments moved in %.2f ms; %d maps kept",
		from, m.At.Local().Format(time.RFC3339), m.DurationMS, m.LinksSwapped, m.SwapMS, len(m.Reused))
	for _, p := range []struct {
		what  string
		names []string
	}{{"copied", m.Copied}, {"made anew", m.Created}, {"old pins removed", m.Removed}} {
		if len(p.names) > 0 {
			line += fmt.Sprintf(", %s: %s", p.what, strings.Join(p.names, " "))
		}
	}
	return line
}
