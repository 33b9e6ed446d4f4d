package datapath

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// pinnedProgIDs are the kernel's IDs of the programs pinned under bpffs.
func pinnedProgIDs(t testing.TB, bpffs string) map[string]ebpf.ProgramID {
	t.Helper()
	out := map[string]ebpf.ProgramID{}
	var d Datapath
	for name := range d.pinnedProgs() {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(bpffs, "progs", name), nil)
		if err != nil {
			t.Fatalf("open pinned program %s: %v", name, err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		out[name] = id
	}
	return out
}

// attachedProgIDs are the programs the endpoints' attachments run: the TCX
// links pinned under bpffs, or the cls_bpf filters of the host veths.
func attachedProgIDs(t testing.TB, tp *topo, bpffs string, clsact bool) []ebpf.ProgramID {
	t.Helper()
	var ids []ebpf.ProgramID
	if !clsact {
		entries, err := os.ReadDir(filepath.Join(bpffs, "links"))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			l, err := link.LoadPinnedLink(filepath.Join(bpffs, "links", e.Name()), nil)
			if err != nil {
				t.Fatal(err)
			}
			info, err := l.Info()
			l.Close()
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, info.Program)
		}
		return ids
	}
	tp.host.Do(t, func() error {
		for _, p := range tp.pods {
			l, err := netlink.LinkByName(p.hostIf)
			if err != nil {
				return err
			}
			for _, h := range hooks() {
				fs, err := netlink.FilterList(l, h.parent)
				if err != nil {
					return err
				}
				for _, f := range fs {
					if bf, ok := f.(*netlink.BpfFilter); ok {
						ids = append(ids, ebpf.ProgramID(bf.Id))
					}
				}
			}
		}
		return nil
	})
	return ids
}

// upgradeProber checks, until stopped, that an allowed new connection works, a
// denied one does not, and the established connections keep echoing.
type upgradeProber struct {
	probes, misjudged, broken atomic.Int64
	stop                      chan struct{}
	wg                        sync.WaitGroup
	mu                        sync.Mutex
	errs                      []string
}

func startUpgradeProber(tp *topo, conns []net.Conn) *upgradeProber {
	pr := &upgradeProber{stop: make(chan struct{})}
	client, server := tp.pods[0], tp.pods[1]
	live := slices.Clone(conns)
	pr.wg.Add(1)
	go func() {
		defer pr.wg.Done()
		for i := 0; ; i++ {
			select {
			case <-pr.stop:
				return
			default:
			}
			if err := tcpWorks(client, server.ip4, 8080); err != nil {
				pr.fail(&pr.misjudged, "allowed connection failed: %v", err)
			}
			if err := tcpWorks(client, server.ip6, 8081); err == nil {
				pr.fail(&pr.misjudged, "denied connection passed")
			}
			for j, c := range live {
				if c == nil {
					continue
				}
				if err := echo(c, fmt.Sprintf("probe %d", i)); err != nil {
					pr.fail(&pr.broken, "established connection %d broke: %v", j, err)
					live[j] = nil
				}
			}
			pr.probes.Add(1)
		}
	}()
	return pr
}

func (pr *upgradeProber) fail(n *atomic.Int64, format string, args ...any) {
	n.Add(1)
	pr.mu.Lock()
	pr.errs = append(pr.errs, fmt.Sprintf(format, args...))
	pr.mu.Unlock()
}

func (pr *upgradeProber) finish(t *testing.T, what string) {
	t.Helper()
	close(pr.stop)
	pr.wg.Wait()
	t.Logf("%s: %d probes, %d misjudged, %d connections broken", what, pr.probes.Load(), pr.misjudged.Load(), pr.broken.Load())
	if pr.misjudged.Load() != 0 || pr.broken.Load() != 0 {
		t.Errorf("%s: %s", what, strings.Join(pr.errs, "; "))
	}
	if pr.probes.Load() < 3 {
		t.Errorf("%s: only %d probes", what, pr.probes.Load())
	}
}

// migrationPair is servedPair with a datapath that is closed again, as an
// agent that exited leaves it, and live connections.
func migrationPair(t *testing.T, cfg Config) (*topo, string, []net.Conn) {
	t.Helper()
	tp := newTopo(t, 2)
	client, server := tp.pods[0], tp.pods[1]
	serve(t, server)
	cfg.BPFFS = testBPFFS(t)
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Whatever the test left pinned: re-open (or load) and remove.
		os.Remove(filepath.Join(cfg.BPFFS, "maps", versionPin))
		if d, err := New(Config{BPFFS: cfg.BPFFS, ForceClsact: cfg.ForceClsact}); err == nil {
			d.Remove()
		}
	})
	if _, err := d.Apply(tp.state(1, serverRules(client.id)...)); err != nil {
		t.Fatal(err)
	}
	attach(t, d, tp)
	var conns []net.Conn
	for range 2 {
		for _, a := range []netip.Addr{server.ip4, server.ip6} {
			c, err := dialTCP(client, a, 8080)
			mustWork(t, "dial", err)
			t.Cleanup(func() { c.Close() })
			mustWork(t, "echo", echo(c, "before"))
			conns = append(conns, c)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	return tp, cfg.BPFFS, conns
}

// newIn runs New in the netns of the host veths (where swapClsact finds
// the cls_bpf filters), as the agent does in its own.
func newIn(t *testing.T, tp *topo, cfg Config) (*Datapath, error) {
	var d *Datapath
	var err error
	tp.host.Do(t, func() error {
		d, err = New(cfg)
		return nil
	})
	return d, err
}

// A migration under traffic: the settings change (a bigger policy trie,
// which copies the policy map and rebuilds the exact table in front of
// it), an obsolete pin is there, and a upgradeProber runs all along. No denied
// connection passes, no allowed one fails, no established one breaks;
// afterwards every attachment runs the new programs, which read the maps
// the new datapath writes.
func TestMigrationUnderTraffic(t *testing.T) {
	for _, clsact := range []bool{false, true} {
		name := "tcx"
		if clsact {
			name = "clsact"
		}
		t.Run(name, func(t *testing.T) { testMigrationUnderTraffic(t, clsact) })
	}
}

func testMigrationUnderTraffic(t *testing.T, clsact bool) {
	tp, bpffs, conns := migrationPair(t, Config{ForceClsact: clsact, MaxPolicyEntries: 4096})
	client, server := tp.pods[0], tp.pods[1]
	before := pinnedProgIDs(t, bpffs)
	obsolete, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := obsolete.Pin(filepath.Join(bpffs, "maps", "obsolete_map")); err != nil {
		t.Fatal(err)
	}
	obsolete.Close()

	pr := startUpgradeProber(tp, conns)
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	d, err := newIn(t, tp, Config{BPFFS: bpffs, ForceClsact: clsact, MaxPolicyEntries: 8192})
	took := time.Since(start)
	if err != nil {
		close(pr.stop)
		pr.wg.Wait()
		t.Fatalf("migrate: %v", err)
	}
	time.Sleep(300 * time.Millisecond)
	pr.finish(t, "migration")

	v := d.Version()
	m := v.Migration
	if m == nil {
		t.Fatalf("no migration recorded: %+v", v)
	}
	t.Logf("migration %s, attachments moved in %s (New %s): reused %d maps, copied %v, created %v, removed %v, %d attachments swapped",
		m.Duration, m.SwapDuration, took, len(m.Reused), m.Copied, m.Created, m.Removed, m.LinksSwapped)
	if !slices.Contains(m.Copied, "policy") || !slices.Contains(m.Created, "policy_exact") ||
		!slices.Equal(m.Removed, []string{"obsolete_map"}) || m.LinksSwapped != 4 || m.From.Serial != currentSerial() {
		t.Errorf("migration record %+v", m)
	}
	if d.PolicyMapEntries() != 8192 {
		t.Errorf("policy trie of %d entries after the migration, want 8192", d.PolicyMapEntries())
	}
	if _, err := os.Stat(filepath.Join(bpffs, "maps", "obsolete_map")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("obsolete pin still there: %v", err)
	}
	after := pinnedProgIDs(t, bpffs)
	for name, id := range after {
		if before[name] == id {
			t.Errorf("program %s still %d after the migration", name, id)
		}
	}
	for _, id := range attachedProgIDs(t, tp, bpffs, clsact) {
		if id != after["bulkhead_from_pod"] && id != after["bulkhead_to_pod"] {
			t.Errorf("an attachment runs program %d, not the new ones %v", id, after)
		}
	}
	if n := len(attachedProgIDs(t, tp, bpffs, clsact)); n != 4 {
		t.Errorf("%d attachments, want 4", n)
	}
	// The new programs read what the new datapath writes: tightening
	// cuts the established connections and the allowed port.
	if _, err := d.Apply(tp.state(2, allowIn(client.id, 17, 5353, 5353, 2))); err != nil {
		t.Fatal(err)
	}
	mustFail(t, "8080 after tightening", tcpWorks(client, server.ip4, 8080))
	mustFail(t, "established after tightening", echo(conns[0], "after"))
	// Re-opening the migrated datapath changes nothing, and still
	// reports the migration.
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	again, err := newIn(t, tp, Config{BPFFS: bpffs, ForceClsact: clsact, MaxPolicyEntries: 8192})
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if got := pinnedProgIDs(t, bpffs); !maps.Equal(got, after) {
		t.Errorf("re-opening loaded the programs again: %v, want %v", got, after)
	}
	if m2 := again.Version().Migration; m2 == nil || !m2.At.Equal(m.At) {
		t.Errorf("re-opened version %+v, want the same migration", again.Version())
	}
}

// A migration cut short at any step is finished by the next start, and
// enforcement holds in between.
func TestMigrationCutShortIsRedone(t *testing.T) {
	for _, step := range []string{"maps pinned", "attachments swapped", "programs pinned"} {
		t.Run(strings.ReplaceAll(step, " ", "_"), func(t *testing.T) {
			tp, bpffs, conns := migrationPair(t, Config{})
			client, server := tp.pods[0], tp.pods[1]
			pr := startUpgradeProber(tp, conns)
			cut := errors.New("cut short")
			_, err := newIn(t, tp, Config{BPFFS: bpffs, CTTimeoutOther: 30 * time.Second,
				migrationFault: func(s string) error {
					if s == step {
						return cut
					}
					return nil
				}})
			if !errors.Is(err, cut) {
				t.Fatalf("cut-short migration: %v", err)
			}
			if v, ok, err := PinnedVersion(bpffs); err != nil || !ok || v.Migration != nil {
				t.Fatalf("version record after the cut: %+v %v %v", v, ok, err)
			}
			d, err := newIn(t, tp, Config{BPFFS: bpffs, CTTimeoutOther: 30 * time.Second})
			if err != nil {
				t.Fatalf("migration after the cut: %v", err)
			}
			defer d.Close()
			time.Sleep(200 * time.Millisecond)
			pr.finish(t, "cut at "+step)
			if d.Version().Migration == nil {
				t.Fatal("the second start did not migrate")
			}
			progs := pinnedProgIDs(t, bpffs)
			for _, id := range attachedProgIDs(t, tp, bpffs, false) {
				if id != progs["bulkhead_from_pod"] && id != progs["bulkhead_to_pod"] {
					t.Errorf("an attachment runs program %d, not the pinned ones %v", id, progs)
				}
			}
			mustWork(t, "allowed", tcpWorks(client, server.ip4, 8080))
			mustFail(t, "denied", tcpWorks(client, server.ip4, 8081))
		})
	}
}

// Pins of a newer version are refused and left enforcing.
func TestNewerPinnedDatapathIsRefused(t *testing.T) {
	tp, bpffs, conns := migrationPair(t, Config{})
	before := pinnedProgIDs(t, bpffs)
	v, ok, err := PinnedVersion(bpffs)
	if err != nil || !ok {
		t.Fatalf("pinned version: %v %v", ok, err)
	}
	v.Serial = currentSerial() + 1
	d := &Datapath{cfg: Config{BPFFS: bpffs}}
	if err := d.pinVersion(v); err != nil {
		t.Fatal(err)
	}
	pr := startUpgradeProber(tp, conns)
	_, err = newIn(t, tp, Config{BPFFS: bpffs})
	time.Sleep(2 * time.Second) // a few rounds of probes after the refusal
	pr.finish(t, "refused downgrade")
	if !errors.Is(err, ErrNewerDatapath) || !strings.Contains(err.Error(), fmt.Sprintf("version %d", v.Serial)) {
		t.Fatalf("New over a newer datapath: %v, want ErrNewerDatapath naming version %d", err, v.Serial)
	}
	if got := pinnedProgIDs(t, bpffs); !maps.Equal(got, before) {
		t.Errorf("programs replaced: %v, want %v", got, before)
	}
	if got, _, _ := PinnedVersion(bpffs); got.Serial != v.Serial {
		t.Errorf("version record changed: %+v", got)
	}
}

// A layout that cannot be carried over (conntrack of another size would
// lose the established flows) is refused before anything changes.
func TestUnmigratableLayoutIsRefused(t *testing.T) {
	tp, bpffs, conns := migrationPair(t, Config{MaxConntrack: 1024})
	before := pinnedProgIDs(t, bpffs)
	pr := startUpgradeProber(tp, conns)
	_, err := newIn(t, tp, Config{BPFFS: bpffs, MaxConntrack: 2048})
	time.Sleep(2 * time.Second) // a few rounds of probes after the refusal
	pr.finish(t, "refused migration")
	if !errors.Is(err, ErrNotMigratable) || !strings.Contains(err.Error(), "conntrack4") ||
		!strings.Contains(err.Error(), "stays in place") {
		t.Fatalf("New with another conntrack size: %v, want ErrNotMigratable naming conntrack4", err)
	}
	if got := pinnedProgIDs(t, bpffs); !maps.Equal(got, before) {
		t.Errorf("programs replaced: %v, want %v", got, before)
	}
	entries, _ := os.ReadDir(filepath.Join(bpffs, "maps"))
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), "-next") {
			t.Errorf("pin %s left behind", e.Name())
		}
	}
	// The same settings still re-open.
	d, err := newIn(t, tp, Config{BPFFS: bpffs, MaxConntrack: 1024})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}
