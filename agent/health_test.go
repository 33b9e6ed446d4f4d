package agent

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/agent/metrics"
	"github.com/bulkhead-io/bulkhead/cni/install"
)

func probeGet(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	b, _ := io.ReadAll(rec.Body)
	return rec.Code, string(b)
}

// The probes on the metrics address: /readyz waits for the first policy
// and for the plugin in the CNI config; /healthz fails once stopping.
func TestHealthAndReadiness(t *testing.T) {
	conf := t.TempDir()
	if err := os.WriteFile(filepath.Join(conf, "10-ptp.conflist"),
		[]byte(`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	a := &Agent{cfg: Config{CNIConfDir: conf}, stopping: make(chan struct{}), notReady: "starting",
		metrics: metrics.New(nil)}
	h := a.metricsHandler()

	if code, body := probeGet(t, h, "/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := probeGet(t, h, "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "starting") {
		t.Errorf("/readyz before the first policy: %d %q", code, body)
	}
	a.mu.Lock()
	a.ready, a.notReady = true, ""
	a.mu.Unlock()
	if code, body := probeGet(t, h, "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "not chained into the primary CNI config in "+conf) {
		t.Errorf("/readyz before the entry exists: %d %q", code, body)
	}
	if err := install.Install(install.Options{ConfDir: conf, BinDir: t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	if code, body := probeGet(t, h, "/readyz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/readyz with the entry: %d %q", code, body)
	}
	if code, body := probeGet(t, h, "/metrics"); code != http.StatusOK || !strings.Contains(body, "go_goroutines") {
		t.Errorf("/metrics: %d %.80q", code, body)
	}
	close(a.stopping)
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, body := probeGet(t, h, p); code != http.StatusServiceUnavailable || body != "stopping\n" {
			t.Errorf("%s while stopping: %d %q", p, code, body)
		}
	}
}

// Without --cni-conf-dir, readiness is the first applied policy alone.
func TestReadinessWithoutCNIConfDir(t *testing.T) {
	a := &Agent{stopping: make(chan struct{}), ready: true, metrics: metrics.New(nil)}
	if code, body := probeGet(t, a.metricsHandler(), "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz: %d %q", code, body)
	}
	// A missing config folder is a reason, not a crash.
	a.cfg.CNIConfDir = filepath.Join(t.TempDir(), "missing")
	if code, body := probeGet(t, a.metricsHandler(), "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "no CNI network config") {
		t.Errorf("/readyz with no config: %d %q", code, body)
	}
}

// TestPprof: --pprof serves the runtime's profiles next to the metrics;
// without it, nothing of them is served.
func TestPprof(t *testing.T) {
	for _, on := range []bool{false, true} {
		a := &Agent{cfg: Config{Pprof: on}, stopping: make(chan struct{}), metrics: metrics.New(nil)}
		code, body := probeGet(t, a.metricsHandler(), "/debug/pprof/heap?debug=1")
		if got := code == http.StatusOK && strings.Contains(body, "heap profile"); got != on {
			t.Errorf("--pprof=%v: /debug/pprof/heap answered %d, heap profile served: %v", on, code, got)
		}
	}
}
