package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/bulkhead-io/bulkhead/agent/cli"
	"github.com/bulkhead-io/bulkhead/policy/author"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

func newPolicy(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "policy",
		Short:   "Check, explain, tabulate and diff policies, offline from a store directory or live from the agent",
		Example: "  bulkhead policy check /etc/bulkhead\n  bulkhead policy explain --from shop/frontend --to shop/api --port 8080",
	}
	cmd.AddCommand(newCheck(), newExplain(g), newMatrix(), newDiff())
	return cmd
}

func newCheck() *cobra.Command {
	return &cobra.Command{
		Use:     "check DIR",
		Short:   "Validate every object of a store directory",
		Example: "  bulkhead policy check /etc/bulkhead",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return explain.Check(args[0], cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
}

func newExplain(g *globals) *cobra.Command {
	var o explain.ExplainOptions
	cmd := &cobra.Command{
		Use:   "explain [--store DIR] --from NS/POD --to NS/POD --port PORT [--protocol TCP] [-o json]",
		Short: "Say whether a connection passes, in each direction, and which rules decided",
		Long: `Without --store, explain asks the running agent and answers from the policy it
enforces now. With --store, it compiles the store directory offline.`,
		Example: `  bulkhead policy explain --from shop/frontend --to shop/api --port 8080
  bulkhead policy explain --store ./store --from shop/debug --to shop/db --port 5432 -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.Store == "" {
				return cli.Explain(cmd.Context(), g.client(), cmd.OutOrStdout(), o.From, o.To, o.Port, o.Protocol, o.Output)
			}
			return explain.Explain(o, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Store, "store", "", "store directory (default: ask the running agent)")
	f.StringVar(&o.From, "from", "", "source pod (NS/POD) or IP")
	f.StringVar(&o.To, "to", "", "destination pod (NS/POD) or IP")
	f.Uint16Var(&o.Port, "port", 0, "destination port")
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
		Use:     "matrix --store DIR --ports 80/TCP,81/TCP,80/UDP [-o json|table]",
		Short:   "Print the truth table of every ordered pair of pods",
		Example: "  bulkhead policy matrix --store ./store --ports 80/TCP,5432/TCP -o table",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return explain.RunMatrix(o, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Store, "store", "", "store directory")
	f.StringVar(&o.Ports, "ports", "", "comma-separated PORT/PROTOCOL list")
	f.StringVarP(&o.Output, "output", "o", "table", "table or json")
	_ = cmd.MarkFlagRequired("store")
	_ = cmd.MarkFlagRequired("ports")
	return cmd
}

func newDiff() *cobra.Command {
	var o author.DiffOptions
	cmd := &cobra.Command{
		Use:   "diff OLD-DIR NEW-DIR | diff --git REV1..REV2 DIR",
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
	f.StringVar(&o.Git, "git", "", "compare the folder at two git revisions, REV1..REV2")
	f.BoolVar(&o.FailOnChange, "fail-on-change", false, "exit non-zero when any verdict changes (a CI gate)")
	f.StringVarP(&o.Output, "output", "o", "text", "text or json")
	return cmd
}
