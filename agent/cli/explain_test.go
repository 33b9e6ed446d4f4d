package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

// explainBackend answers Explain as the agent does (explain.Verdict on its
// MapState, sent as JSON detail), from an offline store. Other calls are
// not served.
type explainBackend struct {
	api.Backend
	off *explain.Offline
}

func (b *explainBackend) Explain(_ context.Context, req api.ExplainRequest) (api.ExplainResponse, error) {
	name := func(p api.Peer) string {
		if p.Pod != nil {
			return p.Pod.Namespace + "/" + p.Pod.Name
		}
		return p.IP.String()
	}
	src, err := b.off.Peer(name(req.Source))
	if err != nil {
		return api.ExplainResponse{}, err
	}
	dst, err := b.off.Peer(name(req.Destination))
	if err != nil {
		return api.ExplainResponse{}, err
	}
	proto, _ := explain.ParseProto(req.Protocol)
	r := explain.Verdict(b.off.MapState, src, dst, proto, req.Port)
	detail, err := json.Marshal(r)
	if err != nil {
		return api.ExplainResponse{}, err
	}
	return api.ExplainResponse{Verdict: r.Combined, PolicyRevision: b.off.MapState.Revision, Reason: explain.Text(r), Detail: detail}, nil
}

func serveExplain(t *testing.T) *api.Client {
	t.Helper()
	off, err := explain.LoadOffline("../../policy/testdata/stores/mtls")
	if err != nil {
		t.Fatal(err)
	}
	return serveBackend(t, &explainBackend{off: off})
}

// serveBackend serves the agent API from b on a socket of its own.
func serveBackend(t *testing.T, b api.Backend) *api.Client {
	t.Helper()
	// A short directory: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "bhcli")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	path := filepath.Join(dir, "agent.sock")
	l, err := api.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: api.NewHandler(b, nil)}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	c := api.NewClient(api.ClientConfig{Socket: path, Timeout: 10 * time.Second})
	t.Cleanup(c.Close)
	return c
}

// TestExplainMTLS: the live explain says when the deciding rule requires
// mTLS, and prints the plaintext and the tunnelled answers when they
// differ.
func TestExplainMTLS(t *testing.T) {
	c := serveExplain(t)
	ctx := context.Background()
	tests := []struct {
		name, from, to, proto string
		port                  uint16
		want, not             []string
	}{
		{"enrolled pair", "shop/api", "shop/db", "tcp", 5432, []string{
			"5432/TCP: ALLOW through the mTLS tunnel",
			"ingress at shop/db: allow by BulkheadPolicy shop/db ingress[0] (allow) [mtls: Required]",
			"allowed only through the tunnel (TCP between enrolled pods, or to a peer through the tunnel)",
			"plaintext is dropped with AUTH_REQUIRED",
			"never matches UDP or other protocols",
			"in plaintext it would be: DENY (AUTH_REQUIRED)",
			"(live state of the agent, policy revision 1)",
		}, nil},
		{"not enrolled and denied", "shop/frontend", "shop/db", "TCP", 5432, []string{
			"5432/TCP: DENY\n", "deny by BulkheadPolicy shop/db ingress[2] (deny)",
		}, []string{"mTLS", "AUTH_REQUIRED"}},
		{"egress mTLS rule, UDP", "shop/api", "bank/vault", "udp", 80, []string{
			"80/UDP: DENY",
			"does not match BulkheadPolicy shop/api egress[0] (allow) [mtls: Required]: it requires mTLS, and never matches UDP",
		}, []string{"would be"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := Explain(ctx, c, &b, tt.from, tt.to, tt.port, tt.proto, "text"); err != nil {
				t.Fatal(err)
			}
			out := b.String()
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			for _, n := range tt.not {
				if strings.Contains(out, n) {
					t.Errorf("output has %q:\n%s", n, out)
				}
			}
		})
	}

	var b bytes.Buffer
	if err := Explain(ctx, c, &b, "shop/api", "shop/db", 5432, "TCP", FormatJSON); err != nil {
		t.Fatal(err)
	}
	var r explain.Result
	if err := json.Unmarshal(b.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	if r.Transport != explain.TransportTunnel || r.Other == nil || !r.Other.Ingress.AuthRequired || r.Ingress.Rule == nil || !r.Ingress.Rule.MTLS {
		t.Fatalf("json: %+v", r)
	}
}
