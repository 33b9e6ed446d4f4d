package explain

import (
	"fmt"
	"strings"
)

// Text renders a verdict for people.
func Text(r Result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s (identity %s) -> %s (identity %s) %d/%s: %s%s\n", r.From, r.FromIdentity, r.To, r.ToIdentity, r.Port, r.Protocol,
		strings.ToUpper(r.Combined), headline(r, true))
	writeSides(&b, "  ", r)
	writeMTLS(&b, r)
	if o := r.Other; o != nil {
		switch o.Transport {
		case TransportTunnel:
			fmt.Fprintf(&b, "  through the mTLS tunnel%s it would be: %s%s\n", unlessEnrolled(*o), strings.ToUpper(o.Combined), headline(*o, false))
		default:
			fmt.Fprintf(&b, "  in plaintext it would be: %s%s\n", strings.ToUpper(o.Combined), headline(*o, false))
		}
		writeSides(&b, "    ", *o)
	}
	return b.String()
}

// headline says how the connection travels (when transport is set) and,
// when the tunnel refuses it or plaintext is dropped for want of mTLS, that.
func headline(r Result, transport bool) string {
	var s string
	switch {
	case r.Egress.Refused != "":
		s = " (refused by the mTLS tunnel)"
	case transport && r.Transport == TransportTunnel:
		s = " through the mTLS tunnel"
	}
	if r.Ingress.AuthRequired || r.Egress.AuthRequired {
		s += " (AUTH_REQUIRED)"
	}
	return s
}

// unenrolled lists the ends of r that are not enrolled in the mTLS tunnel.
func unenrolled(r Result) []string {
	var not []string
	if !r.FromEnrolled {
		not = append(not, r.From)
	}
	if !r.ToEnrolled {
		not = append(not, r.To)
	}
	return not
}

// unlessEnrolled names the ends that would have to be enrolled for the
// connection to take the tunnel.
func unlessEnrolled(r Result) string {
	if not := unenrolled(r); len(not) > 0 {
		return " (if " + strings.Join(not, " and ") + " were enrolled)"
	}
	return ""
}

func writeSides(b *strings.Builder, indent string, r Result) {
	// Why a rule that requires mTLS does not match this flow.
	why := "it requires mTLS, and matches only TCP through the tunnel"
	if r.Protocol != "TCP" {
		why = "it requires mTLS, and never matches " + r.Protocol + " or any protocol but TCP"
	}
	writeSide(b, indent, "egress ", r.From, r.To, r.Egress, why)
	writeSide(b, indent, "ingress", r.To, r.From, r.Ingress, why)
}

func writeSide(b *strings.Builder, indent, label, at, peer string, s Side, why string) {
	fmt.Fprintf(b, "%s%s at %s: %s", indent, label, at, s.Verdict)
	switch {
	case s.Refused != "":
		fmt.Fprintf(b, ": %s allows it only through the mTLS tunnel, and %s", ruleText(*s.Rule), s.Refused)
	case !s.Enforced, s.Rule == nil && s.Default == "allow":
		// One wording for every default allow: unselected, or selected by
		// policies that only deny, and none of whose rules matched.
		b.WriteString(" by default (not isolated in this direction)")
	case s.AuthRequired:
		fmt.Fprintf(b, " (AUTH_REQUIRED): plaintext is dropped; only %s would allow it, through the mTLS tunnel", ruleText(*s.Rule))
	case s.Rule != nil:
		fmt.Fprintf(b, " by %s", ruleText(*s.Rule))
	case len(s.IsolatedBy) > 0:
		fmt.Fprintf(b, " by default (%s): %s is isolated by %s, which %s not allow %s", s.Default, at,
			strings.Join(s.IsolatedBy, ", "), map[bool]string{true: "does", false: "do"}[len(s.IsolatedBy) == 1], peer)
	default:
		fmt.Fprintf(b, " by default (%s)", s.Default)
	}
	b.WriteString("\n")
	for _, m := range s.Matching {
		if s.Rule != nil && m == *s.Rule {
			continue
		}
		fmt.Fprintf(b, "%s  also matches %s\n", indent, ruleText(m))
	}
	for _, m := range s.NotMatchingMTLS {
		if s.AuthRequired && s.Rule != nil && m == *s.Rule {
			continue
		}
		fmt.Fprintf(b, "%s  does not match %s: %s\n", indent, ruleText(m), why)
	}
}

// writeMTLS explains the deciding rules that require mTLS.
func writeMTLS(b *strings.Builder, r Result) {
	mtls := func(s Side) bool { return s.Rule != nil && s.Rule.MTLS }
	if !mtls(r.Egress) && !mtls(r.Ingress) && (r.Other == nil || (!mtls(r.Other.Egress) && !mtls(r.Other.Ingress))) {
		return
	}
	b.WriteString("  mTLS: the deciding rule requires mTLS, so this TCP traffic is allowed only through the tunnel")
	b.WriteString(" (TCP between enrolled pods, or to a peer through the tunnel);")
	b.WriteString(" plaintext is dropped with AUTH_REQUIRED; such a rule never matches UDP or other protocols.\n")
	switch {
	case r.Transport == TransportTunnel:
		if r.FromEnrolled && r.ToEnrolled {
			b.WriteString("  Both ends are enrolled: the connection takes the tunnel.\n")
		} else {
			b.WriteString("  The egress rule requires mTLS: the connection takes the tunnel.\n")
		}
	default:
		fmt.Fprintf(b, "  The connection is sent in plaintext%s.\n", notEnrolled(r))
	}
}

func notEnrolled(r Result) string {
	if not := unenrolled(r); len(not) > 0 {
		return ": " + strings.Join(not, " and ") + " not enrolled"
	}
	return ""
}

func ruleText(r Rule) string {
	s := fmt.Sprintf("%s %s/%s %s[%d] (%s)", r.Kind, r.Namespace, r.Name, r.Direction, r.Index, r.Action)
	if r.Audit {
		s += " [audit]"
	}
	if r.MTLS {
		s += " [mtls: Required]"
	}
	return s
}
