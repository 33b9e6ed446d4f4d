package twonode

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
)

// Store files the topology writes; callers must not declare these pods in
// files of their own (the store rejects a pod defined twice).
const (
	// PodsFile holds a node's own pods (labels, service account).
	PodsFile = "twonode-pods.yaml"
	// PeersFile holds the other node's pods, with their addresses.
	PeersFile = "twonode-peers.yaml"
)

// agentReadyTimeout is generous: the machine running the tests is slow and
// shared.
const agentReadyTimeout = 20 * time.Second

// Node is one node: a network namespace with its agent and CNI chain.
type Node struct {
	// Name is NodeA or NodeB, the agent's --node-name.
	Name string
	// NS is the node's network namespace (the "host" namespace of its
	// pods' veths and of its agent).
	NS ns.NetNS
	// Paths given to the agent.
	Socket, StateDir, BPFFS, FlowLog, StoreDir string
	// Args are the agent's arguments beyond the topology's own (from
	// Config.ExtraAgentArgs). Change them, then RestartAgent.
	Args []string
	// Client talks to the node's agent.
	Client *api.Client
	// PodCIDR4 and PodCIDR6 (IPv6 topologies only) are the node's pod
	// subnets.
	PodCIDR4, PodCIDR6 netip.Prefix
	// TransitIP4 and TransitIP6 (IPv6 topologies only) are the node's
	// addresses on the link to the other node.
	TransitIP4, TransitIP6 netip.Addr
	// Chain is the node's CNI chain (run it only inside NS, as AddPod
	// does).
	Chain *cnichain.Chain

	t    testing.TB
	bin  string
	ipv6 bool
	topo *Topology

	mu    sync.Mutex
	agent *agentProc
	logs  syncBuffer
	pods  []*Pod
}

type agentProc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// WriteStore writes a store file (write, then rename, so the agent never
// reads half of it).
func (n *Node) WriteStore(name, yaml string) {
	n.t.Helper()
	tmp := filepath.Join(n.StoreDir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(yaml), 0o644); err != nil {
		n.t.Fatalf("%s: write store file: %v", n.Name, err)
	}
	if err := os.Rename(tmp, filepath.Join(n.StoreDir, name)); err != nil {
		n.t.Fatalf("%s: write store file: %v", n.Name, err)
	}
}

// RemoveStore removes a store file.
func (n *Node) RemoveStore(name string) {
	n.t.Helper()
	if err := os.Remove(filepath.Join(n.StoreDir, name)); err != nil {
		n.t.Fatalf("%s: remove store file: %v", n.Name, err)
	}
}

// StartAgent starts the node's agent inside the node's namespace and waits
// until its API says it is ready. The agent's output goes to AgentLog.
func (n *Node) StartAgent() {
	n.t.Helper()
	n.mu.Lock()
	running := n.agent != nil && !n.agent.exited()
	n.mu.Unlock()
	if running {
		n.t.Fatalf("%s: agent already running", n.Name)
	}
	p, err := n.launch()
	if err != nil {
		n.t.Fatalf("%s: %v", n.Name, err)
	}
	n.mu.Lock()
	n.agent = p
	n.mu.Unlock()
	deadline := time.Now().Add(agentReadyTimeout)
	for {
		st, err := n.Client.Status(context.Background())
		if err == nil && st.Ready {
			return
		}
		if p.exited() {
			n.t.Fatalf("%s: agent exited during start (%v):\n%s", n.Name, p.cmd.ProcessState, n.logs.String())
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("%s: agent not ready after %v (last: %+v, %v):\n%s", n.Name, agentReadyTimeout, st, err, n.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// launch starts the agent binary from a thread inside the node namespace;
// the child inherits that thread's namespace (not its mount namespace:
// bpffs stays visible, unlike under `ip netns exec`).
func (n *Node) launch() (*agentProc, error) {
	cmd := exec.Command(n.bin, "--store", "dir:"+n.StoreDir, "--socket", n.Socket, "--state-dir", n.StateDir,
		"--bpffs", n.BPFFS, "--flow-log", n.FlowLog, "--metrics-addr", "", "--node-name", n.Name, "--log-level", "debug")
	cmd.Args = append(cmd.Args, n.Args...)
	fmt.Fprintf(&n.logs, "---- %s: %s ----\n", time.Now().Format(time.TimeOnly), strings.Join(cmd.Args, " "))
	cmd.Stdout, cmd.Stderr = &n.logs, &n.logs
	// If the test binary dies outright, the kernel kills the agent too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p := &agentProc{cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the thread that forked the child ends, so
		// this thread lives as long as the agent. It never returns to the
		// host namespace: it ends locked, and Go discards it.
		runtime.LockOSThread()
		defer close(p.done)
		if err := n.NS.Set(); err != nil {
			started <- fmt.Errorf("enter %s: %w", n.NS.Path(), err)
			return
		}
		if err := cmd.Start(); err != nil {
			started <- fmt.Errorf("start agent: %w", err)
			return
		}
		started <- nil
		_ = cmd.Wait()
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return p, nil
}

func (p *agentProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// StopAgent stops the agent with SIGTERM (SIGKILL after 10 s) and waits
// for it to exit. Its pins stay, as after a real agent restart.
func (n *Node) StopAgent() {
	n.t.Helper()
	if err := n.stopAgent(syscall.SIGTERM); err != nil {
		n.t.Errorf("%s: %v", n.Name, err)
	}
}

// KillAgent kills the agent with SIGKILL, as a crash would.
func (n *Node) KillAgent() {
	n.t.Helper()
	if err := n.stopAgent(syscall.SIGKILL); err != nil {
		n.t.Errorf("%s: %v", n.Name, err)
	}
}

func (n *Node) stopAgent(sig syscall.Signal) error {
	n.mu.Lock()
	p := n.agent
	n.mu.Unlock()
	if p == nil || p.exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return nil
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("agent (pid %d) ignored %v for 10s and was killed", p.cmd.Process.Pid, sig)
	}
}

// RestartAgent stops the agent and starts it again with the current Args.
func (n *Node) RestartAgent() {
	n.t.Helper()
	n.StopAgent()
	n.StartAgent()
}

// AgentRunning reports whether the agent process is alive.
func (n *Node) AgentRunning() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.agent != nil && !n.agent.exited()
}

// AgentPID is the running agent's process ID, 0 when none runs.
func (n *Node) AgentPID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.agent == nil || n.agent.exited() {
		return 0
	}
	return n.agent.cmd.Process.Pid
}

// AgentLog is everything the node's agents wrote, every start included.
func (n *Node) AgentLog() string { return n.logs.String() }

// FlowLines returns the node's flow log records that contain every needle.
func (n *Node) FlowLines(needles ...string) []string {
	n.t.Helper()
	f, err := os.Open(n.FlowLog)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		n.t.Fatalf("%s: %v", n.Name, err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
next:
	for sc.Scan() {
		for _, s := range needles {
			if !strings.Contains(sc.Text(), s) {
				continue next
			}
		}
		out = append(out, sc.Text())
	}
	return out
}

// Pods are the node's pods, in the order they were added.
func (n *Node) Pods() []*Pod {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.pods)
}

// writePods rewrites PodsFile from the node's pods.
func (n *Node) writePods() {
	n.t.Helper()
	docs, err := podDocs(n.Pods(), false, nil)
	if err != nil {
		n.t.Fatalf("%s: %v", n.Name, err)
	}
	n.WriteStore(PodsFile, docs)
}

// cleanup stops the agent and removes its pins; the pods' cleanups ran
// before it. On failure (or with BULKHEAD_E2E_LOGS=1) it prints the
// agent's log and the flow log.
func (n *Node) cleanup() {
	if err := n.stopAgent(syscall.SIGTERM); err != nil {
		n.t.Errorf("%s: %v", n.Name, err)
	}
	n.Client.Close()
	if err := os.RemoveAll(n.BPFFS); err != nil {
		n.t.Errorf("%s: remove pins: %v", n.Name, err)
	}
	if n.t.Failed() || os.Getenv("BULKHEAD_E2E_LOGS") == "1" {
		n.t.Logf("%s agent log:\n%s", n.Name, n.AgentLog())
		n.t.Logf("%s flow log:\n%s", n.Name, strings.Join(n.FlowLines(), "\n"))
	}
}

// prefixNet is p as netlink wants it, the address kept as given (an
// interface address) rather than masked.
func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
