package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The agent's flags are checked once, by agent.New, and main reports the
// problem (naming the flag) and exits 2 before touching anything. This
// re-runs the test binary as the agent with the flags under test.
func TestBadFlagsAreReported(t *testing.T) {
	if args := os.Getenv("BULKHEAD_AGENT_TEST_ARGS"); args != "" {
		os.Args = append([]string{"bulkhead-agent"}, strings.Fields(args)...)
		main()
		os.Exit(0)
	}
	dir := t.TempDir()
	base := "--state-dir " + filepath.Join(dir, "state") + " --socket " + filepath.Join(dir, "sock") +
		" --bpffs " + filepath.Join(dir, "bpf") + " --store dir:" + dir + " --metrics-addr="
	for _, tt := range []struct{ args, want string }{
		{"--identity-grace 0", "--identity-grace 0s: must be positive"},
		{"--store-shrink-grace 0", "--store-shrink-grace 0s: must be positive"},
		{"--policy-map-entries 1023", "--policy-map-entries 1023: want 1024 to 16777216"},
		{"--policy-map-entries 0", "--policy-map-entries 0: want 1024 to 16777216"},
		{"--policy-map-entries 99999999999", "invalid value \"99999999999\" for flag -policy-map-entries"},
		{"--flow-ring 0", "--flow-ring 0: must be positive"},
		{"--svid-ttl 2h", "--svid-ttl applies to --identity-source builtin only"},
		{"--identity-source spire --spire-admin-socket /run/spire/admin.sock --svid-ttl 2h", "--svid-ttl applies to --identity-source builtin only"},
		{"--identity-source builtin --svid-ttl 10s", "--svid-ttl 10s: want between 1m and 720h"},
		{"--identity-source vault", `--identity-source "vault": want none, builtin or spire`},
		{"--identity-source spire", "--identity-source spire needs --spire-admin-socket"},
		{"--runtime-detection", "it needs --alert-log or --flow-log"},
		{"--alert-log " + filepath.Join(dir, "alerts.log"), "--alert-log holds runtime alerts: it needs --runtime-detection"},
		{"--runtime-detection --alert-log " + filepath.Join(dir, "f.log") + " --flow-log " + filepath.Join(dir, "f.log"), "is the --flow-log"},
		{"--runtime-detection --alert-log " + filepath.Join(dir, "alerts.log") + " --alert-log-max-size -1", "--alert-log-max-size and --alert-log-max-files must not be negative"},
		{"--runtime-detection --flow-log " + filepath.Join(dir, "f.log") + " --scan-threshold 1", "--scan-threshold 1 would call every denied connection a scan"},
		{"--runtime-detection --flow-log " + filepath.Join(dir, "f.log") + " --scan-window -1s", "--scan-threshold and --scan-window must not be negative"},
		{"--quarantine-dns kube-dns", `"kube-dns" is not an IP address`},
		{"--scan-threshold 50", "--scan-threshold tunes the scan rule (BH-RT-016) of --runtime-detection, which is off"},
		{"--scan-window 30s", "--scan-window tunes the scan rule (BH-RT-016) of --runtime-detection, which is off"},
		{"--runtime-detection --flow-log " + filepath.Join(dir, "f.log") + " --alert-log-max-size 1000", "--alert-log-max-size applies to --alert-log, which is not set"},
		{"--alert-log-max-files 2", "--alert-log-max-files applies to --alert-log, which is not set"},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestBadFlagsAreReported$")
		cmd.Env = append(os.Environ(), "BULKHEAD_AGENT_TEST_ARGS="+base+" "+tt.args)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), tt.want) {
			t.Errorf("%s: exit %v, output %q; want exit 2 and %q", tt.args, err, out, tt.want)
		}
	}
}

// TestHelp: --help names every flag with two dashes, as the README and the
// errors do, gives examples, and exits 0.
func TestHelp(t *testing.T) {
	if os.Getenv("BULKHEAD_AGENT_TEST_HELP") != "" {
		os.Args = []string{"bulkhead-agent", "--help"}
		main()
		os.Exit(3) // main must exit first
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelp$")
	cmd.Env = append(os.Environ(), "BULKHEAD_AGENT_TEST_HELP=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("--help: %v\n%s", err, out)
	}
	help := string(out)
	for _, want := range []string{"Usage:", "Examples:", "  --store string", "  --runtime-detection\n", "(default 5)", "--quarantine-dns"} {
		if !strings.Contains(help, want) {
			t.Errorf("help lacks %q:\n%s", want, help)
		}
	}
	for _, line := range strings.Split(help, "\n") {
		if strings.HasPrefix(line, "  -") && !strings.HasPrefix(line, "  --") {
			t.Errorf("a flag with one dash: %q", line)
		}
		if len(line) > 100 {
			t.Errorf("line of %d columns: %q", len(line), line)
		}
	}
}
