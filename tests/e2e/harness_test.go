package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// env is one end-to-end environment: a store folder, a running agent (the
// real binary) and a CNI chain whose last plugin is bulkhead-cni.
type env struct {
	t        testing.TB
	dir      string
	store    string
	socket   string
	stateDir string
	bpffs    string
	flowLog  string
	chain    *cnichain.Chain
	agent    *agentProc
	client   *api.Client
	// extraArgs are added to the agent's command line.
	extraArgs []string
	// agentBin, when set, is the agent binary launchAgent runs instead of
	// bin/bulkhead-agent (an older build, for the upgrade tests).
	agentBin string
}

type agentProc struct {
	cmd  *exec.Cmd
	logs *syncBuffer
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

func randomHex(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// newEnv prepares a store and a chain; the agent is started by startAgent.
func newEnv(t testing.TB, primary string) *env {
	t.Helper()
	return newEnvConfig(t, primary, false)
}

// newEnvConfig is newEnv with dual-stack pods when ipv6 is set.
func newEnvConfig(t testing.TB, primary string, ipv6 bool) *env {
	t.Helper()
	return newEnvWait(t, primary, ipv6, 5)
}

// newEnvWait sets the conflist's agentWaitSeconds, how long an ADD waits for
// an agent that is not up yet.
func newEnvWait(t testing.TB, primary string, ipv6 bool, agentWait float64) *env {
	t.Helper()
	privileged.Require(t)
	root := cnichain.RepoRoot(t)
	if _, err := os.Stat(filepath.Join(root, "bin", "bulkhead-agent")); err != nil {
		t.Fatalf("bin/bulkhead-agent missing (run `make build`): %v", err)
	}
	dir := t.TempDir()
	e := &env{
		t: t, dir: dir,
		store:    filepath.Join(dir, "store"),
		socket:   filepath.Join(dir, "run", "agent.sock"),
		stateDir: filepath.Join(dir, "state"),
		bpffs:    "/sys/fs/bpf/bulkhead-e2e-" + randomHex(t, 4),
		flowLog:  filepath.Join(dir, "flows.json"),
	}
	if err := os.MkdirAll(e.store, 0o755); err != nil {
		t.Fatal(err)
	}
	e.chain = cnichain.New(t, cnichain.Config{Primary: primary, CNIVersion: "1.1.0", IPv6: ipv6,
		Bulkhead: &cnichain.BulkheadConfig{Socket: e.socket, AgentWaitSeconds: agentWait}})
	e.client = api.NewClient(api.ClientConfig{Socket: e.socket, Timeout: 5 * time.Second})
	t.Cleanup(func() {
		e.stopAgent(syscall.SIGTERM)
		e.client.Close()
		// The pods' cleanups (registered later) ran already: remove what
		// the agent pinned.
		_ = os.RemoveAll(e.bpffs)
		if (t.Failed() || os.Getenv("BULKHEAD_E2E_LOGS") == "1") && e.agent != nil {
			t.Logf("agent log:\n%s", e.agent.logs.String())
			t.Logf("flow log:\n%s", strings.Join(e.flowLines(), "\n"))
		}
	})
	return e
}

func (e *env) writeStore(name, yaml string) {
	e.t.Helper()
	// Write then rename, as a config management tool would, so the agent
	// never reads half a file.
	tmp := filepath.Join(e.store, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(yaml), 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(e.store, name)); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) removeStore(name string) {
	e.t.Helper()
	if err := os.Remove(filepath.Join(e.store, name)); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) startAgent() {
	e.t.Helper()
	e.launchAgent()
	e.waitReady()
}

// launchAgent starts the agent and does not wait for it to be ready.
func (e *env) launchAgent() {
	e.t.Helper()
	bin := filepath.Join(cnichain.RepoRoot(e.t), "bin", "bulkhead-agent")
	if e.agentBin != "" {
		bin = e.agentBin
	}
	cmd := exec.Command(bin, "--store", "dir:"+e.store, "--socket", e.socket, "--state-dir", e.stateDir,
		"--bpffs", e.bpffs, "--flow-log", e.flowLog, "--metrics-addr", "", "--node-name", "e2e-node", "--log-level", "debug")
	cmd.Args = append(cmd.Args, e.extraArgs...)
	logs := &syncBuffer{}
	if e.agent != nil {
		logs = e.agent.logs
		fmt.Fprintf(logs, "---- agent restarted ----\n")
	}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		e.t.Fatalf("start agent: %v", err)
	}
	p := &agentProc{cmd: cmd, logs: logs, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	e.agent = p
}

func (e *env) waitReady() {
	e.t.Helper()
	// Generous: loading the datapath is seconds of verifier time, and
	// more on a busy 2-vCPU machine.
	deadline := time.Now().Add(60 * time.Second)
	for {
		st, err := e.client.Status(context.Background())
		if err == nil && st.Ready {
			return
		}
		select {
		case <-e.agent.done:
			e.t.Fatalf("agent exited during start:\n%s", e.agent.logs.String())
		default:
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("agent not ready after 60s (last: %+v, %v):\n%s", st, err, e.agent.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (e *env) stopAgent(sig syscall.Signal) {
	if e.agent == nil {
		return
	}
	select {
	case <-e.agent.done:
		return
	default:
	}
	_ = e.agent.cmd.Process.Signal(sig)
	select {
	case <-e.agent.done:
	case <-time.After(10 * time.Second):
		_ = e.agent.cmd.Process.Kill()
		<-e.agent.done
	}
}

// pod is a pod added through the chain, with its addresses.
type pod struct {
	*cnichain.Pod
	IPv4 netip.Addr
	// IPv6 is the pod's IPv6 address on dual-stack chains.
	IPv6 netip.Addr
}

func (e *env) addPod(namespace, name string) *pod {
	e.t.Helper()
	p := e.chain.NewPod(e.t)
	p.Namespace, p.Name = namespace, name
	res, err := e.chain.Add(context.Background(), p)
	if err != nil {
		e.t.Fatalf("ADD %s/%s: %v\nagent log:\n%s", namespace, name, err, e.agentLogs())
	}
	return &pod{Pod: p, IPv4: firstIPv4(e.t, res), IPv6: firstIPv6(e.t, res)}
}

// firstIPv6 is the result's first IPv6 address, if any.
func firstIPv6(t testing.TB, r types.Result) netip.Addr {
	t.Helper()
	res, err := current.NewResultFromResult(r)
	if err != nil {
		t.Fatal(err)
	}
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Is6() && !a.Is4In6() {
			return a
		}
	}
	return netip.Addr{}
}

func (e *env) agentLogs() string {
	if e.agent == nil {
		return "(no agent)"
	}
	return e.agent.logs.String()
}

func firstIPv4(t testing.TB, r types.Result) netip.Addr {
	t.Helper()
	res, err := current.NewResultFromResult(r)
	if err != nil {
		t.Fatal(err)
	}
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			return a.Unmap()
		}
	}
	t.Fatalf("no IPv4 in result %v", res)
	return netip.Addr{}
}

// serve echoes TCP and UDP (IPv4) on port in the pod's netns.
func (p *pod) serve(t testing.TB, port int) {
	t.Helper()
	netns.ServeEcho(t, p.NS, port, "4")
}

// dial connects from p to addr:port from inside p's netns.
func (p *pod) dial(network string, to netip.Addr, port int, timeout time.Duration) (net.Conn, error) {
	return netns.Dial(p.NS, network, to, port, timeout)
}

// tcpWorks reports whether a TCP connection from p to addr:port carries an
// echo within a short time.
func (p *pod) tcpWorks(to netip.Addr, port int) bool {
	c, err := p.dial("tcp4", to, port, 700*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	return echo(c)
}

// udpWorks reports whether a UDP datagram from p to addr:port comes back.
func (p *pod) udpWorks(to netip.Addr, port int) bool {
	c, err := p.dial("udp4", to, port, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	return echo(c)
}

func echo(c net.Conn) bool { return netns.Echo(c, 700*time.Millisecond) }

// eventually retries cond for up to d.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// flowLines returns the flow log's records that contain every needle.
func (e *env) flowLines(needles ...string) []string {
	f, err := os.Open(e.flowLog)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
next:
	for sc.Scan() {
		for _, n := range needles {
			if !strings.Contains(sc.Text(), n) {
				continue next
			}
		}
		out = append(out, sc.Text())
	}
	return out
}

// forEachChain runs test once with ptp + host-local + bulkhead-cni and once
// with bridge + host-local + bulkhead-cni: the plugin must work after any
// veth-based primary CNI.
func forEachChain(t *testing.T, test func(t *testing.T, primary string)) {
	for _, primary := range []string{"ptp", "bridge"} {
		t.Run(primary, func(t *testing.T) { test(t, primary) })
	}
}
