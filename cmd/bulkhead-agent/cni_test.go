package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/cni/install"
)

const testConflist = `{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"ptp","ipam":{"type":"host-local"}}]}`

// agentCmd re-runs the test binary as bulkhead-agent with args (see
// TestBadFlagsAreReported).
func agentCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^TestBadFlagsAreReported$")
	cmd.Env = append(os.Environ(), "BULKHEAD_AGENT_TEST_ARGS="+strings.Join(args, " "))
	return cmd
}

type cniDirs struct{ bin, conf, plugin string }

func newCNIDirs(t *testing.T) cniDirs {
	t.Helper()
	root := t.TempDir()
	d := cniDirs{bin: filepath.Join(root, "bin"), conf: filepath.Join(root, "net.d"), plugin: filepath.Join(root, "bulkhead-cni")}
	for _, p := range []string{d.bin, d.conf} {
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(d.plugin, []byte("plugin"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d.conf, "10-ptp.conflist"), []byte(testConflist), 0o644); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d cniDirs) flags() []string {
	return []string{"--cni-bin-dir", d.bin, "--cni-conf-dir", d.conf}
}

func (d cniDirs) opts() install.Options { return install.Options{BinDir: d.bin, ConfDir: d.conf} }

func TestInstallAndUninstallCNI(t *testing.T) {
	d := newCNIDirs(t)
	args := append([]string{"install-cni", "--plugin-binary", d.plugin, "--socket", "/run/bulkhead/agent.sock"}, d.flags()...)
	for i := range 2 {
		if out, err := agentCmd(args...).CombinedOutput(); err != nil {
			t.Fatalf("install-cni run %d: %v\n%s", i, err, out)
		}
	}
	if ok, err := install.Installed(d.opts()); !ok || err != nil {
		t.Fatalf("Installed: %v, %v", ok, err)
	}
	b, _ := os.ReadFile(filepath.Join(d.conf, "10-ptp.conflist"))
	if strings.Count(string(b), `"bulkhead-cni"`) != 1 || !strings.Contains(string(b), `"/run/bulkhead/agent.sock"`) {
		t.Errorf("conflist:\n%s", b)
	}
	if _, err := os.Stat(filepath.Join(d.bin, "bulkhead-cni")); err != nil {
		t.Errorf("binary: %v", err)
	}
	if out, err := agentCmd(append([]string{"uninstall-cni"}, d.flags()...)...).CombinedOutput(); err != nil {
		t.Fatalf("uninstall-cni: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(filepath.Join(d.conf, "10-ptp.conflist")); string(b) != testConflist {
		t.Errorf("not restored:\n%s", b)
	}
}

func TestInstallCNIErrors(t *testing.T) {
	d := newCNIDirs(t)
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"install-cni", "--uninstall-on-exit"}, 2, "--uninstall-on-exit needs --watch"},
		{[]string{"install-cni", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"uninstall-cni", "--watch"}, 2, "flag provided but not defined: -watch"},
		{[]string{"install-cni", "--plugin-binary", filepath.Join(d.conf, "missing")}, 1, "open plugin binary"},
	} {
		out, err := agentCmd(append(tt.args, d.flags()...)...).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != tt.code || !strings.Contains(string(out), tt.want) {
			t.Errorf("%v: %v\n%s\nwant exit %d and %q", tt.args, err, out, tt.code, tt.want)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(d.conf, "10-ptp.conflist")); string(b) != testConflist {
		t.Errorf("a failed run changed the config:\n%s", b)
	}
}

// The sidecar form: it chains the plugin, keeps it chained, and takes it out
// on SIGTERM.
func TestInstallCNIWatchUninstallsOnExit(t *testing.T) {
	d := newCNIDirs(t)
	cmd := agentCmd(append([]string{"install-cni", "--watch", "--uninstall-on-exit", "--plugin-binary", d.plugin}, d.flags()...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := false
	t.Cleanup(func() {
		if !exited {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	waitInstalled := func(what string) {
		deadline := time.Now().Add(20 * time.Second) // bounds a broken test only
		for ok, _ := install.Installed(d.opts()); !ok; ok, _ = install.Installed(d.opts()) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s\n%s", what, out.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitInstalled("the install")
	// The primary rewrites its file: the sidecar chains it again.
	if err := os.WriteFile(filepath.Join(d.conf, "10-ptp.conflist"), []byte(testConflist), 0o644); err != nil {
		t.Fatal(err)
	}
	waitInstalled("the re-insertion")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	exited = true
	if err != nil {
		t.Fatalf("exit: %v\n%s", err, out.String())
	}
	if b, _ := os.ReadFile(filepath.Join(d.conf, "10-ptp.conflist")); string(b) != testConflist {
		t.Errorf("not restored on exit:\n%s", b)
	}
	if _, err := os.Stat(filepath.Join(d.bin, "bulkhead-cni")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("binary left: %v", err)
	}
}
