package main

import (
	"github.com/spf13/cobra"

	"github.com/bulkhead-io/bulkhead/agent/cli"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

func newPolicy(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "policy",
		Short:   "Check, explain and tabulate policies, offline from a store directory or live from the agent",
		Example: "  bulkhead policy check /etc/bulkhead\n  bulkhead policy explain --from shop/frontend --to shop/api --port 8080",
	}
	cmd.AddCommand(newCheck(), newExplain(g), newMatrix())
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
