package author

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

// GenerateOptions are the choices of `bulkhead policy generate`.
type GenerateOptions struct {
	// Namespace, when set, limits the generated policies to workloads in
	// it (their peers may be anywhere).
	Namespace string
	// Ingress and Egress pick the directions; neither means both.
	Ingress, Egress bool
	// SPIFFE writes BulkheadPolicies that select pods and peers by SPIFFE
	// ID, instead of NetworkPolicies by labels.
	SPIFFE bool
	// Mode is "" or a BulkheadPolicy mode (Enforce, Audit); it needs SPIFFE.
	Mode string
}

// ErrBadOptions is wrapped by errors about option combinations.
var ErrBadOptions = errors.New("invalid options")

// Validate rejects combinations that cannot do what they say.
func (o *GenerateOptions) Validate() error {
	switch v1alpha1.Mode(o.Mode) {
	case "":
	case v1alpha1.ModeAudit, v1alpha1.ModeEnforce:
		if !o.SPIFFE {
			return fmt.Errorf("--mode %s: NetworkPolicy has no mode; add --spiffe to write BulkheadPolicies, which do: %w", o.Mode, ErrBadOptions)
		}
	default:
		return fmt.Errorf("--mode %q: want Audit or Enforce: %w", o.Mode, ErrBadOptions)
	}
	return nil
}

func (o *GenerateOptions) directions() (ingress, egress bool) {
	if !o.Ingress && !o.Egress {
		return true, true
	}
	return o.Ingress, o.Egress
}

// GenerateStats say what generate read and left out, and why.
type GenerateStats struct {
	Records     int `json:"records"`
	Connections int `json:"connections"`
	Policies    int `json:"policies"`
	// Left out: replies (they ride conntrack), dropped flows (the
	// generated policy allows what was let through, not what was tried),
	// ICMP (NetworkPolicy cannot say it), and connections whose workload is
	// outside --namespace.
	Replies, Dropped, ICMP, OutOfScope int
	LostMarkers                        int
}

// Generated is the result of Generate: NetworkPolicies or BulkheadPolicies.
type Generated struct {
	NetworkPolicies  []*networkingv1.NetworkPolicy
	BulkheadPolicies []*v1alpha1.BulkheadPolicy
	Stats            GenerateStats
	// Connections are the distinct observed connections the policies
	// allow (a pod at either end), for checking them.
	Connections []Connection
}

// Connection is one observed (source, destination, protocol, port).
type Connection struct {
	Source, Dest FlowPeer
	Proto        uint8
	Port         uint16
}

type portProto struct {
	proto uint8
	port  uint16
}

// gpeer is a class of peer: pods with one namespace and label set (or one
// SPIFFE ID), or one address.
type gpeer struct {
	key       string
	namespace string
	labels    map[string]string
	spiffeID  string
	addr      netip.Addr
}

func (g *gpeer) isPod() bool { return g.namespace != "" }

// sideRules is what one direction of one workload class allows: per peer
// class, the ports.
type sideRules struct {
	peers map[string]*gpeer
	ports map[string]map[portProto]bool
}

func (s *sideRules) add(p *gpeer, pp portProto) {
	if s.peers == nil {
		s.peers, s.ports = map[string]*gpeer{}, map[string]map[portProto]bool{}
	}
	s.peers[p.key] = p
	if s.ports[p.key] == nil {
		s.ports[p.key] = map[portProto]bool{}
	}
	s.ports[p.key][pp] = true
}

type workload struct {
	class           *gpeer
	ingress, egress sideRules
}

// Generate writes policies that allow exactly the observed connections
// between classes: every forwarded or audited connection (not replies, not
// drops, not ICMP) with a pod at the end being selected. A workload class
// gets a policy for a direction only when it was seen in that direction.
func Generate(in *FlowInput, o GenerateOptions) (*Generated, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	wantIn, wantEg := o.directions()
	g := &Generated{Stats: GenerateStats{Records: len(in.Records), LostMarkers: in.LostMarkers}}
	classes := map[string]*gpeer{}
	workloads := map[string]*workload{}
	seen := map[string]bool{}
	for i := range in.Records {
		r := &in.Records[i]
		switch {
		case r.IsReply:
			g.Stats.Replies++
			continue
		case r.Verdict == "DROPPED":
			g.Stats.Dropped++
			continue
		case r.ICMP:
			g.Stats.ICMP++
			continue
		}
		src, err := classOf(classes, &r.Source, o.SPIFFE)
		if err != nil {
			return nil, fmt.Errorf("line %d: source: %w", r.Line, err)
		}
		dst, err := classOf(classes, &r.Dest, o.SPIFFE)
		if err != nil {
			return nil, fmt.Errorf("line %d: destination: %w", r.Line, err)
		}
		pp := portProto{r.Proto, r.Port}
		// Each connection is reported at both ends (egress and ingress).
		ck := fmt.Sprintf("%s\x00%s\x00%d/%d\x00%s\x00%s", src.key, dst.key, pp.proto, pp.port, r.Source.Addr, r.Dest.Addr)
		used := false
		if wantEg && src.isPod() && inScope(src, o) {
			workloadOf(workloads, src).egress.add(dst, pp)
			used = true
		}
		if wantIn && dst.isPod() && inScope(dst, o) {
			workloadOf(workloads, dst).ingress.add(src, pp)
			used = true
		}
		if !used {
			g.Stats.OutOfScope++
			continue
		}
		if !seen[ck] {
			seen[ck] = true
			g.Connections = append(g.Connections, Connection{Source: r.Source, Dest: r.Dest, Proto: r.Proto, Port: r.Port})
		}
	}
	g.Stats.Connections = len(g.Connections)
	names := map[string]bool{}
	for _, k := range slices.Sorted(maps.Keys(workloads)) {
		w := workloads[k]
		name := uniqueName(names, w.class)
		var in, eg []rule
		if wantIn && w.ingress.peers != nil {
			in = rulesOf(&w.ingress)
		}
		if wantEg && w.egress.peers != nil {
			eg = rulesOf(&w.egress)
		}
		if o.SPIFFE {
			g.BulkheadPolicies = append(g.BulkheadPolicies, bulkheadPolicies(names, name, w.class, in, eg, o.Mode)...)
		} else {
			g.NetworkPolicies = append(g.NetworkPolicies, networkPolicy(name, w.class, in, eg))
		}
	}
	g.Stats.Policies = len(g.NetworkPolicies) + len(g.BulkheadPolicies)
	return g, nil
}

func inScope(c *gpeer, o GenerateOptions) bool {
	return o.Namespace == "" || c.namespace == o.Namespace
}

func workloadOf(m map[string]*workload, c *gpeer) *workload {
	w := m[c.key]
	if w == nil {
		w = &workload{class: c}
		m[c.key] = w
	}
	return w
}

// Labels that change with every rollout: a selector on them would stop
// matching the next version of the same workload.
var rolloutLabels = []string{"pod-template-hash", "controller-revision-hash", "pod-template-generation",
	"statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index", "batch.kubernetes.io/controller-uid",
	"controller-uid", "batch.kubernetes.io/job-name", "job-name"}

func classOf(m map[string]*gpeer, p *FlowPeer, spiffe bool) (*gpeer, error) {
	var c gpeer
	switch {
	case p.IsPod() && spiffe:
		if p.SPIFFEID == "" {
			return nil, fmt.Errorf("pod %s/%s has no spiffe_id, and --spiffe selects by it", p.Namespace, p.Pod)
		}
		c = gpeer{key: "spiffe " + p.SPIFFEID, namespace: p.Namespace, spiffeID: p.SPIFFEID}
	case p.IsPod():
		l := maps.Clone(p.Labels)
		for _, k := range rolloutLabels {
			delete(l, k)
		}
		c = gpeer{key: "pod " + p.Namespace + " " + labelText(l), namespace: p.Namespace, labels: l}
	default:
		c = gpeer{key: "addr " + p.Addr.String(), addr: p.Addr}
	}
	if have := m[c.key]; have != nil {
		return have, nil
	}
	m[c.key] = &c
	return &c, nil
}

// rule is one generated rule: peers that were all seen on the same ports.
type rule struct {
	peers []*gpeer
	ports []portProto
}

// maxPeers keeps a rule within BulkheadPolicy's 32 peers; NetworkPolicy has
// no limit, and smaller rules read better too.
const maxPeers = 32

// rulesOf merges peers seen on exactly the same ports into one rule: a rule
// allows every peer on every port, so this merge adds nothing unobserved.
func rulesOf(s *sideRules) []rule {
	filling := map[string]*rule{} // by port set: the rule being filled
	var out []*rule
	for _, k := range slices.Sorted(maps.Keys(s.peers)) {
		ports := slices.SortedFunc(maps.Keys(s.ports[k]), func(a, b portProto) int {
			return cmp.Or(cmp.Compare(a.proto, b.proto), cmp.Compare(a.port, b.port))
		})
		sig := fmt.Sprint(ports)
		r := filling[sig]
		if r == nil || len(r.peers) == maxPeers {
			r = &rule{ports: ports}
			filling[sig] = r
			out = append(out, r)
		}
		r.peers = append(r.peers, s.peers[k])
	}
	rules := make([]rule, len(out))
	for i, r := range out {
		rules[i] = *r
	}
	return rules
}

// portRanges merges consecutive ports of one protocol into port..endPort,
// which allows exactly the same ports.
func portRanges(ports []portProto) []networkingv1.NetworkPolicyPort {
	var out []networkingv1.NetworkPolicyPort
	for i := 0; i < len(ports); {
		j := i
		for j+1 < len(ports) && ports[j+1].proto == ports[i].proto && ports[j+1].port == ports[j].port+1 {
			j++
		}
		proto := corev1Proto(ports[i].proto)
		p := intstr.FromInt32(int32(ports[i].port))
		np := networkingv1.NetworkPolicyPort{Protocol: &proto, Port: &p}
		if j > i {
			end := int32(ports[j].port)
			np.EndPort = &end
		}
		out = append(out, np)
		i = j + 1
	}
	return out
}

func hostPrefix(a netip.Addr) string { return netip.PrefixFrom(a, a.BitLen()).String() }

func npPeer(policyNS string, c *gpeer) networkingv1.NetworkPolicyPeer {
	if !c.isPod() {
		return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: hostPrefix(c.addr)}}
	}
	p := networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: c.labels}}
	if c.namespace != policyNS {
		p.NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{policy.NamespaceNameLabel: c.namespace}}
	}
	return p
}

func networkPolicy(name string, c *gpeer, in, eg []rule) *networkingv1.NetworkPolicy {
	np := &networkingv1.NetworkPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: c.namespace, Labels: map[string]string{generatedLabel: "bulkhead"}},
		Spec:       networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: c.labels}},
	}
	if in != nil {
		np.Spec.PolicyTypes = append(np.Spec.PolicyTypes, networkingv1.PolicyTypeIngress)
		for _, r := range in {
			nr := networkingv1.NetworkPolicyIngressRule{Ports: portRanges(r.ports)}
			for _, p := range r.peers {
				nr.From = append(nr.From, npPeer(c.namespace, p))
			}
			np.Spec.Ingress = append(np.Spec.Ingress, nr)
		}
	}
	if eg != nil {
		np.Spec.PolicyTypes = append(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress)
		for _, r := range eg {
			nr := networkingv1.NetworkPolicyEgressRule{Ports: portRanges(r.ports)}
			for _, p := range r.peers {
				nr.To = append(nr.To, npPeer(c.namespace, p))
			}
			np.Spec.Egress = append(np.Spec.Egress, nr)
		}
	}
	return np
}

func bhpPeer(c *gpeer) v1alpha1.Peer {
	if !c.isPod() {
		return v1alpha1.Peer{CIDR: hostPrefix(c.addr)}
	}
	return v1alpha1.Peer{SPIFFEID: c.spiffeID}
}

// BulkheadPolicy's CRD limits (types.go): rules per direction, and ports
// per rule. The compiler takes more; the apiserver does not.
const (
	maxBHPRules = 64
	maxBHPPorts = 64
)

// bulkheadPolicies writes one BulkheadPolicy, or several when the rules do
// not fit the CRD's limits: ports are split across rules with the same
// peers, rules across policies with the same selector (all of one
// workload's policies together allow the union of their rules).
func bulkheadPolicies(names map[string]bool, name string, c *gpeer, in, eg []rule, mode string) []*v1alpha1.BulkheadPolicy {
	var ins []v1alpha1.IngressRule
	for _, r := range in {
		for _, ports := range chunks(portRanges(r.ports), maxBHPPorts) {
			ir := v1alpha1.IngressRule{RuleCommon: v1alpha1.RuleCommon{Ports: ports}}
			for _, p := range r.peers {
				ir.From = append(ir.From, bhpPeer(p))
			}
			ins = append(ins, ir)
		}
	}
	var egs []v1alpha1.EgressRule
	for _, r := range eg {
		for _, ports := range chunks(portRanges(r.ports), maxBHPPorts) {
			er := v1alpha1.EgressRule{RuleCommon: v1alpha1.RuleCommon{Ports: ports}}
			for _, p := range r.peers {
				er.To = append(er.To, bhpPeer(p))
			}
			egs = append(egs, er)
		}
	}
	inChunks, egChunks := chunks(ins, maxBHPRules), chunks(egs, maxBHPRules)
	var out []*v1alpha1.BulkheadPolicy
	for i := range max(len(inChunks), len(egChunks)) {
		n := name
		if i > 0 {
			n = uniqueName(names, c)
		}
		bp := &v1alpha1.BulkheadPolicy{
			TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.APIVersion, Kind: "BulkheadPolicy"},
			ObjectMeta: metav1.ObjectMeta{Name: n, Namespace: c.namespace, Labels: map[string]string{generatedLabel: "bulkhead"}},
			Spec:       v1alpha1.BulkheadPolicySpec{Selector: v1alpha1.Selector{SPIFFEID: c.spiffeID}, Mode: v1alpha1.Mode(mode)},
		}
		if i < len(inChunks) {
			bp.Spec.Ingress = inChunks[i]
		}
		if i < len(egChunks) {
			bp.Spec.Egress = egChunks[i]
		}
		out = append(out, bp)
	}
	return out
}

func chunks[T any](s []T, n int) [][]T {
	var out [][]T
	for len(s) > n {
		out = append(out, s[:n:n])
		s = s[n:]
	}
	if len(s) > 0 {
		out = append(out, s)
	}
	return out
}

// generatedLabel marks generated objects, so that they can be found
// (kubectl get netpol -l app.kubernetes.io/managed-by=bulkhead).
const generatedLabel = "app.kubernetes.io/managed-by"

// uniqueName is "gen-" and the class's label values (or service account)
// as a DNS label, unique among names already given.
func uniqueName(names map[string]bool, c *gpeer) string {
	var parts []string
	if c.spiffeID != "" {
		parts = append(parts, c.spiffeID[strings.LastIndex(c.spiffeID, "/")+1:])
	}
	for _, k := range slices.Sorted(maps.Keys(c.labels)) {
		parts = append(parts, c.labels[k])
	}
	base := dnsLabel("gen-" + strings.Join(parts, "-"))
	if len(parts) == 0 {
		base = "gen-all-pods"
	}
	if len(base) > 50 {
		sum := sha256.Sum256([]byte(c.key))
		base = strings.TrimRight(base[:40], "-") + "-" + hex.EncodeToString(sum[:4])
	}
	name := base
	for i := 2; names[c.namespace+"/"+name]; i++ {
		name = fmt.Sprintf("%s-%d", base, i)
	}
	names[c.namespace+"/"+name] = true
	return name
}

func dnsLabel(s string) string {
	var b strings.Builder
	dash := false
	for _, r := range strings.ToLower(s) {
		ok := (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9')
		switch {
		case ok:
			b.WriteRune(r)
			dash = false
		case !dash:
			b.WriteByte('-')
			dash = true
		}
	}
	return strings.Trim(b.String(), "-")
}

func corev1Proto(p uint8) corev1.Protocol { return corev1.Protocol(explain.ProtoName(p)) }
