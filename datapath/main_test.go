package datapath

import (
	"fmt"
	"os"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
)

type nsHandle = ns.NetNS

func TestMain(m *testing.M) {
	// Re-executed as the child loader of TestIntegrationPinnedSurvivesLoader.
	if os.Getenv(childEnv) != "" {
		if err := runChildLoader(); err != nil {
			fmt.Fprintln(os.Stderr, "child loader:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}
