package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// RuntimePolicyKind identifies BulkheadRuntimePolicy objects.
const RuntimePolicyKind = "BulkheadRuntimePolicy"

// BulkheadRuntimePolicy sets the answer to each runtime detection for the
// pods it selects in its namespace. A pod that no runtime policy selects
// gets Alert for every rule: a fresh install reports and never disrupts.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Namespaced,shortName=bhrp
type BulkheadRuntimePolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec BulkheadRuntimePolicySpec `json:"spec"`
}

// BulkheadRuntimePolicyList is a list of BulkheadRuntimePolicy.
//
// +kubebuilder:object:root=true
type BulkheadRuntimePolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []BulkheadRuntimePolicy `json:"items"`
}

// BulkheadRuntimePolicySpec is the desired answers.
type BulkheadRuntimePolicySpec struct {
	// Selector picks the pods, in the policy's namespace, that the policy
	// applies to: by SPIFFE ID or labels, as a BulkheadPolicy's.
	Selector Selector `json:"selector"`
	// Detections sets the answer per rule; a rule not listed keeps Alert.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=32
	// +listType=map
	// +listMapKey=rule
	Detections []RuntimeDetection `json:"detections"`
}

// RuntimeDetection is the answer to one rule.
//
// +kubebuilder:validation:XValidation:rule="self.action != 'Block' || self.rule in ['BH-RT-007', 'BH-RT-008', 'BH-RT-009', 'BH-RT-017']",message="Block is only possible for the rules a cgroup hook can deny: BH-RT-007, BH-RT-008, BH-RT-009, BH-RT-017",fieldPath=".action"
// +kubebuilder:validation:XValidation:rule="self.action != 'Kill' || !(self.rule in ['BH-RT-007', 'BH-RT-008', 'BH-RT-009', 'BH-RT-016', 'BH-RT-017'])",message="Kill is only possible for the rules a tracepoint sees (BH-RT-001 to 006, 010 to 015, 018 and 019)",fieldPath=".action"
type RuntimeDetection struct {
	// Rule is a rule ID of the default rule set (see the README's table).
	// +kubebuilder:validation:Enum=BH-RT-001;BH-RT-002;BH-RT-003;BH-RT-004;BH-RT-005;BH-RT-006;BH-RT-007;BH-RT-008;BH-RT-009;BH-RT-010;BH-RT-011;BH-RT-012;BH-RT-013;BH-RT-014;BH-RT-015;BH-RT-016;BH-RT-017;BH-RT-018;BH-RT-019
	Rule string `json:"rule"`
	// Action is the answer: Alert reports; Block denies the operation
	// (EPERM) before it happens, for the rules a cgroup hook sees; Kill
	// sends SIGKILL at syscall entry, for the rules a tracepoint sees (the
	// syscall may still take effect before the process dies); Quarantine
	// cuts the pod's network in the datapath, every packet in and out but
	// DNS to the node's listed resolvers, until `bulkhead quarantine
	// release` (any rule).
	Action RuntimeAction `json:"action"`
}

// RuntimeAction is an answer to a detection.
// +kubebuilder:validation:Enum=Alert;Block;Kill;Quarantine
type RuntimeAction string

const (
	RuntimeAlert RuntimeAction = "Alert"
	RuntimeBlock RuntimeAction = "Block"
	RuntimeKill  RuntimeAction = "Kill"
	// RuntimeQuarantine cuts the pod's network when the rule fires.
	RuntimeQuarantine RuntimeAction = "Quarantine"
)

// RuntimeRule is one rule ID with the answers it can have beyond Alert.
type RuntimeRule struct {
	ID string
	// Block: a cgroup hook sees it before it happens and can deny it.
	Block bool
	// Kill: a tracepoint sees it at syscall entry and can send SIGKILL.
	Kill bool
	// Agent: the agent sees it in the datapath's flow events, after the
	// fact and with no process to name: neither Block nor Kill applies.
	Agent bool
}

// RuntimeRules is the rule catalog the API accepts, in ID order. The
// runtime/detect package's rules must agree with it (a test checks).
func RuntimeRules() []RuntimeRule {
	return []RuntimeRule{
		{ID: "BH-RT-001", Kill: true}, {ID: "BH-RT-002", Kill: true}, {ID: "BH-RT-003", Kill: true},
		{ID: "BH-RT-004", Kill: true}, {ID: "BH-RT-005", Kill: true}, {ID: "BH-RT-006", Kill: true},
		{ID: "BH-RT-007", Block: true}, {ID: "BH-RT-008", Block: true}, {ID: "BH-RT-009", Block: true},
		{ID: "BH-RT-010", Kill: true}, {ID: "BH-RT-011", Kill: true}, {ID: "BH-RT-012", Kill: true},
		{ID: "BH-RT-013", Kill: true}, {ID: "BH-RT-014", Kill: true}, {ID: "BH-RT-015", Kill: true},
		{ID: "BH-RT-016", Agent: true}, {ID: "BH-RT-017", Block: true}, {ID: "BH-RT-018", Kill: true},
		{ID: "BH-RT-019", Kill: true},
	}
}
