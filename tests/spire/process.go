package spiretest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// EnvBin names the folder that holds spire-server and spire-agent.
const EnvBin = "BULKHEAD_SPIRE_BIN"

// Generous: the machine running the tests may be small and busy.
const (
	startTimeout = 90 * time.Second
	stopTimeout  = 15 * time.Second
)

// Bin returns the folder of the SPIRE binaries. Without them the test is
// skipped, unless privileged tests are mandatory in this run
// (BULKHEAD_PRIVILEGED=1): then it fails, so that CI can never pass a SPIRE
// test by skipping it.
func Bin(t testing.TB) string {
	t.Helper()
	dir := os.Getenv(EnvBin)
	missing := ""
	if dir == "" {
		missing = EnvBin + " is not set"
	} else {
		for _, b := range []string{"spire-server", "spire-agent"} {
			if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || fi.Mode()&0o111 == 0 {
				missing = fmt.Sprintf("%s has no executable %s (run `make spire`)", dir, b)
				break
			}
		}
	}
	if missing != "" {
		if privileged.Required() {
			t.Fatalf("SPIRE binaries needed under %s=1: %s", privileged.EnvVar, missing)
		}
		t.Skipf("SPIRE test: %s", missing)
	}
	return dir
}

// process is one SPIRE daemon. It can be stopped and started again with the
// same arguments; its output of every run goes to one log file.
type process struct {
	name    string
	path    string
	args    []string
	logPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

func (p *process) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		return fmt.Errorf("%s is already running", p.name)
	}
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open log of %s: %w", p.name, err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "=== start %s %s at %s\n", p.path, strings.Join(p.args, " "), time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(p.path, p.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// A test binary that dies (timeout panic, kill) must not leave SPIRE
	// daemons behind holding ports and sockets.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	// Pdeathsig fires when the OS thread that forked the child exits, not
	// the process. Go ends a thread whose goroutine exits while locked to
	// it, as netns helpers do (testutils.NewNS), and that thread may be the
	// one that forked: the daemon would be killed in the middle of a test.
	// So the fork happens on a locked thread that lives until the daemon
	// exits.
	started := make(chan error)
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		_ = cmd.Wait()
		close(done)
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	p.cmd, p.done = cmd, done
	return nil
}

// exited is closed when the current run ends (nil when not started).
func (p *process) exited() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done
}

// stop ends the process: SIGTERM first (SPIRE closes its sockets and
// datastore cleanly), SIGKILL when it does not exit in time.
func (p *process) stop() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return nil
	}
	cmd, done := p.cmd, p.done
	p.cmd, p.done = nil, nil
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
		return nil
	case <-time.After(stopTimeout):
	}
	_ = cmd.Process.Kill()
	<-done
	return fmt.Errorf("%s did not stop on SIGTERM within %v, killed", p.name, stopTimeout)
}

func (p *process) log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return string(b)
}

// waitHealthy runs check until it succeeds, failing early when the process
// exits.
func (p *process) waitHealthy(check func() error) error {
	deadline := time.Now().Add(startTimeout)
	exited := p.exited()
	var err error
	for time.Now().Before(deadline) {
		if err = check(); err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%s exited while starting (last check: %w)", p.name, err)
		case <-time.After(250 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s not healthy after %v: %w", p.name, startTimeout, err)
}

// run runs a CLI command of a SPIRE binary and returns its output.
func run(path string, args ...string) ([]byte, error) {
	cmd := exec.Command(path, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s%s", filepath.Base(path), strings.Join(args, " "), err,
			strings.TrimSpace(errb.String()), strings.TrimSpace(out.String()))
	}
	return []byte(out.String()), nil
}
