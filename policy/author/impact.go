package author

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"

	"github.com/bulkhead-io/bulkhead/policy/explain"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

// ErrFlowsDropped is returned by RunImpact with FailOnDrop when the change
// would drop some replayed flow that the current state passes.
var ErrFlowsDropped = errors.New("the change drops observed flows")

// ErrEmptyChange says that the proposed change holds no object.
var ErrEmptyChange = errors.New("the change holds no object")

// Proposal is the current state of a store and the state a change would
// make of it.
type Proposal struct {
	Current, Proposed *State
	// Replaced and Added are the objects of the change ("Kind ns/name")
	// that replace an object of the store, and that are new to it.
	Replaced []string `json:"replaced"`
	Added    []string `json:"added"`
}

// LoadProposal loads the store folder dir and applies a change to it: the
// objects of the change's files and folders (ParsePaths) replace the store's
// objects of the same kind, namespace and name, and are added otherwise. A
// change cannot remove an object. Any invalid object, in the store or the
// change, or two objects of one kind, namespace and name in the change, is
// an error naming its file and line, and nothing is compared.
func LoadProposal(dir string, change []string) (*Proposal, error) {
	cur, err := store.Load(dir, store.Options{AllLocal: true})
	if err != nil {
		return nil, fmt.Errorf("load store %s: %w", dir, err)
	}
	objs, err := store.ParsePaths(change)
	if err != nil {
		return nil, fmt.Errorf("load change: %w", err)
	}
	if len(objs) == 0 {
		return nil, fmt.Errorf("%v: %w", change, ErrEmptyChange)
	}
	byRef := map[string]bool{}
	for _, o := range objs {
		byRef[o.Ref()] = true
	}
	p := &Proposal{Replaced: []string{}, Added: []string{}}
	var merged []*store.Object
	inStore := map[string]bool{}
	for _, o := range cur.Objects {
		inStore[o.Ref()] = true
		if !byRef[o.Ref()] {
			merged = append(merged, o)
		}
	}
	for _, o := range objs {
		if inStore[o.Ref()] {
			p.Replaced = append(p.Replaced, o.Ref())
		} else {
			p.Added = append(p.Added, o.Ref())
		}
	}
	// Build rejects a ref twice in the change, with both places.
	res, err := store.Build(append(merged, objs...), store.Options{AllLocal: true})
	if err != nil {
		return nil, fmt.Errorf("apply change to %s: %w", dir, err)
	}
	if p.Current, err = NewState(dir, cur.Snapshot); err != nil {
		return nil, err
	}
	if p.Proposed, err = NewState(dir+" with the change", res.Snapshot); err != nil {
		return nil, err
	}
	return p, nil
}

// ImpactChange is a group of replayed flows whose verdict the change
// alters: one source and destination workload, protocol and port.
type ImpactChange struct {
	Change
	// Flows counts the flow records of the group. A connection between
	// two pods of one node is logged at both ends: two records.
	Flows int `json:"flows"`
}

// Impact is what a change does to a set of observed flows.
type Impact struct {
	Store    string   `json:"store"`
	Replaced []string `json:"replaced"`
	Added    []string `json:"added"`
	// Records is every flow record read; Replayed those judged in both
	// states. Not replayed: replies (conntrack passes them whatever the
	// policy), ICMP (policy does not match it), and flows with a pod end
	// that is not in the store (NotInStore names those pods).
	Records     int      `json:"records"`
	Replayed    int      `json:"replayed"`
	Replies     int      `json:"replies"`
	ICMP        int      `json:"icmp"`
	NotInStore  int      `json:"not_in_store"`
	MissingPods []string `json:"missing_pods"`
	LostMarkers int      `json:"lost_markers"`
	// Disagree counts replayed records whose logged verdict (dropped or
	// not) differs from the current state's: the store given is not what
	// the node enforced when they were logged.
	Disagree int `json:"disagree"`
	// NewlyDropped pass now and are dropped with the change; NewlyAllowed
	// the reverse; Changed pass in both, audited in one.
	NewlyDropped []ImpactChange `json:"newly_dropped"`
	NewlyAllowed []ImpactChange `json:"newly_allowed"`
	Changed      []ImpactChange `json:"changed"`
}

// maxMissingPods bounds Impact.MissingPods.
const maxMissingPods = 20

// judged is the answer for one memo key: the group it changes (nil when
// the verdict stays) and whether the current state drops it.
type judged struct {
	group  *ImpactChange
	denied bool
}

// flowEnd is one end of a flow resolved in both states, with its class.
type flowEnd struct {
	cls       *Class
	cur, prop explain.Peer
	// addr is the address the end was named by, when not a pod name: a
	// pod's address picks the family the verdict is judged in.
	addr    netip.Addr
	missing bool // a pod that one of the states does not have
}

type endKey struct {
	ns, pod string
	addr    netip.Addr
}

// memoKey: pods of one class get the same answers (podClasses), so one
// verdict stands for every pair of their members.
type memoKey struct {
	fromCls, toCls   *Class
	fromAddr, toAddr netip.Addr
	proto            uint8
	port             uint16
}

// replayer judges flows in both states, once per class pair and port.
type replayer struct {
	p       *Proposal
	classes map[string]*Class // pod name -> its class
	ends    map[endKey]*flowEnd
	memo    map[memoKey]judged
	groups  map[groupKey]*ImpactChange
	missing map[string]bool
}

type groupKey struct {
	from, to *Class
	proto    uint8
	port     uint16
}

func newReplayer(p *Proposal) *replayer {
	rp := &replayer{p: p, classes: map[string]*Class{}, ends: map[endKey]*flowEnd{}, memo: map[memoKey]judged{},
		groups: map[groupKey]*ImpactChange{}, missing: map[string]bool{}}
	pods, _, _ := podClasses(p.Current, p.Proposed)
	for _, c := range pods {
		for _, name := range c.Pods {
			rp.classes[name] = c
		}
	}
	return rp
}

// end resolves a flow end, by pod name or else by address, in both
// states: a pod's class, the class of the pod that has the address, or
// the address itself.
func (rp *replayer) end(p *FlowPeer) *flowEnd {
	k := endKey{addr: p.Addr}
	if p.IsPod() {
		k = endKey{ns: p.Namespace, pod: p.Pod}
	}
	if e := rp.ends[k]; e != nil {
		return e
	}
	name := k.addr.String()
	e := &flowEnd{addr: k.addr}
	if p.IsPod() {
		name = p.Namespace + "/" + p.Pod
	}
	var err1, err2 error
	e.cur, err1 = rp.p.Current.Offline.Peer(name)
	e.prop, err2 = rp.p.Proposed.Offline.Peer(name)
	switch {
	case err1 != nil || err2 != nil:
		e.missing = true
		rp.missing[name] = true
	case e.cur.Endpoint != 0:
		e.cls = rp.classes[e.cur.Name]
	default:
		e.cls = &Class{Kind: "addr", CIDR: name, key: "\xffaddr " + name}
	}
	rp.ends[k] = e
	return e
}

// judge returns the answer for a flow, and false when an end is not in
// both states.
func (rp *replayer) judge(rec *FlowRecord) (judged, bool) {
	src, dst := rp.end(&rec.Source), rp.end(&rec.Dest)
	if src.missing || dst.missing {
		return judged{}, false
	}
	k := memoKey{fromCls: src.cls, toCls: dst.cls, fromAddr: src.addr, toAddr: dst.addr, proto: rec.Proto, port: rec.Port}
	if j, ok := rp.memo[k]; ok {
		return j, true
	}
	var j judged
	// Offline.Verdict: a default deny names the policies that isolate.
	ro := rp.p.Current.Offline.Verdict(src.cur, dst.cur, rec.Proto, rec.Port)
	rn := rp.p.Proposed.Offline.Verdict(src.prop, dst.prop, rec.Proto, rec.Port)
	j.denied = ro.Combined == "deny"
	if ro.Combined != rn.Combined {
		gk := groupKey{src.cls, dst.cls, rec.Proto, rec.Port}
		g := rp.groups[gk]
		if g == nil {
			g = &ImpactChange{Change: Change{From: src.cls, To: dst.cls, Protocol: explain.ProtoName(rec.Proto), PortLo: rec.Port, PortHi: rec.Port,
				Old: outcomeOf(ro), New: outcomeOf(rn), proto: rec.Proto}}
			rp.groups[gk] = g
		}
		j.group = g
	}
	rp.memo[k] = j
	return j, true
}

// Replay reads flow records from r and judges each in both states of p.
// A bad line is an error naming it, and no result is returned.
func Replay(p *Proposal, r io.Reader, name string) (*Impact, error) {
	rp := newReplayer(p)
	im := &Impact{Store: p.Current.Name, Replaced: p.Replaced, Added: p.Added, MissingPods: []string{},
		NewlyDropped: []ImpactChange{}, NewlyAllowed: []ImpactChange{}, Changed: []ImpactChange{}}
	lost, err := ScanFlows(r, name, func(rec *FlowRecord) error {
		im.Records++
		switch {
		case rec.IsReply:
			im.Replies++
			return nil
		case rec.ICMP:
			im.ICMP++
			return nil
		}
		j, ok := rp.judge(rec)
		if !ok {
			im.NotInStore++
			return nil
		}
		im.Replayed++
		if j.denied != (rec.Verdict == "DROPPED") {
			im.Disagree++
		}
		if j.group != nil {
			j.group.Flows++
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	im.LostMarkers = lost
	for _, g := range rp.groups {
		switch {
		case g.Old.Verdict != "deny" && g.New.Verdict == "deny":
			im.NewlyDropped = append(im.NewlyDropped, *g)
		case g.Old.Verdict == "deny":
			im.NewlyAllowed = append(im.NewlyAllowed, *g)
		default:
			im.Changed = append(im.Changed, *g)
		}
	}
	for _, l := range [][]ImpactChange{im.NewlyDropped, im.NewlyAllowed, im.Changed} {
		slices.SortFunc(l, func(a, b ImpactChange) int {
			return cmp.Or(cmp.Compare(a.From.key, b.From.key), cmp.Compare(a.To.key, b.To.key),
				cmp.Compare(a.proto, b.proto), cmp.Compare(a.PortLo, b.PortLo))
		})
	}
	for _, n := range slices.Sorted(maps.Keys(rp.missing)) {
		if len(im.MissingPods) == maxMissingPods {
			break
		}
		im.MissingPods = append(im.MissingPods, n)
	}
	return im, nil
}
