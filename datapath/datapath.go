package datapath

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// ErrNotSupported is returned when the kernel lacks a feature the datapath
// needs.
var ErrNotSupported = errors.New("not supported by this kernel")

// DefaultBPFFS is where the datapath pins its objects unless told otherwise.
const DefaultBPFFS = "/sys/fs/bpf/bulkhead"

// Config configures New. Zero values take the defaults.
type Config struct {
	// BPFFS is the directory under a bpffs mount for pins.
	BPFFS  string
	Logger *slog.Logger
	// HostIdentity is the identity of this node's own addresses.
	HostIdentity identity.NumericID
	// Conntrack timeouts: established TCP, closed TCP, everything else.
	CTTimeoutTCP     time.Duration
	CTTimeoutClosing time.Duration
	CTTimeoutOther   time.Duration
	// CTTimeoutDenied is how long a tombstone (a flow a policy change
	// denied) outlives the last packet it dropped (default 150 s, longer
	// than TCP's longest retransmission gap, TCP_RTO_MAX: 120 s).
	CTTimeoutDenied time.Duration
	// DropEventInterval is the least time between two drop events of a flow.
	DropEventInterval time.Duration
	// Map sizes. MaxConntrack is the flows each address family's
	// conntrack table holds: a power of two, at least 4 (default 65536).
	// MaxIPCache is per generation: the trie holds two (see Apply).
	MaxPolicyEntries uint32
	MaxIPCache       uint32
	MaxConntrack     uint32
	// EventRingBytes sizes the flow event ring buffer (default 1 MiB, about
	// 13,000 events): a power of two and a multiple of the page size. A
	// larger ring rides out longer bursts before events are lost.
	EventRingBytes uint32
	// ForceClsact skips TCX, as on kernels older than 6.6.
	ForceClsact bool
	// TunnelMark and TunnelMask: the mark (within the mask) of packets
	// redirected into the node's mTLS tunnel, which the policy route of
	// EnsureTunnelRouting makes local (default 0xb00/0xf00). A load-time
	// setting: re-opening pins loaded with another mark fails with
	// ErrLoadedOtherwise rather than keep that one silently.
	TunnelMark, TunnelMask uint32

	// exactBuckets, when set, sizes both exact-match tables (tests).
	exactBuckets uint32
	// ctRefreshAlways makes every packet of a tracked flow rewrite its
	// slot (tests: the most writes readers can race with).
	ctRefreshAlways bool
	// migrationFault, when set (tests), runs after each step of
	// finishMigration; an error it returns cuts the migration short there.
	migrationFault func(step string) error
}

func (c *Config) setDefaults() {
	if c.BPFFS == "" {
		c.BPFFS = DefaultBPFFS
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.HostIdentity == 0 {
		c.HostIdentity = identity.IDHost
	}
	if c.CTTimeoutTCP == 0 {
		c.CTTimeoutTCP = 6 * time.Hour
	}
	if c.CTTimeoutClosing == 0 {
		c.CTTimeoutClosing = 10 * time.Second
	}
	if c.CTTimeoutDenied == 0 {
		c.CTTimeoutDenied = 150 * time.Second
	}
	if c.CTTimeoutOther == 0 {
		c.CTTimeoutOther = 60 * time.Second
	}
	if c.DropEventInterval == 0 {
		c.DropEventInterval = time.Second
	}
	if c.TunnelMask == 0 {
		c.TunnelMark, c.TunnelMask = DefaultTunnelMark, DefaultTunnelMask
	}
}

// Datapath is the loaded (or re-opened) datapath.
type Datapath struct {
	cfg  Config
	log  *slog.Logger
	objs segmentObjects

	// bridgeMu serialises attaching the bridge hook, which the pods of one
	// bridge share: two concurrent ADDs would both find it missing, and
	// the second attach of one program to one hook fails.
	bridgeMu sync.Mutex

	mu sync.Mutex
	// Mirrors of both generations of the policy state, read from the maps
	// when opened, so Apply can write differences without dumping maps
	// every time.
	gens [2]generation
	// global mirrors globals; global.Revision&1 is the live generation.
	global GlobalConfig
	// quiesce is the grace period of the last publish (see quiesce.go),
	// nil once waited for.
	quiesce *quiescence
	// beforeWrite, when set (tests), is called before every write Apply
	// makes to a map BPF reads; an error it returns fails that write.
	beforeWrite func(op string) error

	// The conntrack tables, ep_configs and the exact-match tables, mapped
	// into this process. Code that reads them without holding mu holds
	// unmapMu for reading; Close unmaps them holding both.
	unmapMu  sync.RWMutex
	ct4, ct6 *ctTable
	epcfg    *epConfigTable
	globals  *globalsTable
	// quarantine is ep_quarantine (see SetQuarantine).
	quarantine *quarantineTable
	// version is the running datapath's (see Version).
	version Version
	// The exact-match tables in front of ipcache and policy.
	hosts, policyExact *exactTable
}

// Typed views of the maps' keys and values, generated from bpf/include.
type (
	PolicyKey    = segmentPolicyKey
	PolicyValue  = segmentPolicyValue
	IPCacheKey   = segmentIpcacheKey
	IPCacheValue = segmentIpcacheValue
	EPConfig     = segmentEpConfig
	// QuarantineDNSKey is a resolver quarantined endpoints may query.
	QuarantineDNSKey = segmentQuarantineDnsKey
	GlobalConfig     = segmentGlobalConfig
	ConntrackKey     = segmentCtKey
	Conntrack4Key    = segmentCt4Key
	ConntrackItem    = segmentCtEntry
	Counter          = segmentCounter
)

// pinnedMaps are the maps that live under BPFFS/maps; the rest (.rodata,
// .bss) belong to the programs.
func (d *Datapath) pinnedMaps() map[string]**ebpf.Map {
	m := &d.objs.segmentMaps
	return map[string]**ebpf.Map{
		"endpoints_array": &m.EndpointsArray, "endpoints": &m.Endpoints, "ep_configs": &m.EpConfigs,
		"policy": &m.Policy, "ipcache": &m.Ipcache, "globals": &m.Globals,
		"conntrack4": &m.Conntrack4, "conntrack6": &m.Conntrack6, "ipcache_hosts": &m.IpcacheHosts,
		"policy_exact": &m.PolicyExact, "endpoint_addrs": &m.EndpointAddrs,
		"fragments": &m.Fragments, "drop_events": &m.DropEvents, "counters": &m.Counters,
		"events": &m.Events, "tunnel_listener": &m.TunnelListener, "tunnel_socks": &m.TunnelSocks,
		"id_flags": &m.IdFlags, "ep_quarantine": &m.EpQuarantine, "quarantine_dns": &m.QuarantineDns,
	}
}

// pinnedProgs are the programs that live under BPFFS/progs.
func (d *Datapath) pinnedProgs() map[string]**ebpf.Program {
	return map[string]**ebpf.Program{
		"bulkhead_from_pod": &d.objs.BulkheadFromPod, "bulkhead_to_pod": &d.objs.BulkheadToPod,
		"bulkhead_clock": &d.objs.BulkheadClock, "bulkhead_tunnel_bridge": &d.objs.BulkheadTunnelBridge,
	}
}

// endpointsArraySize is ENDPOINTS_ARRAY_SIZE: smaller ifindexes live in
// endpoints_array, the rest in the endpoints hash.
const endpointsArraySize = 65536

func (d *Datapath) setEndpoint(ifindex int, id policy.EndpointID) error {
	if ifindex < endpointsArraySize {
		return d.objs.EndpointsArray.Update(uint32(ifindex), uint32(id), ebpf.UpdateAny)
	}
	if id == 0 {
		err := d.objs.Endpoints.Delete(uint32(ifindex))
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return err
	}
	return d.objs.Endpoints.Update(uint32(ifindex), uint32(id), ebpf.UpdateAny)
}

// Probe reports ErrNotSupported when the kernel lacks something the datapath
// cannot work without.
func Probe() error {
	for _, mt := range []ebpf.MapType{ebpf.LPMTrie, ebpf.LRUHash, ebpf.RingBuf, ebpf.PerCPUArray} {
		if err := features.HaveMapType(mt); err != nil {
			return fmt.Errorf("map type %s: %w: %w", mt, ErrNotSupported, err)
		}
	}
	if err := features.HaveProgramType(ebpf.SchedCLS); err != nil {
		return fmt.Errorf("program type sched_cls: %w: %w", ErrNotSupported, err)
	}
	return nil
}

// New loads the datapath and pins it under cfg.BPFFS, or re-opens what an
// earlier process pinned there. Re-opening attaches nothing: links pinned
// by earlier Attach calls keep enforcing throughout.
//
// Pins of another version, or loaded with other settings, are migrated:
// this version's programs are loaded beside them on the pinned maps (or on
// copies, see planMigration), every attachment moves to them atomically,
// and the old pins go. Pins of a newer version (ErrNewerDatapath), or of a
// layout that cannot be carried over (ErrNotMigratable), are refused and
// left enforcing.
func New(cfg Config) (*Datapath, error) {
	cfg.setDefaults()
	if err := checkMemoryOrder(runtime.GOARCH); err != nil {
		return nil, err
	}
	if err := Probe(); err != nil {
		return nil, err
	}
	if cfg.TunnelMark&^cfg.TunnelMask != 0 || cfg.TunnelMark == 0 {
		return nil, fmt.Errorf("tunnel mark %#x/%#x: want a non-zero mark inside its mask", cfg.TunnelMark, cfg.TunnelMask)
	}
	d := &Datapath{cfg: cfg, log: cfg.Logger}
	var mig *migration
	if _, err := os.Stat(d.progPin("bulkhead_from_pod")); err == nil {
		if mig, err = d.openExisting(); err != nil {
			return nil, err
		}
	} else {
		spec, settings, err := d.spec()
		if err != nil {
			return nil, err
		}
		if err := d.load(spec, settings, nil); err != nil {
			return nil, err
		}
		d.log.Info("datapath loaded and pinned", "bpffs", cfg.BPFFS, "version", d.version.String())
	}
	var err4, err6, errEP, errHosts error
	d.ct4, err4 = mapCTTable(d.objs.Conntrack4, false)
	d.ct6, err6 = mapCTTable(d.objs.Conntrack6, true)
	d.epcfg, errEP = mapEPConfigs(d.objs.EpConfigs)
	d.hosts, errHosts = mapExactTable(d.objs.IpcacheHosts, "ipcache_hosts", 5, 1)
	var errPol, errGlob error
	d.policyExact, errPol = mapExactTable(d.objs.PolicyExact, "policy_exact", 4, 3)
	d.globals, errGlob = mapGlobals(d.objs.Globals)
	var errQ error
	d.quarantine, errQ = mapQuarantine(d.objs.EpQuarantine)
	if err := errors.Join(err4, err6, errEP, errHosts, errPol, errGlob, errQ); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.readMirrors(); err != nil {
		d.Close()
		return nil, err
	}
	d.syncExact()
	if mig != nil {
		if err := d.finishMigration(mig); err != nil {
			d.Close()
			return nil, fmt.Errorf("migrate the datapath from %s (the next start tries again): %w", mig.from, err)
		}
	}
	return d, nil
}

// openExisting re-opens the pinned datapath when it is this version's,
// loaded with these settings. Otherwise it loads this version's beside it
// and returns the migration that finishMigration completes.
func (d *Datapath) openExisting() (*migration, error) {
	pinned, recorded, err := PinnedVersion(d.cfg.BPFFS)
	if err != nil {
		return nil, err
	}
	if cur := currentSerial(); pinned.Serial > cur {
		return nil, fmt.Errorf("%w: %s is pinned under %s, and this agent's datapath is version %d; it stays in "+
			"place and enforcing: run a version at least as new, or remove the pins to load this one "+
			"(enforcement stops until it is loaded)", ErrNewerDatapath, pinned, d.cfg.BPFFS, cur)
	}
	if !recorded {
		if pinned, err = d.legacyVersion(); err != nil {
			return nil, err
		}
	}
	if err := d.checkTunnelMark(pinned); err != nil {
		return nil, err
	}
	spec, settings, err := d.spec()
	if err != nil {
		return nil, err
	}
	if recorded && pinned.Object == objectDigest() && pinned.Settings == settings {
		if err := d.openPinned(); err != nil {
			return nil, err
		}
		d.version = pinned
		d.log.Info("datapath re-opened from pins", "bpffs", d.cfg.BPFFS, "version", pinned.String())
		return nil, nil
	}
	mig, err := d.planMigration(spec, pinned)
	if err != nil {
		return nil, err
	}
	defer mig.close()
	d.log.Info("migrating the pinned datapath", "bpffs", d.cfg.BPFFS, "from", pinned.String(),
		"to_serial", currentSerial(), "reused", len(mig.reused), "copied", mig.copied, "created", mig.created)
	if err := d.load(spec, settings, mig); err != nil {
		return nil, err
	}
	return mig, nil
}

// spec is this version's collection spec with this Config's settings, and
// their digest.
func (d *Datapath) spec() (*ebpf.CollectionSpec, string, error) {
	jiffy, err := jiffyLength()
	if err != nil {
		return nil, "", err
	}
	spec, err := loadSpec(d.cfg, jiffy)
	if err != nil {
		return nil, "", err
	}
	settings, err := settingsDigest(spec)
	if err != nil {
		return nil, "", err
	}
	return spec, settings, nil
}

func (d *Datapath) mapPin(name string) string  { return filepath.Join(d.cfg.BPFFS, "maps", name) }
func (d *Datapath) progPin(name string) string { return filepath.Join(d.cfg.BPFFS, "progs", name) }
func (d *Datapath) linkDir() string            { return filepath.Join(d.cfg.BPFFS, "links") }

// ErrWeaklyOrdered: the CPU may reorder loads with loads, which the
// conntrack tables' lock-free slots (bpf/lib/ct.h) do not survive.
var ErrWeaklyOrdered = errors.New("weakly ordered CPU")

// checkMemoryOrder refuses every architecture but amd64. A conntrack reader
// (BPF and the Go twin in conntrack.go) copies a slot between two plain
// reads of its sequence word, which is sound only where loads are not
// reordered with loads (x86-64's TSO). On arm64 and the like it needs
// load-acquire, which clang 19 cannot emit for BPF: running there would
// let a packet act on a torn entry, so the datapath does not start.
func checkMemoryOrder(goarch string) error {
	if goarch == "amd64" {
		return nil
	}
	return fmt.Errorf("%w: %s: the datapath's conntrack needs x86-64's load ordering (no load-acquire for BPF yet); "+
		"refusing to enforce policy here rather than enforce it wrongly", ErrWeaklyOrdered, goarch)
}

// ctRefresh is how stale BPF lets an entry's last_seen get: a second,
// or a quarter of the shortest timeout when that is shorter, so that a
// flow (or a tombstone) that keeps sending never expires.
func ctRefresh(cfg Config) time.Duration {
	if cfg.ctRefreshAlways {
		return 0
	}
	return min(time.Second, cfg.CTTimeoutClosing/4, cfg.CTTimeoutDenied/4, cfg.CTTimeoutOther/4,
		cfg.CTTimeoutTCP/4)
}

// loadSpec returns the collection spec with load-time settings applied.
// jiffy is the kernel's tick (jiffyLength).
func loadSpec(cfg Config, jiffy time.Duration) (*ebpf.CollectionSpec, error) {
	spec, err := loadSegment()
	if err != nil {
		return nil, fmt.Errorf("load bpf spec: %w", err)
	}
	vars := map[string]any{
		"jiffy_ns":               uint64(jiffy),
		"host_identity":          uint32(cfg.HostIdentity),
		"ct_timeout_tcp_ns":      uint64(cfg.CTTimeoutTCP),
		"ct_timeout_closing_ns":  uint64(cfg.CTTimeoutClosing),
		"ct_timeout_other_ns":    uint64(cfg.CTTimeoutOther),
		"ct_timeout_denied_ns":   uint64(cfg.CTTimeoutDenied),
		"ct_refresh_ns":          uint64(ctRefresh(cfg)),
		"drop_event_interval_ns": uint64(cfg.DropEventInterval),
		"ring_wakeup_mask":       ringWakeupMask(spec, cfg.EventRingBytes, runtime.NumCPU()),
		"tunnel_mark":            cfg.TunnelMark,
		"tunnel_mark_mask":       cfg.TunnelMask,
	}
	for name, v := range vars {
		vs, ok := spec.Variables[name]
		if !ok {
			return nil, fmt.Errorf("bpf variable %s missing", name)
		}
		if err := vs.Set(v); err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
	}
	if n := cfg.EventRingBytes; n != 0 && (n&(n-1) != 0 || n%uint32(os.Getpagesize()) != 0) {
		return nil, fmt.Errorf("event ring size %d: want a power of two and a multiple of the page size (%d)", n, os.Getpagesize())
	}
	if n := cfg.MaxConntrack; n != 0 {
		if n < ctWays || n&(n-1) != 0 {
			return nil, fmt.Errorf("conntrack size %d: want a power of two, at least %d", n, ctWays)
		}
		spec.Maps["conntrack4"].MaxEntries = n / ctWays
		spec.Maps["conntrack6"].MaxEntries = n / ctWays
	}
	// The ipcache trie holds both generations.
	for name, n := range map[string]uint32{"policy": cfg.MaxPolicyEntries, "ipcache": 2 * cfg.MaxIPCache,
		"events": cfg.EventRingBytes} {
		if n != 0 {
			spec.Maps[name].MaxEntries = n
		}
	}
	// The exact tables: a bucket of 4 slots per 4 entries of their trie,
	// a power of two.
	for table, trie := range map[string]string{"ipcache_hosts": "ipcache", "policy_exact": "policy"} {
		n := uint32(1)
		for n*exactWays < spec.Maps[trie].MaxEntries {
			n *= 2
		}
		if cfg.exactBuckets != 0 {
			n = cfg.exactBuckets
		}
		spec.Maps[table].MaxEntries = n
	}
	for name, m := range map[string]string{"ct4_bucket_mask": "conntrack4", "ct6_bucket_mask": "conntrack6",
		"ipcache_host_mask": "ipcache_hosts", "policy_exact_mask": "policy_exact"} {
		if err := spec.Variables[name].Set(spec.Maps[m].MaxEntries - 1); err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
	}
	return spec, nil
}

// ringWakeupMask is one less than the events each CPU emits between two
// wakeups of the reader: a power of two such that all CPUs together fill
// about half the ring in that time. Waking every 512 events cost 17 ns per
// event here (interrupt work and the reader's wakeup), so wakeups are kept
// rare; EventReader's poll drains a ring that fills slowly.
func ringWakeupMask(spec *ebpf.CollectionSpec, ringBytes uint32, cpus int) uint64 {
	if ringBytes == 0 {
		ringBytes = spec.Maps["events"].MaxEntries
	}
	const record = uint64(EventSize) + 8 // and the ring's header
	per := uint64(ringBytes) / 2 / record / uint64(max(cpus, 1))
	mask := uint64(0)
	for (mask+1)*2 <= per {
		mask = mask*2 + 1
	}
	return mask
}

// load loads spec. Without a migration it pins everything; with one, the
// maps mig reuses are the pinned ones, the ones it copies are filled, and
// nothing is pinned yet (finishMigration does that).
func (d *Datapath) load(spec *ebpf.CollectionSpec, settings string, mig *migration) error {
	if mig == nil {
		for name := range d.pinnedMaps() {
			spec.Maps[name].Pinning = ebpf.PinByName
		}
	}
	for _, dir := range []string{"maps", "progs", "links"} {
		if err := os.MkdirAll(filepath.Join(d.cfg.BPFFS, dir), 0o700); err != nil {
			return fmt.Errorf("create pin dir: %w", err)
		}
	}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: filepath.Join(d.cfg.BPFFS, "maps")}}
	if err := spec.LoadAndAssign(&d.objs, opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			d.log.Error("verifier rejected program", "log", fmt.Sprintf("%+v", verr))
		}
		return fmt.Errorf("load bpf objects: %w", err)
	}
	d.version = Version{Serial: currentSerial(), Object: objectDigest(), Settings: settings,
		TunnelMark: d.cfg.TunnelMark, TunnelMask: d.cfg.TunnelMask, LoadedAt: time.Now().UTC()}
	if mig != nil {
		if err := d.copyMaps(mig); err != nil {
			d.Close()
			return err
		}
	}
	if err := d.seedConntrack(); err != nil {
		d.Close()
		return err
	}
	if mig != nil {
		return nil
	}
	if err := d.pinVersion(d.version); err != nil {
		d.Close()
		return err
	}
	// The programs are pinned last: their pins are what New looks for
	// to re-open, so a load that failed before here is loaded again.
	for name, p := range d.pinnedProgs() {
		if err := pinReplacing(*p, d.progPin(name)); err != nil {
			d.Close()
			return fmt.Errorf("pin program %s: %w", name, err)
		}
	}
	return nil
}

// seedConntrack gives new maps a random conntrack hash seed (before any
// program is attached). Maps re-used from pins keep theirs: their tables
// are filed under it.
func (d *Datapath) seedConntrack() error {
	var g GlobalConfig
	if err := d.objs.Globals.Lookup(uint32(0), &g); err != nil {
		return fmt.Errorf("read globals: %w", err)
	}
	for g.CtSeed == 0 {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			return fmt.Errorf("conntrack seed: %w", err)
		}
		g.CtSeed = binary.NativeEndian.Uint32(b[:])
	}
	if err := d.objs.Globals.Update(uint32(0), g, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write globals: %w", err)
	}
	return nil
}

func (d *Datapath) prog(name string) *ebpf.Program {
	if p, ok := d.pinnedProgs()[name]; ok {
		return *p
	}
	return nil
}

func (d *Datapath) openPinned() error {
	for name, dst := range d.pinnedMaps() {
		mp, err := ebpf.LoadPinnedMap(d.mapPin(name), nil)
		if err != nil {
			d.Close()
			return fmt.Errorf("open pinned map %s: %w", name, err)
		}
		*dst = mp
	}
	for name, dst := range d.pinnedProgs() {
		p, err := ebpf.LoadPinnedProgram(d.progPin(name), nil)
		if err != nil {
			d.Close()
			return fmt.Errorf("open pinned program %s: %w", name, err)
		}
		*dst = p
	}
	return nil
}

// readMirrors fills the in-memory copies of both generations from the
// maps. A process that died mid-Apply left the inactive generation half
// written; the mirrors say what it holds, so the next Apply finishes it.
func (d *Datapath) readMirrors() error {
	d.gens = [2]generation{newGeneration(), newGeneration()}
	d.global = d.globals.load()
	for g := range uint8(2) {
		d.gens[g].flags = d.global.Flags[g]
		for id := policy.EndpointID(1); uint32(id) < d.epcfg.n; id++ {
			if cfg, ok := d.epcfg.load(g, id); ok {
				d.gens[g].epConfigs[id] = cfg
			}
		}
	}
	var pk PolicyKey
	var pv PolicyValue
	it := d.objs.Policy.Iterate()
	for it.Next(&pk, &pv) {
		if pk.Slot > 1 {
			return fmt.Errorf("read policy: entry of generation %d (pinned by another version?)", pk.Slot)
		}
		gen, ep := &d.gens[pk.Slot], policy.EndpointID(pk.EpId)
		pk.Slot = 0
		if gen.slots[ep] == nil {
			gen.slots[ep] = map[PolicyKey]PolicyValue{}
		}
		gen.slots[ep][pk] = pv
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read policy: %w", err)
	}
	var ik IPCacheKey
	var iv IPCacheValue
	it = d.objs.Ipcache.Iterate()
	for it.Next(&ik, &iv) {
		if ik.Gen > 1 {
			return fmt.Errorf("read ipcache: entry of generation %d (pinned by another version?)", ik.Gen)
		}
		gen := &d.gens[ik.Gen]
		ik.Gen = 0
		gen.ipcache[ik] = iv
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read ipcache: %w", err)
	}
	var fk segmentIdFlagsKey
	var fv uint32
	it = d.objs.IdFlags.Iterate()
	for it.Next(&fk, &fv) {
		if fk.Gen > 1 {
			return fmt.Errorf("read id_flags: entry of generation %d (pinned by another version?)", fk.Gen)
		}
		d.gens[fk.Gen].idFlags[identity.NumericID(fk.Identity)] = fv
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read id_flags: %w", err)
	}
	// A packet may still judge by the generation that was live before the
	// last publish, which may have been an instant ago.
	d.startQuiesce()
	return nil
}

// Revision is the live policy revision (bumped by every effective Apply).
func (d *Datapath) Revision() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.global.Revision
}

// Close releases this process's handles. Pinned objects and links stay, and
// so does enforcement.
func (d *Datapath) Close() error {
	d.mu.Lock()
	d.unmapMu.Lock()
	err := errors.Join(d.ct4.close(), d.ct6.close(), d.epcfg.close(), d.hosts.close(), d.policyExact.close(),
		d.globals.close(), d.quarantine.close())
	d.ct4, d.ct6, d.epcfg, d.hosts, d.policyExact, d.globals, d.quarantine = nil, nil, nil, nil, nil, nil, nil
	d.unmapMu.Unlock()
	d.mu.Unlock()
	return errors.Join(err, d.objs.Close())
}

// Remove detaches every endpoint attached under this BPFFS, unpins
// everything and closes the datapath. Traffic is no longer enforced.
func (d *Datapath) Remove() error {
	errs := []error{d.detachAll()}
	errs = append(errs, d.Close())
	errs = append(errs, os.RemoveAll(d.cfg.BPFFS))
	return errors.Join(errs...)
}
