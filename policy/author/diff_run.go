package author

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// DiffOptions are the arguments of `bulkhead policy diff`.
type DiffOptions struct {
	// Old and New are store folders; with Git, New is unused and Old is
	// the folder read at both revisions.
	Old, New string
	// Git is "REV1..REV2": read the folder Old at both revisions.
	Git          string
	Output       string // "" or "text", or "json"
	FailOnChange bool
}

// RunDiff loads both states, writes their semantic difference, and returns
// ErrVerdictsChanged when asked to fail on a change and there is one.
func RunDiff(o DiffOptions, w io.Writer) error {
	switch o.Output {
	case "", "text", "json":
	default:
		return fmt.Errorf("output %q: want text or json", o.Output)
	}
	var oldS, newS *State
	var err error
	if o.Git != "" {
		oldS, newS, err = loadGitStates(o.Old, o.Git)
	} else {
		oldS, newS, err = loadStates(o.Old, o.New)
	}
	if err != nil {
		return err
	}
	d := Compare(oldS, newS)
	if o.Output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(d); err != nil {
			return fmt.Errorf("write json: %w", err)
		}
	} else if _, err := io.WriteString(w, DiffText(d)); err != nil {
		return err
	}
	if o.FailOnChange && len(d.Changes) > 0 {
		what := "classes of traffic change"
		if len(d.Changes) == 1 {
			what = "class of traffic changes"
		}
		return fmt.Errorf("--fail-on-change: %d %s verdict: %w", len(d.Changes), what, ErrVerdictsChanged)
	}
	return nil
}

func loadStates(oldDir, newDir string) (*State, *State, error) {
	oldS, err := LoadState(oldDir)
	if err != nil {
		return nil, nil, fmt.Errorf("old state: %w", err)
	}
	newS, err := LoadState(newDir)
	if err != nil {
		return nil, nil, fmt.Errorf("new state: %w", err)
	}
	return oldS, newS, nil
}

// DiffText renders a diff grouped by source class, then destination class,
// then protocol and port.
func DiffText(d *Diff) string {
	var b strings.Builder
	fmt.Fprintf(&b, "old: %s\nnew: %s\n", d.Old, d.New)
	for _, p := range d.OnlyOld {
		fmt.Fprintf(&b, "only in old: pod %s (its traffic is not compared)\n", p)
	}
	for _, p := range d.OnlyNew {
		fmt.Fprintf(&b, "only in new: pod %s (its traffic is not compared)\n", p)
	}
	if len(d.Changes) == 0 {
		b.WriteString("no verdict changes\n")
		return b.String()
	}
	fmt.Fprintf(&b, "%s:\n", plural(len(d.Changes), "verdict change", "verdict changes"))
	writeGrouped(&b, "", len(d.Changes), func(i int) *Change { return &d.Changes[i] }, func(i int) string {
		c := &d.Changes[i]
		return fmt.Sprintf("%s -> %s\twas: %s\tnow: %s", strings.ToUpper(c.Old.Verdict), strings.ToUpper(c.New.Verdict),
			c.Old.Reason, c.New.Reason)
	})
	return b.String()
}

// writeGrouped writes n changes, sorted by source and destination, under a
// heading per source and per destination: one line per change, its ports
// then what line(i) says of it, in columns.
func writeGrouped(b *strings.Builder, indent string, n int, at func(int) *Change, line func(int) string) {
	var from, to *Class
	tw := tabwriter.NewWriter(b, 0, 0, 2, ' ', 0)
	for i := range n {
		c := at(i)
		if c.From != from {
			tw.Flush()
			from, to = c.From, nil
			fmt.Fprintf(b, "\n%sfrom %s%s\n", indent, c.From, members(c.From))
		}
		if c.To != to {
			tw.Flush()
			to = c.To
			fmt.Fprintf(b, "%s  to %s%s\n", indent, c.To, members(c.To))
		}
		fmt.Fprintf(tw, "%s    %s\t%s\n", indent, c.Ports(), line(i))
	}
	tw.Flush()
}

func members(c *Class) string {
	if c.Kind != "pod" {
		return ""
	}
	return " (pods: " + strings.Join(c.Pods, ", ") + ")"
}
