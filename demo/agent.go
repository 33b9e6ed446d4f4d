package demo

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"runtime"
	"syscall"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// agentProc is the bulkhead-agent binary the demo runs.
type agentProc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

type agentConfig struct {
	Binary                                  string
	Store, Socket, StateDir, BPFFS, FlowLog string
	// Output receives the agent's log.
	Output io.Writer
	// Orphan leaves the agent running when the demo process dies (--keep).
	Orphan bool
}

// startAgent starts the agent and waits until its API says it is ready.
func startAgent(ctx context.Context, cfg agentConfig, client *api.Client) (*agentProc, error) {
	cmd := exec.Command(cfg.Binary, "--store", "dir:"+cfg.Store, "--socket", cfg.Socket,
		"--state-dir", cfg.StateDir, "--bpffs", cfg.BPFFS, "--flow-log", cfg.FlowLog,
		"--metrics-addr", "", "--node-name", "demo-node",
		// The built-in development CA (under --state-dir/ca, removed with
		// the demo's temp dir) gives every pod an X.509-SVID without SPIRE.
		"--identity-source", "builtin",
		// The syscall hooks, for the compromised-pod step.
		"--runtime-detection")
	cmd.Stdout, cmd.Stderr = cfg.Output, cfg.Output
	// Its own process group, so a Ctrl-C in the terminal reaches only the
	// demo, which then stops the agent in order (after the CNI DELs).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if !cfg.Orphan {
		// If the demo is killed outright, the kernel kills the agent too.
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	p := &agentProc{cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	// Pdeathsig fires when the *thread* that forked the child exits, and Go
	// retires threads that end locked (the netns helpers do). So the agent
	// is started and waited for on a thread that nothing else can use.
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- fmt.Errorf("start %s: %w", cfg.Binary, err)
			close(p.done)
			return
		}
		started <- nil
		_ = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := client.Status(ctx)
		if err == nil && st.Ready {
			return p, nil
		}
		select {
		case <-p.done:
			return p, fmt.Errorf("bulkhead-agent exited during start (%v)", cmd.ProcessState)
		case <-ctx.Done():
			return p, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return p, fmt.Errorf("bulkhead-agent not ready after 20s (last status %+v, %v)", st, err)
		}
	}
}

// stop asks the agent to exit and kills it if it does not within 10 s.
func (p *agentProc) stop() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("bulkhead-agent (pid %d) ignored SIGTERM for 10s and was killed", p.cmd.Process.Pid)
	}
}
