package explain

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

// ErrInvalidStore is returned by Check when some object is invalid.
var ErrInvalidStore = errors.New("store has invalid objects")

// ErrNothingToCheck is returned by Check when the paths hold no object: a
// CI gate that passed on an empty folder, or on a file it did not read,
// would pass anything.
var ErrNothingToCheck = errors.New("nothing to check")

// Check validates every object of the files and folders named (a folder's
// *.yaml and *.yml files, as the store reads them; a file whatever its
// name), all together as one store state. It writes one line per problem
// to errw (file:line: what), a summary to w, and returns ErrInvalidStore
// when there is any problem, or ErrNothingToCheck when there is no object.
func Check(paths []string, w, errw io.Writer) error {
	objs, perr := store.ParsePaths(paths)
	// Validate what decoded too: every problem is reported at once.
	res, err := store.Build(objs, store.Options{AllLocal: true})
	err = errors.Join(perr, err)
	if err == nil {
		_, err = policy.Compile(res.Snapshot)
	}
	if err != nil {
		for _, line := range flatten(err) {
			fmt.Fprintln(errw, line)
		}
		return ErrInvalidStore
	}
	what := strings.Join(paths, ", ")
	if len(res.Objects) == 0 {
		return fmt.Errorf("%s: no object in any *.yaml or *.yml file: %w", what, ErrNothingToCheck)
	}
	noun := "objects, all"
	if len(res.Objects) == 1 {
		noun = "object,"
	}
	fmt.Fprintf(w, "%s: %d %s valid\n", what, len(res.Objects), noun)
	return nil
}

func flatten(err error) []string {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []string
		for _, e := range j.Unwrap() {
			if e != nil {
				out = append(out, flatten(e)...)
			}
		}
		return out
	}
	return []string{err.Error()}
}

// Offline is a store compiled with every pod local.
type Offline struct {
	MapState  *policy.MapState
	Workloads []Workload
	byName    map[string]Workload
	ports     map[string][]policy.NamedPort // by pod name
	compiler  *policy.Compiler
}

// LoadOffline loads and compiles a store directory with every pod local. It
// refuses a store with invalid objects, since an answer that silently
// ignores a policy would mislead.
func LoadOffline(dir string) (*Offline, error) {
	res, err := store.Load(dir, store.Options{AllLocal: true})
	if err != nil {
		return nil, fmt.Errorf("load store %s: %w", dir, err)
	}
	o, err := NewOffline(res.Snapshot)
	if err != nil {
		return nil, fmt.Errorf("compile store %s: %w", dir, err)
	}
	return o, nil
}

// NewOffline compiles a snapshot whose pods all have endpoint IDs.
func NewOffline(s *policy.Snapshot) (*Offline, error) {
	c := policy.NewCompiler(policy.Config{})
	ms, err := c.Reset(s)
	if err != nil {
		return nil, err
	}
	o := &Offline{MapState: ms, byName: map[string]Workload{}, ports: map[string][]policy.NamedPort{}, compiler: c}
	for _, p := range s.Pods {
		w := Workload{Name: p.Namespace + "/" + p.Name, Endpoint: p.Endpoint, IPs: p.IPs}
		o.Workloads = append(o.Workloads, w)
		o.byName[w.Name] = w
		o.ports[w.Name] = p.Ports
	}
	SortWorkloads(o.Workloads)
	return o, nil
}

// Peer resolves "ns/pod" (or "pod" in default) or an IP address.
func (o *Offline) Peer(s string) (Peer, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		for _, w := range o.Workloads {
			for _, ip := range w.IPs {
				if ip == a.Unmap() {
					return PeerOfEndpoint(o.MapState, w.Name, w.Endpoint, []netip.Addr{ip}), nil
				}
			}
		}
		return PeerOfAddr(o.MapState, a.Unmap()), nil
	}
	if !strings.Contains(s, "/") {
		s = "default/" + s
	}
	w, ok := o.byName[s]
	if !ok {
		return Peer{}, fmt.Errorf("no pod %s in the store", s)
	}
	return PeerOfEndpoint(o.MapState, w.Name, w.Endpoint, w.IPs), nil
}

// Verdict is Verdict on the store's MapState, with each side that its
// default decided against the connection naming the policies that isolate
// that pod in that direction (Side.IsolatedBy).
func (o *Offline) Verdict(src, dst Peer, proto uint8, port uint16) Result {
	r := Verdict(o.MapState, src, dst, proto, port)
	NameIsolation(&r, src, dst, func(at Peer, dir policy.Direction) []string {
		ns, name, _ := strings.Cut(at.Name, "/")
		var out []string
		for _, p := range o.compiler.IsolatedBy(ns, name, dir) {
			out = append(out, p.String())
		}
		return out
	})
	return r
}

// NameIsolation sets Side.IsolatedBy on each side of r (and r.Other) that
// the default deny (or audit) of an endpoint decided: the egress side
// from src, the ingress side from dst, as by names the policies that
// isolate that end in that direction. The offline engine asks its
// compiler; the agent, what its last apply computed.
func NameIsolation(r *Result, src, dst Peer, by func(at Peer, dir policy.Direction) []string) {
	for _, res := range []*Result{r, r.Other} {
		if res == nil {
			continue
		}
		for _, x := range []struct {
			s   *Side
			at  Peer
			dir policy.Direction
		}{{&res.Egress, src, policy.Egress}, {&res.Ingress, dst, policy.Ingress}} {
			if x.s.Rule != nil || x.at.Endpoint == 0 || (x.s.Default != "deny" && x.s.Default != "audit") {
				continue
			}
			x.s.IsolatedBy = by(x.at, x.dir)
		}
	}
}

// ParsePortArg parses a --port: a number (1-65535), or else the name of
// a container port (name set, num 0), which only the destination pod can
// resolve.
func ParsePortArg(s string) (num uint16, name string, err error) {
	if n, err := strconv.ParseUint(s, 10, 16); err == nil && n > 0 {
		return uint16(n), "", nil
	}
	if errs := validation.IsValidPortName(s); len(errs) > 0 {
		return 0, "", fmt.Errorf("port %q: want 1-65535 or a named port: %s", s, errs[0])
	}
	return 0, s, nil
}

// ResolvePort is --port for a connection to the peer to (as Peer takes
// it): a number, or a named port of that pod for proto, as policy resolves
// named ports: by the destination pod's container ports.
func (o *Offline) ResolvePort(to, port string, proto uint8) (uint16, error) {
	num, name, err := ParsePortArg(port)
	if err != nil || name == "" {
		return num, err
	}
	dst, err := o.Peer(to)
	if err != nil {
		return 0, err
	}
	if dst.Endpoint == 0 {
		return 0, fmt.Errorf("port %q: %s is not a pod, and only a pod's containers name ports", name, to)
	}
	var names []string
	for _, np := range o.ports[dst.Name] {
		if np.Name == name && np.Proto == proto {
			return np.Port, nil
		}
		names = append(names, fmt.Sprintf("%s=%d/%s", np.Name, np.Port, ProtoName(np.Proto)))
	}
	have := "it names no port"
	if len(names) > 0 {
		have = "it names " + strings.Join(names, ", ")
	}
	return 0, fmt.Errorf("port %q: pod %s has no %s port of that name (%s)", name, dst.Name, ProtoName(proto), have)
}

// ExplainOptions are the arguments of `bulkhead policy explain`.
type ExplainOptions struct {
	Store, From, To string
	// Port is a number or a named port of the destination pod.
	Port     string
	Protocol string
	Output   string // "" or "text", or "json"
}

// Explain writes the verdict for one connection.
func Explain(o ExplainOptions, w io.Writer) error {
	proto, ok := ParseProto(o.Protocol)
	if !ok {
		return fmt.Errorf("protocol %q: want TCP, UDP or SCTP", o.Protocol)
	}
	off, err := LoadOffline(o.Store)
	if err != nil {
		return err
	}
	src, err := off.Peer(o.From)
	if err != nil {
		return fmt.Errorf("--from: %w", err)
	}
	dst, err := off.Peer(o.To)
	if err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	port, err := off.ResolvePort(o.To, o.Port, proto)
	if err != nil {
		return fmt.Errorf("--port: %w", err)
	}
	r := off.Verdict(src, dst, proto, port)
	switch o.Output {
	case "", "text":
		_, err = io.WriteString(w, Text(r))
	case "json":
		err = writeJSON(w, r)
	default:
		return fmt.Errorf("output %q: want text or json", o.Output)
	}
	return err
}

// MatrixOptions are the arguments of `bulkhead policy matrix`.
type MatrixOptions struct {
	Store, Ports string
	Output       string // "" or "table", or "json"
}

// RunMatrix writes the truth table of every ordered pair of pods.
func RunMatrix(o MatrixOptions, w io.Writer) error {
	ports, err := ParsePorts(o.Ports)
	if err != nil {
		return fmt.Errorf("--ports: %w", err)
	}
	off, err := LoadOffline(o.Store)
	if err != nil {
		return err
	}
	cells := Matrix(off.MapState, off.Workloads, ports)
	switch o.Output {
	case "", "table":
		_, err = io.WriteString(w, Table(cells, off.Workloads, ports))
	case "json":
		err = writeJSON(w, cells)
	default:
		return fmt.Errorf("output %q: want table or json", o.Output)
	}
	return err
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("write json: %w", err)
	}
	return nil
}
