package privileged

import (
	"os"
	"runtime"
	"testing"
)

// recorder stands in for a test: it records whether it was skipped or
// failed, and stops its goroutine there as testing.T does.
type recorder struct {
	testing.TB
	skipped, failed bool
}

func (r *recorder) Helper()               {}
func (r *recorder) Skipf(string, ...any)  { r.skipped = true; runtime.Goexit() }
func (r *recorder) Fatalf(string, ...any) { r.failed = true; runtime.Goexit() }

// run calls f with a fresh recorder on its own goroutine.
func run(f func(testing.TB)) *recorder {
	r := &recorder{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(r)
	}()
	<-done
	return r
}

// Root alone is not permission: without BULKHEAD_PRIVILEGED=1 a kernel test
// skips, whoever runs it.
func TestRequireNeedsTheVariableEvenAsRoot(t *testing.T) {
	for _, v := range []string{"", "0", "true", "yes"} {
		t.Setenv(EnvVar, v)
		if r := run(Require); !r.skipped || r.failed {
			t.Errorf("%s=%q as uid %d: skipped=%v failed=%v, want a skip", EnvVar, v, os.Geteuid(), r.skipped, r.failed)
		}
	}
}

func TestRequireWithTheVariable(t *testing.T) {
	t.Setenv(EnvVar, "1")
	r := run(Require)
	root := os.Geteuid() == 0
	if r.skipped || r.failed == root {
		t.Fatalf("%s=1 as uid %d: skipped=%v failed=%v, want a run as root and a failure otherwise", EnvVar, os.Geteuid(), r.skipped, r.failed)
	}
}

func TestUnsupported(t *testing.T) {
	unsupported := func(t testing.TB) { Unsupported(t, "no %s", "tcx") }
	t.Setenv(EnvVar, "")
	if r := run(unsupported); !r.skipped || r.failed {
		t.Fatalf("without %s: skipped=%v failed=%v, want a skip", EnvVar, r.skipped, r.failed)
	}
	t.Setenv(EnvVar, "1")
	if r := run(unsupported); r.skipped || !r.failed {
		t.Fatalf("with %s=1: skipped=%v failed=%v, want a failure", EnvVar, r.skipped, r.failed)
	}
}
