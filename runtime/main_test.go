package runtime

import (
	"fmt"
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	// Re-executed as the helper that acts from inside a namespace.
	if action := os.Getenv(helperActionEnv); action != "" {
		if err := runHelper(action, os.Getenv(helperNetnsEnv)); err != nil {
			fmt.Fprintln(os.Stderr, "sysmon helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	// Re-executed as a program of TestBenignPodMix's pod.
	if role := os.Getenv(benignRoleEnv); role != "" {
		if err := runBenignRole(role); err != nil {
			fmt.Fprintln(os.Stderr, "benign pod program:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}
