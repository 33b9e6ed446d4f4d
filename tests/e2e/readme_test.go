package e2e

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/tests/cnichain"
)

// readmeCommand is a "$ bulkhead ..." line of a console block in the README,
// with the output the README shows for it (possibly none).
type readmeCommand struct {
	line   int
	cmd    string
	output []string
}

func readmeCommands(t *testing.T, path string) []readmeCommand {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []readmeCommand
	inConsole := false
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		l := sc.Text()
		switch {
		case strings.HasPrefix(l, "```console"):
			inConsole = true
		case strings.HasPrefix(l, "```"):
			inConsole = false
		case inConsole && strings.HasPrefix(l, "$ "):
			out = append(out, readmeCommand{line: n, cmd: strings.TrimPrefix(l, "$ ")})
		case inConsole && len(out) > 0:
			out[len(out)-1].output = append(out[len(out)-1].output, l)
		}
	}
	return out
}

// TestReadmeCommands runs every command the README shows, so the README
// cannot rot: offline commands must print exactly what the README says
// (where it shows output, except for times), live ones must succeed against
// an agent that runs the README's example store.
func TestReadmeCommands(t *testing.T) {
	root := cnichain.RepoRoot(t)
	cmds := readmeCommands(t, filepath.Join(root, "README.md"))
	if len(cmds) < 4 {
		t.Fatalf("found only %d README commands; the extractor is broken", len(cmds))
	}
	e := newEnv(t, "ptp")
	example, _ := filepath.Glob(filepath.Join(root, "manifests", "examples", "shop", "*.yaml"))
	for _, f := range example {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		e.writeStore(filepath.Base(f), string(data))
	}
	e.startAgent()
	for _, c := range cmds {
		args := strings.Fields(c.cmd)
		if args[0] != "bulkhead" {
			t.Fatalf("README line %d: %q is not a bulkhead command; teach this test to run it", c.line, c.cmd)
		}
		cmd := exec.Command(filepath.Join(root, "bin", "bulkhead"), args[1:]...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "BULKHEAD_SOCKET="+e.socket)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("README line %d: %s: %v\n%s", c.line, c.cmd, err, out)
			continue
		}
		// Live output (observe) depends on traffic; offline output must match.
		if strings.Contains(c.cmd, " observe") || len(c.output) == 0 {
			continue
		}
		want := strings.Join(c.output, "\n")
		if got := strings.TrimRight(string(out), "\n"); got != want {
			t.Errorf("README line %d: %s printed\n%s\nbut the README says\n%s", c.line, c.cmd, got, want)
		}
	}
}
