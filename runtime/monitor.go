package runtime

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// Config configures a Monitor.
type Config struct {
	// RingSize is the event ring buffer's size in bytes: a power of two and
	// a multiple of the page size. 0 keeps the default (256 KiB).
	RingSize uint32
	// ModulePath forces the module-load hook; "" picks it from tracefs
	// (ProbeFeatures' choice).
	ModulePath ModulePath
	// NoModuleHook leaves module loads unhooked (the raw_tp path runs for
	// every syscall; benchmarks measure with and without it).
	NoModuleHook bool
	// Cgroup is the cgroup v2 folder the blocking hooks (connect_unix,
	// sock_create, sysctl) attach to, with bpf_link (multi-attach: they
	// run beside other programs there, never replace them). They see
	// every process in that cgroup's subtree and act only for watched
	// netns. The agent gives the cgroup2 root; tests give a cgroup of
	// their own. "" attaches none: CgroupHooks then says so, and Block
	// cannot be enforced.
	Cgroup string
	// RuntimeSockets are the file names of container runtime sockets
	// (BH-RT-007): a connect to a path whose last component is one of
	// them matches. nil means DefaultRuntimeSockets. At most 8, each 1 to
	// 32 bytes without "/".
	RuntimeSockets []string
	// MetadataAddrs are the cloud instance metadata addresses (BH-RT-017):
	// a connect to one of them, any port, matches. nil means
	// DefaultMetadataAddrs. At most 16.
	MetadataAddrs []netip.Addr
	// OpenPrefixes are the path prefixes whose opens BH-RT-018 reports
	// (kernel memory, raw disks); nil means DefaultOpenPrefixes. Each is
	// 7, 8, 9, 11 or 12 bytes long (the lengths the kernel tries); at most
	// 32.
	OpenPrefixes []string
	Logger       *slog.Logger
}

// DefaultRuntimeSockets are docker's, containerd's and CRI-O's sockets.
var DefaultRuntimeSockets = []string{"docker.sock", "containerd.sock", "crio.sock"}

// DefaultOpenPrefixes: kernel memory and I/O ports, the kernel's core
// image, and the block devices of SCSI/SATA, virtio, IDE, Xen, NVMe and
// eMMC disks, device-mapper and software RAID.
var DefaultOpenPrefixes = []string{
	"/dev/mem", "/dev/kmem", "/dev/port", "/proc/kcore",
	"/dev/sd", "/dev/vd", "/dev/hd", "/dev/xvd", "/dev/nvme", "/dev/mmcblk", "/dev/dm-", "/dev/mapper/", "/dev/md",
}

// openPrefixKeys checks the prefixes and makes their map keys.
func openPrefixKeys(prefixes []string) ([]sysmonSysmonOpenPrefix, error) {
	if len(prefixes) > sysmonOpenPrefixes {
		return nil, fmt.Errorf("open prefixes: %d, at most %d", len(prefixes), sysmonOpenPrefixes)
	}
	out := make([]sysmonSysmonOpenPrefix, 0, len(prefixes))
	for _, p := range prefixes {
		switch len(p) {
		case 7, 8, 9, 11, 12:
		default:
			return nil, fmt.Errorf("open prefix %q: %d bytes, the kernel tries 7, 8, 9, 11 and 12", p, len(p))
		}
		if !strings.HasPrefix(p, "/dev/") && !strings.HasPrefix(p, "/proc/") || strings.ContainsRune(p, 0) {
			return nil, fmt.Errorf("open prefix %q: the kernel looks at paths under /dev/ and /proc/ only", p)
		}
		var k sysmonSysmonOpenPrefix
		for i := range len(p) {
			k.P[i] = int8(p[i])
		}
		out = append(out, k)
	}
	return out, nil
}

// sysmonOpenPrefixes is SYSMON_OPEN_PREFIXES.
const sysmonOpenPrefixes = 32

// DefaultMetadataAddrs are the instance metadata services' addresses:
// the link-local one that AWS, GCP, Azure and OpenStack serve, AWS's IPv6
// one, and Alibaba Cloud's.
var DefaultMetadataAddrs = []netip.Addr{
	netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd00:ec2::254"), netip.MustParseAddr("100.100.100.200"),
}

// The cgroup hooks by name, for CgroupHooks.
const (
	HookConnectUnix = "cgroup/connect_unix"
	HookSockCreate  = "cgroup/sock_create"
	HookSysctl      = "cgroup/sysctl"
	// BH-RT-017 needs both; HookOf names connect4.
	HookConnect4 = "cgroup/connect4"
	HookConnect6 = "cgroup/connect6"
)

// Monitor is the loaded and attached system monitor.
type Monitor struct {
	objs       tracingObjects
	links      []link.Link
	modulePath ModulePath
	log        *slog.Logger

	// hooks is each cgroup hook's attach result: nil when attached.
	hooks map[string]error
	// optional is each optional tracepoint's attach result (OptionalHooks).
	optional map[string]error

	mu      sync.Mutex
	watched map[uint32]detect.Endpoint
	nextID  uint32
}

// ErrNoCgroup is a cgroup hook's state when Config.Cgroup is empty.
var ErrNoCgroup = errors.New("no cgroup v2 folder to attach to")

// ErrNotWatched is returned by Unwatch for a namespace that is not watched.
var ErrNotWatched = errors.New("netns not watched")

// New loads bpf/sysmon.c and attaches its hooks. Tracefs must be mounted
// (EnsureTracefs). Nothing is pinned: the hooks live as long as the Monitor,
// and events from before New are not seen.
func New(cfg Config) (*Monitor, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	spec, err := loadSysmon()
	if err != nil {
		return nil, fmt.Errorf("load sysmon spec: %w", err)
	}
	if cfg.RingSize != 0 {
		spec.Maps[sysmonMapSysmonEvents].MaxEntries = cfg.RingSize
	}
	if err := spec.Variables[sysmonVarNrInitModule].Set(int64(unix.SYS_INIT_MODULE)); err != nil {
		return nil, fmt.Errorf("set nr_init_module: %w", err)
	}
	if err := spec.Variables[sysmonVarNrFinitModule].Set(int64(unix.SYS_FINIT_MODULE)); err != nil {
		return nil, fmt.Errorf("set nr_finit_module: %w", err)
	}
	mp := cfg.ModulePath
	if mp == "" {
		mp = modulePath(StandardTracefs)
	}
	socks := cfg.RuntimeSockets
	if socks == nil {
		socks = DefaultRuntimeSockets
	}
	names, err := sockNames(socks)
	if err != nil {
		return nil, err
	}
	mds := cfg.MetadataAddrs
	if mds == nil {
		mds = DefaultMetadataAddrs
	}
	if len(mds) > sysmonMetadataAddrs {
		return nil, fmt.Errorf("metadata addresses: %d, at most %d", len(mds), sysmonMetadataAddrs)
	}
	ops := cfg.OpenPrefixes
	if ops == nil {
		ops = DefaultOpenPrefixes
	}
	opKeys, err := openPrefixKeys(ops)
	if err != nil {
		return nil, err
	}
	m := &Monitor{modulePath: mp, log: log, watched: map[uint32]detect.Endpoint{}, hooks: map[string]error{},
		optional: map[string]error{}}
	// The cgroup programs load on their own (attachCgroupHooks): a kernel
	// without one of them still runs the tracepoints.
	if err := spec.LoadAndAssign(&m.objs, nil); err != nil {
		return nil, fmt.Errorf("load sysmon: %w", err)
	}
	for _, n := range names {
		if err := m.objs.SysmonSockNames.Put(n, uint8(1)); err != nil {
			m.Close()
			return nil, fmt.Errorf("fill runtime socket names: %w", err)
		}
	}
	for _, a := range mds {
		if err := m.objs.SysmonMetadataAddrs.Put(sysmonSysmonAddr{Addr: addrKey(a)}, uint8(1)); err != nil {
			m.Close()
			return nil, fmt.Errorf("fill metadata addresses: %w", err)
		}
	}
	for _, k := range opKeys {
		if err := m.objs.SysmonOpenPrefixes.Put(k, detect.Bit(detect.RuleRawDevice.ID)); err != nil {
			m.Close()
			return nil, fmt.Errorf("fill open prefixes: %w", err)
		}
	}
	m.attachCgroupHooks(cfg.Cgroup, spec)
	tps := []struct {
		name string
		prog *ebpf.Program
	}{
		{"sys_enter_setns", m.objs.SysmonSetns},
		{"sys_enter_unshare", m.objs.SysmonUnshare},
		{"sys_enter_mount", m.objs.SysmonMount},
		{"sys_enter_ptrace", m.objs.SysmonPtrace},
		{"sys_enter_bpf", m.objs.SysmonBpf},
		{"sys_enter_socket", m.objs.SysmonSocket},
	}
	if !cfg.NoModuleHook && mp == ModuleTracepoints {
		tps = append(tps, struct {
			name string
			prog *ebpf.Program
		}{"sys_enter_init_module", m.objs.SysmonInitModule}, struct {
			name string
			prog *ebpf.Program
		}{"sys_enter_finit_module", m.objs.SysmonFinitModule})
	}
	for _, tp := range tps {
		l, err := link.Tracepoint("syscalls", tp.name, tp.prog, nil)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("attach tracepoint syscalls/%s: %w", tp.name, err)
		}
		m.links = append(m.links, l)
	}
	if !cfg.NoModuleHook && mp == ModuleRawSysEnter {
		l, err := link.AttachRawTracepoint(link.RawTracepointOptions{Name: "sys_enter", Program: m.objs.SysmonSysEnter})
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("attach raw_tp sys_enter: %w", err)
		}
		m.links = append(m.links, l)
	}
	m.attachOptional(StandardTracefs)
	exec, err := link.Tracepoint("sched", "sched_process_exec", m.objs.SysmonExec, nil)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("attach tracepoint sched/sched_process_exec: %w", err)
	}
	m.links = append(m.links, exec)
	// The container runtime's set-up in a pod is not the pod's (see
	// sysmon_entering in bpf/sysmon.c): its mark follows its forks.
	fork, err := link.AttachRawTracepoint(link.RawTracepointOptions{Name: "sched_process_fork", Program: m.objs.SysmonFork})
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("attach raw_tp sched_process_fork: %w", err)
	}
	m.links = append(m.links, fork)
	if cfg.NoModuleHook {
		m.modulePath = ""
	}
	log.Info("runtime monitor attached", "hooks", len(m.links), "module_path", string(m.modulePath))
	return m, nil
}

// The optional tracepoints: rules added after the first set, on syscalls a
// kernel may lack (a kernel without CONFIG_MULTIUSER has no setuid family).
// Each is probed in tracefs and attached on its own; a missing one leaves
// its rule silent, and OptionalHooks says why.
var optionalTracepoints = []string{
	"sys_enter_chroot", "sys_enter_pivot_root", // BH-RT-011
	"sys_enter_setuid", "sys_enter_setreuid", "sys_enter_setresuid", "sys_enter_capset", // BH-RT-015
	"sys_enter_openat", "sys_enter_open", "sys_enter_openat2", // BH-RT-018, BH-RT-019
}

func (m *Monitor) optionalProgram(name string) *ebpf.Program {
	switch name {
	case "sys_enter_chroot":
		return m.objs.SysmonChroot
	case "sys_enter_pivot_root":
		return m.objs.SysmonPivotRoot
	case "sys_enter_setuid":
		return m.objs.SysmonSetuid
	case "sys_enter_setreuid":
		return m.objs.SysmonSetreuid
	case "sys_enter_setresuid":
		return m.objs.SysmonSetresuid
	case "sys_enter_capset":
		return m.objs.SysmonCapset
	case "sys_enter_openat":
		return m.objs.SysmonOpenat
	case "sys_enter_open":
		return m.objs.SysmonOpen
	case "sys_enter_openat2":
		return m.objs.SysmonOpenat2
	}
	return nil
}

// attachOptional attaches each optional tracepoint that tracefs (at
// tracefs) lists; m.optional records each one's outcome.
func (m *Monitor) attachOptional(tracefs string) {
	for _, name := range optionalTracepoints {
		hook := "syscalls/" + name
		if _, err := os.Stat(filepath.Join(tracefs, "events", "syscalls", name)); err != nil {
			m.optional[hook] = fmt.Errorf("%w: tracefs has no %s: %v", ErrNotSupported, hook, err)
			m.log.Warn("runtime tracepoint unavailable: its rule is silent", "hook", hook, "error", m.optional[hook])
			continue
		}
		l, err := link.Tracepoint("syscalls", name, m.optionalProgram(name), nil)
		if err != nil {
			m.optional[hook] = fmt.Errorf("attach tracepoint %s: %w", hook, err)
			m.log.Warn("runtime tracepoint unavailable: its rule is silent", "hook", hook, "error", m.optional[hook])
			continue
		}
		m.optional[hook] = nil
		m.links = append(m.links, l)
	}
}

// OptionalHooks is each optional tracepoint's state (syscalls/sys_enter_chroot,
// ...): nil when attached, else why not. Where one is missing its rule
// (TracepointRule) does not see that syscall.
func (m *Monitor) OptionalHooks() map[string]error {
	out := make(map[string]error, len(m.optional))
	for k, v := range m.optional {
		out[k] = v
	}
	return out
}

// attachCgroupHooks loads and attaches each cgroup program on its own, so
// that one the kernel lacks (connect_unix needs 6.7) leaves the others
// working; each one's outcome is in m.hooks.
func (m *Monitor) attachCgroupHooks(cgroup string, spec *ebpf.CollectionSpec) {
	hooks := []struct {
		hook, prog string
		attach     ebpf.AttachType
	}{
		{HookConnectUnix, "sysmon_connect_unix", ebpf.AttachCgroupUnixConnect},
		{HookSockCreate, "sysmon_sock_create", ebpf.AttachCGroupInetSockCreate},
		{HookSysctl, "sysmon_sysctl", ebpf.AttachCGroupSysctl},
		{HookConnect4, "sysmon_connect4", ebpf.AttachCGroupInet4Connect},
		{HookConnect6, "sysmon_connect6", ebpf.AttachCGroupInet6Connect},
	}
	for _, h := range hooks {
		hook := h.hook
		if cgroup == "" {
			m.hooks[hook] = ErrNoCgroup
			continue
		}
		// Lazy loading: only this program, on the monitor's own maps.
		var obj struct {
			P *ebpf.Program `ebpf:"prog"`
		}
		one := spec.Copy()
		one.Programs = map[string]*ebpf.ProgramSpec{"prog": spec.Programs[h.prog]}
		err := one.LoadAndAssign(&obj, &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
			sysmonMapSysmonWatched: m.objs.SysmonWatched, sysmonMapSysmonEvents: m.objs.SysmonEvents,
			sysmonMapSysmonCounters: m.objs.SysmonCounters, sysmonMapSysmonSockNames: m.objs.SysmonSockNames,
			sysmonMapSysmonMetadataAddrs: m.objs.SysmonMetadataAddrs,
		}})
		if err != nil {
			m.hooks[hook] = fmt.Errorf("load %s: %w", hook, err)
			m.log.Warn("runtime cgroup hook unavailable", "hook", hook, "error", m.hooks[hook])
			continue
		}
		prog := obj.P
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: h.attach, Program: prog})
		prog.Close() // the link holds it
		if err != nil {
			m.hooks[hook] = fmt.Errorf("attach %s to %s: %w", hook, cgroup, err)
			m.log.Warn("runtime cgroup hook unavailable", "hook", hook, "error", m.hooks[hook])
			continue
		}
		m.hooks[hook] = nil
		m.links = append(m.links, l)
	}
}

// CgroupHooks is each blocking hook's state: nil when attached, else why
// not. A rule whose hook is missing has no other source: it is silent, and
// Block cannot be enforced for it.
func (m *Monitor) CgroupHooks() map[string]error {
	out := make(map[string]error, len(m.hooks))
	for k, v := range m.hooks {
		out[k] = v
	}
	return out
}

// HookOf is the cgroup hook a rule needs; "" for the tracepoint rules.
func HookOf(ruleID string) string {
	switch ruleID {
	case detect.RuleRuntimeSocket.ID:
		return HookConnectUnix
	case detect.RuleRawSocket.ID:
		return HookSockCreate
	case detect.RuleSysctlWrite.ID:
		return HookSysctl
	case detect.RuleMetadata.ID:
		return HookConnect4
	}
	return ""
}

// sysmonMetadataAddrs is SYSMON_METADATA_ADDRS.
const sysmonMetadataAddrs = 16

// addrKey is an address as sysmon_addr holds it: 16 bytes, IPv4
// v4-mapped, in network order, read as native words.
func addrKey(a netip.Addr) [4]uint32 {
	b := a.As16()
	var w [4]uint32
	for i := range 4 {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

// sockNames checks the runtime socket names and encodes them.
func sockNames(names []string) ([]sysmonSysmonSockName, error) {
	const maxN, maxLen = 8, 32
	if len(names) > maxN {
		return nil, fmt.Errorf("runtime sockets: %d names, at most %d", len(names), maxN)
	}
	out := make([]sysmonSysmonSockName, 0, len(names))
	for _, n := range names {
		if n == "" || len(n) > maxLen || strings.ContainsAny(n, "/\x00") {
			return nil, fmt.Errorf("runtime sockets: %q: want a file name of 1 to %d bytes without \"/\"", n, maxLen)
		}
		var s sysmonSysmonSockName
		for i := range len(n) {
			s.Name[i] = int8(n[i])
		}
		out = append(out, s)
	}
	return out, nil
}

// ModulePath is the module-load hook in use; "" when none is attached.
func (m *Monitor) ModulePath() ModulePath { return m.modulePath }

// Watch makes the kernel report the processes in the network namespace
// with inode netns, as the pod ep. Watching a watched namespace again
// replaces its endpoint.
func (m *Monitor) Watch(netns uint32, ep detect.Endpoint) error {
	if netns == 0 {
		return fmt.Errorf("watch netns: inode 0")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nextID++
	ep.Netns = netns
	if err := m.objs.SysmonWatched.Put(netns, sysmonSysmonWatch{Endpoint: m.nextID, Block: ep.Actions.Block, Kill: ep.Actions.Kill}); err != nil {
		return fmt.Errorf("watch netns %d: %w", netns, err)
	}
	m.watched[netns] = ep
	return nil
}

// Unwatch stops reporting the namespace. Events already in the ring buffer
// still decode, but Endpoint no longer names their pod.
func (m *Monitor) Unwatch(netns uint32) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.watched[netns]; !ok {
		return fmt.Errorf("unwatch netns %d: %w", netns, ErrNotWatched)
	}
	if err := m.objs.SysmonWatched.Delete(netns); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unwatch netns %d: %w", netns, err)
	}
	delete(m.watched, netns)
	return nil
}

// Endpoint is the pod watched under netns.
func (m *Monitor) Endpoint(netns uint32) (detect.Endpoint, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ep, ok := m.watched[netns]
	return ep, ok
}

// Counters are the kernel side's totals since load, summed over CPUs.
type Counters struct {
	Sent uint64 // events submitted to the ring buffer
	// Lost events: the ring buffer was full. Never silent: report it.
	Lost uint64
	// Unwatched: hook runs for processes in no watched namespace, dropped
	// before the ring buffer.
	Unwatched uint64
	// Blocked: operations a cgroup hook denied.
	Blocked uint64
}

// Counters reads the kernel's counters.
func (m *Monitor) Counters() (Counters, error) {
	var c Counters
	for key, dst := range map[sysmonSysmonCounter]*uint64{
		sysmonSysmonCounterSMC_SENT: &c.Sent, sysmonSysmonCounterSMC_LOST: &c.Lost, sysmonSysmonCounterSMC_UNWATCHED: &c.Unwatched,
		sysmonSysmonCounterSMC_BLOCKED: &c.Blocked,
	} {
		var per []uint64
		if err := m.objs.SysmonCounters.Lookup(uint32(key), &per); err != nil {
			return Counters{}, fmt.Errorf("read sysmon counter %d: %w", key, err)
		}
		for _, v := range per {
			*dst += v
		}
	}
	return c, nil
}

// Close detaches every hook and frees the programs and maps.
func (m *Monitor) Close() error {
	var errs []error
	for _, l := range m.links {
		errs = append(errs, l.Close())
	}
	m.links = nil
	errs = append(errs, m.objs.Close())
	return errors.Join(errs...)
}

func (m *Monitor) watchedInodes() []uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]uint32, 0, len(m.watched))
	for ino := range m.watched {
		out = append(out, ino)
	}
	return out
}

// tracingObjects are the maps and the tracepoint programs; the cgroup
// programs are loaded one by one in attachCgroupHooks.
type tracingObjects struct {
	sysmonMaps
	SysmonBpf         *ebpf.Program `ebpf:"sysmon_bpf"`
	SysmonCapset      *ebpf.Program `ebpf:"sysmon_capset"`
	SysmonChroot      *ebpf.Program `ebpf:"sysmon_chroot"`
	SysmonPivotRoot   *ebpf.Program `ebpf:"sysmon_pivot_root"`
	SysmonSetresuid   *ebpf.Program `ebpf:"sysmon_setresuid"`
	SysmonSetreuid    *ebpf.Program `ebpf:"sysmon_setreuid"`
	SysmonSetuid      *ebpf.Program `ebpf:"sysmon_setuid"`
	SysmonExec        *ebpf.Program `ebpf:"sysmon_exec"`
	SysmonFork        *ebpf.Program `ebpf:"sysmon_fork"`
	SysmonFinitModule *ebpf.Program `ebpf:"sysmon_finit_module"`
	SysmonInitModule  *ebpf.Program `ebpf:"sysmon_init_module"`
	SysmonMount       *ebpf.Program `ebpf:"sysmon_mount"`
	SysmonPtrace      *ebpf.Program `ebpf:"sysmon_ptrace"`
	SysmonSetns       *ebpf.Program `ebpf:"sysmon_setns"`
	SysmonSocket      *ebpf.Program `ebpf:"sysmon_socket"`
	SysmonSysEnter    *ebpf.Program `ebpf:"sysmon_sys_enter"`
	SysmonUnshare     *ebpf.Program `ebpf:"sysmon_unshare"`
	SysmonOpenat      *ebpf.Program `ebpf:"sysmon_openat"`
	SysmonOpen        *ebpf.Program `ebpf:"sysmon_open"`
	SysmonOpenat2     *ebpf.Program `ebpf:"sysmon_openat2"`
}

func (o *tracingObjects) Close() error {
	errs := []error{o.sysmonMaps.Close()}
	for _, p := range []*ebpf.Program{o.SysmonBpf, o.SysmonExec, o.SysmonFork, o.SysmonFinitModule, o.SysmonInitModule, o.SysmonMount,
		o.SysmonPtrace, o.SysmonSetns, o.SysmonSocket, o.SysmonSysEnter, o.SysmonUnshare, o.SysmonCapset, o.SysmonChroot,
		o.SysmonPivotRoot, o.SysmonSetresuid, o.SysmonSetreuid, o.SysmonSetuid, o.SysmonOpenat, o.SysmonOpen, o.SysmonOpenat2} {
		if p != nil {
			errs = append(errs, p.Close())
		}
	}
	return errors.Join(errs...)
}
