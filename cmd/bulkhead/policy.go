package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/bulkhead-io/bulkhead/agent/cli"
	"github.com/bulkhead-io/bulkhead/policy/author"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

func newPolicy(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "policy",
		Short:   "Check, explain, tabulate, diff, generate policies and replay flows against a change, from a store folder (the argument or --store) or live from the agent",
		Example: "  bulkhead policy check /etc/bulkhead\n  bulkhead policy explain --from shop/frontend --to shop/api --port 8080",
	}
	cmd.AddCommand(newCheck(), newExplain(g), newMatrix(), newDiff(), newGenerate(g), newImpact(g))
	return cmd
}

func newCheck() *cobra.Command {
	var storeFlag string
	cmd := &cobra.Command{
		Use:   "check [STORE-DIR | FILE]... | check --store DIR",
		Short: "Validate every object of store folders and files; no object to check is an error",
		Long: `check reads the *.yaml and *.yml files of each folder, and each file named,
as one store state, and validates every object as the agent would. Each
problem is printed as file:line. The exit code is non-zero when an object is
invalid, or when there is no object at all (an empty folder, or a path with
no YAML), so that check can gate CI.`,
		Example: "  bulkhead policy check /etc/bulkhead\n  bulkhead policy check manifests/examples/shop extra-policy.yml",
		RunE: func(cmd *cobra.Command, args []string) error {
			paths := args
			if storeFlag != "" {
				paths = append([]string{storeFlag}, args...)
			}
			if len(paths) == 0 {
				return fmt.Errorf("give the store folders or files to check")
			}
			return explain.Check(paths, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	cmd.Flags().StringVar(&storeFlag, "store", "", "a store folder (the same as the first argument)")
	return cmd
}

func newExplain(g *globals) *cobra.Command {
	var o explain.ExplainOptions
	cmd := &cobra.Command{
		Use:   "explain [STORE-DIR | --store DIR] --from NS/POD --to NS/POD --port PORT [--protocol TCP] [-o json]",
		Short: "Say whether a connection passes, in each direction, and which rules decided",
		Long: `Without a store, explain asks the running agent and answers from the policy it
enforces now. With a store folder (the argument or --store), it compiles the
store offline. --port is a number, or with a store the name of a container
port of the destination pod (--port pg), resolved as policy resolves it.`,
		Example: `  bulkhead policy explain --from shop/frontend --to shop/api --port 8080
  bulkhead policy explain ./store --from shop/debug --to shop/db --port pg -o json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			store, err := storeOnly(o.Store, args)
			if err != nil {
				return err
			}
			if store == "" {
				num, name, err := explain.ParsePortArg(o.Port)
				if err != nil {
					return fmt.Errorf("--port: %w", err)
				}
				if name != "" {
					return fmt.Errorf("--port %s: the agent takes a port number; give the number, or a store folder to resolve the name against the pod", name)
				}
				return cli.Explain(cmd.Context(), g.client(), cmd.OutOrStdout(), o.From, o.To, num, o.Protocol, o.Output)
			}
			o.Store = store
			return explain.Explain(o, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Store, "store", "", "store folder (or the argument; default: ask the running agent)")
	f.StringVar(&o.From, "from", "", "source pod (NS/POD) or IP")
	f.StringVar(&o.To, "to", "", "destination pod (NS/POD) or IP")
	f.StringVar(&o.Port, "port", "", "destination port: a number, or a named port of the destination pod")
	f.StringVar(&o.Protocol, "protocol", "TCP", "TCP, UDP or SCTP")
	f.StringVarP(&o.Output, "output", "o", "text", "text or json")
	for _, n := range []string{"from", "to", "port"} {
		_ = cmd.MarkFlagRequired(n)
	}
	return cmd
}

func newMatrix() *cobra.Command {
	var o explain.MatrixOptions
	cmd := &cobra.Command{
		Use:     "matrix [STORE-DIR | --store DIR] --ports 80/TCP,81/TCP,80/UDP [-o json|table]",
		Short:   "Print the truth table of every ordered pair of pods of a store",
		Example: "  bulkhead policy matrix ./store --ports 80/TCP,5432/TCP -o table",
		Args:    cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			store, err := storeOnly(o.Store, args)
			if err != nil {
				return err
			}
			if store == "" {
				return fmt.Errorf("matrix needs a store folder (the argument or --store DIR): the agent's API serves neither its store nor a matrix")
			}
			o.Store = store
			return explain.RunMatrix(o, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Store, "store", "", "store folder (or the argument)")
	f.StringVar(&o.Ports, "ports", "", "comma-separated PORT/PROTOCOL list")
	f.StringVarP(&o.Output, "output", "o", "table", "table or json")
	_ = cmd.MarkFlagRequired("ports")
	return cmd
}

func newDiff() *cobra.Command {
	var o author.DiffOptions
	cmd := &cobra.Command{
		Use:   "diff OLD-DIR NEW-DIR | diff --store OLD-DIR NEW-DIR | diff --git REV1..REV2 DIR",
		Short: "Show which classes of traffic change verdict between two store states",
		Long: `diff compiles both states offline, as matrix does, and decides every class of
traffic in both: pods grouped by namespace, labels, service account and named
ports; the ipBlock prefixes of either state; and the world. Ports are split
where some rule of either state starts or ends. It prints the (source,
destination, port range) classes whose verdict differs, grouped by source and
destination, with the rule that decided on each side. Traffic to and from
pods present in one state only is not compared; they are listed.

With --git, DIR is read at both revisions (committed files only).
The exit code is 0 unless an input is invalid, or --fail-on-change is given
and some verdict changed.`,
		Example: `  bulkhead policy diff ./store ./store-proposed
  bulkhead policy diff --git main..HEAD manifests/policies --fail-on-change
  bulkhead policy diff old/ new/ -o json | jq '.changes[] | select(.new.verdict == "deny")'`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.Old != "" {
				args = append([]string{o.Old}, args...) // --store is the old state
			}
			switch {
			case o.Git != "" && len(args) != 1:
				return fmt.Errorf("with --git, give one store folder")
			case o.Git == "" && len(args) != 2:
				return fmt.Errorf("give two store folders, OLD and NEW, or --git REV1..REV2 DIR")
			}
			o.Old = args[0]
			if len(args) == 2 {
				o.New = args[1]
			}
			return author.RunDiff(o, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Old, "store", "", "the old state's folder (or the first argument); with --git, the folder")
	f.StringVar(&o.Git, "git", "", "compare the folder at two git revisions, REV1..REV2")
	f.BoolVar(&o.FailOnChange, "fail-on-change", false, "exit non-zero when any verdict changes (a CI gate)")
	f.StringVarP(&o.Output, "output", "o", "text", "text or json")
	return cmd
}

func newGenerate(g *globals) *cobra.Command {
	var o author.GenerateOptions
	var since, out string
	cmd := &cobra.Command{
		Use:   "generate [FLOW-LOG | -] [--since DURATION] [--namespace NS] [--ingress] [--egress] [--spiffe [--mode Audit]] [-f OUT]",
		Short: "Write policies that allow exactly the connections seen in flow records",
		Long: `generate reads flow records (the agent's --flow-log JSON lines, or
bulkhead observe -o json) from a file, from stdin ("-"), or with --since from
the flows the running agent holds in memory (its last --flow-ring flows), and
writes policies that allow the connections observed: one policy per workload
class (pods of one namespace with the same labels, rollout labels such as
pod-template-hash left out), with one rule per set of peers seen on the same
ports, consecutive ports merged into ranges. Peers are pod classes, or the
exact address (/32, /128) of a peer that is not a pod.

Left out: replies, DROPPED flows (the policy allows what was let through, not
what was tried), ICMP (NetworkPolicy cannot express it). A workload gets a
policy only for a direction it was seen in. A malformed line is an error
naming its line, and nothing is written.

NetworkPolicies select by labels. With --spiffe, BulkheadPolicies select pods
and peers by SPIFFE ID, and --mode Audit stages them: what they would drop is
reported as AUDIT and passes.`,
		Example: `  bulkhead policy generate /var/log/bulkhead/flows.json > allow.yaml
  bulkhead observe -o json --last 0 | bulkhead policy generate - --namespace shop
  bulkhead policy generate --since 1h --spiffe --mode Audit -f staged.yaml`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.Validate(); err != nil {
				return err
			}
			r, name, closeIn, err := flowInput(cmd, g, since, args)
			if err != nil {
				return err
			}
			defer closeIn()
			// Render to memory first: a bad line leaves no half-written file.
			var buf bytes.Buffer
			gen, err := author.RunGenerate(o, r, name, &buf)
			if err != nil {
				return err
			}
			if out == "" || out == "-" {
				_, err = cmd.OutOrStdout().Write(buf.Bytes())
				return err
			}
			if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
				return fmt.Errorf("write %s: %w", out, err)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "wrote %s for %s to %s\n", author.Plural(gen.Stats.Policies, "policy", "policies"),
				author.Plural(gen.Stats.Connections, "connection", "connections"), out)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&since, "since", "", "read the running agent's flows of this last duration (1h) instead of a file")
	f.StringVarP(&o.Namespace, "namespace", "n", "", "write policies only for workloads in this namespace (their peers may be anywhere)")
	f.BoolVar(&o.Ingress, "ingress", false, "write ingress rules (default: ingress and egress)")
	f.BoolVar(&o.Egress, "egress", false, "write egress rules (default: ingress and egress)")
	f.BoolVar(&o.SPIFFE, "spiffe", false, "write BulkheadPolicies by SPIFFE ID instead of NetworkPolicies by labels")
	f.StringVar(&o.Mode, "mode", "", "Audit or Enforce: the BulkheadPolicies' mode (needs --spiffe)")
	f.StringVarP(&out, "file", "f", "", "write to this file instead of stdout")
	return cmd
}

// flowInput opens the flow records a command reads: the file args names
// (at most one), stdin for "-", or with since the running agent's flows of
// that last duration.
func flowInput(cmd *cobra.Command, g *globals, since string, args []string) (io.Reader, string, func(), error) {
	none := func() {}
	switch {
	case len(args) > 1:
		return nil, "", none, fmt.Errorf("give one flow log, not %d", len(args))
	case since != "" && len(args) == 1:
		return nil, "", none, fmt.Errorf("give a flow log or --since (the running agent's flows), not both")
	case since != "":
		d, err := time.ParseDuration(since)
		if err != nil || d <= 0 {
			return nil, "", none, fmt.Errorf("--since %q: want a positive duration such as 30m or 1h", since)
		}
		from := time.Now().Add(-d)
		data, oldest, err := cli.FlowHistory(cmd.Context(), g.client(), from)
		if err != nil {
			return nil, "", none, err
		}
		if oldest.IsZero() || oldest.After(from.Add(time.Minute)) {
			fmt.Fprintf(cmd.ErrOrStderr(), "warning: the agent holds flows only since %s (it keeps its last --flow-ring flows): the last %s may not be complete\n",
				oldest.Local().Format(time.RFC3339), since)
		}
		return bytes.NewReader(data), "the agent's flows of the last " + since, none, nil
	case len(args) == 0:
		return nil, "", none, fmt.Errorf("give a flow log file, - for stdin, or --since DURATION")
	case args[0] == "-":
		return cmd.InOrStdin(), "stdin", none, nil
	}
	f, err := os.Open(args[0])
	if err != nil {
		return nil, "", none, fmt.Errorf("open flow log: %w", err)
	}
	return f, args[0], func() { f.Close() }, nil
}

func newImpact(g *globals) *cobra.Command {
	var o author.ImpactOptions
	var since string
	cmd := &cobra.Command{
		Use:   "impact [STORE-DIR | --store DIR] --change FILE-OR-DIR... [FLOW-LOG | - | --since DURATION] [--fail-on-drop] [-o json]",
		Short: "Replay observed flows against the store and a proposed change, and show the flows whose verdict changes",
		Long: `impact applies a proposed change to a store folder: every object of the
--change files and folders (*.yaml and *.yml in a folder) replaces the store's
object of the same kind, namespace and name, or is added when the store has
none. A change cannot remove an object. It then replays each flow record of a
flow log (the agent's --flow-log, bulkhead observe -o json, stdin "-", or with
--since the running agent's flows) against the current and the proposed
state with the engine of explain and matrix, and prints the flows that would
be newly dropped and newly allowed, grouped by source and destination workload
and port, with the rule that decides each in both states.

Replies and ICMP are not replayed. A flow with a pod that the store does not
have is not replayed; such pods are listed. An invalid object in the store or
the change, or a bad flow line, is an error naming its file and line, and
nothing is printed.

The agent's API does not serve its store: give the folder it reads (--store),
also with --since.`,
		Example: `  bulkhead policy impact /etc/bulkhead --change ./proposed /var/log/bulkhead/flows.json
  bulkhead policy impact --store /etc/bulkhead --change db.yaml --since 1h --fail-on-drop
  bulkhead observe -o json --last 0 | bulkhead policy impact /etc/bulkhead --change db.yaml - -o json`,
		RunE: func(cmd *cobra.Command, args []string) error {
			store, rest := storeArg(o.Store, args)
			if store == "" {
				return fmt.Errorf("impact needs the store folder (STORE-DIR or --store DIR): the agent's API does not serve its store, only its flows (--since)")
			}
			o.Store = store
			if err := o.Validate(); err != nil {
				return err
			}
			r, name, closeIn, err := flowInput(cmd, g, since, rest)
			if err != nil {
				return err
			}
			defer closeIn()
			_, err = author.RunImpact(o, r, name, cmd.OutOrStdout())
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Store, "store", "", "the store folder (or the first argument)")
	f.StringArrayVar(&o.Change, "change", nil, "a file or folder of objects that replace or add to the store's (repeatable)")
	f.StringVar(&since, "since", "", "replay the running agent's flows of this last duration (1h) instead of a file")
	f.BoolVar(&o.FailOnDrop, "fail-on-drop", false, "exit non-zero when the change drops any replayed flow (a CI gate)")
	f.StringVarP(&o.Output, "output", "o", "text", "text or json")
	return cmd
}

// storeOnly is storeArg for a verb whose only argument is the store.
func storeOnly(flag string, args []string) (string, error) {
	store, rest := storeArg(flag, args)
	if len(rest) > 0 {
		return "", fmt.Errorf("give the store once: %q and --store %q", rest[0], store)
	}
	return store, nil
}

// storeArg is the store folder given by --store (flag) or else as the
// first argument, and the arguments left for the verb: with the flag, all
// of them, so that an extra folder is the verb's argument error, not
// silently a second store. "" is no store.
func storeArg(flag string, args []string) (string, []string) {
	if flag != "" || len(args) == 0 {
		return flag, args
	}
	return args[0], args[1:]
}
