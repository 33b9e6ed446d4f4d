package policy

import (
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// PolicyTypes returns the directions a NetworkPolicy applies to, defaulted
// as the API server defaults them: Ingress always, Egress when the policy has
// egress rules.
func PolicyTypes(np *networkingv1.NetworkPolicy) (ingress, egress bool) {
	if len(np.Spec.PolicyTypes) == 0 {
		return true, len(np.Spec.Egress) > 0
	}
	for _, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			ingress = true
		case networkingv1.PolicyTypeEgress:
			egress = true
		}
	}
	return ingress, egress
}

// ValidateNetworkPolicy checks a NetworkPolicy the way the API server would
// (the parts the compiler relies on) and returns nil when it is valid.
func ValidateNetworkPolicy(np *networkingv1.NetworkPolicy) error {
	_, err := compileNetworkPolicy(np)
	return err
}

// compileNetworkPolicy validates np and reduces it to the normal form.
func compileNetworkPolicy(np *networkingv1.NetworkPolicy) (*cpolicy, error) {
	ns := namespaceOf(np.Namespace)
	var errs field.ErrorList
	spec := field.NewPath("spec")
	if np.Name == "" {
		errs = append(errs, field.Required(field.NewPath("metadata", "name"), ""))
	}
	p := &cpolicy{key: policyKey{KindNetworkPolicy, ns, np.Name}}
	p.subjectSel = selector(&np.Spec.PodSelector, spec.Child("podSelector"), &errs)
	for i, t := range np.Spec.PolicyTypes {
		if t != networkingv1.PolicyTypeIngress && t != networkingv1.PolicyTypeEgress {
			errs = append(errs, field.NotSupported(spec.Child("policyTypes").Index(i), t, []string{"Ingress", "Egress"}))
		}
	}
	in, eg := PolicyTypes(np)
	p.enforce = [2]bool{in, eg}
	if in {
		for i, r := range np.Spec.Ingress {
			rp := spec.Child("ingress").Index(i)
			p.rules = append(p.rules, npRule(ns, Ingress, i, r.From, r.Ports, rp.Child("from"), rp.Child("ports"), &errs))
		}
	}
	if eg {
		for i, r := range np.Spec.Egress {
			rp := spec.Child("egress").Index(i)
			p.rules = append(p.rules, npRule(ns, Egress, i, r.To, r.Ports, rp.Child("to"), rp.Child("ports"), &errs))
		}
	}
	if len(errs) > 0 {
		return nil, &ValidationError{Kind: KindNetworkPolicy, Namespace: ns, Name: np.Name, Errs: errs}
	}
	for _, r := range p.rules {
		p.addCIDRs(r.peers)
	}
	return p, nil
}

func npRule(ns string, dir Direction, index int, peers []networkingv1.NetworkPolicyPeer, ps []networkingv1.NetworkPolicyPort,
	peerPath, portPath *field.Path, errs *field.ErrorList) crule {
	r := crule{dir: dir, index: index, action: ActionAllow, allPeers: len(peers) == 0}
	r.ports = ports(ps, portPath, errs)
	for j, pr := range peers {
		pp := peerPath.Index(j)
		switch {
		case pr.IPBlock != nil:
			if pr.PodSelector != nil || pr.NamespaceSelector != nil {
				*errs = append(*errs, field.Forbidden(pp, "may not specify both ipBlock and another peer"))
				continue
			}
			if c, ok := cidrPeer(pr.IPBlock.CIDR, pr.IPBlock.Except, pp.Child("ipBlock"), errs); ok {
				r.peers = append(r.peers, c)
			}
		case pr.PodSelector == nil && pr.NamespaceSelector == nil:
			*errs = append(*errs, field.Required(pp, "must specify a peer"))
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

// namespaceOf defaults an empty namespace the way kubectl does.
func namespaceOf(ns string) string {
	if ns == "" {
		return "default"
	}
	return ns
}
