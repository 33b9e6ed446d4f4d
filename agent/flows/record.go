// Package flows owns the flow record: what Bulkhead says about every flow,
// in Hubble's flow JSON field names wherever Hubble has the field, so that jq
// scripts and SIEM parsers written for Hubble exports read ours. Our own
// additions (spiffe_id, rule) use names Hubble does not use.
package flows

import "time"

// Verdict values, as Hubble spells them.
const (
	VerdictForwarded = "FORWARDED"
	VerdictDropped   = "DROPPED"
	VerdictAudit     = "AUDIT"
)

// Traffic directions, as Hubble spells them.
const (
	DirectionIngress = "INGRESS"
	DirectionEgress  = "EGRESS"
)

// Flow is one flow record.
type Flow struct {
	Time           time.Time `json:"time"`
	Verdict        string    `json:"verdict"`
	DropReasonDesc string    `json:"drop_reason_desc,omitempty"`
	IP             *IP       `json:"IP,omitempty"`
	L4             *Layer4   `json:"l4,omitempty"`
	Source         *Endpoint `json:"source,omitempty"`
	Destination    *Endpoint `json:"destination,omitempty"`
	// Type is always "L3_L4": Bulkhead sees no L7.
	Type             string `json:"Type"`
	NodeName         string `json:"node_name,omitempty"`
	IsReply          bool   `json:"is_reply"`
	TrafficDirection string `json:"traffic_direction"`
	// EventKind says what the datapath reported: "new", "drop" or "end".
	// Hubble has no such field; ours is named so as not to collide.
	EventKind string `json:"event_kind,omitempty"`
	// MTLS says the flow travels through the mTLS tunnel: at the sending
	// pod, it was steered into its node's tunnel endpoint; at the receiving
	// pod, the tunnel delivered it and the source is the identity its
	// verified SVID names (source.spiffe_id), not what its address maps to.
	// Hubble has no such field.
	MTLS bool `json:"mtls,omitempty"`
	// PickedUp marks the reply of a connection whose conntrack entry was
	// lost (evicted or expired), passed because the direction the
	// connection was opened in is allowed, and tracked again from it.
	// Hubble has no such field.
	PickedUp         bool      `json:"picked_up,omitempty"`
	IngressAllowedBy []*Policy `json:"ingress_allowed_by,omitempty"`
	EgressAllowedBy  []*Policy `json:"egress_allowed_by,omitempty"`
	IngressDeniedBy  []*Policy `json:"ingress_denied_by,omitempty"`
	EgressDeniedBy   []*Policy `json:"egress_denied_by,omitempty"`
	// IsolatedBy names, as "Kind ns/name", the policies that isolate the
	// deciding pod in the deciding direction (the destination's ingress,
	// the source's egress), on a flow decided by that isolation's default
	// deny (denied_by "default-deny"): the policies whose rules did not
	// allow it. As explain's isolated_by; Hubble has no such field.
	IsolatedBy []string `json:"isolated_by,omitempty"`
	// Quarantine names, on a flow dropped because its pod is quarantined
	// (drop_reason_desc QUARANTINED), what quarantined it: the runtime
	// alert, or an operator. Hubble has no such field.
	Quarantine *QuarantineRef `json:"quarantine,omitempty"`
}

// QuarantineRef is what quarantined a pod: an alert (its ID and rule) or
// an operator's `bulkhead quarantine add` (its reason).
type QuarantineRef struct {
	AlertID string `json:"alert_id,omitempty"`
	RuleID  string `json:"rule_id,omitempty"`
	Reason  string `json:"reason,omitempty"`
}

// IP is the network layer.
type IP struct {
	Source      string `json:"source"`
	Destination string `json:"destination"`
	// IPVersion is "IPv4" or "IPv6".
	IPVersion string `json:"ipVersion"`
}

// Layer4 holds exactly one of its fields.
type Layer4 struct {
	TCP    *TCP   `json:"TCP,omitempty"`
	UDP    *Ports `json:"UDP,omitempty"`
	SCTP   *Ports `json:"SCTP,omitempty"`
	ICMPv4 *ICMP  `json:"ICMPv4,omitempty"`
	ICMPv6 *ICMP  `json:"ICMPv6,omitempty"`
}

// Ports are a transport's source and destination ports.
type Ports struct {
	SourcePort      uint16 `json:"source_port"`
	DestinationPort uint16 `json:"destination_port"`
}

// TCP adds the flags seen so far on the flow.
type TCP struct {
	SourcePort      uint16    `json:"source_port"`
	DestinationPort uint16    `json:"destination_port"`
	Flags           *TCPFlags `json:"flags,omitempty"`
}

// TCPFlags are the TCP flags seen, as Hubble names them.
type TCPFlags struct {
	FIN bool `json:"FIN,omitempty"`
	SYN bool `json:"SYN,omitempty"`
	RST bool `json:"RST,omitempty"`
	PSH bool `json:"PSH,omitempty"`
	ACK bool `json:"ACK,omitempty"`
	URG bool `json:"URG,omitempty"`
	ECE bool `json:"ECE,omitempty"`
	CWR bool `json:"CWR,omitempty"`
}

// ICMP is an ICMP or ICMPv6 type and code.
type ICMP struct {
	Type uint8 `json:"type"`
	Code uint8 `json:"code"`
}

// Endpoint is one side of a flow.
type Endpoint struct {
	// ID is the node-local endpoint number, for local endpoints.
	ID       uint32 `json:"ID,omitempty"`
	Identity uint32 `json:"identity"`
	// Namespace and PodName are empty for peers that are not pods.
	Namespace string `json:"namespace,omitempty"`
	PodName   string `json:"pod_name,omitempty"`
	// Labels are "key=value" strings, sorted, with the "k8s:" source prefix
	// Hubble uses, and reserved labels such as "reserved:world".
	Labels   []string `json:"labels,omitempty"`
	SPIFFEID string   `json:"spiffe_id,omitempty"`
	// CIDR is the ipBlock prefix whose CIDR identity matched, for peers
	// outside the cluster.
	CIDR string `json:"cidr,omitempty"`
	// labelsJSON, when set, is Labels as AppendJSON writes them, shared
	// by every record of the identity (see IdentityView).
	labelsJSON []byte
}

// Policy names the rule that decided a flow.
type Policy struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
	// Kind is "NetworkPolicy", "BulkheadPolicy", or "default" for the
	// default deny of a selected endpoint (then Name says "default-deny").
	Kind     string `json:"kind"`
	Revision uint64 `json:"revision,omitempty"`
	// Rule is "ingress[0]", "egress[2]", ...: which rule of the policy.
	Rule string `json:"rule,omitempty"`
}

// LostEvents is the record written where the stream has a gap.
type LostEvents struct {
	Time time.Time `json:"time"`
	// Source is "kernel" (ring buffer full) or "userspace" (a consumer was
	// too slow and the agent dropped records).
	Source        string `json:"source"`
	NumEventsLost uint64 `json:"num_events_lost"`
	NodeName      string `json:"node_name,omitempty"`
}
