package flows

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/bulkhead-io/bulkhead/identity"
)

// ANSI colours for verdicts, used only when the output is a terminal.
const (
	colorRed    = "\x1b[31m"
	colorGreen  = "\x1b[32m"
	colorYellow = "\x1b[33m"
	colorReset  = "\x1b[0m"
)

func paintVerdict(v string, color bool) string {
	if !color {
		return v
	}
	switch v {
	case VerdictDropped:
		return colorRed + v + colorReset
	case VerdictForwarded:
		return colorGreen + v + colorReset
	case VerdictAudit:
		return colorYellow + v + colorReset
	}
	return v
}

// Compact renders one flow on one line, for people: when, who to whom,
// at which side (a pod-to-pod flow is seen twice: at the client's egress
// and at the server's ingress), what, the verdict, and the rule that
// decided it; a default deny says which policies isolate the pod.
//
//	05:00:00.123 shop/frontend:40000 -> shop/api:8080 egress TCP SYN DROPPED by BulkheadPolicy shop/api egress[1]
//	05:00:00.124 shop/frontend:40000 -> shop/db:5432 ingress TCP SYN DROPPED by default-deny (isolated by NetworkPolicy shop/db-in)
func Compact(f *Flow, color bool) string {
	var b strings.Builder
	b.WriteString(f.Time.Local().Format("15:04:05.000"))
	b.WriteByte(' ')
	src, dst, _ := f.L4.ports()
	b.WriteString(endpointName(f.Source, f.ipSource(), src))
	b.WriteString(" -> ")
	b.WriteString(endpointName(f.Destination, f.ipDestination(), dst))
	if d := f.direction(); d != "" {
		b.WriteByte(' ')
		b.WriteString(d)
	}
	b.WriteByte(' ')
	b.WriteString(protoSummary(f.L4))
	if f.IsReply {
		b.WriteString(" reply")
	}
	if f.PickedUp {
		b.WriteString(" (picked up)")
	}
	b.WriteByte(' ')
	b.WriteString(paintVerdict(f.Verdict, color))
	if f.MTLS {
		b.WriteString(" mtls")
	}
	if by := f.Decider(); by != "" {
		b.WriteString(" by ")
		b.WriteString(by)
		if iso := f.isolation(); iso != "" {
			b.WriteString(" ")
			b.WriteString(iso)
		}
		if f.DropReasonDesc == DropAuthRequired {
			// The rule allows this traffic, only not in plaintext.
			b.WriteString(" ")
			b.WriteString(f.DropReasonDesc)
		}
	} else if f.DropReasonDesc != "" {
		// Dropped before policy (a forged source, a malformed header).
		b.WriteString(" ")
		b.WriteString(f.DropReasonDesc)
	}
	return b.String()
}

// direction is the side the flow was seen at, lowercase: "egress" at the
// sending pod, "ingress" at the receiving one.
func (f *Flow) direction() string { return strings.ToLower(f.TrafficDirection) }

// isolation is "(isolated by NetworkPolicy shop/db-in, ...)" for a flow
// decided by a default deny, empty otherwise.
func (f *Flow) isolation() string {
	if len(f.IsolatedBy) == 0 {
		return ""
	}
	return "(isolated by " + strings.Join(f.IsolatedBy, ", ") + ")"
}

// Decider names the rule that decided the flow, preferring a denying rule,
// in the direction that decided: "BulkheadPolicy shop/api egress[1]", or
// "default-deny" for the default of a pod that policies isolate.
func (f *Flow) Decider() string {
	if p := f.DecidingPolicy(); p != nil {
		return p.String()
	}
	if q := f.Quarantine; q != nil {
		switch {
		case q.AlertID != "":
			return "quarantine (alert " + q.AlertID + " " + q.RuleID + ")"
		case q.Reason != "":
			return "quarantine (" + q.Reason + ")"
		}
		return "quarantine"
	}
	return ""
}

// DecidingPolicy is the rule that decided the flow, preferring a denying
// one; nil when the record names none.
func (f *Flow) DecidingPolicy() *Policy {
	for _, ps := range [][]*Policy{f.IngressDeniedBy, f.EgressDeniedBy, f.IngressAllowedBy, f.EgressAllowedBy} {
		if len(ps) > 0 {
			return ps[0]
		}
	}
	return nil
}

func (p *Policy) String() string {
	if p.Kind == "default" {
		// "default-deny", "no-policy-selects": the name says it.
		return p.Name
	}
	name := p.Name
	if p.Namespace != "" {
		name = p.Namespace + "/" + p.Name
	}
	s := p.Kind + " " + name
	if p.Rule != "" {
		s += " " + p.Rule
	}
	return s
}

// WriteTable renders flows as aligned columns.
func WriteTable(w io.Writer, fs []*Flow, color bool) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tSOURCE\tDESTINATION\tDIRECTION\tPROTO\tVERDICT\tDECIDED BY")
	for _, f := range fs {
		src, dst, _ := f.L4.ports()
		proto := protoSummary(f.L4)
		if f.IsReply {
			proto += " reply"
		}
		if f.MTLS {
			proto += " mtls"
		}
		by := f.Decider()
		if iso := f.isolation(); iso != "" {
			by += " " + iso
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", f.Time.Local().Format("15:04:05.000"),
			endpointName(f.Source, f.ipSource(), src), endpointName(f.Destination, f.ipDestination(), dst),
			f.direction(), proto, paintVerdict(f.Verdict, color), by)
	}
	return tw.Flush()
}

func (f *Flow) ipSource() string {
	if f.IP == nil {
		return ""
	}
	return f.IP.Source
}

func (f *Flow) ipDestination() string {
	if f.IP == nil {
		return ""
	}
	return f.IP.Destination
}

// endpointName is "ns/pod:port" for pods and "ip:port" for anything else.
func endpointName(e *Endpoint, ip string, port uint16) string {
	name := ip
	if strings.Contains(ip, ":") {
		name = "[" + ip + "]"
	}
	if isPod(e) {
		name = e.Namespace + "/" + e.PodName
	}
	if port != 0 {
		name += ":" + strconv.Itoa(int(port))
	}
	if !isPod(e) && e != nil && e.SPIFFEID != "" && !identity.NumericID(e.Identity).IsReserved() {
		// A tunnel-delivered flow comes from the node's address; its
		// source is the identity the tunnel verified.
		name = e.SPIFFEID + " via " + name
	}
	return name
}

func protoSummary(l *Layer4) string {
	switch {
	case l == nil:
		return "?"
	case l.TCP != nil:
		if fl := l.TCP.Flags; fl != nil {
			var set []string
			for _, b := range [...]struct {
				on   bool
				name string
			}{{fl.SYN, "SYN"}, {fl.ACK, "ACK"}, {fl.FIN, "FIN"}, {fl.RST, "RST"}} {
				if b.on {
					set = append(set, b.name)
				}
			}
			if len(set) > 0 {
				return "TCP " + strings.Join(set, ",")
			}
		}
		return "TCP"
	case l.UDP != nil:
		return "UDP"
	case l.SCTP != nil:
		return "SCTP"
	case l.ICMPv4 != nil:
		return "ICMPv4 type " + strconv.Itoa(int(l.ICMPv4.Type))
	case l.ICMPv6 != nil:
		return "ICMPv6 type " + strconv.Itoa(int(l.ICMPv6.Type))
	}
	return "?"
}
