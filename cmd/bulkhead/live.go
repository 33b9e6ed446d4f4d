package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/bulkhead-io/bulkhead/agent/cli"
)

func newStatus(g *globals) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the agent's health, kernel features, endpoints, policy revision, store errors and lost events",
		Example: `  bulkhead status
  bulkhead status -o json | jq .policyRevision`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cli.Status(cmd.Context(), g.client(), cmd.OutOrStdout(), output)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", cli.FormatTable, "table or json")
	return cmd
}

func newEndpoints(g *globals) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:     "endpoints",
		Short:   "List the pods the agent enforces on, with identity, SPIFFE ID, IPs, veth and attach mode",
		Example: "  bulkhead endpoints\n  bulkhead endpoints -o json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cli.Endpoints(cmd.Context(), g.client(), cmd.OutOrStdout(), output)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", cli.FormatTable, "table or json")
	return cmd
}

func newIdentities(g *globals) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:     "identities",
		Short:   "List the security identities: numeric ID, SPIFFE ID, namespace, labels",
		Example: "  bulkhead identities",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cli.Identities(cmd.Context(), g.client(), cmd.OutOrStdout(), output)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", cli.FormatTable, "table or json")
	return cmd
}

func newObserve(g *globals) *cobra.Command {
	var o cli.ObserveOptions
	var ports []uint
	cmd := &cobra.Command{
		Use:   "observe",
		Short: "Show flows with their verdict and the policy that decided them, or runtime alerts (--alerts)",
		Example: `  bulkhead observe --last 20
  bulkhead observe --verdict DROPPED --namespace shop --follow
  bulkhead observe --to-pod shop/api --port 8080 -o json
  bulkhead observe --spiffe-id 'spiffe://cluster.local/ns/shop/sa/*'
  bulkhead observe --mtls --verdict DROPPED
  bulkhead observe --alerts --severity critical --follow
  bulkhead observe --alerts --pod shop/web --rule BH-RT-002 -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Color = isTerminal(cmd)
			// --follow starts from now unless --last or --since asks for
			// recent flows too.
			o.FromNow = o.Follow && !cmd.Flags().Changed("last") && !cmd.Flags().Changed("since")
			for _, p := range ports {
				if p > 65535 {
					return fmt.Errorf("--port %d: out of range", p)
				}
				o.Port = append(o.Port, uint16(p))
			}
			return cli.Observe(cmd.Context(), g.client(), cmd.OutOrStdout(), o)
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&o.Follow, "follow", "f", false, "keep printing new flows")
	f.IntVar(&o.Last, "last", 20, "print this many recent flows first (0: all kept); flows with --follow: none unless given")
	f.StringVar(&o.Since, "since", "", "only flows since a duration ago (5m) or an RFC 3339 time")
	f.StringSliceVarP(&o.Namespace, "namespace", "n", nil, "flows from or to pods in this namespace")
	f.StringSliceVar(&o.Pod, "pod", nil, "flows from or to this pod (NS/POD or POD)")
	f.StringSliceVar(&o.FromPod, "from-pod", nil, "flows from this pod")
	f.StringSliceVar(&o.ToPod, "to-pod", nil, "flows to this pod")
	f.StringSliceVar(&o.Verdict, "verdict", nil, "FORWARDED, DROPPED or AUDIT")
	f.StringSliceVar(&o.Protocol, "protocol", nil, "TCP, UDP, SCTP, ICMPv4 or ICMPv6")
	f.UintSliceVar(&ports, "port", nil, "source or destination port")
	f.StringSliceVar(&o.SPIFFEID, "spiffe-id", nil, "SPIFFE ID of either side; * matches one path segment")
	f.BoolVar(&o.MTLS, "mtls", false, "only flows through the mTLS tunnel")
	f.BoolVar(&o.Alerts, "alerts", false, "show runtime alerts (--runtime-detection) instead of flows; filters: --namespace, --pod, --spiffe-id, --rule, --severity, --since")
	f.StringSliceVar(&o.Rule, "rule", nil, "with --alerts: alerts of this rule (BH-RT-002)")
	f.StringSliceVar(&o.Severity, "severity", nil, "with --alerts: alerts of this severity (medium, high or critical)")
	f.StringVarP(&o.Output, "output", "o", cli.FormatCompact, "compact, table or json (--alerts: compact or json)")
	return cmd
}
