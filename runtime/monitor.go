package runtime

import (
	"errors"
	"fmt"
	"log/slog"
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
	Logger       *slog.Logger
}

// Monitor is the loaded and attached system monitor.
type Monitor struct {
	objs       sysmonObjects
	links      []link.Link
	modulePath ModulePath
	log        *slog.Logger

	mu      sync.Mutex
	watched map[uint32]detect.Endpoint
	nextID  uint32
}

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
	m := &Monitor{modulePath: mp, log: log, watched: map[uint32]detect.Endpoint{}}
	if err := spec.LoadAndAssign(&m.objs, nil); err != nil {
		return nil, fmt.Errorf("load sysmon: %w", err)
	}
	tps := []struct {
		name string
		prog *ebpf.Program
	}{
		{"sys_enter_setns", m.objs.SysmonSetns},
		{"sys_enter_unshare", m.objs.SysmonUnshare},
		{"sys_enter_mount", m.objs.SysmonMount},
		{"sys_enter_ptrace", m.objs.SysmonPtrace},
		{"sys_enter_bpf", m.objs.SysmonBpf},
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
	exec, err := link.Tracepoint("sched", "sched_process_exec", m.objs.SysmonExec, nil)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("attach tracepoint sched/sched_process_exec: %w", err)
	}
	m.links = append(m.links, exec)
	if cfg.NoModuleHook {
		m.modulePath = ""
	}
	log.Info("runtime monitor attached", "hooks", len(m.links), "module_path", string(m.modulePath))
	return m, nil
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
	if err := m.objs.SysmonWatched.Put(netns, sysmonSysmonWatch{Endpoint: m.nextID}); err != nil {
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
}

// Counters reads the kernel's counters.
func (m *Monitor) Counters() (Counters, error) {
	var c Counters
	for key, dst := range map[sysmonSysmonCounter]*uint64{
		sysmonSysmonCounterSMC_SENT: &c.Sent, sysmonSysmonCounterSMC_LOST: &c.Lost, sysmonSysmonCounterSMC_UNWATCHED: &c.Unwatched,
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
