package author

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/bulkhead-io/bulkhead/policy"
)

// ErrBadFlowLine is wrapped by every error about one line of a flow log.
var ErrBadFlowLine = errors.New("bad flow record")

// maxFlowLine bounds one record. The agent's records are well under 4 KiB;
// a longer line is not one of them.
const maxFlowLine = 1 << 20

// FlowPeer is one end of a flow, as generate needs it.
type FlowPeer struct {
	// Namespace and Pod are set for pods.
	Namespace string
	Pod       string
	// Labels are the pod's own labels (the "k8s:" labels without the
	// namespace and service account ones the agent adds).
	Labels         map[string]string
	ServiceAccount string
	SPIFFEID       string
	// Addr is the address the flow used.
	Addr netip.Addr
	// Reserved is "world" or "host" for peers that are not pods.
	Reserved string
}

// IsPod reports whether the peer is a pod.
func (p *FlowPeer) IsPod() bool { return p.Namespace != "" && p.Pod != "" }

// FlowRecord is what generate needs of one flow record.
type FlowRecord struct {
	// Line is the record's line in its input, for messages.
	Line      int
	Time      time.Time
	Verdict   string
	IsReply   bool
	Direction string
	Source    FlowPeer
	Dest      FlowPeer
	// Proto is policy.ProtoTCP, ProtoUDP or ProtoSCTP, and Port the
	// destination port; ICMP records have Proto 0 and ICMP set.
	Proto uint8
	Port  uint16
	ICMP  bool
}

// FlowInput is a parsed flow log.
type FlowInput struct {
	Records []FlowRecord
	// LostMarkers counts the lost-events records: the log has gaps there.
	LostMarkers int
}

// wire is the part of the flow record JSON (DESIGN.md §5, agent/flows)
// that generate reads. A line is a record, or the agent API's
// {"flow":{...}} / {"lost_events":{...}} wrapping of one.
type wireLine struct {
	wireFlow
	Flow       *wireFlow       `json:"flow"`
	LostEvents json.RawMessage `json:"lost_events"`
	// EventKind "alert" is a runtime detection alert, which the agent's
	// --runtime-detection writes into the same log.
	EventKind string `json:"event_kind"`
}

type wireFlow struct {
	Time    time.Time `json:"time"`
	Verdict string    `json:"verdict"`
	IP      *struct {
		Source      string `json:"source"`
		Destination string `json:"destination"`
	} `json:"IP"`
	L4 *struct {
		TCP    *wirePorts      `json:"TCP"`
		UDP    *wirePorts      `json:"UDP"`
		SCTP   *wirePorts      `json:"SCTP"`
		ICMPv4 json.RawMessage `json:"ICMPv4"`
		ICMPv6 json.RawMessage `json:"ICMPv6"`
	} `json:"l4"`
	Source           *wireEndpoint `json:"source"`
	Destination      *wireEndpoint `json:"destination"`
	IsReply          bool          `json:"is_reply"`
	TrafficDirection string        `json:"traffic_direction"`
}

type wirePorts struct {
	DestinationPort uint16 `json:"destination_port"`
}

type wireEndpoint struct {
	Namespace string   `json:"namespace"`
	PodName   string   `json:"pod_name"`
	Labels    []string `json:"labels"`
	SPIFFEID  string   `json:"spiffe_id"`
}

// Labels the agent adds to a pod's own, in Hubble's spelling.
const (
	labelNamespace      = "io.kubernetes.pod.namespace"
	labelServiceAccount = "io.kubernetes.pod.serviceaccount"
)

// ReadFlows reads flow records, one JSON object a line, as the agent's
// --flow-log writes them or `bulkhead observe -o json` prints them. Blank
// lines and runtime alerts (event_kind "alert") are skipped, and lost-events
// markers counted. Any other line that is
// not a complete flow record is an error that names the input and line,
// and no record is returned: a policy generated from part of a log would
// silently drop what the rest observed.
func ReadFlows(r io.Reader, name string) (*FlowInput, error) {
	in := &FlowInput{}
	lost, err := ScanFlows(r, name, func(rec *FlowRecord) error {
		in.Records = append(in.Records, *rec)
		return nil
	})
	if err != nil {
		return nil, err
	}
	in.LostMarkers = lost
	return in, nil
}

// ScanFlows reads flow records as ReadFlows does, without holding them:
// fn sees each record (valid only during the call) in input order, and the
// lost-events markers are counted. A bad line stops the scan with an error
// naming it; a caller that must not act on part of a log acts only after
// ScanFlows returns nil.
func ScanFlows(r io.Reader, name string, fn func(*FlowRecord) error) (lostMarkers int, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	for line := 1; ; line++ {
		data, err := readLine(br)
		if len(data) > 0 {
			rec, lost, perr := parseFlowLine(data)
			switch {
			case perr != nil:
				return 0, fmt.Errorf("%s:%d: %w: %w", name, line, ErrBadFlowLine, perr)
			case lost:
				lostMarkers++
			case rec != nil:
				rec.Line = line
				if ferr := fn(rec); ferr != nil {
					return 0, fmt.Errorf("%s:%d: %w", name, line, ferr)
				}
			}
		}
		if errors.Is(err, io.EOF) {
			return lostMarkers, nil
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			return 0, fmt.Errorf("%s:%d: %w: line longer than %d bytes", name, line, ErrBadFlowLine, maxFlowLine)
		}
		if err != nil {
			return 0, fmt.Errorf("read %s: %w", name, err)
		}
	}
}

// readLine reads one line without its end, up to maxFlowLine bytes.
func readLine(br *bufio.Reader) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := br.ReadSlice('\n')
		if len(buf)+len(chunk) > maxFlowLine+1 {
			return nil, bufio.ErrBufferFull
		}
		buf = append(buf, chunk...)
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		return bytes.TrimSpace(buf), err
	}
}

// parseFlowLine parses one non-empty line: a record, a lost-events marker
// (lost true), a line to skip (neither), or an error.
func parseFlowLine(data []byte) (*FlowRecord, bool, error) {
	var wl wireLine
	if err := json.Unmarshal(data, &wl); err != nil {
		return nil, false, fmt.Errorf("not a JSON object: %w", err)
	}
	if wl.LostEvents != nil {
		return nil, true, nil
	}
	if wl.EventKind == "alert" {
		return nil, false, nil
	}
	f := &wl.wireFlow
	if wl.Flow != nil {
		f = wl.Flow
	}
	rec := &FlowRecord{Time: f.Time, Verdict: f.Verdict, IsReply: f.IsReply, Direction: f.TrafficDirection}
	switch f.Verdict {
	case "FORWARDED", "DROPPED", "AUDIT":
	case "":
		return nil, false, errors.New(`no "verdict": not a flow record (OCSF lines are not read; use the agent's default --flow-format)`)
	default:
		return nil, false, fmt.Errorf("verdict %q: want FORWARDED, DROPPED or AUDIT", f.Verdict)
	}
	if f.IP == nil {
		return nil, false, errors.New(`no "IP"`)
	}
	var err error
	if rec.Source.Addr, err = netip.ParseAddr(f.IP.Source); err != nil {
		return nil, false, fmt.Errorf("IP.source: %w", err)
	}
	if rec.Dest.Addr, err = netip.ParseAddr(f.IP.Destination); err != nil {
		return nil, false, fmt.Errorf("IP.destination: %w", err)
	}
	rec.Source.Addr, rec.Dest.Addr = rec.Source.Addr.Unmap(), rec.Dest.Addr.Unmap()
	if f.L4 == nil {
		return nil, false, errors.New(`no "l4"`)
	}
	n := 0
	for _, p := range []struct {
		ports *wirePorts
		proto uint8
	}{{f.L4.TCP, policy.ProtoTCP}, {f.L4.UDP, policy.ProtoUDP}, {f.L4.SCTP, policy.ProtoSCTP}} {
		if p.ports != nil {
			n++
			rec.Proto, rec.Port = p.proto, p.ports.DestinationPort
		}
	}
	if f.L4.ICMPv4 != nil || f.L4.ICMPv6 != nil {
		n++
		rec.ICMP = true
	}
	if n != 1 {
		return nil, false, fmt.Errorf(`"l4" has %d protocols, want exactly one of TCP, UDP, SCTP, ICMPv4, ICMPv6`, n)
	}
	if !rec.ICMP && rec.Port == 0 && !rec.IsReply {
		return nil, false, errors.New("destination_port 0")
	}
	if err := endpointOf(f.Source, &rec.Source); err != nil {
		return nil, false, fmt.Errorf("source: %w", err)
	}
	if err := endpointOf(f.Destination, &rec.Dest); err != nil {
		return nil, false, fmt.Errorf("destination: %w", err)
	}
	return rec, false, nil
}

func endpointOf(e *wireEndpoint, p *FlowPeer) error {
	if e == nil {
		return errors.New("missing")
	}
	if (e.Namespace == "") != (e.PodName == "") {
		return errors.New("namespace and pod_name must be both set (a pod) or both empty")
	}
	p.Namespace, p.Pod, p.SPIFFEID = e.Namespace, e.PodName, e.SPIFFEID
	if p.IsPod() {
		p.Labels = map[string]string{}
		// Generated selectors name the namespace and labels: they must be
		// what Kubernetes accepts.
		if errs := validation.IsDNS1123Label(p.Namespace); len(errs) > 0 {
			return fmt.Errorf("namespace %q: %s", p.Namespace, errs[0])
		}
	}
	if p.SPIFFEID != "" {
		// An exact ID: a "*" segment would become a glob in a generated
		// BulkheadPolicy and allow far more than was seen.
		id, err := spiffeid.FromString(p.SPIFFEID)
		if err != nil {
			return fmt.Errorf("spiffe_id %q: %w", p.SPIFFEID, err)
		}
		if id.Path() == "" {
			return fmt.Errorf("spiffe_id %q: a workload's ID has a path", p.SPIFFEID)
		}
		if p.IsPod() {
			if err := policy.CheckIssuedID(id, p.Namespace); err != nil {
				return err
			}
		}
	}
	for _, l := range e.Labels {
		src, kv, ok := strings.Cut(l, ":")
		if !ok {
			return fmt.Errorf("label %q: want SOURCE:KEY=VALUE", l)
		}
		switch src {
		case "reserved":
			p.Reserved = kv
			continue
		case "k8s":
		default:
			continue // cidr:, and other sources Hubble knows: not the pod's
		}
		k, v, _ := strings.Cut(kv, "=")
		if k == "" {
			return fmt.Errorf("label %q: empty key", l)
		}
		switch {
		case !p.IsPod():
			return fmt.Errorf("label %q on a peer that is not a pod", l)
		case k == labelNamespace:
			if v != p.Namespace {
				return fmt.Errorf("label %q disagrees with namespace %q", l, p.Namespace)
			}
		case k == labelServiceAccount:
			p.ServiceAccount = v
		case strings.HasPrefix(k, "io.cilium.k8s."), strings.HasPrefix(k, "io.kubernetes.pod."):
			// Hubble exports carry these; they are not the pod's labels.
		default:
			if errs := validation.IsQualifiedName(k); len(errs) > 0 {
				return fmt.Errorf("label key %q: %s", k, errs[0])
			}
			if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
				return fmt.Errorf("label %q value %q: %s", k, v, errs[0])
			}
			if _, dup := p.Labels[k]; dup {
				return fmt.Errorf("label %q repeated", k)
			}
			p.Labels[k] = v
		}
	}
	if p.IsPod() && p.Reserved != "" {
		return fmt.Errorf("pod %s/%s has reserved:%s", p.Namespace, p.Pod, p.Reserved)
	}
	return nil
}
