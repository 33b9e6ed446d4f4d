package policy

import (
	"slices"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// ValidateBulkheadPolicy checks a BulkheadPolicy and returns nil when it is
// valid.
func ValidateBulkheadPolicy(bp *v1alpha1.BulkheadPolicy) error {
	_, err := compileBulkheadPolicy(bp)
	return err
}

// compileBulkheadPolicy validates bp and reduces it to the normal form.
//
// Defaults: a direction becomes default-deny (or default-audit) for the
// selected pods only when the policy has an Allow rule in it. Deny-only
// policies subtract traffic and leave the rest of the direction as it was,
// so adding a "block this one peer" policy never cuts a pod off by surprise.
func compileBulkheadPolicy(bp *v1alpha1.BulkheadPolicy) (*cpolicy, error) {
	ns := namespaceOf(bp.Namespace)
	var errs field.ErrorList
	spec := field.NewPath("spec")
	if bp.Name == "" {
		errs = append(errs, field.Required(field.NewPath("metadata", "name"), ""))
	}
	p := &cpolicy{key: policyKey{KindBulkheadPolicy, ns, bp.Name}}
	p.subjectSPIFFE, p.subjectSel = subjectSelector(bp.Spec.Selector, ns, spec.Child("selector"), &errs)
	polMode := mode(bp.Spec.Mode, v1alpha1.ModeEnforce, spec.Child("mode"), &errs)
	for i, r := range bp.Spec.Ingress {
		rp := spec.Child("ingress").Index(i)
		p.rules = append(p.rules, bhpRule(ns, Ingress, i, polMode, r.From, r.RuleCommon, rp, rp.Child("from"), &errs))
	}
	for i, r := range bp.Spec.Egress {
		rp := spec.Child("egress").Index(i)
		p.rules = append(p.rules, bhpRule(ns, Egress, i, polMode, r.To, r.RuleCommon, rp, rp.Child("to"), &errs))
	}
	if len(errs) > 0 {
		return nil, &ValidationError{Kind: KindBulkheadPolicy, Namespace: ns, Name: bp.Name, Errs: errs}
	}
	for _, r := range p.rules {
		p.addCIDRs(r.peers)
		if r.action != ActionAllow {
			continue
		}
		if r.audit {
			p.audit[r.dir] = true
		} else {
			p.enforce[r.dir] = true
		}
	}
	return p, nil
}

func mode(m, def v1alpha1.Mode, path *field.Path, errs *field.ErrorList) v1alpha1.Mode {
	switch m {
	case "":
		return def
	case v1alpha1.ModeEnforce, v1alpha1.ModeAudit:
		return m
	}
	*errs = append(*errs, field.NotSupported(path, m, []string{"Enforce", "Audit"}))
	return def
}

func bhpRule(ns string, dir Direction, index int, polMode v1alpha1.Mode, peers []v1alpha1.Peer, c v1alpha1.RuleCommon,
	rulePath, peerPath *field.Path, errs *field.ErrorList) crule {
	r := crule{dir: dir, index: index, action: ActionAllow, allPeers: len(peers) == 0}
	switch c.Action {
	case "", v1alpha1.ActionAllow:
	case v1alpha1.ActionDeny:
		r.action = ActionDeny
	default:
		*errs = append(*errs, field.NotSupported(rulePath.Child("action"), c.Action, []string{"Allow", "Deny"}))
	}
	r.audit = mode(c.Mode, polMode, rulePath.Child("mode"), errs) == v1alpha1.ModeAudit
	switch c.MTLS {
	case "":
	case v1alpha1.MTLSRequired:
		if r.action == ActionDeny {
			*errs = append(*errs, field.Invalid(rulePath.Child("mtls"), c.MTLS, "only Allow rules can require mTLS"))
		}
		r.mtls = true
	default:
		*errs = append(*errs, field.NotSupported(rulePath.Child("mtls"), c.MTLS, []string{"Required"}))
	}
	r.ports = ports(c.Ports, rulePath.Child("ports"), errs)
	if r.mtls && len(c.Ports) > 0 && !slices.ContainsFunc(c.Ports, func(p networkingv1.NetworkPolicyPort) bool {
		return p.Protocol == nil || *p.Protocol == corev1.ProtocolTCP
	}) {
		// The tunnel carries TCP only: such a rule would be accepted and
		// never match anything.
		*errs = append(*errs, field.Invalid(rulePath.Child("ports"), "",
			"mtls: Required matches TCP only (the tunnel carries TCP), and no port here is TCP: the rule could never match"))
	}
	for j, pr := range peers {
		pp := peerPath.Index(j)
		set := 0
		if pr.SPIFFEID != "" {
			set++
		}
		if pr.PodSelector != nil || pr.NamespaceSelector != nil {
			set++
		}
		if pr.CIDR != "" {
			set++
		}
		if set != 1 || (pr.CIDR == "" && len(pr.Except) > 0) {
			*errs = append(*errs, field.Invalid(pp, "", "set exactly one of spiffeID, podSelector/namespaceSelector, or cidr (except only with cidr)"))
			continue
		}
		switch {
		case pr.SPIFFEID != "":
			pat, err := identity.ParseSPIFFEPattern(pr.SPIFFEID)
			if err != nil {
				*errs = append(*errs, field.Invalid(pp.Child("spiffeID"), pr.SPIFFEID, err.Error()))
				continue
			}
			r.peers = append(r.peers, cpeer{kind: peerSPIFFE, spiffe: pat})
		case pr.CIDR != "":
			if r.mtls {
				// mTLS authenticates a workload's SVID; an address range
				// names no SPIFFE ID to verify.
				*errs = append(*errs, field.Invalid(pp.Child("cidr"), pr.CIDR,
					"mtls: Required cannot be verified for an address: use spiffeID or podSelector/namespaceSelector peers"))
				continue
			}
			if c, ok := cidrPeer(pr.CIDR, pr.Except, pp, errs); ok {
				r.peers = append(r.peers, c)
			}
		default:
			c := cpeer{kind: peerSelector, nsName: ns, podSel: labels.Everything()}
			if pr.PodSelector != nil {
				c.podSel = selector(pr.PodSelector, pp.Child("podSelector"), errs)
			}
			if pr.NamespaceSelector != nil {
				c.nsSel = selector(pr.NamespaceSelector, pp.Child("namespaceSelector"), errs)
			}
			r.peers = append(r.peers, c)
		}
	}
	return r
}

// subjectSelector parses the selector of a namespaced policy of ours
// (BulkheadPolicy, BulkheadRuntimePolicy): a SPIFFE ID pattern or a pod
// selector, exactly one.
func subjectSelector(s v1alpha1.Selector, ns string, sp *field.Path, errs *field.ErrorList) (*identity.SPIFFEPattern, labels.Selector) {
	switch {
	case s.SPIFFEID != "" && s.PodSelector != nil:
		*errs = append(*errs, field.Forbidden(sp, "set exactly one of spiffeID and podSelector"))
	case s.SPIFFEID != "":
		pat, err := identity.ParseSPIFFEPattern(s.SPIFFEID)
		if err != nil {
			*errs = append(*errs, field.Invalid(sp.Child("spiffeID"), s.SPIFFEID, err.Error()))
		} else if pns, ok := pat.Namespace(); ok && pns != ns {
			// A namespaced policy governs only its own namespace; a selector
			// naming another one would silently select nothing.
			*errs = append(*errs, field.Invalid(sp.Child("spiffeID"), s.SPIFFEID, "selects namespace "+pns+", but the policy is in "+ns))
		}
		return &pat, nil
	case s.PodSelector != nil:
		return nil, selector(s.PodSelector, sp.Child("podSelector"), errs)
	default:
		*errs = append(*errs, field.Required(sp, "set exactly one of spiffeID and podSelector"))
	}
	return nil, nil
}
