package author

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"maps"
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

type flowKey struct {
	src, dst string
	proto    uint8
	port     uint16
}

// judged is the answer for one distinct flow key: the group it changes
// (nil when the verdict stays) and whether the current state drops it.
type judged struct {
	group  *ImpactChange
	denied bool
	skip   bool // an end is not in the store
}

// replayer judges flows in both states, once per distinct flow key.
type replayer struct {
	p       *Proposal
	classes map[string]*Class // pod name -> its class
	addrs   map[string]*Class
	memo    map[flowKey]judged
	groups  map[groupKey]*ImpactChange
	missing map[string]bool
}

type groupKey struct {
	from, to *Class
	proto    uint8
	port     uint16
}

func newReplayer(p *Proposal) *replayer {
	rp := &replayer{p: p, classes: map[string]*Class{}, addrs: map[string]*Class{}, memo: map[flowKey]judged{},
		groups: map[groupKey]*ImpactChange{}, missing: map[string]bool{}}
	pods, _, _ := podClasses(p.Current, p.Proposed)
	for _, c := range pods {
		for _, name := range c.Pods {
			rp.classes[name] = c
		}
	}
	return rp
}

// end is a flow end's name for explain's Offline.Peer: "ns/pod" or an
// address.
func end(p *FlowPeer) string {
	if p.IsPod() {
		return p.Namespace + "/" + p.Pod
	}
	return p.Addr.String()
}

// classOf is the workload a flow end belongs to: the pod's class, the
// class of the pod that has the address, or the address.
func (rp *replayer) classOf(name string, peer explain.Peer) *Class {
	if peer.Endpoint != 0 {
		return rp.classes[peer.Name]
	}
	c := rp.addrs[name]
	if c == nil {
		c = &Class{Kind: "addr", CIDR: name, key: "\xffaddr " + name}
		rp.addrs[name] = c
	}
	return c
}

func (rp *replayer) judge(rec *FlowRecord) judged {
	k := flowKey{end(&rec.Source), end(&rec.Dest), rec.Proto, rec.Port}
	if j, ok := rp.memo[k]; ok {
		return j
	}
	var j judged
	cur, prop := rp.p.Current.Offline, rp.p.Proposed.Offline
	srcO, err1 := cur.Peer(k.src)
	dstO, err2 := cur.Peer(k.dst)
	srcN, err3 := prop.Peer(k.src)
	dstN, err4 := prop.Peer(k.dst)
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		for _, n := range []string{k.src, k.dst} {
			if _, err := cur.Peer(n); err != nil {
				rp.missing[n] = true
			} else if _, err := prop.Peer(n); err != nil {
				rp.missing[n] = true
			}
		}
		j.skip = true
		rp.memo[k] = j
		return j
	}
	// Offline.Verdict: a default deny names the policies that isolate.
	ro := cur.Verdict(srcO, dstO, k.proto, k.port)
	rn := prop.Verdict(srcN, dstN, k.proto, k.port)
	j.denied = ro.Combined == "deny"
	if ro.Combined != rn.Combined {
		from, to := rp.classOf(k.src, srcO), rp.classOf(k.dst, dstO)
		gk := groupKey{from, to, k.proto, k.port}
		g := rp.groups[gk]
		if g == nil {
			g = &ImpactChange{Change: Change{From: from, To: to, Protocol: explain.ProtoName(k.proto), PortLo: k.port, PortHi: k.port,
				Old: outcomeOf(ro), New: outcomeOf(rn), proto: k.proto}}
			rp.groups[gk] = g
		}
		j.group = g
	}
	rp.memo[k] = j
	return j
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
		j := rp.judge(rec)
		if j.skip {
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
