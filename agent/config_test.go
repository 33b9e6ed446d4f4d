package agent

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A zero field is "unset" (its default) for Go callers, and what the user
// gave when it came from a flag: a flag of 0 that is not allowed is an
// error naming the flag, never silently replaced by the default.
func TestConfigFlagBounds(t *testing.T) {
	dir := t.TempDir()
	valid := func() Config {
		return Config{FromFlags: true, StateDir: filepath.Join(dir, "state"), Socket: filepath.Join(dir, "s"),
			BPFFS: filepath.Join(dir, "bpf"), FlowRing: DefaultFlowRing, StoreShrinkGrace: DefaultStoreShrinkGrace,
			IdentityGrace: DefaultIdentityGrace, SVIDTTL: DefaultSVIDTTL,
			TunnelPort: DefaultTunnelPort, RedirectPort: DefaultRedirectPort, TunnelMark: DefaultTunnelMark}
	}
	c := valid()
	c.Datapath.MaxPolicyEntries = DefaultPolicyMapEntries
	if err := c.setDefaults(); err != nil {
		t.Fatalf("the flags' defaults: %v", err)
	}
	tests := []struct {
		name, flag string
		set        func(*Config)
		ok         bool
	}{
		{"runtime detection without a flow log", "--runtime-detection", func(c *Config) { c.RuntimeDetection = true }, false},
		{"runtime detection with an ocsf flow log", "", func(c *Config) {
			c.RuntimeDetection, c.FlowLog, c.FlowFormat = true, "/var/log/flows", "ocsf"
		}, true},
		{"runtime detection with an alert log only", "", func(c *Config) { c.RuntimeDetection, c.AlertLog = true, "/var/log/alerts" }, true},
		{"runtime detection with an ocsf alert log only", "", func(c *Config) {
			c.RuntimeDetection, c.AlertLog, c.FlowFormat = true, "/var/log/alerts", "ocsf"
		}, true},
		{"alert log without runtime detection", "--alert-log", func(c *Config) { c.AlertLog = "/var/log/alerts" }, false},
		{"alert log is the flow log", "--alert-log", func(c *Config) {
			c.RuntimeDetection, c.AlertLog, c.FlowLog = true, "/var/log/flows", "/var/log/./flows"
		}, false},
		{"alert log max size negative", "--alert-log-max-size", func(c *Config) {
			c.RuntimeDetection, c.AlertLog, c.AlertLogMaxSize = true, "/var/log/alerts", -1
		}, false},
		{"alert log max files negative", "--alert-log-max-files", func(c *Config) {
			c.RuntimeDetection, c.AlertLog, c.AlertLogMaxFiles = true, "/var/log/alerts", -1
		}, false},
		{"runtime detection with a json flow log", "", func(c *Config) { c.RuntimeDetection, c.FlowLog = true, "/var/log/flows" }, true},
		{"identity grace 0", "--identity-grace", func(c *Config) { c.IdentityGrace = 0 }, false},
		{"identity grace negative", "--identity-grace", func(c *Config) { c.IdentityGrace = -time.Second }, false},
		{"identity grace 1ns", "", func(c *Config) { c.IdentityGrace = time.Nanosecond }, true},
		{"store shrink grace 0", "--store-shrink-grace", func(c *Config) { c.StoreShrinkGrace = 0 }, false},
		{"store shrink grace negative", "--store-shrink-grace", func(c *Config) { c.StoreShrinkGrace = -1 }, false},
		{"store shrink grace 1ns", "", func(c *Config) { c.StoreShrinkGrace = 1 }, true},
		{"svid ttl 0", "--svid-ttl", func(c *Config) { c.SVIDTTL = 0 }, false},
		{"svid ttl 59s", "--svid-ttl", func(c *Config) { c.SVIDTTL = 59 * time.Second }, false},
		{"svid ttl 1m", "", func(c *Config) { c.SVIDTTL = time.Minute }, true},
		{"identity source bogus", "--identity-source", func(c *Config) { c.IdentitySource = "vault" }, false},
		{"spire without socket", "--spire-admin-socket", func(c *Config) { c.IdentitySource = "spire" }, false},
		{"spire socket relative", "--spire-admin-socket", func(c *Config) { c.SPIREAdminSocket = "admin.sock" }, false},
		{"spire socket with builtin", "--spire-admin-socket", func(c *Config) { c.IdentitySource = "builtin"; c.SPIREAdminSocket = "/run/spire/admin.sock" }, false},
		{"spire socket implies spire", "", func(c *Config) { c.SPIREAdminSocket = "/run/spire/admin.sock" }, true},
		{"trust domain bad", "--trust-domain", func(c *Config) { c.TrustDomain = "Bad Domain" }, false},
		{"flow ring 0", "--flow-ring", func(c *Config) { c.FlowRing = 0 }, false},
		{"policy map entries 0", "--policy-map-entries", func(c *Config) { c.Datapath.MaxPolicyEntries = 0 }, false},
		{"policy map entries 1023", "--policy-map-entries", func(c *Config) { c.Datapath.MaxPolicyEntries = MinPolicyMapEntries - 1 }, false},
		{"policy map entries 1024", "", func(c *Config) { c.Datapath.MaxPolicyEntries = MinPolicyMapEntries }, true},
		{"policy map entries 2^24", "", func(c *Config) { c.Datapath.MaxPolicyEntries = MaxPolicyMapEntries }, true},
		{"policy map entries 2^24+1", "--policy-map-entries", func(c *Config) { c.Datapath.MaxPolicyEntries = MaxPolicyMapEntries + 1 }, false},
		{"tunnel port 0", "--tunnel-port", func(c *Config) { c.TunnelPort = 0 }, false},
		{"redirect port 0", "--tunnel-redirect-port", func(c *Config) { c.RedirectPort = 0 }, false},
		{"tunnel ports equal", "--tunnel-port", func(c *Config) { c.RedirectPort = c.TunnelPort }, false},
		{"tunnel mark 0", "--tunnel-mark", func(c *Config) { c.TunnelMark = 0 }, false},
		{"tunnel mark outside mask", "--tunnel-mark", func(c *Config) { c.TunnelMark = 0x1b00 }, false},
		{"tunnel mark 0x100", "", func(c *Config) { c.TunnelMark = 0x100 }, true},
		{"policy budget negative", "--policy-budget-endpoint", func(c *Config) { c.PolicyBudgetEndpoint = -1 }, false},
	}
	for _, tt := range tests {
		c := valid()
		c.Datapath.MaxPolicyEntries = DefaultPolicyMapEntries
		tt.set(&c)
		before := c
		err := c.setDefaults()
		switch {
		case tt.ok && err != nil:
			t.Errorf("%s: %v", tt.name, err)
		case !tt.ok && err == nil:
			t.Errorf("%s: accepted (now %v identity grace, %v store grace, %d flow ring, %d policy entries)", tt.name,
				c.IdentityGrace, c.StoreShrinkGrace, c.FlowRing, c.Datapath.MaxPolicyEntries)
		case !tt.ok && (!errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.flag)):
			t.Errorf("%s: error %q does not name %s", tt.name, err, tt.flag)
		}
		if tt.ok && (c.IdentityGrace != before.IdentityGrace || c.StoreShrinkGrace != before.StoreShrinkGrace) {
			t.Errorf("%s: a given value was replaced: %+v", tt.name, c)
		}
	}

	// Go callers: zero is unset, and means the default.
	var z Config
	if err := z.setDefaults(); err != nil {
		t.Fatalf("zero Config: %v", err)
	}
	if z.IdentityGrace != DefaultIdentityGrace || z.StoreShrinkGrace != DefaultStoreShrinkGrace || z.FlowRing != DefaultFlowRing {
		t.Errorf("zero Config: %v identity grace, %v store grace, %d flow ring; want the defaults", z.IdentityGrace, z.StoreShrinkGrace, z.FlowRing)
	}
}
