package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
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
	// FlowRing is how many recent flows the agent keeps for `observe`.
	FlowRing int
	// MetricsAddr serves Prometheus metrics; empty serves none.
	MetricsAddr string
	NodeName    string
	TrustDomain string
	// DenyHostIngress stops the node's own traffic (kubelet probes) from
	// reaching pods without a policy that allows it.
	DenyHostIngress bool
	// StoreDebounce is how long the store must be quiet before a reload.
	StoreDebounce time.Duration
	// Version is reported in status.
	Version string
	Logger  *slog.Logger
	// Datapath tunes the datapath; BPFFS above wins over its BPFFS.
	// Datapath.MaxPolicyEntries sizes the policy trie (--policy-map-entries).
	Datapath datapath.Config
	// PolicyBudgetEndpoint and PolicyBudgetPolicy are the policy trie keys
	// (per policy generation) one endpoint and one policy may take; 0 derives them from
	// the trie's size (see policyBudget).
	PolicyBudgetEndpoint int
	PolicyBudgetPolicy   int
}

// Defaults (DESIGN.md §5).
const (
	DefaultStore    = "dir:/etc/bulkhead"
	DefaultStateDir = "/var/run/bulkhead"
	DefaultMetrics  = "127.0.0.1:9962"
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
	if c.FlowRing <= 0 {
		c.FlowRing = 4096
	}
	if c.TrustDomain == "" {
		c.TrustDomain = identity.DefaultTrustDomain
	}
	if c.StoreDebounce <= 0 {
		c.StoreDebounce = 200 * time.Millisecond
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
	return errors.Join(errs...)
}
