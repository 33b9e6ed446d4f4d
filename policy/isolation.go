package policy

// PolicyRef names a policy.
type PolicyRef struct {
	Kind, Namespace, Name string
}

func (r PolicyRef) String() string { return r.Kind + " " + r.Namespace + "/" + r.Name }

// IsolatedBy returns the policies that isolate a pod in a direction, in
// the order the compiler reads them: those that select it in dir and
// enforce there, or, when none enforces, the audit-mode ones. These set
// the direction's default (EndpointPolicy.Default); nil when none does or
// the pod is unknown. It answers from the last compile.
func (c *Compiler) IsolatedBy(namespace, name string, dir Direction) []PolicyRef {
	ps := c.pods[podKey{namespace, name}]
	if ps == nil {
		return nil
	}
	sel, enforce, _ := c.selecting(ps)
	var out []PolicyRef
	for _, p := range sel {
		if p.enforce[dir] || (!enforce[dir] && p.audit[dir]) {
			out = append(out, PolicyRef(p.key))
		}
	}
	return out
}
