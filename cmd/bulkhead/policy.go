package main

import (
	"github.com/bulkhead-io/bulkhead/policy/explain"
	"github.com/spf13/cobra"
)

func newPolicy() *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Check and explain policies offline, from a store directory"}
	cmd.AddCommand(newCheck(), newExplain(), newMatrix())
	return cmd
}

func newCheck() *cobra.Command {
	return &cobra.Command{
		Use:   "check DIR",
		Short: "Validate every object of a store directory",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return explain.Check(args[0], cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
}

func newExplain() *cobra.Command {
	var o explain.ExplainOptions
	cmd := &cobra.Command{
		Use:   "explain --store DIR --from NS/POD --to NS/POD --port PORT [--protocol TCP] [-o json]",
		Short: "Say whether a connection passes, in each direction, and which rules decided",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return explain.Explain(o, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Store, "store", "", "store directory")
	f.StringVar(&o.From, "from", "", "source pod (NS/POD) or IP")
	f.StringVar(&o.To, "to", "", "destination pod (NS/POD) or IP")
	f.Uint16Var(&o.Port, "port", 0, "destination port")
	f.StringVar(&o.Protocol, "protocol", "TCP", "TCP, UDP or SCTP")
	f.StringVarP(&o.Output, "output", "o", "text", "text or json")
	for _, n := range []string{"store", "from", "to", "port"} {
		_ = cmd.MarkFlagRequired(n)
	}
	return cmd
}

func newMatrix() *cobra.Command {
	var o explain.MatrixOptions
	cmd := &cobra.Command{
		Use:   "matrix --store DIR --ports 80/TCP,81/TCP,80/UDP [-o json|table]",
		Short: "Print the truth table of every ordered pair of pods",
		Args:  cobra.NoArgs,
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
