// Package privileged decides whether tests that need root and a real kernel
// run. Only tests import it.
package privileged

import (
	"os"
	"testing"
)

// EnvVar, set to 1 by `make test` and CI, turns every privilege skip into a
// failure, so a missing capability can never pass silently.
const EnvVar = "BULKHEAD_PRIVILEGED"

// Required reports whether privileged tests are mandatory in this run.
func Required() bool { return os.Getenv(EnvVar) == "1" }

// Require skips t when not running as root, unless privileged tests are
// mandatory, in which case it fails t.
func Require(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if Required() {
		t.Fatalf("%s=1 but not running as root", EnvVar)
	}
	t.Skip("needs root; run with sudo or BULKHEAD_PRIVILEGED=1 as root")
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
