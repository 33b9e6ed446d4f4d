package runtime

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
)

// ErrNotSupported is wrapped by a probe's error when the kernel lacks the
// feature.
var ErrNotSupported = ebpf.ErrNotSupported

// ModulePath tells how module loads are hooked.
type ModulePath string

const (
	// ModuleTracepoints: syscalls/sys_enter_init_module and
	// sys_enter_finit_module exist and are used.
	ModuleTracepoints ModulePath = "tracepoint"
	// ModuleRawSysEnter: those tracepoints are missing (a kernel without
	// CONFIG_MODULES), so raw_tp sys_enter filters by syscall number. It
	// runs for every syscall on the node.
	ModuleRawSysEnter ModulePath = "raw_tp/sys_enter"
	// ModuleNone: the kernel cannot load modules at all (no
	// CONFIG_MODULES: no /proc/modules, and init_module fails with
	// ENOSYS), so nothing is hooked. raw_tp sys_enter would run a program
	// on every syscall of the node (10 to 30 % more per syscall, measured
	// by BenchmarkSysmonOverhead) to see attempts that cannot succeed.
	ModuleNone ModulePath = "none"
)

// Features is what the kernel offers the runtime monitor. A nil error means
// available; a non-nil one says why not (wrapping ErrNotSupported when the
// kernel lacks the feature, or the kernel's refusal, such as EPERM).
type Features struct {
	Tracefs    error // mounted at StandardTracefs
	Tracepoint error // syscalls/sys_enter_* tracepoints attach
	RawTP      error // raw_tp sys_enter attaches
	Fentry     error // fentry on a kernel function attaches
	Kprobe     error // a kprobe attaches
	BPFLSM     error // a BPF LSM program attaches
	CgroupHook error // cgroup connect4 programs load
	RingBuf    error
	// ModulePath is the module-load hook New uses on this kernel.
	ModulePath ModulePath
}

// Available lists the features by name with their state, for status output.
func (f Features) Available() map[string]error {
	return map[string]error{
		"tracefs": f.Tracefs, "tracepoint": f.Tracepoint, "raw_tp": f.RawTP, "fentry": f.Fentry,
		"kprobe": f.Kprobe, "bpf_lsm": f.BPFLSM, "cgroup_hooks": f.CgroupHook, "ringbuf": f.RingBuf,
	}
}

// The kernel function fentry, kprobe and LSM probes use: present on every
// kernel with the security hooks compiled in.
const probeFunc = "security_file_open"

// ProbeFeatures attaches a do-nothing program to each kind of hook and
// detaches it at once. It needs tracefs (call EnsureTracefs first): without
// it, the tracepoint probes fail and say so.
func ProbeFeatures() Features {
	f := Features{
		Tracefs: tracefsState(StandardTracefs),
		RingBuf: features.HaveMapType(ebpf.RingBuf),
	}
	f.Tracepoint = probeAttach(ebpf.TracePoint, 0, "", func(p *ebpf.Program) (link.Link, error) {
		return link.Tracepoint("syscalls", "sys_enter_getppid", p, nil)
	})
	f.RawTP = probeAttach(ebpf.RawTracepoint, 0, "", func(p *ebpf.Program) (link.Link, error) {
		return link.AttachRawTracepoint(link.RawTracepointOptions{Name: "sys_enter", Program: p})
	})
	f.Fentry = probeAttach(ebpf.Tracing, ebpf.AttachTraceFEntry, probeFunc, func(p *ebpf.Program) (link.Link, error) {
		return link.AttachTracing(link.TracingOptions{Program: p})
	})
	f.Kprobe = probeAttach(ebpf.Kprobe, 0, "", func(p *ebpf.Program) (link.Link, error) {
		return link.Kprobe(probeFunc, p, nil)
	})
	f.BPFLSM = probeAttach(ebpf.LSM, ebpf.AttachLSMMac, "file_open", func(p *ebpf.Program) (link.Link, error) {
		return link.AttachLSM(link.LSMOptions{Program: p})
	})
	// Attaching a cgroup program would change the node's behaviour for a
	// moment; loading one is the probe.
	f.CgroupHook = probeLoad(ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect, "", 1)
	f.ModulePath = modulePath(StandardTracefs)
	return f
}

func tracefsState(dir string) error {
	on, err := isTracefs(dir)
	if err != nil {
		return err
	}
	if !on {
		return fmt.Errorf("%w: tracefs is not mounted at %s", ErrNotSupported, dir)
	}
	return nil
}

// modulePath picks the module-load hook: the per-syscall tracepoints where
// tracefs lists them.
func modulePath(tracefs string) ModulePath {
	return modulePathIn(tracefs, "/proc/modules")
}

// modulePathIn is modulePath with the file that says the kernel has module
// support.
func modulePathIn(tracefs, procModules string) ModulePath {
	for _, n := range []string{"sys_enter_init_module", "sys_enter_finit_module"} {
		if _, err := os.Stat(filepath.Join(tracefs, "events", "syscalls", n)); err != nil {
			if _, err := os.Stat(procModules); errors.Is(err, os.ErrNotExist) {
				return ModuleNone
			}
			return ModuleRawSysEnter
		}
	}
	return ModuleTracepoints
}

func probeLoad(t ebpf.ProgramType, at ebpf.AttachType, to string, ret int64) error {
	p, err := loadProbe(t, at, to, ret)
	if err != nil {
		return err
	}
	return p.Close()
}

func loadProbe(t ebpf.ProgramType, at ebpf.AttachType, to string, ret int64) (*ebpf.Program, error) {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: t, AttachType: at, AttachTo: to, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, int32(ret)), asm.Return()},
	})
	if err != nil {
		return nil, fmt.Errorf("load %s program: %w", t, err)
	}
	return p, nil
}

func probeAttach(t ebpf.ProgramType, at ebpf.AttachType, to string, attach func(*ebpf.Program) (link.Link, error)) error {
	p, err := loadProbe(t, at, to, 0)
	if err != nil {
		return err
	}
	defer p.Close()
	l, err := attach(p)
	if err != nil {
		return fmt.Errorf("attach %s program: %w", t, err)
	}
	return l.Close()
}
