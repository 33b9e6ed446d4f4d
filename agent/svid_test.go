package agent

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/bulkhead-io/bulkhead/agent/svids"
	"github.com/bulkhead-io/bulkhead/identity/devca"
)

// A source whose bundles are for another trust domain than --trust-domain
// issues IDs that policy does not use: status says the source is unhealthy
// and why, rather than healthy with an empty bundle.
func TestIdentitySourceOfAnotherTrustDomainIsUnhealthy(t *testing.T) {
	for _, tc := range []struct {
		sourceTD string
		healthy  bool
	}{{"cluster.local", true}, {"other.example", false}} {
		ca, err := devca.Open(t.TempDir(), spiffeid.RequireTrustDomainFromString(tc.sourceTD), devca.Options{Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		src, err := devca.NewSource(ca, devca.SourceOptions{})
		if err != nil {
			t.Fatal(err)
		}
		a := &Agent{cfg: Config{TrustDomain: "cluster.local"}, svids: svids.New(svids.Config{Source: src})}
		deadline := time.Now().Add(10 * time.Second)
		for a.svids.Bundles() == nil && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		st := a.identitySourceStatus()
		_ = a.svids.Close()
		if st.Healthy != tc.healthy || (!tc.healthy && !strings.Contains(st.LastError, "not --trust-domain cluster.local")) {
			t.Errorf("source of %s: healthy %v (%q), want %v", tc.sourceTD, st.Healthy, st.LastError, tc.healthy)
		}
		if tc.healthy && st.BundlePEM == "" {
			t.Errorf("source of %s: no bundle in status", tc.sourceTD)
		}
	}
}
