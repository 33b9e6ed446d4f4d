package e2e

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/netns"
)

// previousAgentCommit is the last commit before datapath versioning: its
// agent pins the datapath in the layout that an upgrade has to migrate.
const previousAgentCommit = "6fe331f3ee3c718e7c37bcc6b18210d3b55e1b9f"

// oldAgentCache holds agents built from history, outside the clone, so that
// fresh clones on the same machine build each one once.
const oldAgentCache = "/var/cache/bulkhead"

// TestUpgradeFromPreviousAgent replaces a running agent of the previous
// release with this one under live traffic: the new agent migrates the
// pinned datapath while pods keep talking, and the old layout is gone
// afterwards.
func TestUpgradeFromPreviousAgent(t *testing.T) {
	e := newEnv(t, "ptp")
	e.agentBin = previousAgent(t)
	front, api, db := startShop(t, e)

	// The old agent's status knows nothing of datapath versions: this is
	// really the layout from before them.
	if st := status(t, e); st.DatapathVersion != nil {
		t.Fatalf("the previous agent reports a datapath version (%+v): %s is not the pre-versioning agent", st.DatapathVersion, e.agentBin)
	}
	oldProgs := pinnedProgIDs(t, e.bpffs)
	oldLinks := pinnedLinkProgs(t, e.bpffs)
	// 3 pods, each with a from-pod and a to-pod link, all running the
	// pinned programs: otherwise the checks after the swap prove nothing.
	if len(oldLinks) < 6 {
		t.Fatalf("the previous agent pinned %d links, want at least 6: %v", len(oldLinks), oldLinks)
	}
	oldIDs := slices.Collect(maps.Values(oldProgs))
	for name, id := range oldLinks {
		if !slices.Contains(oldIDs, id) {
			t.Fatalf("before the upgrade, link %s runs program %d, which is not pinned under progs/ %v", name, id, oldProgs)
		}
	}

	p := startProber(t, front, api, db, 4)
	// Traffic under the old agent first, so that a prober that cannot see
	// anything fails here rather than pass the swap.
	time.Sleep(500 * time.Millisecond)
	if r := p.snapshot(); r.probes < 20 || r.misjudged() > 0 || r.broken > 0 {
		t.Fatalf("before the upgrade: %s", r)
	}

	down := time.Now()
	e.stopAgent(syscall.SIGTERM)
	e.agentBin = ""
	e.startAgent()
	downToReady := time.Since(down)
	// Ready is not the end of the swap for the pods (a link may still move
	// after it): keep the traffic going a while.
	time.Sleep(2 * time.Second)
	r := p.halt()

	st := status(t, e)
	dv := st.DatapathVersion
	if dv == nil || dv.Migration == nil {
		t.Fatalf("after the upgrade the status has no migration: %+v", dv)
	}
	t.Logf("upgrade: %d probes, %d misjudged, %d connections broken; migration %.1f ms, agent down→ready %s",
		r.probes, r.misjudged(), r.broken, dv.Migration.DurationMS, downToReady.Round(time.Millisecond))
	t.Logf("upgrade probes: %s", r)
	t.Logf("migration: %.1f ms, %.1f ms of it moving %d links; maps reused %v, copied %v, created %v, removed %v",
		dv.Migration.DurationMS, dv.Migration.SwapMS, dv.Migration.LinksSwapped,
		dv.Migration.Reused, dv.Migration.Copied, dv.Migration.Created, dv.Migration.Removed)
	if r.misjudged() > 0 || r.broken > 0 {
		t.Errorf("traffic misjudged during the upgrade: %s", r)
	}
	if r.allowed < 20 || r.denied < 10 || r.roundTrips < 4*20 {
		t.Errorf("too few probes to judge the upgrade: %s", r)
	}

	m := dv.Migration
	if dv.Serial < 1 || len(dv.Object) != 64 {
		t.Errorf("datapath version after the upgrade: serial %d, object %q; want a serial >= 1 and a sha256", dv.Serial, dv.Object)
	}
	if m.FromSerial != 0 {
		t.Errorf("migration from serial %d, want 0 (pins from before versioning)", m.FromSerial)
	}
	if m.LinksSwapped < 6 {
		t.Errorf("migration swapped %d links, want at least 6 (3 pods × 2 hooks)", m.LinksSwapped)
	}
	if !slices.Contains(m.Removed, "load_record") {
		t.Errorf("migration did not remove load_record: removed %v", m.Removed)
	}

	// New programs everywhere: no old program is still pinned, and every
	// pod's links run a new one.
	newProgs := pinnedProgIDs(t, e.bpffs)
	for _, name := range []string{"bulkhead_from_pod", "bulkhead_to_pod"} {
		if _, ok := newProgs[name]; !ok {
			t.Errorf("no program pinned as %s after the upgrade: %v", name, newProgs)
		}
	}
	var stale []string
	for name, id := range newProgs {
		if slices.Contains(oldIDs, id) {
			stale = append(stale, name)
		}
	}
	if len(stale) > 0 {
		t.Errorf("programs %v are still the previous agent's: %v before, %v after", stale, oldProgs, newProgs)
	}
	newIDs := slices.Collect(maps.Values(newProgs))
	newLinks := pinnedLinkProgs(t, e.bpffs)
	// The same pods, the same hooks: as many links as before, none lost
	// and no stray one left.
	if len(newLinks) != len(oldLinks) {
		t.Errorf("%d links pinned after the upgrade, %d before: %v", len(newLinks), len(oldLinks), newLinks)
	}
	for name, id := range newLinks {
		if !slices.Contains(newIDs, id) {
			t.Errorf("link %s runs program %d, not one of the new programs %v", name, id, newProgs)
		}
	}

	// Nothing is left of the old layout.
	mapPins, err := os.ReadDir(filepath.Join(e.bpffs, "maps"))
	if err != nil {
		t.Fatal(err)
	}
	current := datapath.PinnedMapNames()
	for _, pin := range mapPins {
		if !slices.Contains(current, pin.Name()) {
			t.Errorf("map %s pinned after the upgrade is not in the current layout %v", pin.Name(), current)
		}
	}
	if _, err := os.Stat(filepath.Join(e.bpffs, "maps", "load_record")); err == nil {
		t.Error("load_record is still pinned after the upgrade")
	}

	// Policy still applies after the migration: the new datapath is the
	// one the agent writes to.
	if db.tcpWorks(api.IPv4, 8080) || !front.tcpWorks(api.IPv4, 8080) {
		t.Error("enforcement after the upgrade is not the store's policy")
	}
}

// TestUpgradeRefusesDowngrade starts this agent over a datapath pinned by
// a newer one: it must exit with an error and leave the pins alone, and
// the pinned datapath keeps enforcing while it tries. It needs no history,
// so it also runs in shallow clones.
func TestUpgradeRefusesDowngrade(t *testing.T) {
	e := newEnv(t, "ptp")
	front, api, db := startShop(t, e)
	dv := status(t, e).DatapathVersion
	if dv == nil {
		t.Fatal("the agent's status has no datapath version")
	}
	serial := dv.Serial

	p := startProber(t, front, api, db, 4)
	e.stopAgent(syscall.SIGTERM)

	// What a newer agent would have pinned: the same record with a
	// larger serial.
	record := filepath.Join(e.bpffs, "maps", "datapath_version")
	original := readVersionRecord(t, record)
	var fields map[string]any
	if err := json.Unmarshal(versionJSON(t, original), &fields); err != nil {
		t.Fatalf("datapath_version record: %v: %q", err, versionJSON(t, original))
	}
	if _, ok := fields["serial"].(float64); !ok {
		t.Fatalf("datapath_version record has no numeric serial: %s", versionJSON(t, original))
	}
	fields["serial"] = 1000000
	forged := encodeVersionRecord(t, fields, len(original))
	writeVersionRecord(t, record, forged)
	restored := false
	t.Cleanup(func() {
		if !restored {
			writeVersionRecord(t, record, original)
		}
	})

	progs, links := pinnedProgIDs(t, e.bpffs), pinnedLinkProgs(t, e.bpffs)
	logStart := len(e.agentLogs())
	e.launchAgent()
	select {
	case <-e.agent.done:
	case <-time.After(60 * time.Second):
		e.stopAgent(syscall.SIGKILL)
		t.Fatalf("the agent did not exit within 60s over a newer datapath:\n%s", e.agentLogs()[logStart:])
	}
	// Traffic a while after the refusal too: a refusing agent must not
	// have left anything half done.
	time.Sleep(time.Second)
	r := p.halt()
	logs := e.agentLogs()[logStart:]
	t.Logf("downgrade: %d probes, %d misjudged, %d connections broken; refusing agent exited %d",
		r.probes, r.misjudged(), r.broken, e.agent.cmd.ProcessState.ExitCode())
	t.Logf("downgrade probes: %s", r)

	if code := e.agent.cmd.ProcessState.ExitCode(); code <= 0 {
		t.Errorf("the agent over a newer datapath exited with %d (%s), want an error exit", code, e.agent.cmd.ProcessState)
	}
	if !strings.Contains(logs, "newer") {
		t.Errorf("the refusing agent's log does not say the pinned datapath is newer:\n%s", logs)
	}
	if r.misjudged() > 0 || r.broken > 0 {
		t.Errorf("traffic misjudged while a downgrade was refused: %s", r)
	}
	if r.allowed < 10 || r.denied < 5 || r.roundTrips < 4*10 {
		t.Errorf("too few probes to judge the refusal: %s", r)
	}
	if got := pinnedProgIDs(t, e.bpffs); !maps.Equal(got, progs) {
		t.Errorf("the refusing agent changed the pinned programs: %v before, %v after", progs, got)
	}
	if got := pinnedLinkProgs(t, e.bpffs); !maps.Equal(got, links) {
		t.Errorf("the refusing agent changed the pinned links: %v before, %v after", links, got)
	}
	if got := readVersionRecord(t, record); !bytes.Equal(got, forged) {
		t.Errorf("the refusing agent rewrote the version record: %q", versionJSON(t, got))
	}

	// With the record back, the same agent starts over the same datapath:
	// a restart re-opens the pins, it reloads nothing.
	writeVersionRecord(t, record, original)
	restored = true
	e.startAgent()
	if got := status(t, e).DatapathVersion; got == nil || got.Serial != serial {
		t.Errorf("after restoring the record the agent reports %+v, want serial %d", got, serial)
	}
	if got := pinnedProgIDs(t, e.bpffs); !maps.Equal(got, progs) {
		t.Errorf("a restart over its own datapath reloaded the programs: %v before, %v after", progs, got)
	}
	if db.tcpWorks(api.IPv4, 8080) || !front.tcpWorks(api.IPv4, 8080) {
		t.Error("enforcement after the restart is not the store's policy")
	}
}

// startShop starts the agent with frontend, api and db, where only the
// frontend may reach api:8080.
func startShop(t *testing.T, e *env) (front, api, db *pod) {
	t.Helper()
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.startAgent()
	front, api, db = e.addPod("shop", "frontend"), e.addPod("shop", "api"), e.addPod("shop", "db")
	api.serve(t, 8080)
	return front, api, db
}

// previousAgent returns the agent built at previousAgentCommit, building it
// on first use.
func previousAgent(t *testing.T) string {
	t.Helper()
	root := cnichain.RepoRoot(t)
	if err := exec.Command("git", "-C", root, "cat-file", "-e", previousAgentCommit+"^{commit}").Run(); err != nil {
		t.Skipf("commit %s (the agent before datapath versioning) is not in this clone, a shallow one? (git fetch --unshallow): %v",
			previousAgentCommit[:12], err)
	}
	dir := filepath.Join(oldAgentCache, "old-agent-"+previousAgentCommit[:12])
	bin := filepath.Join(dir, "bulkhead-agent")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.MkdirTemp("", "bulkhead-old-agent-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(src)
	start := time.Now()
	run := func(in string, env []string, name string, args ...string) {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Dir, cmd.Env = in, env
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build the agent of %s: %s %s: %v\n%s", previousAgentCommit[:12], name, strings.Join(args, " "), err, out)
		}
	}
	tarball := filepath.Join(src, "src.tar")
	run(root, nil, "git", "-C", root, "archive", "--output", tarball, previousAgentCommit)
	run(src, nil, "tar", "-x", "-f", tarball)
	// As `make build` does, so that the build cache serves most packages.
	// The generated BPF object is committed: no clang needed.
	tmp := filepath.Join(dir, fmt.Sprintf(".bulkhead-agent.%d", os.Getpid()))
	run(src, append(os.Environ(), "CGO_ENABLED=0", "GOTOOLCHAIN=local"),
		"go", "build", "-trimpath", "-o", tmp, "./cmd/bulkhead-agent")
	// Renamed into place, so that an interrupted build is never taken for
	// a finished one.
	if err := os.Rename(tmp, bin); err != nil {
		os.Remove(tmp)
		t.Fatal(err)
	}
	t.Logf("built the agent of %s in %s", previousAgentCommit[:12], time.Since(start).Round(100*time.Millisecond))
	return bin
}

// pinnedProgIDs maps each program pinned under bpffs/progs to its kernel ID.
func pinnedProgIDs(t *testing.T, bpffs string) map[string]ebpf.ProgramID {
	t.Helper()
	out := map[string]ebpf.ProgramID{}
	for _, name := range pinNames(t, filepath.Join(bpffs, "progs")) {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(bpffs, "progs", name), nil)
		if err != nil {
			t.Fatalf("open pinned program %s: %v", name, err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			t.Fatalf("program %s: %v", name, err)
		}
		id, ok := info.ID()
		if !ok {
			t.Fatalf("program %s: the kernel reports no ID", name)
		}
		out[name] = id
	}
	return out
}

// pinnedLinkProgs maps each link pinned under bpffs/links to the ID of the
// program it runs.
func pinnedLinkProgs(t *testing.T, bpffs string) map[string]ebpf.ProgramID {
	t.Helper()
	out := map[string]ebpf.ProgramID{}
	for _, name := range pinNames(t, filepath.Join(bpffs, "links")) {
		l, err := link.LoadPinnedLink(filepath.Join(bpffs, "links", name), nil)
		if err != nil {
			t.Fatalf("open pinned link %s: %v", name, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatalf("link %s: %v", name, err)
		}
		out[name] = info.Program
	}
	return out
}

func pinNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, en := range entries {
		if !en.IsDir() {
			names = append(names, en.Name())
		}
	}
	return names
}

// The datapath_version record: an array of one fixed-size value, a
// little-endian uint16 length and that many bytes of JSON, zero-padded.

func readVersionRecord(t *testing.T, pin string) []byte {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatalf("open %s: %v", pin, err)
	}
	defer m.Close()
	v := make([]byte, m.ValueSize())
	if err := m.Lookup(uint32(0), v); err != nil {
		t.Fatalf("read %s: %v", pin, err)
	}
	return v
}

func writeVersionRecord(t *testing.T, pin string, v []byte) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Errorf("open %s: %v", pin, err)
		return
	}
	defer m.Close()
	if err := m.Update(uint32(0), v, ebpf.UpdateExist); err != nil {
		t.Errorf("write %s: %v", pin, err)
	}
}

func versionJSON(t *testing.T, v []byte) []byte {
	t.Helper()
	if len(v) < 2 {
		t.Fatalf("datapath_version value of %d bytes", len(v))
	}
	n := int(binary.LittleEndian.Uint16(v))
	if 2+n > len(v) {
		t.Fatalf("datapath_version record says %d bytes of JSON in a %d-byte value", n, len(v))
	}
	return v[2 : 2+n]
}

func encodeVersionRecord(t *testing.T, fields map[string]any, size int) []byte {
	t.Helper()
	js, err := json.Marshal(fields)
	if err != nil {
		t.Fatal(err)
	}
	if 2+len(js) > size {
		t.Fatalf("forged record of %d bytes does not fit a %d-byte value", len(js), size)
	}
	v := make([]byte, size)
	binary.LittleEndian.PutUint16(v, uint16(len(js)))
	copy(v[2:], js)
	return v
}

// prober keeps traffic going between the pods while agents come and go,
// and counts what the datapath got wrong: a round trip that failed on an
// established connection (broken), a new allowed connection that failed,
// a denied one that got through.
type prober struct {
	t        *testing.T
	db       *pod
	capture  *netns.Capture
	conns    []net.Conn
	stop     chan struct{}
	wg       sync.WaitGroup
	haltOnce sync.Once
	final    proberResult

	roundTrips, allowed, denied         atomic.Int64
	broken, allowedFailed, deniedPassed atomic.Int64

	mu    sync.Mutex
	notes []string
}

type proberResult struct {
	probes, roundTrips, allowed, denied int64
	broken, allowedFailed, deniedPassed int64
	// deniedSeen counts the denied probes (by source port) with a
	// packet that reached api: denied traffic that passed, whether or not
	// its connection came up.
	deniedSeen int64
	notes      []string
}

func (r proberResult) misjudged() int64 {
	// A denied connection that came up was also seen at api, unless the
	// capture missed it.
	return r.allowedFailed + max(r.deniedPassed, r.deniedSeen)
}

func (r proberResult) String() string {
	s := fmt.Sprintf("%d probes (%d round trips on established connections, %d new allowed, %d new denied): "+
		"%d connections broken, %d allowed connections failed, %d denied probes reached api (%d connected)",
		r.probes, r.roundTrips, r.allowed, r.denied, r.broken, r.allowedFailed, r.deniedSeen, r.deniedPassed)
	if len(r.notes) > 0 {
		s += "; first failures: " + strings.Join(r.notes, "; ")
	}
	return s
}

// startProber opens n connections from front to api:8080 and probes until
// halt (or the end of the test).
func startProber(t *testing.T, front, api, db *pod, n int) *prober {
	t.Helper()
	p := &prober{t: t, db: db, stop: make(chan struct{})}
	// A denied dial that gives up may still have let its SYN through: the
	// capture inside api sees every packet that passed.
	p.capture = netns.StartCapture(t, api.NS, api.IfName)
	t.Cleanup(func() { p.halt() })
	for range n {
		c, err := front.dial("tcp4", api.IPv4, 8080, time.Second)
		if err != nil {
			t.Fatalf("frontend → api: %v", err)
		}
		p.conns = append(p.conns, c)
		if !echo(c) {
			t.Fatal("frontend → api: no echo on a new connection")
		}
	}
	for i, c := range p.conns {
		p.loop(func(k int) bool {
			p.roundTrips.Add(1)
			if err := roundTrip(c, fmt.Sprintf("conn %d probe %d", i, k)); err != nil {
				p.broken.Add(1)
				p.note("connection %d broken: %v", i, err)
				return false // a broken connection is not probed again
			}
			return true
		})
	}
	p.loop(func(int) bool {
		p.allowed.Add(1)
		if !front.tcpWorks(api.IPv4, 8080) {
			p.allowedFailed.Add(1)
			p.note("new frontend → api connection failed")
		}
		return true
	})
	p.loop(func(int) bool {
		p.denied.Add(1)
		// Short: the dial only has to send its SYN, the capture judges
		// it; a longer wait would only mean fewer probes.
		c, err := db.dial("tcp4", api.IPv4, 8080, 50*time.Millisecond)
		if err == nil {
			c.Close()
			p.deniedPassed.Add(1)
			p.note("new db → api connection passed")
		}
		return true
	})
	return p
}

// loop runs probe about every 15 ms until halt, or until probe returns
// false.
func (p *prober) loop(probe func(k int) bool) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for k := 0; ; k++ {
			select {
			case <-p.stop:
				return
			default:
			}
			if !probe(k) {
				return
			}
			select {
			case <-p.stop:
				return
			case <-time.After(15 * time.Millisecond):
			}
		}
	}()
}

func (p *prober) note(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.notes) < 5 {
		p.notes = append(p.notes, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, args...))
	}
}

// snapshot is what the prober saw so far.
func (p *prober) snapshot() proberResult {
	r := proberResult{
		roundTrips: p.roundTrips.Load(), allowed: p.allowed.Load(), denied: p.denied.Load(),
		broken: p.broken.Load(), allowedFailed: p.allowedFailed.Load(), deniedPassed: p.deniedPassed.Load(),
	}
	r.probes = r.roundTrips + r.allowed + r.denied
	ports := map[uint16]bool{}
	for _, s := range p.capture.Segments() {
		if s.Src.Addr() == p.db.IPv4 {
			ports[s.Src.Port()] = true
		}
	}
	r.deniedSeen = int64(len(ports))
	p.mu.Lock()
	r.notes = slices.Clone(p.notes)
	p.mu.Unlock()
	return r
}

// halt stops probing, closes the connections and returns the counts.
func (p *prober) halt() proberResult {
	p.haltOnce.Do(func() {
		close(p.stop)
		p.wg.Wait()
		for _, c := range p.conns {
			c.Close()
		}
		p.capture.Stop()
		p.final = p.snapshot()
		if p.capture.Truncated() || p.capture.Err() != nil {
			p.t.Errorf("the capture on api missed frames (truncated %v, error %v): denied packets may have passed unseen",
				p.capture.Truncated(), p.capture.Err())
		}
	})
	return p.final
}

// roundTrip writes msg on c and reads it back from the echo server.
func roundTrip(c net.Conn, msg string) error {
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}
