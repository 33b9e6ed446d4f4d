package v1alpha1

import (
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// APIVersion and Kind identify BulkheadPolicy objects.
const (
	APIVersion = "bulkhead.io/v1alpha1"
	Kind       = "BulkheadPolicy"
)

// BulkheadPolicy selects pods in its namespace by SPIFFE ID or labels and
// allows or denies their traffic by SPIFFE ID, labels or CIDR.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Namespaced,shortName=bhp
type BulkheadPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec BulkheadPolicySpec `json:"spec"`
}

// BulkheadPolicyList is a list of BulkheadPolicy.
//
// +kubebuilder:object:root=true
type BulkheadPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []BulkheadPolicy `json:"items"`
}

// BulkheadPolicySpec is the desired policy.
//
// A direction is default-deny for the selected pods only when the policy has
// at least one Allow rule in it: a policy whose rules in a direction are all
// Deny only takes traffic away and leaves everything else as it was.
type BulkheadPolicySpec struct {
	// Selector picks the pods, in the policy's namespace, that the policy
	// applies to.
	Selector Selector `json:"selector"`
	// Mode is the default mode of every rule. Audit reports what Enforce
	// would drop, and lets it pass.
	// +optional
	Mode Mode `json:"mode,omitempty"`
	// +optional
	Ingress []IngressRule `json:"ingress,omitempty"`
	// +optional
	Egress []EgressRule `json:"egress,omitempty"`
}

// Selector selects pods by SPIFFE ID or by labels; set exactly one.
//
// +kubebuilder:validation:MinProperties=1
// +kubebuilder:validation:MaxProperties=1
type Selector struct {
	// SPIFFEID is an exact SPIFFE ID or a glob whose "*" segments match any
	// one path segment, e.g. spiffe://cluster.local/ns/shop/sa/*.
	// +kubebuilder:validation:Pattern=`^spiffe://[^/]+(/[^/]+)+$`
	// +optional
	SPIFFEID string `json:"spiffeID,omitempty"`
	// +optional
	PodSelector *metav1.LabelSelector `json:"podSelector,omitempty"`
}

// Action is what a rule does with the traffic it matches.
// +kubebuilder:validation:Enum=Allow;Deny
type Action string

const (
	ActionAllow Action = "Allow"
	// ActionDeny beats any Allow from any policy.
	ActionDeny Action = "Deny"
)

// Mode says whether a rule is enforced or only audited.
// +kubebuilder:validation:Enum=Enforce;Audit
type Mode string

const (
	ModeEnforce Mode = "Enforce"
	ModeAudit   Mode = "Audit"
)

// MTLS says whether allowed traffic must be mutually authenticated.
// +kubebuilder:validation:Enum=Required
type MTLS string

// MTLSRequired marks the rule's allowed traffic as needing mutual TLS.
const MTLSRequired MTLS = "Required"

// RuleCommon is what ingress and egress rules share.
type RuleCommon struct {
	// Ports as in NetworkPolicy; empty means every port and protocol.
	// +optional
	Ports []networkingv1.NetworkPolicyPort `json:"ports,omitempty"`
	// Action defaults to Allow.
	// +optional
	Action Action `json:"action,omitempty"`
	// Mode overrides the policy's mode for this rule.
	// +optional
	Mode Mode `json:"mode,omitempty"`
	// MTLS is reserved for mutual authentication; only Required is valid.
	// +optional
	MTLS MTLS `json:"mtls,omitempty"`
}

// IngressRule matches traffic from its peers; empty From means any source.
type IngressRule struct {
	// +optional
	From       []Peer `json:"from,omitempty"`
	RuleCommon `json:",inline"`
}

// EgressRule matches traffic to its peers; empty To means any destination.
type EgressRule struct {
	// +optional
	To         []Peer `json:"to,omitempty"`
	RuleCommon `json:",inline"`
}

// Peer is one side of a connection. Set spiffeID, or podSelector and/or
// namespaceSelector (as in NetworkPolicy), or cidr (with except).
//
// +kubebuilder:validation:MinProperties=1
type Peer struct {
	// +kubebuilder:validation:Pattern=`^spiffe://[^/]+(/[^/]+)+$`
	// +optional
	SPIFFEID string `json:"spiffeID,omitempty"`
	// +optional
	PodSelector *metav1.LabelSelector `json:"podSelector,omitempty"`
	// NamespaceSelector nil means the policy's namespace, as in NetworkPolicy.
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	// +optional
	CIDR string `json:"cidr,omitempty"`
	// Except are prefixes inside CIDR that the peer does not cover.
	// +optional
	Except []string `json:"except,omitempty"`
}
