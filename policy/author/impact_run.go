package author

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
)

// ImpactOptions are the arguments of `bulkhead policy impact`.
type ImpactOptions struct {
	// Store is the current state's folder; Change the files and folders
	// whose objects replace or add to it.
	Store      string
	Change     []string
	Output     string // "" or "text", or "json"
	FailOnDrop bool
}

// Validate rejects options that cannot do what they say.
func (o *ImpactOptions) Validate() error {
	switch o.Output {
	case "", "text", "json":
	default:
		return fmt.Errorf("output %q: want text or json: %w", o.Output, ErrBadOptions)
	}
	if o.Store == "" {
		return fmt.Errorf("no store folder: %w", ErrBadOptions)
	}
	if len(o.Change) == 0 {
		return fmt.Errorf("no change: give --change FILE-OR-FOLDER: %w", ErrBadOptions)
	}
	return nil
}

// RunImpact loads the store and the change, replays the flow records of r
// (named name in messages) against both, and writes what changes. Nothing
// is written when an input is bad. With FailOnDrop it returns
// ErrFlowsDropped when some flow would be newly dropped.
func RunImpact(o ImpactOptions, r io.Reader, name string, w io.Writer) (*Impact, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	p, err := LoadProposal(o.Store, o.Change)
	if err != nil {
		return nil, err
	}
	im, err := Replay(p, r, name)
	if err != nil {
		return nil, err
	}
	if o.Output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(im); err != nil {
			return nil, fmt.Errorf("write json: %w", err)
		}
	} else if _, err := io.WriteString(w, ImpactText(im, name)); err != nil {
		return nil, err
	}
	if o.FailOnDrop && len(im.NewlyDropped) > 0 {
		n := 0
		for _, g := range im.NewlyDropped {
			n += g.Flows
		}
		return im, fmt.Errorf("--fail-on-drop: %s in %s: %w", plural(n, "flow record", "flow records"),
			plural(len(im.NewlyDropped), "group", "groups"), ErrFlowsDropped)
	}
	return im, nil
}

// Plural is "1 policy" or "2 policies": no "1 objects" in messages.
func Plural(n int, one, many string) string { return plural(n, one, many) }

func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

// ImpactText renders an impact for people: a summary, then the newly
// dropped, newly allowed and otherwise changed groups, by source and
// destination workload.
func ImpactText(im *Impact, source string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "store: %s\n", im.Store)
	for _, r := range im.Replaced {
		fmt.Fprintf(&b, "change replaces %s\n", r)
	}
	for _, r := range im.Added {
		fmt.Fprintf(&b, "change adds %s\n", r)
	}
	fmt.Fprintf(&b, "flows: %s from %s, %d replayed; not replayed: %s, %d ICMP, %d with a pod not in the store\n",
		plural(im.Records, "record", "records"), source, im.Replayed, plural(im.Replies, "reply", "replies"), im.ICMP, im.NotInStore)
	if len(im.MissingPods) > 0 {
		fmt.Fprintf(&b, "pods not in the store: %s\n", strings.Join(im.MissingPods, ", "))
	}
	if im.LostMarkers > 0 {
		fmt.Fprintf(&b, "WARNING: events were lost at %d places in the input: flows seen only there are not replayed\n", im.LostMarkers)
	}
	if im.Disagree > 0 {
		fmt.Fprintf(&b, "WARNING: %s logged with another verdict than the store gives them now: the store is not what the node enforced then\n",
			plural(im.Disagree, "replayed record was", "replayed records were"))
	}
	for _, sec := range []struct {
		title string
		l     []ImpactChange
	}{{"newly dropped", im.NewlyDropped}, {"newly allowed", im.NewlyAllowed}, {"verdict changed (audit)", im.Changed}} {
		if len(sec.l) == 0 {
			fmt.Fprintf(&b, "\n%s: none\n", sec.title)
			continue
		}
		n := 0
		for _, g := range sec.l {
			n += g.Flows
		}
		fmt.Fprintf(&b, "\n%s: %s in %s\n", sec.title, plural(n, "flow record", "flow records"), plural(len(sec.l), "group", "groups"))
		l := sec.l
		writeGrouped(&b, "  ", len(l), func(i int) *Change { return &l[i].Change }, func(i int) string {
			g := &l[i]
			return fmt.Sprintf("%s -> %s\t%s\twas: %s\tnow: %s", strings.ToUpper(g.Old.Verdict), strings.ToUpper(g.New.Verdict),
				plural(g.Flows, "flow", "flows"), g.Old.Reason, g.New.Reason)
		})
	}
	return b.String()
}
