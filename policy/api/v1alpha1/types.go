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
// +kubebuilder:subresource:status
type BulkheadPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec BulkheadPolicySpec `json:"spec"`
	// Status is written by the agents, each its own node's entry.
	// +optional
	Status BulkheadPolicyStatus `json:"status,omitzero"`
}

// BulkheadPolicyStatus says what each node's agent does with the policy.
type BulkheadPolicyStatus struct {
	// Nodes has one entry per node whose agent has judged the policy. Each
	// agent writes only its own entry (server-side apply, field manager
	// bulkhead-agent/<node>), and only when it changes.
	// +listType=map
	// +listMapKey=nodeName
	// +optional
	Nodes []NodeStatus `json:"nodes,omitempty"`
}

// NodeStatus is one node's verdict on the policy.
type NodeStatus struct {
	// NodeName is the node whose agent wrote this entry.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	NodeName string `json:"nodeName"`
	// ObservedGeneration is the policy's metadata.generation that the
	// agent judged last.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// EnforcedGeneration is the generation the node enforces: the
	// observed one when it was accepted, an earlier one when a later
	// version was rejected and the last valid one stays in force, and
	// absent when none is.
	// +optional
	EnforcedGeneration int64 `json:"enforcedGeneration,omitempty"`
	// Revision is the agent's policy revision (bulkhead status) that
	// first enforced EnforcedGeneration on this node, or that left the
	// rejected version out.
	// +optional
	Revision int64 `json:"revision,omitempty"`
	// Conditions has the Accepted condition: True when the node enforces
	// the observed generation, False with reason Invalid (the policy is
	// not valid) or OverBudget (this node cannot hold its rules), and a
	// message that says why.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// The Accepted condition of a NodeStatus and its reasons.
const (
	ConditionAccepted = "Accepted"
	ReasonAccepted    = "Accepted"
	ReasonInvalid     = "Invalid"
	ReasonOverBudget  = "OverBudget"
)

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
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Ingress []IngressRule `json:"ingress,omitempty"`
	// +kubebuilder:validation:MaxItems=64
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
	// The pattern is the SPIFFE ID syntax (a lowercase trust domain, path
	// segments of letters, digits, ".", "-" and "_", never "." or "..") with
	// "*" as a whole trust domain or segment.
	// +kubebuilder:validation:Pattern=`^spiffe://([a-z0-9._-]+|\*)(/([a-zA-Z0-9_-][a-zA-Z0-9._-]*|\.[a-zA-Z0-9_-][a-zA-Z0-9._-]*|\.\.[a-zA-Z0-9._-]+|\*))+$`
	// +kubebuilder:validation:MaxLength=2048
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
	// +kubebuilder:validation:MaxItems=64
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
//
// The CEL rules below are the compiler's own checks of a rule
// (policy/bhp.go), moved into the apiserver so that kubectl rejects what
// the agent would: crd_apiserver_test.go checks that the compiler rejects
// every object each rule rejects.
//
// +kubebuilder:validation:XValidation:rule="!has(self.ports) || self.ports.all(p, !has(p.protocol) || p.protocol in ['TCP', 'UDP', 'SCTP'])",message="protocol must be TCP, UDP or SCTP",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.ports) || self.ports.all(p, !has(p.port) || type(p.port) != int || (p.port >= 1 && p.port <= 65535))",message="a numeric port must be between 1 and 65535",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.ports) || self.ports.all(p, !has(p.port) || type(p.port) != string || size(p.port) <= 15)",message="a named port must be at most 15 characters",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.ports) || self.ports.all(p, !has(p.endPort) || (has(p.port) && type(p.port) == int && p.endPort >= p.port && p.endPort <= 65535))",message="endPort needs a numeric port, and must be between port and 65535",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.mtls) || !has(self.action) || self.action != 'Deny'",message="only Allow rules can require mTLS",fieldPath=".mtls"
// +kubebuilder:validation:XValidation:rule="!has(self.mtls) || !has(self.ports) || size(self.ports) == 0 || self.ports.exists(p, !has(p.protocol) || p.protocol == 'TCP')",message="mtls: Required matches TCP only (the tunnel carries TCP), and no port here is TCP: the rule could never match",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.mtls) || !has(self.from) || self.from.all(p, !has(p.cidr))",message="mtls: Required cannot be verified for an address (cidr): use spiffeID or podSelector/namespaceSelector peers",fieldPath=".from"
type IngressRule struct {
	// +kubebuilder:validation:MaxItems=32
	// +optional
	From       []Peer `json:"from,omitempty"`
	RuleCommon `json:",inline"`
}

// EgressRule matches traffic to its peers; empty To means any destination.
//
// The rules are IngressRule's, with to for from.
//
// +kubebuilder:validation:XValidation:rule="!has(self.ports) || self.ports.all(p, !has(p.protocol) || p.protocol in ['TCP', 'UDP', 'SCTP'])",message="protocol must be TCP, UDP or SCTP",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.ports) || self.ports.all(p, !has(p.port) || type(p.port) != int || (p.port >= 1 && p.port <= 65535))",message="a numeric port must be between 1 and 65535",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.ports) || self.ports.all(p, !has(p.port) || type(p.port) != string || size(p.port) <= 15)",message="a named port must be at most 15 characters",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.ports) || self.ports.all(p, !has(p.endPort) || (has(p.port) && type(p.port) == int && p.endPort >= p.port && p.endPort <= 65535))",message="endPort needs a numeric port, and must be between port and 65535",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.mtls) || !has(self.action) || self.action != 'Deny'",message="only Allow rules can require mTLS",fieldPath=".mtls"
// +kubebuilder:validation:XValidation:rule="!has(self.mtls) || !has(self.ports) || size(self.ports) == 0 || self.ports.exists(p, !has(p.protocol) || p.protocol == 'TCP')",message="mtls: Required matches TCP only (the tunnel carries TCP), and no port here is TCP: the rule could never match",fieldPath=".ports"
// +kubebuilder:validation:XValidation:rule="!has(self.mtls) || !has(self.to) || self.to.all(p, !has(p.cidr))",message="mtls: Required cannot be verified for an address (cidr): use spiffeID or podSelector/namespaceSelector peers",fieldPath=".to"
type EgressRule struct {
	// +kubebuilder:validation:MaxItems=32
	// +optional
	To         []Peer `json:"to,omitempty"`
	RuleCommon `json:",inline"`
}

// Peer is one side of a connection. Set spiffeID, or podSelector and/or
// namespaceSelector (as in NetworkPolicy), or cidr (with except).
//
// +kubebuilder:validation:MinProperties=1
// +kubebuilder:validation:XValidation:rule="(has(self.spiffeID) ? 1 : 0) + (has(self.podSelector) || has(self.namespaceSelector) ? 1 : 0) + (has(self.cidr) ? 1 : 0) == 1",message="set exactly one of spiffeID, podSelector/namespaceSelector, or cidr"
// +kubebuilder:validation:XValidation:rule="!has(self.except) || has(self.cidr)",message="except is only valid with cidr",fieldPath=".except"
// +kubebuilder:validation:XValidation:rule="!has(self.cidr) || isCIDR(self.cidr)",message="cidr must be a CIDR such as 10.0.0.0/8 or fd00::/8 (not an IPv4-mapped IPv6 one)",fieldPath=".cidr"
// +kubebuilder:validation:XValidation:rule="!has(self.except) || !has(self.cidr) || !isCIDR(self.cidr) || self.except.all(e, isCIDR(e) && cidr(self.cidr).containsCIDR(e) && cidr(e).prefixLength() > cidr(self.cidr).prefixLength())",message="every except entry must be a CIDR strictly inside cidr",fieldPath=".except"
type Peer struct {
	// SPIFFEID is an exact SPIFFE ID or a glob, as in the selector.
	// +kubebuilder:validation:Pattern=`^spiffe://([a-z0-9._-]+|\*)(/([a-zA-Z0-9_-][a-zA-Z0-9._-]*|\.[a-zA-Z0-9_-][a-zA-Z0-9._-]*|\.\.[a-zA-Z0-9._-]+|\*))+$`
	// +kubebuilder:validation:MaxLength=2048
	// +optional
	SPIFFEID string `json:"spiffeID,omitempty"`
	// +optional
	PodSelector *metav1.LabelSelector `json:"podSelector,omitempty"`
	// NamespaceSelector nil means the policy's namespace, as in NetworkPolicy.
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	// CIDR is an address range, as NetworkPolicy's ipBlock.cidr.
	// +kubebuilder:validation:MaxLength=64
	// +optional
	CIDR string `json:"cidr,omitempty"`
	// Except are prefixes inside CIDR that the peer does not cover.
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:validation:items:MaxLength=64
	// +optional
	Except []string `json:"except,omitempty"`
}
