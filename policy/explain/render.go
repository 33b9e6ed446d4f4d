package explain

import (
	"fmt"
	"strings"
)

// Text renders a verdict for people.
func Text(r Result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s (identity %s) -> %s (identity %s) %d/%s: %s\n", r.From, r.FromIdentity, r.To, r.ToIdentity, r.Port, r.Protocol, strings.ToUpper(r.Combined))
	writeSide(&b, "egress ", r.From, r.Egress)
	writeSide(&b, "ingress", r.To, r.Ingress)
	return b.String()
}

func writeSide(b *strings.Builder, label, at string, s Side) {
	fmt.Fprintf(b, "  %s at %s: %s", label, at, s.Verdict)
	switch {
	case !s.Enforced:
		b.WriteString(" (no policy selects it in this direction)")
	case s.Rule != nil:
		fmt.Fprintf(b, " by %s", ruleText(*s.Rule))
	default:
		fmt.Fprintf(b, " by default (%s)", s.Default)
	}
	b.WriteString("\n")
	for _, m := range s.Matching {
		if s.Rule != nil && m == *s.Rule {
			continue
		}
		fmt.Fprintf(b, "    also matches %s\n", ruleText(m))
	}
}

func ruleText(r Rule) string {
	s := fmt.Sprintf("%s %s/%s %s[%d] (%s)", r.Kind, r.Namespace, r.Name, r.Direction, r.Index, r.Action)
	if r.Audit {
		s += " [audit]"
	}
	return s
}
