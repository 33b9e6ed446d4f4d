package runtime

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// BenchmarkSysmonOverhead is issue 14's overhead goal: syscall-heavy loops
// (openat+close of /dev/null with a getpid; a 64-byte read of /dev/zero and
// write to /dev/null) with no monitor, with the monitor's per-syscall
// tracepoints, and with the raw_tp sys_enter module hook as well (which runs
// a program on every syscall). Compare the sub-benchmarks of one run as
// ratios; pin with taskset -c 1 and interleave runs (-count 1 in a loop)
// for stable numbers. One netns is watched, as on a node with pods; the
// loop runs in the node's own.
func BenchmarkSysmonOverhead(b *testing.B) {
	privileged.Require(b)
	zero, err := unix.Open("/dev/zero", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(zero)
	null, err := unix.Open("/dev/null", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(null)
	buf := make([]byte, 64)
	loops := []struct {
		name string
		body func(b *testing.B)
	}{
		{"openat", func(b *testing.B) {
			fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
			unix.Getpid()
		}},
		{"socket", func(b *testing.B) {
			// A UDP socket: what the sys_enter_socket tracepoint (AF_PACKET
			// test) and the sock_create hook (SOCK_RAW test) both see and let
			// through.
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}},
		{"readwrite", func(b *testing.B) {
			if _, err := unix.Read(zero, buf); err != nil {
				b.Fatal(err)
			}
			if _, err := unix.Write(null, buf); err != nil {
				b.Fatal(err)
			}
		}},
	}
	monitors := []struct {
		name string
		cfg  *Config
		// emptyTP attaches one do-nothing program to an unrelated syscall
		// tracepoint instead of the monitor: the price of putting every
		// syscall on the kernel's syscall-tracepoint path at all, which
		// any syscalls/sys_enter_* attachment pays.
		emptyTP bool
	}{
		{"off", nil, false},
		{"one-empty-tracepoint", nil, true},
		{"tracepoints", &Config{NoModuleHook: true}, false},
		{"tracepoints+rawtp", &Config{ModulePath: ModuleRawSysEnter}, false},
		// The blocking hooks on the cgroup2 root, as the agent attaches
		// them: for the benchmark's own process too. They allow everything
		// from an unwatched netns, so the node is unaffected.
		{"tracepoints+cgroup", &Config{NoModuleHook: true, Cgroup: "root"}, false},
	}
	for _, l := range loops {
		for _, c := range monitors {
			b.Run("loop="+l.name+"/monitor="+c.name, func(b *testing.B) {
				if c.cfg != nil || c.emptyTP {
					mounted, err := EnsureTracefs()
					if err != nil {
						b.Fatal(err)
					}
					if mounted {
						defer unix.Unmount(StandardTracefs, 0)
					}
				}
				if c.emptyTP {
					p, err := loadProbe(ebpf.TracePoint, 0, "", 0)
					if err != nil {
						b.Fatal(err)
					}
					defer p.Close()
					l, err := link.Tracepoint("syscalls", "sys_enter_getppid", p, nil)
					if err != nil {
						b.Fatal(err)
					}
					defer l.Close()
				}
				if c.cfg != nil {
					cfg := *c.cfg
					if cfg.Cgroup == "root" {
						cfg.Cgroup = benchCgroupRoot(b)
					}
					m, err := New(cfg)
					if err != nil {
						b.Fatal(err)
					}
					defer m.Close()
					pod := netns.New(b)
					if err := m.Watch(nsInode(b, pod.Path()), detect.Endpoint{Pod: "bench"}); err != nil {
						b.Fatal(err)
					}
				}
				for b.Loop() {
					l.body(b)
				}
			})
		}
	}
}

// benchCgroupRoot mounts the cgroup2 hierarchy at a folder of b's own, for
// its root, and unmounts it when b ends.
func benchCgroupRoot(b *testing.B) string {
	b.Helper()
	root := b.TempDir()
	if err := unix.Mount("cgroup2", root, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		b.Fatalf("mount cgroup2: %v", err)
	}
	b.Cleanup(func() { unix.Unmount(root, unix.MNT_DETACH) })
	return root
}
