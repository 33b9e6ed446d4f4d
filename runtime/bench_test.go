package runtime

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// BenchmarkSysmonOverhead is issue 14's overhead goal: a syscall-heavy loop
// (openat+close of /dev/null, then getpid) with no monitor, with the
// monitor's per-syscall tracepoints, and with the raw_tp sys_enter module
// hook as well (which runs on every syscall). Compare the sub-benchmarks of
// one run as ratios; pin with taskset -c 1 for stable numbers. One netns is
// watched, as on a node with pods; the loop runs in the node's own.
func BenchmarkSysmonOverhead(b *testing.B) {
	privileged.Require(b)
	for _, c := range []struct {
		name string
		cfg  *Config
	}{
		{"monitor=off", nil},
		{"monitor=tracepoints", &Config{NoModuleHook: true}},
		{"monitor=tracepoints+rawtp", &Config{ModulePath: ModuleRawSysEnter}},
		{"monitor=off-again", nil}, // the baseline once more: drift check
	} {
		b.Run(c.name, func(b *testing.B) {
			if c.cfg != nil {
				mounted, err := EnsureTracefs()
				if err != nil {
					b.Fatal(err)
				}
				if mounted {
					defer unix.Unmount(StandardTracefs, 0)
				}
				m, err := New(*c.cfg)
				if err != nil {
					b.Fatal(err)
				}
				defer m.Close()
				pod := netns.New(b)
				if err := m.Watch(nsInode(b, pod.Path()), detect.Endpoint{Pod: "bench"}); err != nil {
					b.Fatal(err)
				}
			}
			path := []byte("/dev/null\x00")
			b.ResetTimer()
			for b.Loop() {
				fd, err := unix.Open(string(path[:9]), unix.O_RDONLY|unix.O_CLOEXEC, 0)
				if err != nil {
					b.Fatal(err)
				}
				unix.Close(fd)
				unix.Getpid()
			}
		})
	}
}
