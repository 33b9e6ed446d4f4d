package flows

import (
	"strconv"
	"time"
	"unicode/utf8"
)

// AppendJSON appends f as one JSON object (no newline) to dst. It is the
// hot path of the flow log: it writes the same document encoding/json would
// (the tests decode both and compare) without reflection or per-field
// allocations.
func (f *Flow) AppendJSON(dst []byte) []byte {
	dst = append(dst, `{"time":"`...)
	dst = f.Time.UTC().AppendFormat(dst, time.RFC3339Nano)
	dst = append(dst, `","verdict":`...)
	dst = appendString(dst, f.Verdict)
	if f.DropReasonDesc != "" {
		dst = append(dst, `,"drop_reason_desc":`...)
		dst = appendString(dst, f.DropReasonDesc)
	}
	if f.IP != nil {
		dst = append(dst, `,"IP":{"source":`...)
		dst = appendString(dst, f.IP.Source)
		dst = append(dst, `,"destination":`...)
		dst = appendString(dst, f.IP.Destination)
		dst = append(dst, `,"ipVersion":`...)
		dst = appendString(dst, f.IP.IPVersion)
		dst = append(dst, '}')
	}
	if f.L4 != nil {
		dst = append(dst, `,"l4":`...)
		dst = f.L4.appendJSON(dst)
	}
	if f.Source != nil {
		dst = append(dst, `,"source":`...)
		dst = f.Source.appendJSON(dst)
	}
	if f.Destination != nil {
		dst = append(dst, `,"destination":`...)
		dst = f.Destination.appendJSON(dst)
	}
	dst = append(dst, `,"Type":`...)
	dst = appendString(dst, f.Type)
	if f.NodeName != "" {
		dst = append(dst, `,"node_name":`...)
		dst = appendString(dst, f.NodeName)
	}
	dst = append(dst, `,"is_reply":`...)
	dst = strconv.AppendBool(dst, f.IsReply)
	dst = append(dst, `,"traffic_direction":`...)
	dst = appendString(dst, f.TrafficDirection)
	if f.EventKind != "" {
		dst = append(dst, `,"event_kind":`...)
		dst = appendString(dst, f.EventKind)
	}
	if f.MTLS {
		dst = append(dst, `,"mtls":true`...)
	}
	if f.PickedUp {
		dst = append(dst, `,"picked_up":true`...)
	}
	dst = appendPolicies(dst, `,"ingress_allowed_by":`, f.IngressAllowedBy)
	dst = appendPolicies(dst, `,"egress_allowed_by":`, f.EgressAllowedBy)
	dst = appendPolicies(dst, `,"ingress_denied_by":`, f.IngressDeniedBy)
	dst = appendPolicies(dst, `,"egress_denied_by":`, f.EgressDeniedBy)
	if len(f.IsolatedBy) > 0 {
		dst = append(dst, `,"isolated_by":`...)
		dst = appendLabels(dst, f.IsolatedBy)
	}
	if q := f.Quarantine; q != nil {
		dst = append(dst, `,"quarantine":{`...)
		sep := ""
		for _, kv := range [...][2]string{{"alert_id", q.AlertID}, {"rule_id", q.RuleID}, {"reason", q.Reason}} {
			if kv[1] == "" {
				continue
			}
			dst = append(dst, sep+`"`+kv[0]+`":`...)
			dst = appendString(dst, kv[1])
			sep = ","
		}
		dst = append(dst, '}')
	}
	return append(dst, '}')
}

func (l *Layer4) appendJSON(dst []byte) []byte {
	dst = append(dst, '{')
	first := true
	sep := func(name string) {
		if !first {
			dst = append(dst, ',')
		}
		first = false
		dst = append(dst, name...)
	}
	if l.TCP != nil {
		sep(`"TCP":`)
		dst = appendPorts(dst, l.TCP.SourcePort, l.TCP.DestinationPort)
		if fl := l.TCP.Flags; fl != nil {
			dst = append(dst[:len(dst)-1], `,"flags":{`...)
			n := len(dst)
			for _, b := range [...]struct {
				on   bool
				name string
			}{{fl.FIN, "FIN"}, {fl.SYN, "SYN"}, {fl.RST, "RST"}, {fl.PSH, "PSH"}, {fl.ACK, "ACK"}, {fl.URG, "URG"}, {fl.ECE, "ECE"}, {fl.CWR, "CWR"}} {
				if b.on {
					if len(dst) > n {
						dst = append(dst, ',')
					}
					dst = append(dst, '"')
					dst = append(dst, b.name...)
					dst = append(dst, `":true`...)
				}
			}
			dst = append(dst, "}}"...)
		}
	}
	if l.UDP != nil {
		sep(`"UDP":`)
		dst = appendPorts(dst, l.UDP.SourcePort, l.UDP.DestinationPort)
	}
	if l.SCTP != nil {
		sep(`"SCTP":`)
		dst = appendPorts(dst, l.SCTP.SourcePort, l.SCTP.DestinationPort)
	}
	if l.ICMPv4 != nil {
		sep(`"ICMPv4":`)
		dst = appendICMP(dst, l.ICMPv4)
	}
	if l.ICMPv6 != nil {
		sep(`"ICMPv6":`)
		dst = appendICMP(dst, l.ICMPv6)
	}
	return append(dst, '}')
}

func appendPorts(dst []byte, src, dstPort uint16) []byte {
	dst = append(dst, `{"source_port":`...)
	dst = strconv.AppendUint(dst, uint64(src), 10)
	dst = append(dst, `,"destination_port":`...)
	dst = strconv.AppendUint(dst, uint64(dstPort), 10)
	return append(dst, '}')
}

func appendICMP(dst []byte, i *ICMP) []byte {
	dst = append(dst, `{"type":`...)
	dst = strconv.AppendUint(dst, uint64(i.Type), 10)
	dst = append(dst, `,"code":`...)
	dst = strconv.AppendUint(dst, uint64(i.Code), 10)
	return append(dst, '}')
}

func (e *Endpoint) appendJSON(dst []byte) []byte {
	dst = append(dst, '{')
	if e.ID != 0 {
		dst = append(dst, `"ID":`...)
		dst = strconv.AppendUint(dst, uint64(e.ID), 10)
		dst = append(dst, ',')
	}
	dst = append(dst, `"identity":`...)
	dst = strconv.AppendUint(dst, uint64(e.Identity), 10)
	if e.Namespace != "" {
		dst = append(dst, `,"namespace":`...)
		dst = appendString(dst, e.Namespace)
	}
	if e.PodName != "" {
		dst = append(dst, `,"pod_name":`...)
		dst = appendString(dst, e.PodName)
	}
	if len(e.Labels) > 0 {
		dst = append(dst, `,"labels":`...)
		if e.labelsJSON != nil {
			dst = append(dst, e.labelsJSON...)
		} else {
			dst = appendLabels(dst, e.Labels)
		}
	}
	if e.SPIFFEID != "" {
		dst = append(dst, `,"spiffe_id":`...)
		dst = appendString(dst, e.SPIFFEID)
	}
	if e.CIDR != "" {
		dst = append(dst, `,"cidr":`...)
		dst = appendString(dst, e.CIDR)
	}
	return append(dst, '}')
}

func appendLabels(dst []byte, labels []string) []byte {
	dst = append(dst, '[')
	for i, l := range labels {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendString(dst, l)
	}
	return append(dst, ']')
}

func appendPolicies(dst []byte, key string, ps []*Policy) []byte {
	if len(ps) == 0 {
		return dst
	}
	dst = append(dst, key...)
	dst = append(dst, '[')
	for i, p := range ps {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, `{"name":`...)
		dst = appendString(dst, p.Name)
		if p.Namespace != "" {
			dst = append(dst, `,"namespace":`...)
			dst = appendString(dst, p.Namespace)
		}
		dst = append(dst, `,"kind":`...)
		dst = appendString(dst, p.Kind)
		if p.Revision != 0 {
			dst = append(dst, `,"revision":`...)
			dst = strconv.AppendUint(dst, p.Revision, 10)
		}
		if p.Rule != "" {
			dst = append(dst, `,"rule":`...)
			dst = appendString(dst, p.Rule)
		}
		dst = append(dst, '}')
	}
	return append(dst, ']')
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string. Invalid UTF-8 becomes U+FFFD, as
// encoding/json does, so a hostile label cannot break the line format.
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		// Labels, names and addresses are nearly always plain ASCII: skip
		// runs of it in a tight loop.
		for i < len(s) {
			if c := s[i]; c < 0x20 || c >= utf8.RuneSelf || c == '"' || c == '\\' {
				break
			}
			i++
		}
		if i == len(s) {
			break
		}
		c := s[i]
		if c < utf8.RuneSelf {
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		// U+2028 and U+2029 end lines in JavaScript; escape them as
		// encoding/json does.
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// AppendJSON appends the record that marks a gap in the flow log:
// {"lost_events":{...},"time":...,"node_name":...}, the shape Hubble's
// exporter uses.
func (l *LostEvents) AppendJSON(dst []byte) []byte {
	dst = append(dst, `{"lost_events":{"source":`...)
	dst = appendString(dst, l.Source)
	dst = append(dst, `,"num_events_lost":`...)
	dst = strconv.AppendUint(dst, l.NumEventsLost, 10)
	dst = append(dst, `},"time":"`...)
	dst = l.Time.UTC().AppendFormat(dst, time.RFC3339Nano)
	dst = append(dst, '"')
	if l.NodeName != "" {
		dst = append(dst, `,"node_name":`...)
		dst = appendString(dst, l.NodeName)
	}
	return append(dst, '}')
}

// AppendJSON appends the item as a stream line: {"flow":{...}} or the
// lost_events record.
func (it Item) AppendJSON(dst []byte) []byte {
	if it.Lost != nil {
		return it.Lost.AppendJSON(dst)
	}
	dst = append(dst, `{"flow":`...)
	dst = it.Flow.AppendJSON(dst)
	return append(dst, '}')
}
