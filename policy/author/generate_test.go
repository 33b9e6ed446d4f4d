package author

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/explain"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

// world is the shape of a generated cluster: pods in classes (same
// namespace, labels and service account), and addresses outside it.
type world struct {
	yaml    string
	pods    []testPod
	outside []netip.Addr
}

type testPod struct {
	ns, name, app, sa string
	ip                netip.Addr
}

func (p testPod) class() string { return p.ns + "/" + p.app }

// newWorld makes 3 namespaces and n pods; about a third of the pods share
// their class with another pod.
func newWorld(rng *rand.Rand, n int) *world {
	w := &world{}
	var b strings.Builder
	for i := range 3 {
		fmt.Fprintf(&b, "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ns%d, labels: {team: t%d}}\n", i, i)
	}
	for i := range n {
		p := testPod{ns: fmt.Sprintf("ns%d", rng.IntN(3)), name: fmt.Sprintf("p%d", i), app: fmt.Sprintf("a%d", i),
			ip: netip.AddrFrom4([4]byte{10, 0, byte(i / 250), byte(i%250 + 1)})}
		if i > 0 && rng.IntN(3) == 0 {
			// The same class as an earlier pod.
			q := w.pods[rng.IntN(len(w.pods))]
			p.ns, p.app = q.ns, q.app
		}
		p.sa = "sa-" + p.app
		w.pods = append(w.pods, p)
		fmt.Fprintf(&b, "---\napiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: %s, labels: {app: %s, pod-template-hash: h%d}}\nspec: {serviceAccountName: %s}\nstatus: {podIPs: [{ip: %s}]}\n",
			p.name, p.ns, p.app, i, p.sa, p.ip)
	}
	for i := range 4 {
		w.outside = append(w.outside, netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}))
	}
	w.yaml = b.String()
	return w
}

// conn is a connection between two ends: a pod (index) or an outside
// address (-1 - index).
type conn struct {
	src, dst int
	proto    uint8
	port     uint16
}

func (w *world) endpointJSON(i int) map[string]any {
	if i < 0 {
		return map[string]any{"identity": 2, "labels": []string{"reserved:world"}}
	}
	p := w.pods[i]
	return map[string]any{"identity": 300 + i, "namespace": p.ns, "pod_name": p.name,
		"labels": []string{"k8s:app=" + p.app, "k8s:io.kubernetes.pod.namespace=" + p.ns,
			"k8s:io.kubernetes.pod.serviceaccount=" + p.sa, fmt.Sprintf("k8s:pod-template-hash=h%d", i)},
		"spiffe_id": "spiffe://cluster.local/ns/" + p.ns + "/sa/" + p.sa}
}

func (w *world) addr(i int) netip.Addr {
	if i < 0 {
		return w.outside[-1-i]
	}
	return w.pods[i].ip
}

func (w *world) name(i int) string {
	if i < 0 {
		return w.outside[-1-i].String()
	}
	return w.pods[i].ns + "/" + w.pods[i].name
}

// flowLine is a flow record as the agent writes it.
func (w *world) flowLine(c conn, verdict, dir string, reply bool) string {
	l4 := map[string]any{}
	ports := map[string]any{"source_port": 40000, "destination_port": c.port}
	switch c.proto {
	case policy.ProtoTCP:
		l4["TCP"] = ports
	case policy.ProtoUDP:
		l4["UDP"] = ports
	default:
		l4["SCTP"] = ports
	}
	rec := map[string]any{"time": "2026-12-07T10:00:00Z", "verdict": verdict,
		"IP": map[string]any{"source": w.addr(c.src).String(), "destination": w.addr(c.dst).String(), "ipVersion": "IPv4"},
		"l4": l4, "source": w.endpointJSON(c.src), "destination": w.endpointJSON(c.dst), "Type": "L3_L4",
		"is_reply": reply, "traffic_direction": dir, "event_kind": "new"}
	data, _ := json.Marshal(rec)
	return string(data)
}

var testPorts = []struct {
	proto uint8
	port  uint16
}{{policy.ProtoTCP, 80}, {policy.ProtoTCP, 81}, {policy.ProtoTCP, 82}, {policy.ProtoTCP, 443}, {policy.ProtoUDP, 53}, {policy.ProtoSCTP, 9000}}

func (w *world) randomConn(rng *rand.Rand) conn {
	pick := func() int {
		if rng.IntN(6) == 0 {
			return -1 - rng.IntN(len(w.outside))
		}
		return rng.IntN(len(w.pods))
	}
	for {
		c := conn{src: pick(), dst: pick()}
		pp := testPorts[rng.IntN(len(testPorts))]
		c.proto, c.port = pp.proto, pp.port
		if (c.src >= 0 || c.dst >= 0) && c.src != c.dst {
			return c
		}
	}
}

// classKey is what generate cannot tell apart: a pod's class, or an
// outside address.
func (w *world) classKey(i int) string {
	if i < 0 {
		return "addr " + w.outside[-1-i].String()
	}
	return "pod " + w.pods[i].class()
}

// TestGenerateProperty: the policies generated from observed flows, applied
// to the same pods and namespaces with no other policy, allow every observed
// connection; a held-back connection that was not observed (at the class
// level) is denied exactly when its source class was seen sending or its
// destination class was seen receiving (the policies generate isolates),
// and allowed otherwise. Replies and dropped flows must not open anything.
func TestGenerateProperty(t *testing.T) {
	for seed := range uint64(12) {
		for _, spiffe := range []bool{false, true} {
			t.Run(fmt.Sprintf("seed%d/spiffe=%v", seed, spiffe), func(t *testing.T) {
				checkGenerated(t, seed, spiffe)
			})
		}
	}
}

func checkGenerated(t *testing.T, seed uint64, spiffe bool) {
	rng := rand.New(rand.NewPCG(seed, 16))
	w := newWorld(rng, 6+rng.IntN(20))
	var observed, heldBack []conn
	for range 10 + rng.IntN(40) {
		observed = append(observed, w.randomConn(rng))
	}
	seenTriple := map[string]bool{}
	sends, receives := map[string]bool{}, map[string]bool{}
	for _, c := range observed {
		seenTriple[fmt.Sprint(w.classKey(c.src), w.classKey(c.dst), c.proto, c.port)] = true
		sends[w.classKey(c.src)] = true
		receives[w.classKey(c.dst)] = true
	}
	for range 60 {
		c := w.randomConn(rng)
		if !seenTriple[fmt.Sprint(w.classKey(c.src), w.classKey(c.dst), c.proto, c.port)] {
			heldBack = append(heldBack, c)
		}
	}
	var log strings.Builder
	for _, c := range observed {
		verdict := "FORWARDED"
		if rng.IntN(4) == 0 {
			verdict = "AUDIT"
		}
		// Each end that is a pod reports the connection.
		if c.src >= 0 {
			fmt.Fprintln(&log, w.flowLine(c, verdict, "EGRESS", false))
		}
		if c.dst >= 0 {
			fmt.Fprintln(&log, w.flowLine(c, verdict, "INGRESS", false))
		}
		rev := conn{src: c.dst, dst: c.src, proto: c.proto, port: 40000}
		fmt.Fprintln(&log, w.flowLine(rev, verdict, "INGRESS", true))
	}
	for _, c := range heldBack[:len(heldBack)/3] {
		fmt.Fprintln(&log, w.flowLine(c, "DROPPED", "INGRESS", false))
	}

	var out bytes.Buffer
	gen, err := RunGenerate(GenerateOptions{SPIFFE: spiffe}, strings.NewReader(log.String()), "flows.json", &out)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := store.Parse("store.yaml", []byte(w.yaml))
	if err != nil {
		t.Fatal(err)
	}
	genObjs, err := store.Parse("generated.yaml", out.Bytes())
	if err != nil {
		t.Fatalf("generated YAML does not load: %v\n%s", err, out.String())
	}
	res, err := store.Build(append(objs, genObjs...), store.Options{AllLocal: true})
	if err != nil {
		t.Fatalf("generated policies are invalid: %v\n%s", err, out.String())
	}
	off, err := explain.NewOffline(res.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	verdict := func(c conn) explain.Result {
		src, err1 := off.Peer(w.name(c.src))
		dst, err2 := off.Peer(w.name(c.dst))
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		return explain.Verdict(off.MapState, src, dst, c.proto, c.port)
	}
	for _, c := range observed {
		if r := verdict(c); r.Combined != "allow" {
			t.Errorf("observed %s -> %s %d/%d is %s:\n%s\n%s", w.name(c.src), w.name(c.dst), c.port, c.proto, r.Combined, explain.Text(r), out.String())
		}
	}
	allowed, denied := 0, 0
	for _, c := range heldBack {
		r := verdict(c)
		wantDeny := sends[w.classKey(c.src)] && c.src >= 0 || receives[w.classKey(c.dst)] && c.dst >= 0
		if got := r.Combined == "deny"; got != wantDeny {
			t.Errorf("held back %s -> %s %d/%d: got %s, want deny=%v\n%s", w.name(c.src), w.name(c.dst), c.port, c.proto, r.Combined, wantDeny, explain.Text(r))
		}
		if r.Combined == "deny" {
			denied++
		} else {
			allowed++
		}
	}
	t.Logf("%d pods, %d observed connections -> %d policies; held back: %d allowed, %d denied",
		len(w.pods), gen.Stats.Connections, gen.Stats.Policies, allowed, denied)
	if gen.Stats.Dropped != len(heldBack)/3 || gen.Stats.Replies != len(observed) {
		t.Errorf("stats %+v: want %d dropped and %d replies left out", gen.Stats, len(heldBack)/3, len(observed))
	}
}

func TestGenerateOptions(t *testing.T) {
	for _, o := range []GenerateOptions{{Mode: "Audit"}, {Mode: "Enforce"}, {SPIFFE: true, Mode: "audit"}, {SPIFFE: true, Mode: "Staged"}} {
		var out bytes.Buffer
		if _, err := RunGenerate(o, strings.NewReader(goodLine), "f", &out); !errors.Is(err, ErrBadOptions) || out.Len() != 0 {
			t.Errorf("%+v: got %v and %d bytes, want ErrBadOptions and nothing written", o, err, out.Len())
		}
	}
	if err := (&GenerateOptions{SPIFFE: true, Mode: "Audit"}).Validate(); err != nil {
		t.Fatal(err)
	}
	// A namespace nothing was seen in, or a log of replies only, is an
	// error, not an empty file.
	var out bytes.Buffer
	reply := strings.Replace(goodLine, `"is_reply":false`, `"is_reply":true`, 1)
	for _, tc := range []struct {
		o   GenerateOptions
		log string
	}{{GenerateOptions{Namespace: "nope"}, goodLine}, {GenerateOptions{}, reply}, {GenerateOptions{}, ""}} {
		if _, err := RunGenerate(tc.o, strings.NewReader(tc.log), "f", &out); !errors.Is(err, ErrNothingObserved) || out.Len() != 0 {
			t.Errorf("%+v %q: got %v", tc.o, tc.log, err)
		}
	}
}

// twoWay: frontend calls api on 80, 81, 82 and 443, and so does ops/probe
// (same ports: one rule for both); api calls 192.0.2.7 on 53/UDP.
func twoWay(t *testing.T) *FlowInput {
	t.Helper()
	w := &world{pods: []testPod{
		{ns: "shop", name: "frontend-1", app: "frontend", sa: "web", ip: netip.MustParseAddr("10.0.0.1")},
		{ns: "shop", name: "api-1", app: "api", sa: "api", ip: netip.MustParseAddr("10.0.0.2")},
		{ns: "ops", name: "probe-1", app: "probe", sa: "probe", ip: netip.MustParseAddr("10.0.0.3")},
	}, outside: []netip.Addr{netip.MustParseAddr("192.0.2.7")}}
	var log strings.Builder
	for _, src := range []int{0, 2} {
		for _, port := range []uint16{80, 81, 82, 443} {
			fmt.Fprintln(&log, w.flowLine(conn{src: src, dst: 1, proto: policy.ProtoTCP, port: port}, "FORWARDED", "EGRESS", false))
		}
	}
	fmt.Fprintln(&log, w.flowLine(conn{src: 1, dst: -1, proto: policy.ProtoUDP, port: 53}, "FORWARDED", "EGRESS", false))
	in, err := ReadFlows(strings.NewReader(log.String()), "f")
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func TestGenerateMergesPortsAndPeers(t *testing.T) {
	g, err := Generate(twoWay(t), GenerateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var api *networkingv1.NetworkPolicy
	for _, np := range g.NetworkPolicies {
		if np.Name == "gen-api" {
			api = np
		}
	}
	if api == nil || len(g.NetworkPolicies) != 3 {
		t.Fatalf("want gen-api, gen-frontend (egress) and gen-probe (egress): %v", g.NetworkPolicies)
	}
	in := api.Spec.Ingress
	if len(in) != 1 || len(in[0].From) != 2 || len(in[0].Ports) != 2 {
		t.Fatalf("want one rule, two peers, ports 80-82 and 443: %+v", in)
	}
	p := in[0].Ports[0]
	if p.Port.IntValue() != 80 || p.EndPort == nil || *p.EndPort != 82 || in[0].Ports[1].Port.IntValue() != 443 || in[0].Ports[1].EndPort != nil {
		t.Fatalf("ports %+v", in[0].Ports)
	}
	// ops/probe is in another namespace: selected by its name label too.
	var probe *networkingv1.NetworkPolicyPeer
	for i := range in[0].From {
		if in[0].From[i].NamespaceSelector != nil {
			probe = &in[0].From[i]
		}
	}
	if probe == nil || probe.NamespaceSelector.MatchLabels[policy.NamespaceNameLabel] != "ops" || probe.PodSelector.MatchLabels["app"] != "probe" {
		t.Fatalf("peer in ops: %+v", in[0].From)
	}
	if eg := api.Spec.Egress; len(eg) != 1 || eg[0].To[0].IPBlock == nil || eg[0].To[0].IPBlock.CIDR != "192.0.2.7/32" {
		t.Fatalf("egress %+v", eg)
	}
}

func TestGenerateScope(t *testing.T) {
	for _, tc := range []struct {
		o    GenerateOptions
		want []string // name and policy types
	}{
		{GenerateOptions{Ingress: true}, []string{"shop/gen-api [Ingress]"}},
		{GenerateOptions{Egress: true}, []string{"shop/gen-api [Egress]", "shop/gen-frontend [Egress]", "ops/gen-probe [Egress]"}},
		{GenerateOptions{Namespace: "ops"}, []string{"ops/gen-probe [Egress]"}},
		{GenerateOptions{Namespace: "shop", Ingress: true, Egress: true}, []string{"shop/gen-api [Ingress Egress]", "shop/gen-frontend [Egress]"}},
	} {
		g, err := Generate(twoWay(t), tc.o)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, np := range g.NetworkPolicies {
			got = append(got, fmt.Sprintf("%s/%s %v", np.Namespace, np.Name, np.Spec.PolicyTypes))
			if tc.o.Namespace != "" && np.Namespace != tc.o.Namespace {
				t.Errorf("%+v: policy outside the namespace: %s", tc.o, np.Name)
			}
		}
		slices.Sort(got)
		slices.Sort(tc.want)
		if !slices.Equal(got, tc.want) {
			t.Errorf("%+v: got %v, want %v", tc.o, got, tc.want)
		}
	}
}

// TestGenerateBulkheadPolicyLimits: a workload seen from 70 addresses on
// 70 scattered ports each gets its rules split to fit the CRD's limits (64
// rules, 64 ports a rule, 32 peers a rule), and still allows every one.
func TestGenerateBulkheadPolicyLimits(t *testing.T) {
	w := &world{pods: []testPod{{ns: "shop", name: "api-1", app: "api", sa: "api", ip: netip.MustParseAddr("10.0.0.2")}}}
	for i := range 70 {
		w.outside = append(w.outside, netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}))
	}
	var log strings.Builder
	var observed []conn
	for i := range 70 {
		// Peer i is seen on its own port set, so no two peers share a rule.
		for j := range 70 {
			c := conn{src: -1 - i, dst: 0, proto: policy.ProtoTCP, port: uint16(1000 + 2*j + 200*i)}
			if j == 69 {
				c.port = uint16(30000 + i) // makes each peer's set distinct
			}
			observed = append(observed, c)
			fmt.Fprintln(&log, w.flowLine(c, "FORWARDED", "INGRESS", false))
		}
	}
	var out bytes.Buffer
	g, err := RunGenerate(GenerateOptions{SPIFFE: true, Ingress: true}, strings.NewReader(log.String()), "f", &out)
	if err != nil {
		t.Fatal(err)
	}
	if len(g.BulkheadPolicies) < 2 {
		t.Fatalf("want the rules split over policies, got %d", len(g.BulkheadPolicies))
	}
	for _, bp := range g.BulkheadPolicies {
		if len(bp.Spec.Ingress) > maxBHPRules {
			t.Errorf("%s: %d rules", bp.Name, len(bp.Spec.Ingress))
		}
		for _, r := range bp.Spec.Ingress {
			if len(r.Ports) > maxBHPPorts || len(r.From) > maxPeers {
				t.Errorf("%s: a rule with %d ports and %d peers", bp.Name, len(r.Ports), len(r.From))
			}
		}
	}
	objs, err := store.Parse("store.yaml", []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: api-1, namespace: shop, labels: {app: api}}\nspec: {serviceAccountName: api}\nstatus: {podIPs: [{ip: 10.0.0.2}]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	gen, err := store.Parse("gen.yaml", out.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	res, err := store.Build(append(objs, gen...), store.Options{AllLocal: true})
	if err != nil {
		t.Fatal(err)
	}
	off, err := explain.NewOffline(res.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	dst, _ := off.Peer("shop/api-1")
	for _, c := range observed {
		src, _ := off.Peer(w.name(c.src))
		if r := explain.Verdict(off.MapState, src, dst, c.proto, c.port); r.Combined != "allow" {
			t.Fatalf("%s -> api %d: %s", w.name(c.src), c.port, r.Combined)
		}
	}
	src, _ := off.Peer(w.name(-1))
	if r := explain.Verdict(off.MapState, src, dst, policy.ProtoTCP, 1001); r.Combined != "deny" {
		t.Fatalf("an unobserved port in the gaps: %s", r.Combined)
	}
}
