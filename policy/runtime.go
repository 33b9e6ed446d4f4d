package policy

import (
	"fmt"
	"slices"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// KindBulkheadRuntimePolicy is the kind of runtime policies.
const KindBulkheadRuntimePolicy = v1alpha1.RuntimePolicyKind

// RuntimePolicy is a validated BulkheadRuntimePolicy: its selector and its
// answer per rule ID.
type RuntimePolicy struct {
	Namespace, Name string
	spiffe          *identity.SPIFFEPattern
	sel             labels.Selector
	Actions         map[string]v1alpha1.RuntimeAction
}

// ValidateRuntimePolicy checks a BulkheadRuntimePolicy as the CRD's schema
// does, and what the schema cannot: the selector's syntax and that it
// names the policy's own namespace.
func ValidateRuntimePolicy(rp *v1alpha1.BulkheadRuntimePolicy) error {
	_, err := CompileRuntimePolicy(rp)
	return err
}

// CompileRuntimePolicy validates rp and returns its normal form.
func CompileRuntimePolicy(rp *v1alpha1.BulkheadRuntimePolicy) (*RuntimePolicy, error) {
	ns := namespaceOf(rp.Namespace)
	var errs field.ErrorList
	spec := field.NewPath("spec")
	if rp.Name == "" {
		errs = append(errs, field.Required(field.NewPath("metadata", "name"), ""))
	}
	p := &RuntimePolicy{Namespace: ns, Name: rp.Name, Actions: map[string]v1alpha1.RuntimeAction{}}
	p.spiffe, p.sel = subjectSelector(rp.Spec.Selector, ns, spec.Child("selector"), &errs)
	dp := spec.Child("detections")
	if len(rp.Spec.Detections) == 0 {
		errs = append(errs, field.Required(dp, "list at least one rule; a pod no policy selects alerts on every rule"))
	}
	catalog := v1alpha1.RuntimeRules()
	for i, d := range rp.Spec.Detections {
		ip := dp.Index(i)
		at := slices.IndexFunc(catalog, func(r v1alpha1.RuntimeRule) bool { return r.ID == d.Rule })
		if at < 0 {
			errs = append(errs, field.NotSupported(ip.Child("rule"), d.Rule, ruleIDs(catalog)))
			continue
		}
		if _, dup := p.Actions[d.Rule]; dup {
			errs = append(errs, field.Duplicate(ip.Child("rule"), d.Rule))
			continue
		}
		r := catalog[at]
		switch d.Action {
		case v1alpha1.RuntimeAlert:
		case v1alpha1.RuntimeBlock:
			if !r.Block {
				errs = append(errs, field.Invalid(ip.Child("action"), d.Action,
					fmt.Sprintf("Block is only possible for the rules a cgroup hook can deny (%s); %s is seen %s, which cannot stop it: use %s",
						blockable(catalog), d.Rule, seenBy(r), otherAnswers(r))))
				continue
			}
		case v1alpha1.RuntimeKill:
			if !r.Kill {
				errs = append(errs, field.Invalid(ip.Child("action"), d.Action,
					fmt.Sprintf("Kill is only possible for the rules a tracepoint sees; %s is seen %s: use %s", d.Rule, seenBy(r), otherAnswers(r))))
				continue
			}
		case v1alpha1.RuntimeQuarantine:
		default:
			errs = append(errs, field.NotSupported(ip.Child("action"), d.Action, []string{"Alert", "Block", "Kill", "Quarantine"}))
			continue
		}
		p.Actions[d.Rule] = d.Action
	}
	if len(errs) > 0 {
		return nil, &ValidationError{Kind: KindBulkheadRuntimePolicy, Namespace: ns, Name: rp.Name, Errs: errs}
	}
	return p, nil
}

// Selects reports whether the policy applies to a pod of namespace ns
// with the given labels and SPIFFE ID.
func (p *RuntimePolicy) Selects(ns string, podLabels map[string]string, spiffeID string) bool {
	if ns != p.Namespace {
		return false
	}
	if p.spiffe != nil {
		id, err := spiffeid.FromString(spiffeID)
		return err == nil && p.spiffe.Match(id)
	}
	return p.sel != nil && p.sel.Matches(labels.Set(podLabels))
}

// RuntimeActions is the kernel's answer per rule for one pod under the
// given policies: Alert for every rule no policy sets. Where two policies
// set the same rule, the stronger answer wins (Kill and Block over Alert;
// no rule can have both Kill and Block). Quarantine is not a kernel answer
// (see RuntimeQuarantines): it adds to the others, never replaces one, so
// a rule one policy Blocks and another Quarantines is blocked and its pod
// quarantined.
func RuntimeActions(pols []*RuntimePolicy, ns string, podLabels map[string]string, spiffeID string) map[string]v1alpha1.RuntimeAction {
	out := map[string]v1alpha1.RuntimeAction{}
	for _, p := range pols {
		if !p.Selects(ns, podLabels, spiffeID) {
			continue
		}
		for rule, a := range p.Actions {
			if a == v1alpha1.RuntimeQuarantine {
				a = v1alpha1.RuntimeAlert
			}
			if cur, ok := out[rule]; !ok || cur == v1alpha1.RuntimeAlert {
				out[rule] = a
			}
		}
	}
	return out
}

// RuntimeQuarantines are the rules whose alerts quarantine the pod under
// the given policies.
func RuntimeQuarantines(pols []*RuntimePolicy, ns string, podLabels map[string]string, spiffeID string) map[string]bool {
	var out map[string]bool
	for _, p := range pols {
		if !p.Selects(ns, podLabels, spiffeID) {
			continue
		}
		for rule, a := range p.Actions {
			if a == v1alpha1.RuntimeQuarantine {
				if out == nil {
					out = map[string]bool{}
				}
				out[rule] = true
			}
		}
	}
	return out
}

// seenBy says where a rule is seen, for the errors that refuse an answer.
func seenBy(r v1alpha1.RuntimeRule) string {
	switch {
	case r.Agent:
		return "by the agent in the pod's flows, after the fact"
	case r.Block:
		return "by a cgroup hook"
	}
	return "by a tracepoint"
}

// otherAnswers are the answers a rule can have, for the same errors.
func otherAnswers(r v1alpha1.RuntimeRule) string {
	switch {
	case r.Agent:
		return "Quarantine or Alert"
	case r.Block:
		return "Block, Quarantine or Alert"
	}
	return "Kill, Quarantine or Alert"
}

func ruleIDs(c []v1alpha1.RuntimeRule) []string {
	out := make([]string, len(c))
	for i, r := range c {
		out[i] = r.ID
	}
	return out
}

func blockable(c []v1alpha1.RuntimeRule) string {
	var ids []string
	for _, r := range c {
		if r.Block {
			ids = append(ids, r.ID)
		}
	}
	return fmt.Sprint(ids)
}
