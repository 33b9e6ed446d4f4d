package agent

import (
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
)

func TestPolicyBudgetFlags(t *testing.T) {
	var c Config
	if got := c.policyBudget(262144); got != (policy.Budget{Endpoint: 16384, Policy: 32768, Node: 131072}) {
		t.Errorf("defaults for the default trie: %+v", got)
	}
	c.PolicyBudgetEndpoint, c.PolicyBudgetPolicy = 100, 200
	if got := c.policyBudget(262144); got != (policy.Budget{Endpoint: 100, Policy: 200, Node: 131072}) {
		t.Errorf("flags: %+v", got)
	}
	for _, bad := range []Config{
		{PolicyBudgetEndpoint: -1},
		{PolicyBudgetPolicy: -1},
	} {
		if err := bad.validateBudget(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	c = Config{}
	c.Datapath.MaxPolicyEntries = 100
	if err := c.validateBudget(); err == nil {
		t.Error("a 100-entry policy trie accepted")
	}
}
