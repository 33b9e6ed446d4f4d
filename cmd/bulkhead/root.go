package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// globals are the flags every command shares.
type globals struct {
	socket string
}

func (g *globals) client() *api.Client {
	return api.NewClient(api.ClientConfig{Socket: g.socket})
}

func newRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "bulkhead",
		Short: "Bulkhead: identity-based segmentation, flow logs and policy explain for pods",
		Long: `bulkhead talks to the node's bulkhead-agent (status, endpoints, identities,
observe, live explain) and checks policies offline (policy check, explain
--store, matrix).`,
		Example: `  bulkhead status
  bulkhead observe --verdict DROPPED --follow
  bulkhead policy explain --from shop/frontend --to shop/api --port 8080`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	socket := api.DefaultSocket
	if env := os.Getenv("BULKHEAD_SOCKET"); env != "" {
		socket = env
	}
	root.PersistentFlags().StringVar(&g.socket, "socket", socket, "the agent's API socket (or $BULKHEAD_SOCKET)")
	root.AddCommand(newDemo(), newPolicy(g), newStatus(g), newEndpoints(g), newIdentities(g), newObserve(g), newVersion())
	return root
}

func newDemo() *cobra.Command {
	return &cobra.Command{
		Use:     "demo",
		Short:   "Run the demo",
		Example: "  make demo",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintln(cmd.OutOrStdout(), "bulkhead demo: not yet (the demo issue builds it)")
			return nil
		},
	}
}

func newVersion() *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print the version",
		Example: "  bulkhead version",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintln(cmd.OutOrStdout(), "bulkhead", version)
			return err
		},
	}
}

// isTerminal decides colour: only when stdout is a terminal.
func isTerminal(cmd *cobra.Command) bool {
	f, ok := cmd.OutOrStdout().(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}
