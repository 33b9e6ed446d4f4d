package explain

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/bulkhead-io/bulkhead/policy"
)

// PortProto is one port and protocol of a matrix.
type PortProto struct {
	Port  uint16
	Proto uint8
}

func (p PortProto) String() string { return fmt.Sprintf("%d/%s", p.Port, ProtoName(p.Proto)) }

// ParsePorts parses "80/TCP,81/TCP,80/UDP" (the protocol defaults to TCP).
func ParsePorts(s string) ([]PortProto, error) {
	var out []PortProto
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		num, proto, hasProto := strings.Cut(f, "/")
		pp := PortProto{Proto: policy.ProtoTCP}
		if hasProto {
			p, ok := ParseProto(proto)
			if !ok {
				return nil, fmt.Errorf("port %q: protocol must be TCP, UDP or SCTP", f)
			}
			pp.Proto = p
		}
		n, err := strconv.ParseUint(num, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("port %q: want 1-65535: %w", f, err)
		}
		pp.Port = uint16(n)
		out = append(out, pp)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no ports in %q", s)
	}
	return out, nil
}

// Workload is a pod for the matrix.
type Workload struct {
	Name     string
	Endpoint policy.EndpointID
	IPs      []netip.Addr
}

// Cell is one row of the matrix JSON: the shape other tools check.
type Cell struct {
	From     string `json:"from"`
	To       string `json:"to"`
	Port     uint16 `json:"port"`
	Protocol string `json:"protocol"`
	Ingress  bool   `json:"ingress"`
	Egress   bool   `json:"egress"`
	Combined bool   `json:"combined"`
}

// Matrix decides every ordered pair of two different workloads on every
// port, in the order of ws and ports. A pod's traffic to itself stays in
// its network namespace and never meets its policy, so it has no cell.
func Matrix(ms *policy.MapState, ws []Workload, ports []PortProto) []Cell {
	peers := make([]Peer, len(ws))
	for i, w := range ws {
		peers[i] = PeerOfEndpoint(ms, w.Name, w.Endpoint, w.IPs)
	}
	var out []Cell
	for _, pp := range ports {
		for i, src := range peers {
			for j, dst := range peers {
				if i == j {
					continue
				}
				r := Verdict(ms, src, dst, pp.Proto, pp.Port)
				out = append(out, Cell{From: src.Name, To: dst.Name, Port: pp.Port, Protocol: ProtoName(pp.Proto),
					Ingress: r.IngressPasses(), Egress: r.EgressPasses(), Combined: r.Passes()})
			}
		}
	}
	return out
}

// Table renders the matrix as one grid per port: rows are sources, columns
// destinations; "." passes, "X" is dropped, "I"/"E" say only ingress/egress
// dropped it; "-" is a pod with itself, which policy does not see.
func Table(cells []Cell, ws []Workload, ports []PortProto) string {
	var b strings.Builder
	names := make([]string, len(ws))
	width := 4
	for i, w := range ws {
		names[i] = strconv.Itoa(i+1) + " " + w.Name
		width = max(width, len(names[i]))
	}
	idx := 0
	for _, pp := range ports {
		fmt.Fprintf(&b, "%s (rows: from, columns: to; . allowed, X denied both ways, I ingress denied, E egress denied, - the pod itself)\n", pp)
		fmt.Fprintf(&b, "%-*s", width, "")
		for i := range names {
			fmt.Fprintf(&b, " %3d", i+1)
		}
		b.WriteString("\n")
		for i, n := range names {
			fmt.Fprintf(&b, "%-*s", width, n)
			for j := range names {
				if i == j {
					fmt.Fprintf(&b, " %3s", "-")
					continue
				}
				c := cells[idx]
				idx++
				mark := "."
				switch {
				case !c.Ingress && !c.Egress:
					mark = "X"
				case !c.Ingress:
					mark = "I"
				case !c.Egress:
					mark = "E"
				}
				fmt.Fprintf(&b, " %3s", mark)
			}
			b.WriteString("\n")
		}
		b.WriteString("\n")
	}
	return b.String()
}

// SortWorkloads orders workloads by name.
func SortWorkloads(ws []Workload) {
	slices.SortFunc(ws, func(a, b Workload) int { return strings.Compare(a.Name, b.Name) })
}
