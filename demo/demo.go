package demo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// DefaultCNIBin is where `make cni-plugins` puts the reference plugins.
const DefaultCNIBin = "/var/cache/bulkhead/cni-plugins-v1.10.0"

// ErrSelfCheck is returned when an observed matrix differs from the
// expected one, or the compiler's prediction does.
var ErrSelfCheck = errors.New("demo self-check failed")

// Config configures a demo run.
type Config struct {
	// CNIBin holds the reference plugins ptp and host-local.
	CNIBin string
	// BinDir holds bulkhead-agent and bulkhead-cni.
	BinDir string
	// Keep leaves everything in place (agent, namespaces, files) for
	// debugging, and prints how to remove it.
	Keep bool
	Out  io.Writer
	// Color turns on ANSI colours; the caller sets it only for a terminal.
	Color bool
	// BPFFSRoot is the bpffs mount; the demo pins under a directory of its
	// own there. Default /sys/fs/bpf.
	BPFFSRoot string
}

// Timing. Denied cells cost a probe timeout each, in parallel, so a round
// takes about probeTimeout.
const (
	probeTimeout   = 300 * time.Millisecond
	applyTimeout   = 3 * time.Second
	convergeWithin = 8 * time.Second
	flowsWithin    = 2 * time.Second
)

// run is the state of one demo run.
type run struct {
	cfg Config
	// ownsRouting: the demo's agent installed the tunnel's policy routing
	// (none was there before), so the demo removes it.
	ownsRouting bool
	p           *printer
	id          string
	dir         string
	store       string
	bpffs       string
	socket      string
	flowLog     string
	client      *api.Client
	agent       *agentProc
	chain       *chain
	pods        []*pod
	byRef       map[string]*pod
	diag        *syncBuffer
	cleanups    []func() error
}

// Run runs the demo and removes what it created, whether it succeeds, fails
// or ctx is cancelled (Ctrl-C).
func Run(ctx context.Context, cfg Config) (err error) {
	if cfg.Out == nil {
		cfg.Out = os.Stdout
	}
	if cfg.CNIBin == "" {
		cfg.CNIBin = DefaultCNIBin
	}
	if cfg.BPFFSRoot == "" {
		cfg.BPFFSRoot = "/sys/fs/bpf"
	}
	r := &run{cfg: cfg, p: &printer{w: cfg.Out, color: cfg.Color}, byRef: map[string]*pod{}, diag: &syncBuffer{}}
	start := time.Now()
	defer func() {
		interrupted := err != nil && ctx.Err() != nil
		// A failed self-check has said which cells differ; anything else
		// (setup, the agent, a plugin) is explained by their logs. The
		// caller prints err itself.
		if err != nil && !interrupted && !errors.Is(err, ErrSelfCheck) {
			if tail := r.diag.tail(30); tail != "" {
				r.p.note("last lines of the agent's and the plugins' log:")
				r.p.note(tail)
			}
		}
		if interrupted {
			r.p.say("\ninterrupted: cleaning up")
			err = fmt.Errorf("interrupted: %w", ctx.Err())
		}
		if cerr := r.cleanup(); cerr != nil {
			r.p.fail("cleanup: " + cerr.Error())
			err = errors.Join(err, cerr)
		}
		if err == nil {
			done := "everything cleaned up"
			if r.cfg.Keep {
				done = "everything left in place (--keep)"
			}
			r.p.good(fmt.Sprintf("\nself-check passed; %s; %.1fs", done, time.Since(start).Seconds()))
		}
	}()
	if err := r.setup(ctx); err != nil {
		return err
	}
	return r.story(ctx)
}

// cleanup runs the registered cleanups in reverse order, all of them even
// when some fail, with a context of its own: it also runs after Ctrl-C.
func (r *run) cleanup() error {
	if r.cfg.Keep && r.dir != "" {
		script, err := r.writeCleanupScript()
		if err != nil {
			return err
		}
		r.p.heading("--keep: everything is left in place")
		r.p.say("  explore: bulkhead observe --socket \\\n             " + r.socket)
		r.p.say("  netns:   ip netns list | grep bh-" + r.id)
		// The pods' echo servers were goroutines of this process: without
		// a word, a connection to one would just be refused.
		r.p.say("  servers: the pods' echo servers ran in this process and stopped")
		r.p.say("           with it; serve again with, e.g.,")
		r.p.say("           ip netns exec bh-" + r.id + "-shop-api python3 -m http.server 8080")
		r.p.say("  remove:  sh " + script)
		return nil
	}
	var errs []error
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		if err := r.cleanups[i](); err != nil {
			errs = append(errs, err)
		}
	}
	r.cleanups = nil
	return errors.Join(errs...)
}

// onCleanup registers f to run at the end, after everything registered
// later: setup registers each undo right after the thing it undoes.
func (r *run) onCleanup(f func() error) { r.cleanups = append(r.cleanups, f) }

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random: %w", err)
	}
	return hex.EncodeToString(b), nil
}

func (r *run) setup(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo creates network namespaces and loads eBPF programs: run it as root (sudo make demo)")
	}
	var st unix.Statfs_t
	if err := unix.Statfs(r.cfg.BPFFSRoot, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("%s is not a bpffs mount: run `make bpffs` (mount -t bpf bpf %s)", r.cfg.BPFFSRoot, r.cfg.BPFFSRoot)
	}
	agentBin := filepath.Join(r.cfg.BinDir, "bulkhead-agent")
	if _, err := os.Stat(agentBin); err != nil {
		return fmt.Errorf("bulkhead-agent not found in %s: run `make build`, or pass --bin-dir", r.cfg.BinDir)
	}
	id, err := randomHex(3)
	if err != nil {
		return err
	}
	r.id = id
	r.dir, err = os.MkdirTemp("", "bulkhead-demo-"+id+"-")
	if err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}
	r.onCleanup(func() error { return os.RemoveAll(r.dir) })
	r.store = filepath.Join(r.dir, "store")
	r.socket = filepath.Join(r.dir, "agent.sock")
	r.flowLog = filepath.Join(r.dir, "flows.json")
	r.bpffs = filepath.Join(r.cfg.BPFFSRoot, "bulkhead-demo-"+id)
	for _, d := range []string{r.store, filepath.Join(r.dir, "ipam"), filepath.Join(r.dir, "cni-cache")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}

	subnet, release, err := reserveSubnet()
	if err != nil {
		return err
	}
	r.onCleanup(release)
	restore, err := ensureForwarding()
	if err != nil {
		return err
	}
	r.onCleanup(restore)

	r.p.heading("Setting up the shop")
	r.p.say("  store   " + r.store)
	r.p.say("  pins    " + r.bpffs)
	r.p.say("  subnet  " + subnet.String())
	if err := r.writeStore("00-workloads.yaml", workloadsYAML); err != nil {
		return err
	}
	if err := r.writeStore(runtimePolicyFile, runtimePolicyYAML); err != nil {
		return err
	}

	// Namespaces first: creating one retires an OS thread, and the agent's
	// parent-death signal is tied to the thread that started it.
	for _, spec := range ShopPods() {
		uid, err := randomHex(16)
		if err != nil {
			return err
		}
		p := &pod{spec: spec, containerID: "bhdemo" + uid[:24], uid: uid[:8] + "-" + uid[8:12] + "-4" + uid[13:16] + "-8" + uid[17:20] + "-" + uid[20:32]}
		p.netns, err = createNetns("bh-" + id + "-" + spec.Namespace + "-" + spec.Name)
		if err != nil {
			return err
		}
		path := p.netns.Path()
		r.onCleanup(func() error { _ = p.netns.Close(); return removeNetns(path) })
		r.pods = append(r.pods, p)
		r.byRef[spec.Ref()] = p
	}

	r.client = api.NewClient(api.ClientConfig{Socket: r.socket, Timeout: 5 * time.Second})
	r.onCleanup(func() error { r.client.Close(); return nil })
	// The pins go after the agent has stopped (registered first, so it
	// runs later): the agent keeps them on SIGTERM for restarts.
	r.onCleanup(func() error { return removePins(r.bpffs) })
	// So does the tunnel's policy routing, which the agent installs and
	// leaves for its restarts.
	unroute, owned, err := tunnelRoutingCleanup()
	if err != nil {
		return err
	}
	r.ownsRouting = owned
	r.onCleanup(unroute)
	agent, err := startAgent(ctx, agentConfig{
		Binary: agentBin, Store: r.store, Socket: r.socket, StateDir: filepath.Join(r.dir, "state"),
		BPFFS: r.bpffs, FlowLog: r.flowLog, Output: r.diag, Orphan: r.cfg.Keep,
	}, r.client)
	if agent != nil {
		r.agent = agent
		r.onCleanup(agent.stop)
	}
	if err != nil {
		return err
	}
	r.p.say(fmt.Sprintf("  bulkhead-agent running (pid %d)", agent.cmd.Process.Pid))

	r.chain, err = newChain(chainConfig{
		PluginDirs: []string{r.cfg.CNIBin, r.cfg.BinDir}, Subnet: subnet,
		DataDir: filepath.Join(r.dir, "ipam"), CacheDir: filepath.Join(r.dir, "cni-cache"),
		Socket: r.socket, Stderr: r.diag,
	})
	if err != nil {
		return err
	}
	// ADD in parallel, as a node starting several pods does.
	errs := make([]error, len(r.pods))
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i, p := range r.pods {
		wg.Go(func() {
			ip, err := r.chain.add(ctx, p)
			mu.Lock()
			defer mu.Unlock()
			// DEL is registered even for a failed ADD: the chain may have
			// half-built the pod (a veth, a lease) before failing.
			r.onCleanup(func() error { return r.chain.del(context.Background(), p) })
			if err != nil {
				errs[i] = err
				return
			}
			p.ip = ip
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, p := range r.pods {
		r.onCleanup(func() error { p.stop(); return nil })
		if err := p.serve(ShopPorts()); err != nil {
			return err
		}
	}
	r.p.say(fmt.Sprintf("  %d pods added through ptp + host-local + bulkhead-cni (libcni),", len(r.pods)))
	r.p.say("  each serving TCP and UDP echo on " + portList(ShopPorts()))
	return nil
}

func portList(ports []Port) string {
	var s []string
	for _, p := range ports {
		s = append(s, p.String())
	}
	return strings.Join(s, " and ")
}

// writeStore writes a store file the way a config management tool would:
// to a temporary name, then renamed, so the agent never reads half a file.
func (r *run) writeStore(name, content string) error {
	tmp := filepath.Join(r.store, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		return fmt.Errorf("write store file: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(r.store, name)); err != nil {
		return fmt.Errorf("write store file: %w", err)
	}
	return nil
}

// removePins removes the demo's pin directory. bpffs supports unlink and
// rmdir, so RemoveAll works once the agent no longer needs the pins.
func removePins(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove pins %s: %w", dir, err)
	}
	return nil
}

func (r *run) addr(ref string) netip.Addr { return r.byRef[ref].ip }

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) tail(n int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	lines := strings.Split(strings.TrimRight(s.b.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.TrimSpace(strings.Join(lines, "\n"))
}

// writeCleanupScript writes the commands that remove what a --keep run
// left behind, since the demo process that knows them is gone by then.
func (r *run) writeCleanupScript() (string, error) {
	var b strings.Builder
	b.WriteString("#!/bin/sh\n# Removes what `bulkhead demo --keep` left behind.\n")
	if r.agent != nil {
		pid := r.agent.cmd.Process.Pid
		fmt.Fprintf(&b, "kill %d 2>/dev/null\nwhile kill -0 %d 2>/dev/null; do sleep 0.1; done\n", pid, pid)
	}
	for _, p := range r.pods {
		if p.netns != nil {
			// Deleting the namespace deletes the pod's veth pair and routes.
			fmt.Fprintf(&b, "ip netns del %s\n", filepath.Base(p.netns.Path()))
		}
	}
	if r.ownsRouting {
		b.WriteString(tunnelRoutingScript())
	}
	fmt.Fprintf(&b, "rm -rf %s %s\n", r.bpffs, r.dir)
	path := filepath.Join(r.dir, "cleanup.sh")
	if err := os.WriteFile(path, []byte(b.String()), 0o700); err != nil {
		return "", fmt.Errorf("write cleanup script: %w", err)
	}
	return path, nil
}
