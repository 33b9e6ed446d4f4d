package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/bulkhead-io/bulkhead/agent/cli"
)

func newQuarantine(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "quarantine",
		Short: "List, add and release quarantined pods: all their traffic is dropped but DNS to the listed resolvers",
		Long: `A quarantined pod has all its traffic dropped in the datapath, but DNS to the
resolvers listed by the agent's --quarantine-dns (none listed: nothing at all),
until it is released. The runtime monitor quarantines a pod when a detection
whose action is Quarantine fires; an operator can do it by hand, with a
reason, which every record of a dropped packet carries. The agent of the
pod's node does it: run the command on that node.`,
		Example: `  bulkhead quarantine list
  bulkhead quarantine add shop/web-1 --reason "INC-4211: reverse shell"
  bulkhead quarantine release shop/web-1`,
	}
	cmd.AddCommand(newQuarantineList(g), newQuarantineAdd(g), newQuarantineRelease(g))
	return cmd
}

func newQuarantineList(g *globals) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:     "list",
		Short:   "List the quarantined pods of this node, since when, and the alert or operator that quarantined each",
		Example: "  bulkhead quarantine list\n  bulkhead quarantine list -o json | jq -r '.quarantines[].pod.name'",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cli.Quarantines(cmd.Context(), g.client(), cmd.OutOrStdout(), output)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", cli.FormatTable, "table or json")
	return cmd
}

func newQuarantineAdd(g *globals) *cobra.Command {
	var reason, output string
	cmd := &cobra.Command{
		Use:     "add NAMESPACE/POD --reason REASON",
		Short:   "Quarantine a pod of this node: drop all its traffic but DNS to the listed resolvers",
		Example: `  bulkhead quarantine add shop/web-1 --reason "INC-4211: reverse shell"`,
		Args:    onePod,
		RunE: func(cmd *cobra.Command, args []string) error {
			return cli.Quarantine(cmd.Context(), g.client(), cmd.OutOrStdout(), args[0], reason, output)
		},
	}
	// Not MarkFlagRequired: an empty --reason "" must be refused too, with
	// the same message.
	cmd.Flags().StringVar(&reason, "reason", "", "why (required, one line): written into the record of every packet dropped")
	cmd.Flags().StringVarP(&output, "output", "o", cli.FormatText, "text or json")
	return cmd
}

func newQuarantineRelease(g *globals) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:     "release NAMESPACE/POD",
		Short:   "Lift the quarantine of a pod of this node",
		Example: "  bulkhead quarantine release shop/web-1",
		Args:    onePod,
		RunE: func(cmd *cobra.Command, args []string) error {
			return cli.ReleaseQuarantine(cmd.Context(), g.client(), cmd.OutOrStdout(), args[0], output)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", cli.FormatText, "text or json")
	return cmd
}

// onePod checks the pod argument before anything else, so a typo never
// reaches the agent.
func onePod(_ *cobra.Command, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("give one pod, as NAMESPACE/NAME (got %d arguments)", len(args))
	}
	_, err := cli.ParsePod(args[0])
	return err
}

// unknownVerb refuses a verb a group of commands does not have (see
// refuseUnknownVerbs).
func unknownVerb(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
	if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return errors.New(msg)
}
