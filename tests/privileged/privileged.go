// Package privileged decides whether tests that need root and a real kernel
// run. Only tests import it.
package privileged

import (
	"os"
	"testing"
)

// EnvVar, set to 1 by `make test`, `make fuzz`, `make bench` and CI, is the
// only thing that lets kernel tests run: being root is not enough, so a plain
// `go test ./...` as root never loads BPF or makes namespaces. Under it every
// privilege skip is a failure, so a missing capability can never pass
// silently.
const EnvVar = "BULKHEAD_PRIVILEGED"

// Required reports whether privileged tests run, and are mandatory, in this
// run.
func Required() bool { return os.Getenv(EnvVar) == "1" }

// Require skips t unless BULKHEAD_PRIVILEGED=1. With it, t fails when not
// running as root.
func Require(t testing.TB) {
	t.Helper()
	if !Required() {
		t.Skipf("kernel test: runs only with %s=1 (as root), e.g. under make test", EnvVar)
	}
	if os.Geteuid() != 0 {
		t.Fatalf("%s=1 but not running as root", EnvVar)
	}
}

// Unsupported is called when the kernel lacks a feature the test needs. It
// fails under BULKHEAD_PRIVILEGED=1 and skips otherwise.
func Unsupported(t testing.TB, format string, args ...any) {
	t.Helper()
	if Required() {
		t.Fatalf("unsupported under %s=1: "+format, append([]any{EnvVar}, args...)...)
	}
	t.Skipf(format, args...)
}
