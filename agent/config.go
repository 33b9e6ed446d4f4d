package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Config is the agent's configuration; cmd/bulkhead-agent fills it from
// flags (DESIGN.md §5).
type Config struct {
	// Store is "dir:PATH".
	Store    string
	Socket   string
	StateDir string
	BPFFS    string
	// FlowLog is a file of flow records, one JSON object per line; empty
	// writes none. FlowFormat is "json" (Hubble field names) or "ocsf".
	FlowLog         string
	FlowFormat      string
	FlowLogMaxSize  int64
	FlowLogMaxFiles int
	// FlowLogFilter selects which records the flow log keeps.
	FlowLogFilter flows.Selector
	// RuntimeDetection loads the system monitor (runtime package), watches
	// every endpoint's netns and writes its alerts, in FlowFormat, to
	// AlertLog when it is set, else to FlowLog (JSON lines with event_kind
	// "alert", or OCSF Detection Findings). It needs one of the two files.
	RuntimeDetection bool
	// AlertLog is a file of runtime alerts only, one per line in
	// FlowFormat, rotated at AlertLogMaxSize bytes (0: never) keeping
	// AlertLogMaxFiles rotated files; empty: alerts go to FlowLog. It needs
	// RuntimeDetection.
	AlertLog string
	// QuarantineDNS are the resolvers a quarantined pod may still query
	// (port 53); none: a quarantined pod reaches nothing at all.
	QuarantineDNS    []netip.Addr
	AlertLogMaxSize  int64
	AlertLogMaxFiles int
	// ScanThreshold and ScanWindow tune the scan rule (BH-RT-016): new
	// connections denied to that many distinct destinations within the
	// window; 0 is the default (detect.DefaultScanThreshold, ...Window).
	ScanThreshold int
	ScanWindow    time.Duration
	// RuntimeResync is how often the monitor's watch set is reconciled with
	// the endpoint table besides after each apply; 0 means 1 s.
	RuntimeResync time.Duration
	// FlowRing is how many recent flows the agent keeps for `observe`.
	FlowRing int
	// MetricsAddr serves Prometheus metrics; empty serves none.
	MetricsAddr string
	NodeName    string
	TrustDomain string
	// DenyHostIngress stops the node's own traffic (kubelet probes) from
	// reaching pods without a policy that allows it.
	DenyHostIngress bool
	// Kubeconfig is the kubeconfig of --store kubernetes; empty: the
	// in-cluster config.
	Kubeconfig string
	// StoreDebounce is how long the store must be quiet before a reload.
	StoreDebounce time.Duration
	// StoreShrinkGrace is how long a store state that removes every policy
	// or most objects or policies at once must stay the same before it is
	// applied (agent/storeguard). It must be positive; zero is unset (see
	// FromFlags) and means DefaultStoreShrinkGrace.
	StoreShrinkGrace time.Duration
	// Version is reported in status.
	Version string
	Logger  *slog.Logger
	// Datapath tunes the datapath; BPFFS above wins over its BPFFS.
	// Datapath.MaxPolicyEntries sizes the policy trie (--policy-map-entries).
	Datapath datapath.Config
	// IdentityGrace is how long an identity number or endpoint ID that
	// nothing uses stays reserved. It must be positive; zero is unset (see
	// FromFlags) and means DefaultIdentityGrace.
	IdentityGrace time.Duration
	// ReconcileInterval is how often endpoints whose veth vanished are
	// looked for, besides on every link deletion (default 5 s).
	ReconcileInterval time.Duration
	// PolicyBudgetEndpoint and PolicyBudgetPolicy are the policy trie keys
	// (per policy generation) one endpoint and one policy may take; 0 derives them from
	// the trie's size (see policyBudget).
	PolicyBudgetEndpoint int
	PolicyBudgetPolicy   int
	// IdentitySource is where local pods' SVIDs come from: "none",
	// "builtin" (the development CA under StateDir/ca) or "spire" (the
	// Delegated Identity API at SPIREAdminSocket). Empty: "spire" when
	// SPIREAdminSocket is set, else "none".
	IdentitySource   string
	SPIREAdminSocket string
	// SVIDTTL is the lifetime of the built-in CA's SVIDs (default 1 h).
	SVIDTTL time.Duration
	// TunnelPort is the mTLS tunnel endpoint's port on every node (HBONE,
	// default 15008); RedirectPort the node-local transparent listener that
	// enrolled pods' connections are steered to (default 15001).
	TunnelPort   uint16
	RedirectPort uint16
	// TunnelMark is the packet mark, within TunnelMarkMask (0xf00), that
	// steers tunnelled packets (default 0xb00). Change it when another
	// component of the node uses those bits.
	TunnelMark uint32
	// CNIConfDir, when set, makes readiness (/readyz) wait until
	// bulkhead-cni is chained into the primary CNI config in this folder
	// (cni/install.Installed): pods created before that are not enforced.
	CNIConfDir string
	// Adopt enforces on running pods of this node (spec.nodeName is
	// NodeName) that no CNI ADD registered: pods started before Bulkhead
	// was chained in (agent/adopt). NetnsDirs are where the runtime mounts
	// pod network namespaces (default /var/run/netns); CNICacheDir is
	// libcni's cache (default /var/lib/cni), which names their container
	// IDs so that the runtime's DEL and GC find adopted endpoints.
	Adopt       bool
	NetnsDirs   []string
	CNICacheDir string
	// Pprof serves Go's profiles under /debug/pprof/ on MetricsAddr.
	Pprof bool
	// FromFlags says every field was set from a flag (cmd/bulkhead-agent),
	// so a zero is what the user gave, not "unset": a flag of 0 where 0 is
	// not allowed (--store-shrink-grace, --identity-grace,
	// --policy-map-entries, --flow-ring) is an error naming the flag, never
	// silently replaced by the default. Without it (Go callers, tests) a
	// zero field means its default.
	FromFlags bool
}

// Defaults (DESIGN.md §5).
const (
	DefaultStore    = "dir:/etc/bulkhead"
	DefaultStateDir = "/var/run/bulkhead"
	DefaultMetrics  = "127.0.0.1:9962"
	// DefaultNetnsDir and DefaultCNICacheDir are where containerd and
	// CRI-O keep pod network namespaces and libcni its result cache.
	DefaultNetnsDir    = "/var/run/netns"
	DefaultCNICacheDir = "/var/lib/cni"
	// DefaultStoreShrinkGrace is long enough for a copy of a store to
	// finish, short enough that an intended change does not wait long.
	DefaultStoreShrinkGrace = 30 * time.Second
	DefaultFlowRing         = 4096
	// DefaultPolicyMapEntries, MinPolicyMapEntries and MaxPolicyMapEntries
	// bound --policy-map-entries.
	DefaultPolicyMapEntries = 262144
	MinPolicyMapEntries     = 1024
	MaxPolicyMapEntries     = 1 << 24
)

func (c *Config) setDefaults() error {
	if c.Store == "" {
		c.Store = DefaultStore
	}
	if c.Socket == "" {
		c.Socket = api.DefaultSocket
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.BPFFS == "" {
		c.BPFFS = datapath.DefaultBPFFS
	}
	if c.FlowFormat == "" {
		c.FlowFormat = "json"
	}
	if c.FlowRing == 0 && !c.FromFlags {
		c.FlowRing = DefaultFlowRing
	}
	if c.TrustDomain == "" {
		c.TrustDomain = identity.DefaultTrustDomain
	}
	if c.StoreDebounce <= 0 {
		c.StoreDebounce = 200 * time.Millisecond
	}
	if c.StoreShrinkGrace == 0 && !c.FromFlags {
		c.StoreShrinkGrace = DefaultStoreShrinkGrace
	}
	if c.IdentityGrace == 0 && !c.FromFlags {
		c.IdentityGrace = DefaultIdentityGrace
	}
	if c.IdentitySource == "" {
		c.IdentitySource = identity.SourceNone
		if c.SPIREAdminSocket != "" {
			c.IdentitySource = identity.SourceSPIRE
		}
	}
	if c.SVIDTTL == 0 && !c.FromFlags {
		c.SVIDTTL = DefaultSVIDTTL
	}
	if c.ReconcileInterval <= 0 {
		c.ReconcileInterval = 5 * time.Second
	}
	if len(c.NetnsDirs) == 0 {
		c.NetnsDirs = []string{DefaultNetnsDir}
	}
	if c.CNICacheDir == "" && !c.FromFlags {
		c.CNICacheDir = DefaultCNICacheDir
	}
	if c.TunnelPort == 0 && !c.FromFlags {
		c.TunnelPort = DefaultTunnelPort
	}
	if c.RedirectPort == 0 && !c.FromFlags {
		c.RedirectPort = DefaultRedirectPort
	}
	if c.TunnelMark == 0 && !c.FromFlags {
		c.TunnelMark = DefaultTunnelMark
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	var errs []error
	if c.FlowFormat != "json" && c.FlowFormat != "ocsf" {
		errs = append(errs, fmt.Errorf("--flow-format %q: want json or ocsf", c.FlowFormat))
	}
	if err := c.FlowLogFilter.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("--flow-log-allow/--flow-log-deny: %w", err))
	}
	errs = append(errs, c.validateAlertLog()...)
	if c.FlowRing <= 0 {
		errs = append(errs, fmt.Errorf("--flow-ring %d: must be positive", c.FlowRing))
	}
	if c.StoreShrinkGrace <= 0 {
		// Without a grace period an emptied store would be applied at
		// once: the hold-back exists to prevent exactly that.
		errs = append(errs, fmt.Errorf("--store-shrink-grace %v: must be positive", c.StoreShrinkGrace))
	}
	if c.IdentityGrace <= 0 {
		errs = append(errs, fmt.Errorf("--identity-grace %v: must be positive (a number nothing uses stays reserved this long, so a label set that comes back keeps it)", c.IdentityGrace))
	}
	errs = append(errs, c.validateIdentity()...)
	errs = append(errs, c.validateTunnel()...)
	if err := c.validateBudget(); err != nil {
		errs = append(errs, err)
	}
	if c.FlowLogMaxSize < 0 || c.FlowLogMaxFiles < 0 {
		errs = append(errs, errors.New("--flow-log-max-size and --flow-log-max-files must not be negative"))
	}
	for name, p := range map[string]string{"--socket": c.Socket, "--state-dir": c.StateDir, "--bpffs": c.BPFFS} {
		if !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("%s %q: must be an absolute path", name, p))
		}
	}
	if c.Pprof && c.MetricsAddr == "" {
		errs = append(errs, errors.New("--pprof serves on --metrics-addr, which is empty"))
	}
	for _, d := range c.NetnsDirs {
		if !filepath.IsAbs(d) {
			errs = append(errs, fmt.Errorf("--netns-dir %q: must be an absolute path", d))
		}
	}
	if c.CNICacheDir != "" && !filepath.IsAbs(c.CNICacheDir) {
		errs = append(errs, fmt.Errorf("--cni-cache-dir %q: must be an absolute path", c.CNICacheDir))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	return nil
}

// validateAlertLog checks where runtime alerts go.
func (c *Config) validateAlertLog() []error {
	var errs []error
	if c.RuntimeDetection && c.FlowLog == "" && c.AlertLog == "" {
		// Alerts must go somewhere a user looks; a flag that detects into
		// nothing would be worse than none.
		errs = append(errs, errors.New("--runtime-detection writes alerts to --alert-log, or to the flow log without it: it needs --alert-log or --flow-log"))
	}
	if c.AlertLog != "" && !c.RuntimeDetection {
		errs = append(errs, errors.New("--alert-log holds runtime alerts: it needs --runtime-detection"))
	}
	if c.AlertLog != "" && c.FlowLog != "" && filepath.Clean(c.AlertLog) == filepath.Clean(c.FlowLog) {
		errs = append(errs, fmt.Errorf("--alert-log %s is the --flow-log: drop --alert-log to write alerts into the flow log", c.AlertLog))
	}
	if c.AlertLogMaxSize < 0 || c.AlertLogMaxFiles < 0 {
		errs = append(errs, errors.New("--alert-log-max-size and --alert-log-max-files must not be negative"))
	}
	if c.ScanThreshold < 0 || c.ScanWindow < 0 {
		errs = append(errs, errors.New("--scan-threshold and --scan-window must not be negative"))
	}
	if c.ScanThreshold == 1 {
		// One denied connection is a policy at work, not a scan.
		errs = append(errs, errors.New("--scan-threshold 1 would call every denied connection a scan: use 2 or more"))
	}
	return errs
}

// DefaultSVIDTTL is the lifetime of the built-in CA's SVIDs; they are
// renewed at half of it.
const DefaultSVIDTTL = time.Hour

func (c *Config) validateIdentity() []error {
	var errs []error
	if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
		errs = append(errs, fmt.Errorf("--trust-domain %q: %w", c.TrustDomain, err))
	}
	switch c.IdentitySource {
	case identity.SourceNone, identity.SourceBuiltin:
		if c.SPIREAdminSocket != "" {
			errs = append(errs, fmt.Errorf("--spire-admin-socket is set but --identity-source is %s: drop one of them", c.IdentitySource))
		}
	case identity.SourceSPIRE:
		if c.SPIREAdminSocket == "" {
			errs = append(errs, errors.New("--identity-source spire needs --spire-admin-socket (the SPIRE agent's admin_socket_path, not its workload socket)"))
		} else if !filepath.IsAbs(c.SPIREAdminSocket) {
			errs = append(errs, fmt.Errorf("--spire-admin-socket %q: must be an absolute path", c.SPIREAdminSocket))
		}
	default:
		errs = append(errs, fmt.Errorf("--identity-source %q: want none, builtin or spire", c.IdentitySource))
	}
	if c.SVIDTTL < time.Minute || c.SVIDTTL > 30*24*time.Hour {
		errs = append(errs, fmt.Errorf("--svid-ttl %v: want between 1m and 720h", c.SVIDTTL))
	}
	return errs
}

func (c *Config) validateTunnel() []error {
	var errs []error
	if c.TunnelPort == 0 {
		errs = append(errs, errors.New("--tunnel-port 0: want a port"))
	}
	if c.RedirectPort == 0 {
		errs = append(errs, errors.New("--tunnel-redirect-port 0: want a port"))
	}
	if c.TunnelPort != 0 && c.TunnelPort == c.RedirectPort {
		errs = append(errs, fmt.Errorf("--tunnel-port and --tunnel-redirect-port are both %d: they must differ", c.TunnelPort))
	}
	if c.TunnelMark == 0 || c.TunnelMark&^TunnelMarkMask != 0 {
		errs = append(errs, fmt.Errorf("--tunnel-mark %#x: want a non-zero value within the mask %#x", c.TunnelMark, TunnelMarkMask))
	}
	return errs
}

// ErrConfig marks an invalid configuration: each problem names its flag.
var ErrConfig = errors.New("invalid configuration")
