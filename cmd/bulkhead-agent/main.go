// Command bulkhead-agent is the Bulkhead node daemon: flags → agent.Config
// → agent.Run. Its subcommands install-cni and uninstall-cni chain
// bulkhead-cni into the node's CNI config (cni/install), as an init
// container or a sidecar of the agent's DaemonSet.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/bulkhead-io/bulkhead/agent"
	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if len(os.Args) > 1 && (os.Args[1] == cmdInstallCNI || os.Args[1] == cmdUninstallCNI) {
		os.Exit(runCNIInstaller(os.Args[1], os.Args[2:]))
	}
	var cfg agent.Config
	fs := flag.NewFlagSet("bulkhead-agent", flag.ExitOnError)
	fs.StringVar(&cfg.Store, "store", agent.DefaultStore, "where workloads and policies come from: dir:PATH (every *.yaml and *.yml file in PATH) or kubernetes (the apiserver, through --kubeconfig or the in-cluster config)")
	fs.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig of --store kubernetes (empty: the in-cluster config of the pod's service account)")
	fs.StringVar(&cfg.Socket, "socket", api.DefaultSocket, "unix socket of the agent API (mode 0600)")
	fs.StringVar(&cfg.StateDir, "state-dir", agent.DefaultStateDir, "where endpoint records persist across restarts")
	fs.StringVar(&cfg.BPFFS, "bpffs", datapath.DefaultBPFFS, "directory on a bpffs mount for pinned programs, maps and links")
	fs.StringVar(&cfg.FlowLog, "flow-log", "", "write flow records to this file, one JSON object per line")
	fs.StringVar(&cfg.FlowFormat, "flow-format", "json", "flow record format: json (Hubble field names) or ocsf (OCSF Network Activity; runtime alerts as OCSF Detection Findings)")
	fs.BoolVar(&cfg.RuntimeDetection, "runtime-detection", false, "load the syscall monitor and write its alerts (escape attempts from pods: setns, unshare, mount, ptrace, bpf, module loads, ...) in --flow-format to --alert-log, or without it to --flow-log (JSON lines with event_kind \"alert\", or OCSF Detection Findings); needs one of them (default off while it is new)")
	fs.StringVar(&cfg.AlertLog, "alert-log", "", "write runtime alerts (--runtime-detection) to this file instead of --flow-log, one per line in --flow-format")
	fs.Var(addrListValue{&cfg.QuarantineDNS}, "quarantine-dns", "comma-separated resolver addresses a quarantined pod may still query on port 53 (the cluster DNS service's address, e.g.); none: a quarantined pod reaches nothing")
	fs.IntVar(&cfg.ScanThreshold, "scan-threshold", detect.DefaultScanThreshold, "the scan rule (BH-RT-016, with --runtime-detection): a pod whose new connections are denied to this many distinct destinations (address, protocol, port) within --scan-window")
	fs.DurationVar(&cfg.ScanWindow, "scan-window", detect.DefaultScanWindow, "the scan rule's window (see --scan-threshold)")
	fs.Int64Var(&cfg.AlertLogMaxSize, "alert-log-max-size", 100<<20, "rotate the alert log at this many bytes (0: never)")
	fs.IntVar(&cfg.AlertLogMaxFiles, "alert-log-max-files", 5, "rotated alert log files to keep")
	fs.Int64Var(&cfg.FlowLogMaxSize, "flow-log-max-size", 100<<20, "rotate the flow log at this many bytes (0: never)")
	fs.IntVar(&cfg.FlowLogMaxFiles, "flow-log-max-files", 5, "rotated flow log files to keep")
	ringKiB := fs.Uint("flow-event-ring-kib", 1024, "size of the kernel's flow event ring buffer in KiB (a power of two); a larger ring loses fewer events in bursts")
	cfg.Datapath.MaxPolicyEntries = agent.DefaultPolicyMapEntries
	fs.Var(uint32Value{&cfg.Datapath.MaxPolicyEntries}, "policy-map-entries", "keys the policy trie holds, shared by all endpoints and by the live and the next policy generation; sizes the exact-match table in front of it too")
	fs.IntVar(&cfg.PolicyBudgetEndpoint, "policy-budget-endpoint", 0, "policy trie keys one endpoint's policy may take; policies are rejected, largest first, until it fits (0: 1/16 of --policy-map-entries)")
	fs.IntVar(&cfg.PolicyBudgetPolicy, "policy-budget-policy", 0, "policy trie keys one policy may take, summed over the local pods it selects; a policy over it is rejected alone (0: 1/8 of --policy-map-entries)")
	fs.IntVar(&cfg.FlowRing, "flow-ring", agent.DefaultFlowRing, "how many recent flows to keep in memory for bulkhead observe")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", agent.DefaultMetrics, "serve Prometheus metrics here (empty: off)")
	fs.BoolVar(&cfg.Pprof, "pprof", false, "serve Go's runtime profiles (heap, CPU, goroutines) under /debug/pprof/ on --metrics-addr")
	fs.StringVar(&cfg.NodeName, "node-name", defaultNodeName(), "this node's name in flow records and in Kubernetes (default: $NODE_NAME, else the hostname)")
	fs.StringVar(&cfg.CNIConfDir, "cni-conf-dir", "", "CNI network config folder; when set, /readyz fails until bulkhead-cni is chained into its primary config")
	fs.BoolVar(&cfg.Adopt, "adopt", true, "enforce on this node's running pods that no CNI ADD registered (started before bulkhead-cni was chained in), found from their addresses in the store")
	netnsDirs := fs.String("netns-dir", agent.DefaultNetnsDir, "comma-separated folders where the container runtime mounts pod network namespaces (for --adopt)")
	fs.StringVar(&cfg.CNICacheDir, "cni-cache-dir", agent.DefaultCNICacheDir, "libcni's cache folder; it names adopted pods' container IDs so the runtime's DEL and GC find them (empty: not read)")
	fs.StringVar(&cfg.TrustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain of workload identities")
	fs.DurationVar(&cfg.StoreShrinkGrace, "store-shrink-grace", agent.DefaultStoreShrinkGrace, "hold back a store state that removes every policy, or more than half of the policies or of the objects, at once until it has stayed the same this long (must be positive)")
	fs.BoolVar(&cfg.DenyHostIngress, "deny-host-ingress", false, "do not let the node's own traffic (kubelet probes) into pods unless a policy allows it")
	logAllow := fs.String("flow-log-allow", "", `JSON list of flow filters; the flow log keeps only records that match one, e.g. [{"verdicts":["DROPPED"]},{"namespaces":["shop"]}]`)
	logDeny := fs.String("flow-log-deny", "", `JSON list of flow filters; the flow log drops records that match one, e.g. [{"spiffe_ids":["spiffe://cluster.local/ns/kube-system/sa/*"]}]`)
	attachMode := fs.String("attach-mode", "tcx", "tcx (falls back to clsact where the kernel lacks TCX) or clsact; TCX attach waits for RCU grace periods, clsact does not (see README)")
	fs.DurationVar(&cfg.IdentityGrace, "identity-grace", agent.DefaultIdentityGrace, "how long an identity number or endpoint ID that nothing uses stays reserved (must be positive)")
	fs.StringVar(&cfg.IdentitySource, "identity-source", "", "where local pods' X.509-SVIDs come from: none, builtin (a development CA under --state-dir/ca; not for production) or spire (default: spire when --spire-admin-socket is set, else none)")
	fs.StringVar(&cfg.SPIREAdminSocket, "spire-admin-socket", "", "the SPIRE agent's admin socket (admin_socket_path, not the workload socket); the agent must be one of its authorized_delegates")
	fs.DurationVar(&cfg.SVIDTTL, "svid-ttl", agent.DefaultSVIDTTL, "lifetime of the SVIDs the builtin source issues; renewed at half of it")
	tunnelPort := fs.Uint("tunnel-port", agent.DefaultTunnelPort, "port of the mTLS tunnel endpoint (HTTP/2 CONNECT over mTLS) on every node")
	redirectPort := fs.Uint("tunnel-redirect-port", agent.DefaultRedirectPort, "node-local port of the transparent listener that enrolled pods' TCP connections are steered to")
	cfg.TunnelMark = agent.DefaultTunnelMark
	fs.Var(uint32Value{&cfg.TunnelMark}, "tunnel-mark", "packet mark (within 0xf00) that steers tunnelled packets to the tunnel; change it if another component uses those bits")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	showVersion := fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() { agentUsage(fs, fs.Output()) }
	_ = fs.Parse(os.Args[1:])
	if *showVersion {
		fmt.Println("bulkhead-agent", version)
		return
	}
	// --svid-ttl is the builtin CA's: SPIRE's entries set their own TTLs.
	src := cfg.IdentitySource
	if src == "" && cfg.SPIREAdminSocket != "" {
		src = "spire"
	}
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "svid-ttl" && src != "builtin" {
			fmt.Fprintf(os.Stderr, "bulkhead-agent: --svid-ttl applies to --identity-source builtin only (SPIRE's registration entries set their TTL)\n")
			os.Exit(2)
		}
		// The scan rule runs with the runtime monitor only: tuned without
		// it, nothing would detect scans.
		if (f.Name == "scan-threshold" || f.Name == "scan-window") && !cfg.RuntimeDetection {
			fmt.Fprintf(os.Stderr, "bulkhead-agent: --%s tunes the scan rule (BH-RT-016) of --runtime-detection, which is off\n", f.Name)
			os.Exit(2)
		}
		// The alert log's rotation flags size a file that only --alert-log
		// opens: given alone they would do nothing.
		if (f.Name == "alert-log-max-size" || f.Name == "alert-log-max-files") && cfg.AlertLog == "" {
			fmt.Fprintf(os.Stderr, "bulkhead-agent: --%s applies to --alert-log, which is not set (the flow log's rotation is --flow-log-max-size and --flow-log-max-files)\n", f.Name)
			os.Exit(2)
		}
	})
	for _, d := range strings.Split(*netnsDirs, ",") {
		if d = strings.TrimSpace(d); d != "" {
			cfg.NetnsDirs = append(cfg.NetnsDirs, d)
		}
	}
	switch *attachMode {
	case "tcx":
	case "clsact":
		cfg.Datapath.ForceClsact = true
	default:
		fmt.Fprintf(os.Stderr, "bulkhead-agent: --attach-mode %q: want tcx or clsact\n", *attachMode)
		os.Exit(2)
	}
	for name, v := range map[string]string{"flow-log-allow": *logAllow, "flow-log-deny": *logDeny} {
		if v == "" {
			continue
		}
		var fl []flows.Filter
		dec := json.NewDecoder(strings.NewReader(v))
		dec.DisallowUnknownFields() // a misspelt field must not widen the filter
		if err := dec.Decode(&fl); err != nil {
			fmt.Fprintf(os.Stderr, "bulkhead-agent: --%s: want a JSON list of filters: %v\n", name, err)
			os.Exit(2)
		}
		if name == "flow-log-allow" {
			cfg.FlowLogFilter.Allow = fl
		} else {
			cfg.FlowLogFilter.Deny = fl
		}
	}
	if *ringKiB == 0 || *ringKiB > 1<<20 {
		fmt.Fprintf(os.Stderr, "bulkhead-agent: --flow-event-ring-kib %d: want 1 to %d\n", *ringKiB, 1<<20)
		os.Exit(2)
	}
	cfg.Datapath.EventRingBytes = uint32(*ringKiB) << 10
	for name, v := range map[string]uint{"tunnel-port": *tunnelPort, "tunnel-redirect-port": *redirectPort} {
		if v == 0 || v > 65535 {
			fmt.Fprintf(os.Stderr, "bulkhead-agent: --%s %d: want 1 to 65535\n", name, v)
			os.Exit(2)
		}
	}
	cfg.TunnelPort, cfg.RedirectPort = uint16(*tunnelPort), uint16(*redirectPort)
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "bulkhead-agent: --log-level: %v\n", err)
		os.Exit(2)
	}
	cfg.Logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	cfg.Version = version
	cfg.FromFlags = true

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	a, err := agent.New(cfg)
	if errors.Is(err, agent.ErrConfig) {
		fmt.Fprintf(os.Stderr, "bulkhead-agent: %v\n", err)
		os.Exit(2)
	}
	if err != nil {
		cfg.Logger.Error("agent failed to start", "error", err)
		os.Exit(1)
	}
	if err := a.Run(ctx); err != nil {
		cfg.Logger.Error("agent failed", "error", err)
		os.Exit(1)
	}
}

// uint32Value is a flag of a uint32 field; agent.New checks its range.
// addrListValue is a comma-separated list of IP addresses; a repeated
// flag adds to it.
type addrListValue struct{ p *[]netip.Addr }

func (v addrListValue) String() string {
	if v.p == nil {
		return ""
	}
	s := make([]string, len(*v.p))
	for i, a := range *v.p {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

func (v addrListValue) Set(s string) error {
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil || a.Zone() != "" {
			return fmt.Errorf("%q is not an IP address", f)
		}
		*v.p = append(*v.p, a.Unmap())
	}
	return nil
}

type uint32Value struct{ p *uint32 }

func (v uint32Value) String() string {
	if v.p == nil {
		return "0"
	}
	return strconv.FormatUint(uint64(*v.p), 10)
}

func (v uint32Value) Set(s string) error {
	n, err := strconv.ParseUint(s, 0, 32)
	if err != nil {
		return err
	}
	*v.p = uint32(n)
	return nil
}

// defaultNodeName is NODE_NAME, which a DaemonSet sets from the downward
// API (spec.nodeName), else the hostname.
func defaultNodeName() string {
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n
	}
	return hostname()
}

func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return ""
	}
	return h
}
