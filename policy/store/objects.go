package store

import (
	"fmt"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
)

// The constructors below turn API objects into store objects. The YAML
// decoder and the Kubernetes store (agent/k8s) both use them, so that an
// object means the same to both, and Build validates both the same way.
// The objects they return have no file: the caller sets File (and Line)
// to say where the object came from.

// NamespaceObject is the store object of a Namespace.
func NamespaceObject(n *corev1.Namespace) (*Object, error) {
	if n.Name == "" {
		return nil, fmt.Errorf("%s: metadata.name is required", "Namespace") // the kind, as in every other message
	}
	return &Object{Kind: "Namespace", name: n.Name,
		Namespace: &policy.Namespace{Name: n.Name, Labels: n.Labels}}, nil
}

// PodObject is the store object of a Pod: its workload metadata only.
func PodObject(p *corev1.Pod) (*Object, error) {
	pod, err := podOf(p)
	if err != nil {
		return nil, fmt.Errorf("%s %s/%s: %w", "Pod", namespaceOr(p.Namespace), p.Name, err)
	}
	return &Object{Kind: "Pod", namespace: pod.Namespace, name: pod.Name, Pod: pod}, nil
}

// NetworkPolicyObject is the store object of a NetworkPolicy. A policy
// without a namespace is in "default", as kubectl would create it.
func NetworkPolicyObject(np *networkingv1.NetworkPolicy) *Object {
	if np.Namespace == "" {
		np.Namespace = "default"
	}
	return &Object{Kind: "NetworkPolicy", namespace: np.Namespace, name: np.Name, NetworkPolicy: np}
}

// BulkheadPolicyObject is the store object of a BulkheadPolicy.
func BulkheadPolicyObject(bp *v1alpha1.BulkheadPolicy) *Object {
	if bp.Namespace == "" {
		bp.Namespace = "default"
	}
	return &Object{Kind: v1alpha1.Kind, namespace: bp.Namespace, name: bp.Name, BulkheadPolicy: bp}
}

// RuntimePolicyObject is the store object of a BulkheadRuntimePolicy.
func RuntimePolicyObject(rp *v1alpha1.BulkheadRuntimePolicy) *Object {
	if rp.Namespace == "" {
		rp.Namespace = "default"
	}
	return &Object{Kind: v1alpha1.RuntimePolicyKind, namespace: rp.Namespace, name: rp.Name, RuntimePolicy: rp}
}

// Validate checks what the apiserver does not: the policy rules the
// compiler relies on. Build leaves out every object it rejects.
func (o *Object) Validate() error {
	switch {
	case o.NetworkPolicy != nil:
		return policy.ValidateNetworkPolicy(o.NetworkPolicy)
	case o.BulkheadPolicy != nil:
		return policy.ValidateBulkheadPolicy(o.BulkheadPolicy)
	case o.RuntimePolicy != nil:
		return policy.ValidateRuntimePolicy(o.RuntimePolicy)
	}
	return nil
}
