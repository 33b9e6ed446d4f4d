package author

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/explain"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

// ErrVerdictsChanged is returned by RunDiff with FailOnChange when some
// class of traffic changes verdict: the CLI's exit code then fails a CI job.
var ErrVerdictsChanged = errors.New("verdicts changed")

// State is one compiled store state: the snapshot (for the pods' labels)
// and its offline compilation (every pod local, so both ends are enforced).
type State struct {
	Name     string
	Snapshot *policy.Snapshot
	Offline  *explain.Offline
}

// LoadState loads and compiles a store folder. Like `policy explain`, it
// refuses a store with an invalid object: a diff that silently skipped a
// policy would mislead.
func LoadState(dir string) (*State, error) {
	res, err := store.Load(dir, store.Options{AllLocal: true})
	if err != nil {
		return nil, fmt.Errorf("load store %s: %w", dir, err)
	}
	return NewState(dir, res.Snapshot)
}

// NewState compiles a snapshot whose pods all have endpoint IDs.
func NewState(name string, s *policy.Snapshot) (*State, error) {
	o, err := explain.NewOffline(s)
	if err != nil {
		return nil, fmt.Errorf("compile store %s: %w", name, err)
	}
	return &State{Name: name, Snapshot: s, Offline: o}, nil
}

// Class is a set of peers that policy cannot tell apart: pods with the same
// namespace, labels, service account, named ports and address identities in
// both states, or one ipBlock prefix, or "world".
type Class struct {
	// Kind is "pod", "cidr" or "world"; impact also groups by "addr", one
	// address that is not a pod's (in CIDR).
	Kind      string            `json:"kind"`
	Namespace string            `json:"namespace,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	// Pods are the members' names (ns/name), sorted.
	Pods []string `json:"pods,omitempty"`
	CIDR string   `json:"cidr,omitempty"`

	key  string
	addr netip.Addr // an external class's representative address
}

// String is what a person reads: "shop [app=db]", "cidr 10.96.0.0/12".
func (c *Class) String() string {
	switch c.Kind {
	case "cidr":
		return "cidr " + c.CIDR
	case "world":
		return "world (" + c.CIDR + ")"
	case "addr":
		return c.CIDR
	}
	return c.Namespace + " " + labelText(c.Labels)
}

func labelText(l map[string]string) string {
	var kv []string
	for _, k := range slices.Sorted(maps.Keys(l)) {
		kv = append(kv, k+"="+l[k])
	}
	return "[" + strings.Join(kv, ",") + "]"
}

// Outcome is one state's answer for a class of traffic.
type Outcome struct {
	// Verdict is "allow", "deny" or "audit".
	Verdict string `json:"verdict"`
	// Reason names what decided each side that matters: the sides that
	// drop it, or every enforced side when it passes.
	Reason  string       `json:"reason"`
	Egress  explain.Side `json:"egress"`
	Ingress explain.Side `json:"ingress"`
	rules   []string     // for comparing outcomes
}

// Change is a class of traffic whose verdict differs between the states.
type Change struct {
	From     *Class  `json:"from"`
	To       *Class  `json:"to"`
	Protocol string  `json:"protocol"`
	PortLo   uint16  `json:"port"`
	PortHi   uint16  `json:"end_port"`
	Old      Outcome `json:"old"`
	New      Outcome `json:"new"`
	proto    uint8
}

// Ports renders the port range: "5432/TCP" or "1-52/TCP".
func (c *Change) Ports() string {
	if c.PortLo == c.PortHi {
		return fmt.Sprintf("%d/%s", c.PortLo, c.Protocol)
	}
	return fmt.Sprintf("%d-%d/%s", c.PortLo, c.PortHi, c.Protocol)
}

// Diff is the semantic difference of two states.
type Diff struct {
	Old     string   `json:"old"`
	New     string   `json:"new"`
	Changes []Change `json:"changes"`
	// OnlyOld and OnlyNew are the pods present in one state only; traffic
	// to and from them is not compared.
	OnlyOld []string `json:"only_old"`
	OnlyNew []string `json:"only_new"`
}

var diffProtos = []uint8{policy.ProtoTCP, policy.ProtoUDP, policy.ProtoSCTP}

// Compare decides every class of traffic in both states and returns those
// whose combined verdict differs. Classes: pods grouped by what policy can
// see of them; the ipBlock prefixes of either state; and the world. Ports:
// the intervals between the port boundaries of every compiled entry of
// either state, per protocol, so that every port of an interval gets the
// same answer and one lookup stands for all of them.
func Compare(oldS, newS *State) *Diff {
	d := &Diff{Old: oldS.Name, New: newS.Name, Changes: []Change{}, OnlyOld: []string{}, OnlyNew: []string{}}
	pods, onlyOld, onlyNew := podClasses(oldS, newS)
	d.OnlyOld, d.OnlyNew = onlyOld, onlyNew
	ext := externalClasses(oldS, newS)
	msO, msN := oldS.Offline.MapState, newS.Offline.MapState
	type pair struct{ from, to *Class }
	var pairs []pair
	for _, a := range pods {
		for _, b := range pods {
			pairs = append(pairs, pair{a, b})
		}
		for _, e := range ext {
			pairs = append(pairs, pair{a, e}, pair{e, a})
		}
	}
	bc := boundsCache{}
	for _, proto := range diffProtos {
		for _, p := range pairs {
			if p.from == p.to && len(p.from.Pods) == 1 {
				continue // a pod to itself does not cross its veth
			}
			srcO, srcN, ok1 := peers(p.from, oldS, newS)
			dstO, dstN, ok2 := peers(p.to, oldS, newS)
			// No packet crosses address families: an external class of a
			// family the pod lacks has no traffic with it.
			if !ok1 || !ok2 || !shareFamily(srcO, dstO) || !shareFamily(srcN, dstN) {
				continue
			}
			bounds := bc.pair(proto, []sideOf{{msO, srcO.Endpoint, policy.Egress}, {msN, srcN.Endpoint, policy.Egress},
				{msO, dstO.Endpoint, policy.Ingress}, {msN, dstN.Endpoint, policy.Ingress}})
			prev := -1 // the change the last interval made, if it made one
			for i, lo := range bounds {
				hi := uint16(65535)
				if i+1 < len(bounds) {
					hi = bounds[i+1] - 1
				}
				ro := explain.Verdict(msO, srcO, dstO, proto, lo)
				rn := explain.Verdict(msN, srcN, dstN, proto, lo)
				if ro.Combined == rn.Combined {
					prev = -1
					continue
				}
				c := Change{From: p.from, To: p.to, Protocol: explain.ProtoName(proto), PortLo: lo, PortHi: hi,
					Old: outcomeOf(ro), New: outcomeOf(rn), proto: proto}
				// Adjacent intervals with the same answers read as one range.
				if prev >= 0 && sameOutcome(d.Changes[prev].Old, c.Old) && sameOutcome(d.Changes[prev].New, c.New) {
					d.Changes[prev].PortHi = hi
					continue
				}
				d.Changes = append(d.Changes, c)
				prev = len(d.Changes) - 1
			}
		}
	}
	slices.SortStableFunc(d.Changes, func(a, b Change) int {
		return cmp.Or(cmp.Compare(a.From.key, b.From.key), cmp.Compare(a.To.key, b.To.key),
			cmp.Compare(a.proto, b.proto), cmp.Compare(a.PortLo, b.PortLo))
	})
	return d
}

// podClasses groups the pods present in both states. The key holds all
// that policy matches on, and the identities each pod's addresses get in
// both states (an ipBlock can cover one pod of a label set and not another).
func podClasses(oldS, newS *State) (classes []*Class, onlyOld, onlyNew []string) {
	byName := func(s *State) map[string]policy.Pod {
		m := map[string]policy.Pod{}
		for _, p := range s.Snapshot.Pods {
			m[p.Namespace+"/"+p.Name] = p
		}
		return m
	}
	po, pn := byName(oldS), byName(newS)
	byKey := map[string]*Class{}
	for _, name := range slices.Sorted(maps.Keys(po)) {
		a := po[name]
		b, ok := pn[name]
		if !ok {
			onlyOld = append(onlyOld, name)
			continue
		}
		key := fmt.Sprintf("%s %s|%s %s|%v %v|%s|%s", a.Namespace, labelText(a.Labels), labelText(b.Labels), a.ServiceAccount+","+b.ServiceAccount,
			a.Ports, b.Ports, addrIDs(oldS.Offline.MapState, a.IPs), addrIDs(newS.Offline.MapState, b.IPs))
		c := byKey[key]
		if c == nil {
			c = &Class{Kind: "pod", Namespace: a.Namespace, Labels: a.Labels, key: key}
			if !maps.Equal(a.Labels, b.Labels) {
				// Relabelled: show the new labels; the key keeps both.
				c.Labels = b.Labels
			}
			byKey[key] = c
			classes = append(classes, c)
		}
		c.Pods = append(c.Pods, name)
	}
	for _, name := range slices.Sorted(maps.Keys(pn)) {
		if _, ok := po[name]; !ok {
			onlyNew = append(onlyNew, name)
		}
	}
	for _, c := range classes {
		// Order by what people read, then by members.
		c.key = c.String() + "\x00" + strings.Join(c.Pods, ",")
	}
	slices.SortFunc(classes, func(a, b *Class) int { return cmp.Compare(a.key, b.key) })
	return classes, orEmpty(onlyOld), orEmpty(onlyNew)
}

func orEmpty(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func addrIDs(ms *policy.MapState, ips []netip.Addr) string {
	var b strings.Builder
	for _, ip := range ips {
		fmt.Fprintf(&b, "%d,", ms.ResolveIP(ip))
	}
	return b.String()
}

// externalClasses are the ipBlock prefixes of either state, each with an
// address that no more specific prefix of either state covers, and the
// world (an address no prefix covers), per address family.
func externalClasses(oldS, newS *State) []*Class {
	set := map[netip.Prefix]bool{}
	for _, ms := range []*policy.MapState{oldS.Offline.MapState, newS.Offline.MapState} {
		for p, id := range ms.IPCache {
			if id >= identity.MinCIDRID {
				set[p.Masked()] = true
			}
		}
	}
	prefixes := slices.SortedFunc(maps.Keys(set), func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	deepest := func(a netip.Addr) (netip.Prefix, bool) {
		best, found := netip.Prefix{}, false
		for _, p := range prefixes {
			if p.Contains(a) && (!found || p.Bits() > best.Bits()) {
				best, found = p, true
			}
		}
		return best, found
	}
	var out []*Class
	for _, p := range prefixes {
		for _, a := range []netip.Addr{p.Addr(), lastAddr(p)} {
			if d, ok := deepest(a); ok && d == p {
				out = append(out, &Class{Kind: "cidr", CIDR: p.String(), key: "\xffcidr " + p.String(), addr: a})
				break
			}
		}
	}
	// Documentation ranges first: they are the least likely to be in a
	// real ipBlock.
	for _, cands := range [][]string{
		{"192.0.2.1", "198.51.100.1", "203.0.113.1", "1.1.1.1", "9.9.9.9"},
		{"2001:db8::1", "2001:db8:ffff::1", "2606:4700::1"},
	} {
		for _, s := range cands {
			a := netip.MustParseAddr(s)
			if _, ok := deepest(a); !ok {
				out = append(out, &Class{Kind: "world", CIDR: a.String(), key: "\xffworld " + a.String(), addr: a})
				break
			}
		}
	}
	return out
}

func shareFamily(a, b explain.Peer) bool {
	for _, x := range a.Addrs {
		for _, y := range b.Addrs {
			if x.Unmap().Is4() == y.Unmap().Is4() {
				return true
			}
		}
	}
	return false
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// peers are a class's representative in both states. An external class
// resolves through each state's ipcache; a pod class is its first member.
func peers(c *Class, oldS, newS *State) (explain.Peer, explain.Peer, bool) {
	if c.Kind != "pod" {
		return explain.PeerOfAddr(oldS.Offline.MapState, c.addr), explain.PeerOfAddr(newS.Offline.MapState, c.addr), true
	}
	po, err1 := oldS.Offline.Peer(c.Pods[0])
	pn, err2 := newS.Offline.Peer(c.Pods[0])
	return po, pn, err1 == nil && err2 == nil
}

// sideOf is one end's entries that a verdict reads: the endpoint's, in one
// direction, in one state.
type sideOf struct {
	ms  *policy.MapState
	ep  policy.EndpointID
	dir policy.Direction
}

type boundsKey struct {
	side  sideOf
	proto uint8
}

// boundsCache holds each side's port boundaries.
type boundsCache map[boundsKey][]uint16

// pair returns the first ports of the intervals on which none of the
// sides' entries changes its mind: 1, and every entry's low end and one
// past its high end. A verdict reads only the source's egress entries and
// the destination's ingress entries, so on each interval every port gets
// the answer its first port gets.
func (bc boundsCache) pair(proto uint8, sides []sideOf) []uint16 {
	set := map[uint16]bool{1: true}
	for _, s := range sides {
		for _, b := range bc.side(s, proto) {
			set[b] = true
		}
	}
	return slices.Sorted(maps.Keys(set))
}

func (bc boundsCache) side(s sideOf, proto uint8) []uint16 {
	k := boundsKey{s, proto}
	if b, ok := bc[k]; ok {
		return b
	}
	var out []uint16
	if ep := s.ms.Endpoints[s.ep]; s.ep != 0 && ep != nil {
		for _, e := range ep.Entries {
			if e.Direction != s.dir || (e.Proto != 0 && e.Proto != proto) {
				continue
			}
			if e.PortLo > 0 {
				out = append(out, e.PortLo)
			}
			if e.PortHi < 65535 {
				out = append(out, e.PortHi+1)
			}
		}
	}
	bc[k] = out
	return out
}

func outcomeOf(r explain.Result) Outcome {
	o := Outcome{Verdict: r.Combined, Egress: r.Egress, Ingress: r.Ingress}
	var parts []string
	for _, s := range []struct {
		name string
		side explain.Side
	}{{"egress", r.Egress}, {"ingress", r.Ingress}} {
		if !s.side.Enforced {
			continue
		}
		if r.Combined != "allow" && s.side.Verdict == "allow" {
			continue // it passes here; the other side decided
		}
		parts = append(parts, s.name+" "+sideReason(s.side))
	}
	if len(parts) == 0 {
		parts = append(parts, "no policy selects either end")
	}
	o.Reason = strings.Join(parts, "; ")
	o.rules = parts
	return o
}

func sideReason(s explain.Side) string {
	if s.Rule == nil {
		if len(s.IsolatedBy) > 0 {
			return "default " + s.Default + " (isolated by " + strings.Join(s.IsolatedBy, ", ") + ")"
		}
		return "default " + s.Default
	}
	r := s.Rule
	t := fmt.Sprintf("%s %s/%s %s[%d] (%s)", r.Kind, r.Namespace, r.Name, r.Direction, r.Index, r.Action)
	if r.Audit {
		t += " [audit]"
	}
	if s.AuthRequired {
		t += " [plaintext: AUTH_REQUIRED]"
	}
	return t
}

func sameOutcome(a, b Outcome) bool { return a.Verdict == b.Verdict && slices.Equal(a.rules, b.rules) }
