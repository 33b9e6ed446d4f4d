package main

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/demo"
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
observe, quarantine, live explain) and works on policies offline from a
store folder (policy check, explain, matrix, diff, impact, generate).`,
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
	root.AddCommand(newDemo(), newPolicy(g), newStatus(g), newEndpoints(g), newIdentities(g), newObserve(g), newQuarantine(g), newVersion())
	refuseUnknownVerbs(root)
	return root
}

// refuseUnknownVerbs makes every group of commands below root (policy,
// quarantine) refuse a verb it does not have, with a suggestion: cobra lets
// a group without Run answer with its help and exit 0, and a script that
// typed "policy chek" or "quarantine relase" must not take that for
// success. (The root refuses unknown commands itself.)
func refuseUnknownVerbs(root *cobra.Command) {
	for _, c := range root.Commands() {
		if !c.HasSubCommands() {
			continue
		}
		if c.Run == nil && c.RunE == nil {
			c.Args = unknownVerb
			c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
		}
		// cobra defaults this only on the root's own lookup.
		c.SuggestionsMinimumDistance = 2
		refuseUnknownVerbs(c)
	}
}

func newDemo() *cobra.Command {
	cfg := demo.Config{CNIBin: os.Getenv("BULKHEAD_CNI_BIN")}
	if cfg.CNIBin == "" {
		cfg.CNIBin = demo.DefaultCNIBin
	}
	// The agent and the plugin are normally built next to this binary.
	if exe, err := os.Executable(); err == nil {
		cfg.BinDir = filepath.Dir(exe)
	}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run a self-checking demo on this machine: pods, policies, flows, explain",
		Long: `demo builds a small shop on this machine (needs root): namespaces shop and
ops, pods frontend, api, db and debug in their own network namespaces, added
through the real CNI chain (ptp + host-local + bulkhead-cni), and a running
bulkhead-agent. It measures the reachability matrix with real traffic, then
adds a NetworkPolicy, a BulkheadPolicy by SPIFFE ID, a Deny rule and an
Audit-mode policy, showing after each step what changed and which policy
decided it. Every matrix is checked against the expected one and against
the offline policy engine; the command fails if one differs. It ends with
mTLS between two enrolled pods, then a compromised frontend: runtime
alerts, a blocked connect to the runtime socket, and a scan that
quarantines the pod until it is released. Everything it created is
removed at the end, also on failure and on Ctrl-C.`,
		Example: `  make demo
  sudo bulkhead demo --cni-bin /opt/cni/bin
  sudo bulkhead demo --keep   # leave the agent and pods running to explore`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			cfg.Out = cmd.OutOrStdout()
			cfg.Color = isTerminal(cmd)
			return demo.Run(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.CNIBin, "cni-bin", cfg.CNIBin, "directory with the reference CNI plugins ptp and host-local ($BULKHEAD_CNI_BIN when set)")
	f.StringVar(&cfg.BinDir, "bin-dir", cfg.BinDir, "directory with bulkhead-agent and bulkhead-cni")
	f.BoolVar(&cfg.Keep, "keep", false, "do not clean up: leave the agent, pods and files for debugging")
	return cmd
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
