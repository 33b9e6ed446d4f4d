package flows

import (
	"encoding/json"
)

// OCSF Network Activity (class 4001) identifiers used here.
const (
	ocsfClassNetworkActivity = 4001
	ocsfCategoryNetwork      = 4
	ocsfSchemaVersion        = "1.1.0"

	ocsfActivityOpen    = 1
	ocsfActivityClose   = 2
	ocsfActivityRefuse  = 5
	ocsfActivityTraffic = 6

	ocsfDirectionInbound  = 1
	ocsfDirectionOutbound = 2
	ocsfDirectionLateral  = 3
)

// OCSFEvent is a flow as an OCSF Network Activity event.
type OCSFEvent struct {
	ClassUID      int                `json:"class_uid"`
	CategoryUID   int                `json:"category_uid"`
	TypeUID       int                `json:"type_uid"`
	ActivityID    int                `json:"activity_id"`
	ActivityName  string             `json:"activity_name"`
	Time          int64              `json:"time"`
	SeverityID    int                `json:"severity_id"`
	StatusID      int                `json:"status_id"`
	ActionID      int                `json:"action_id"`
	Action        string             `json:"action"`
	DispositionID int                `json:"disposition_id"`
	Disposition   string             `json:"disposition"`
	Message       string             `json:"message,omitempty"`
	Metadata      ocsfMetadata       `json:"metadata"`
	SrcEndpoint   ocsfEndpoint       `json:"src_endpoint"`
	DstEndpoint   ocsfEndpoint       `json:"dst_endpoint"`
	Connection    ocsfConnectionInfo `json:"connection_info"`
	Unmapped      ocsfUnmapped       `json:"unmapped"`
}

type ocsfMetadata struct {
	Version string      `json:"version"`
	Product ocsfProduct `json:"product"`
}

type ocsfProduct struct {
	Name       string `json:"name"`
	VendorName string `json:"vendor_name"`
}

type ocsfEndpoint struct {
	IP   string `json:"ip,omitempty"`
	Port uint16 `json:"port,omitempty"`
	// Name is "namespace/pod" for pods.
	Name string `json:"name,omitempty"`
	// UID is the SPIFFE ID of a workload.
	UID string `json:"uid,omitempty"`
}

type ocsfConnectionInfo struct {
	ProtocolName string `json:"protocol_name,omitempty"`
	ProtocolNum  int    `json:"protocol_num,omitempty"`
	DirectionID  int    `json:"direction_id"`
	Direction    string `json:"direction"`
}

// ocsfUnmapped carries what OCSF has no attribute for: the deciding rules
// and the Bulkhead verdict, under the same names as the native format.
type ocsfUnmapped struct {
	Verdict          string         `json:"verdict"`
	DropReasonDesc   string         `json:"drop_reason_desc,omitempty"`
	TrafficDirection string         `json:"traffic_direction"`
	IsReply          bool           `json:"is_reply"`
	NodeName         string         `json:"node_name,omitempty"`
	MTLS             bool           `json:"mtls,omitempty"`
	PickedUp         bool           `json:"picked_up,omitempty"`
	IngressAllowedBy []*Policy      `json:"ingress_allowed_by,omitempty"`
	EgressAllowedBy  []*Policy      `json:"egress_allowed_by,omitempty"`
	IngressDeniedBy  []*Policy      `json:"ingress_denied_by,omitempty"`
	EgressDeniedBy   []*Policy      `json:"egress_denied_by,omitempty"`
	IsolatedBy       []string       `json:"isolated_by,omitempty"`
	Quarantine       *QuarantineRef `json:"quarantine,omitempty"`
}

// ToOCSF maps a flow to an OCSF Network Activity event. A drop is Refuse,
// a flow's end is Close, a new forwarded flow is Open, and an audited flow
// (it passed, but policy would have dropped it) is Traffic.
func (f *Flow) ToOCSF() *OCSFEvent {
	e := &OCSFEvent{
		ClassUID:      ocsfClassNetworkActivity,
		CategoryUID:   ocsfCategoryNetwork,
		Time:          f.Time.UnixMilli(),
		SeverityID:    1,
		StatusID:      1,
		ActionID:      1,
		Action:        "Allowed",
		DispositionID: 1,
		Disposition:   "Allowed",
		Metadata:      ocsfMetadata{Version: ocsfSchemaVersion, Product: ocsfProduct{Name: "Bulkhead", VendorName: "Bulkhead"}},
		Unmapped: ocsfUnmapped{
			Verdict: f.Verdict, DropReasonDesc: f.DropReasonDesc, TrafficDirection: f.TrafficDirection,
			IsReply: f.IsReply, NodeName: f.NodeName, MTLS: f.MTLS, PickedUp: f.PickedUp,
			IngressAllowedBy: f.IngressAllowedBy, EgressAllowedBy: f.EgressAllowedBy,
			IngressDeniedBy: f.IngressDeniedBy, EgressDeniedBy: f.EgressDeniedBy,
			IsolatedBy: f.IsolatedBy, Quarantine: f.Quarantine,
		},
	}
	switch {
	case f.Verdict == VerdictDropped:
		e.ActivityID, e.ActivityName = ocsfActivityRefuse, "Refuse"
		e.SeverityID, e.StatusID = 3, 2
		e.ActionID, e.Action, e.DispositionID, e.Disposition = 2, "Denied", 2, "Blocked"
	case f.EventKind == "end":
		e.ActivityID, e.ActivityName = ocsfActivityClose, "Close"
	case f.Verdict == VerdictAudit:
		e.ActivityID, e.ActivityName = ocsfActivityTraffic, "Traffic"
		e.SeverityID = 2
	default:
		e.ActivityID, e.ActivityName = ocsfActivityOpen, "Open"
	}
	e.TypeUID = e.ClassUID*100 + e.ActivityID
	if f.IP != nil {
		e.SrcEndpoint.IP, e.DstEndpoint.IP = f.IP.Source, f.IP.Destination
	}
	src, dst, _ := f.L4.ports()
	e.SrcEndpoint.Port, e.DstEndpoint.Port = src, dst
	e.SrcEndpoint.Name, e.SrcEndpoint.UID = podName(f.Source), spiffeOf(f.Source)
	e.DstEndpoint.Name, e.DstEndpoint.UID = podName(f.Destination), spiffeOf(f.Destination)
	e.Connection.ProtocolName, e.Connection.ProtocolNum = protocolOfL4(f.L4)
	switch srcPod, dstPod := isPod(f.Source), isPod(f.Destination); {
	case srcPod && dstPod:
		e.Connection.DirectionID, e.Connection.Direction = ocsfDirectionLateral, "Lateral"
	case dstPod:
		e.Connection.DirectionID, e.Connection.Direction = ocsfDirectionInbound, "Inbound"
	case srcPod:
		e.Connection.DirectionID, e.Connection.Direction = ocsfDirectionOutbound, "Outbound"
	default:
		e.Connection.Direction = "Unknown"
	}
	return e
}

// AppendOCSF appends f as one OCSF JSON object.
func (f *Flow) AppendOCSF(dst []byte) ([]byte, error) {
	b, err := json.Marshal(f.ToOCSF())
	if err != nil {
		return dst, err
	}
	return append(dst, b...), nil
}

func isPod(e *Endpoint) bool { return e != nil && e.PodName != "" }

func podName(e *Endpoint) string {
	if !isPod(e) {
		return ""
	}
	return e.Namespace + "/" + e.PodName
}

func spiffeOf(e *Endpoint) string {
	if e == nil {
		return ""
	}
	return e.SPIFFEID
}

func protocolOfL4(l *Layer4) (string, int) {
	switch {
	case l == nil:
		return "", 0
	case l.TCP != nil:
		return "tcp", 6
	case l.UDP != nil:
		return "udp", 17
	case l.SCTP != nil:
		return "sctp", 132
	case l.ICMPv4 != nil:
		return "icmp", 1
	case l.ICMPv6 != nil:
		return "ipv6-icmp", 58
	}
	return "", 0
}
