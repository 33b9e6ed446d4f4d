package agent

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/cni/install"
)

// freeAddr picks a loopback port for the metrics listener.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// The running agent serves the probes on its metrics address: ready once the
// first policy is applied and bulkhead-cni is chained, not before.
func TestProbesOnMetricsAddr(t *testing.T) {
	conf := t.TempDir()
	if err := os.WriteFile(filepath.Join(conf, "10-ptp.conflist"),
		[]byte(`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	runAgentWith(t, func(c *Config) { c.MetricsAddr, c.CNIConfDir = addr, conf })
	fetch := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := fetch("/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := fetch("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "not chained") {
		t.Errorf("/readyz before the entry: %d %q", code, body)
	}
	if err := install.Install(install.Options{ConfDir: conf, BinDir: t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second) // bounds a broken test only
	for {
		code, body := fetch("/readyz")
		if code == http.StatusOK && body == "ok\n" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz with the entry: %d %q", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if code, body := fetch("/metrics"); code != http.StatusOK || !strings.Contains(body, "bulkhead_") {
		t.Errorf("/metrics: %d %.100q", code, body)
	}
}

// TestCleanStopWarnsNothing: an agent stopped cleanly logs no warning or
// error on its way out (the closed address subscription used to warn
// "address updates ... resource temporarily unavailable").
func TestCleanStopWarnsNothing(t *testing.T) {
	var buf syncBuffer
	a, _ := newTestAgentWith(t, func(c *Config) {
		c.Logger = slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	stop := startTestAgent(t, a)
	time.Sleep(200 * time.Millisecond)
	stop()
	if out := buf.String(); out != "" {
		t.Errorf("a clean stop logged:\n%s", out)
	}
}

// syncBuffer is a bytes.Buffer for a logger's concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
