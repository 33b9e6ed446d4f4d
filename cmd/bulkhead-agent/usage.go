package main

import (
	"flag"
	"fmt"
	"io"
	"strings"
)

// agentUsage is the agent's --help: flags spelt with two dashes, as
// everywhere else in Bulkhead (Go's flag package takes both, but prints
// one), with the ways it is run.
func agentUsage(fs *flag.FlagSet, w io.Writer) {
	fmt.Fprint(w, `bulkhead-agent enforces Bulkhead's policy on this node: it serves the
bulkhead-cni plugin, attaches the eBPF datapath to each pod's veth, and
applies the store's workloads and policies (see the README).

Usage:
  bulkhead-agent [flags]
  bulkhead-agent install-cni | uninstall-cni [flags]   the CNI installer (--help)

Examples:
  # A node without Kubernetes: workloads and policies from a folder.
  sudo bulkhead-agent --store dir:/etc/bulkhead --flow-log /var/log/bulkhead/flows.json
  # With runtime detection, answering with quarantine where a policy says so.
  sudo bulkhead-agent --store dir:/etc/bulkhead --flow-log /var/log/bulkhead/flows.json \
      --runtime-detection --quarantine-dns 10.96.0.10
  # In a cluster (the chart's DaemonSet runs it so).
  bulkhead-agent --store kubernetes --cni-conf-dir /etc/cni/net.d

Stopping it (SIGTERM) leaves enforcement in place: a restarted agent takes
over the pins under --bpffs and the records under --state-dir.

Flags:
`)
	flagsUsage(fs, w)
}

// installerUsage is install-cni's and uninstall-cni's --help.
func installerUsage(fs *flag.FlagSet, name string, w io.Writer) {
	what := "chains bulkhead-cni into the node's primary CNI config and copies the plugin"
	if name == cmdUninstallCNI {
		what = "takes bulkhead-cni out of the node's primary CNI config again, and its binary"
	}
	fmt.Fprintf(w, "bulkhead-agent %s %s\n(see the README's CNI installer).\n\nUsage:\n  bulkhead-agent %s [flags]\n\nFlags:\n", name, what, name)
	flagsUsage(fs, w)
}

// flagsUsage lists fs's flags, two dashes each, with their help wrapped.
func flagsUsage(fs *flag.FlagSet, w io.Writer) {
	fs.VisitAll(func(f *flag.Flag) {
		kind, usage := flag.UnquoteUsage(f)
		head := "  --" + f.Name
		if kind != "" {
			head += " " + kind
		}
		fmt.Fprintln(w, head)
		if d := f.DefValue; d != "" && d != "false" && d != "0" && d != "0s" {
			usage += fmt.Sprintf(" (default %s)", d)
		}
		for _, line := range wrap(usage, 74) {
			fmt.Fprintln(w, "      "+line)
		}
	})
}

// wrap breaks s into lines of at most width bytes at spaces (a longer
// word stays whole).
func wrap(s string, width int) []string {
	var lines []string
	line := ""
	for _, word := range strings.Fields(s) {
		if line != "" && len(line)+1+len(word) > width {
			lines = append(lines, line)
			line = ""
		}
		if line != "" {
			line += " "
		}
		line += word
	}
	if line != "" {
		lines = append(lines, line)
	}
	return lines
}
