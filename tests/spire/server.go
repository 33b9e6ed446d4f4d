package spiretest

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ServerConfig configures a test SPIRE server. Zero values are defaults.
type ServerConfig struct {
	// TrustDomain defaults to "bulkhead.test".
	TrustDomain string
	// DefaultX509SVIDTTL is the lifetime of SVIDs whose entry sets none
	// (and of the agents' own SVIDs); default 1h.
	DefaultX509SVIDTTL time.Duration
	// CATTL is the lifetime of the server's self-signed CA; default 24h.
	CATTL time.Duration
}

// Server is a running spire-server owned by one test.
type Server struct {
	bin  string
	dir  string // short, for the sockets: sun_path holds 108 bytes
	td   spiffeid.TrustDomain
	port int
	sock string
	proc *process

	mu     sync.Mutex
	agents []*Agent
}

// StartServer starts a SPIRE server on 127.0.0.1 and waits until it is
// healthy. It and all its agents are stopped, and their folders removed,
// when t ends.
func StartServer(t testing.TB, cfg ServerConfig) *Server {
	t.Helper()
	bin := Bin(t)
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = "bulkhead.test"
	}
	if cfg.DefaultX509SVIDTTL == 0 {
		cfg.DefaultX509SVIDTTL = time.Hour
	}
	if cfg.CATTL == 0 {
		cfg.CATTL = 24 * time.Hour
	}
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		t.Fatalf("spire server: %v", err)
	}
	dir, err := os.MkdirTemp("/tmp", "sp")
	if err != nil {
		t.Fatalf("spire server: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	s := &Server{bin: bin, dir: dir, td: td, port: freePort(t), sock: filepath.Join(dir, "s", "api.sock")}
	for _, d := range []string{"s", "server-data", "server-keys"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatalf("spire server: %v", err)
		}
	}
	// The disk key manager keeps the CA keys across a restart, so a
	// restarted server signs with the same CA and the agents' bundle stays.
	conf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = %q
  trust_domain = %q
  data_dir = %q
  log_level = "DEBUG"
  default_x509_svid_ttl = %q
  ca_ttl = %q
}

plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "disk" {
    plugin_data {
      keys_path = %q
    }
  }
}
`, s.port, s.sock, td.Name(), filepath.Join(dir, "server-data"), cfg.DefaultX509SVIDTTL.String(), cfg.CATTL.String(),
		filepath.Join(dir, "server-data", "datastore.sqlite3"), filepath.Join(dir, "server-keys", "keys.json"))
	confPath := filepath.Join(dir, "server.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatalf("spire server: %v", err)
	}
	s.proc = &process{
		name:    "spire-server",
		path:    filepath.Join(bin, "spire-server"),
		args:    []string{"run", "-config", confPath},
		logPath: filepath.Join(dir, "server.log"),
	}
	// Cleanups run last-in first-out: processes stop, then logs are
	// dumped, then the folder goes (registered above).
	t.Cleanup(func() {
		if t.Failed() {
			s.dumpLogs(t)
		}
	})
	t.Cleanup(func() {
		for _, a := range s.agentList() {
			if err := a.proc.stop(); err != nil {
				t.Logf("cleanup: %v", err)
			}
		}
		if err := s.proc.stop(); err != nil {
			t.Logf("cleanup: %v", err)
		}
	})
	s.Start(t)
	return s
}

// freePort returns a loopback TCP port that is free now. The server binds it
// a moment later; another process taking it in between is unlikely enough.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (s *Server) agentList() []*Agent {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*Agent(nil), s.agents...)
}

func (s *Server) dumpLogs(t testing.TB) {
	t.Logf("--- spire-server log (%s):\n%s", s.proc.logPath, s.proc.log())
	for _, a := range s.agentList() {
		t.Logf("--- %s log (%s):\n%s", a.proc.name, a.proc.logPath, a.proc.log())
	}
}

// TrustDomain is the server's trust domain.
func (s *Server) TrustDomain() spiffeid.TrustDomain { return s.td }

// Address is the server's host:port (agents' server_address/server_port).
func (s *Server) Address() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// SocketPath is the server API socket the CLI uses.
func (s *Server) SocketPath() string { return s.sock }

// Start starts the server (again, after Stop) with the same datastore,
// keys and port, and waits until it is healthy.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	if err := s.proc.start(); err != nil {
		t.Fatalf("spire server: %v", err)
	}
	if err := s.proc.waitHealthy(func() error {
		_, err := s.CLI("healthcheck")
		return err
	}); err != nil {
		t.Fatalf("spire server: %v\n%s", err, s.proc.log())
	}
}

// Stop stops the server (SIGTERM); agents keep running and lose it.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	if err := s.proc.stop(); err != nil {
		t.Fatalf("spire server: %v", err)
	}
}

// CLI runs `spire-server <args> -socketPath <socket>` and returns its
// standard output.
func (s *Server) CLI(args ...string) ([]byte, error) {
	return run(filepath.Join(s.bin, "spire-server"), append(args, "-socketPath", s.sock)...)
}

// JoinToken generates a single-use join token for a new agent.
func (s *Server) JoinToken(t testing.TB) string {
	t.Helper()
	out, err := s.CLI("token", "generate", "-output", "json")
	if err != nil {
		t.Fatalf("spire join token: %v", err)
	}
	var tok struct {
		Value string `json:"value"`
	}
	if err := json.Unmarshal(out, &tok); err != nil || tok.Value == "" {
		t.Fatalf("spire join token: unexpected output %q: %v", out, err)
	}
	return tok.Value
}

// BundlePEM is the server's trust bundle (its CA certificates, PEM).
func (s *Server) BundlePEM(t testing.TB) []byte {
	t.Helper()
	out, err := s.CLI("bundle", "show", "-format", "pem")
	if err != nil {
		t.Fatalf("spire bundle: %v", err)
	}
	return out
}

// Entry is a registration entry to create.
type Entry struct {
	ParentID spiffeid.ID
	SPIFFEID spiffeid.ID
	// Selectors are "type:value" (the value may contain ':').
	Selectors []string
	// X509SVIDTTL is the entry's SVID lifetime in whole seconds; 0 is the
	// server's default.
	X509SVIDTTL time.Duration
}

// CreateEntry creates a registration entry and returns its ID.
func (s *Server) CreateEntry(t testing.TB, e Entry) string {
	t.Helper()
	id, err := s.TryCreateEntry(e)
	if err != nil {
		t.Fatalf("spire entry: %v", err)
	}
	return id
}

// TryCreateEntry is CreateEntry that returns the server's refusal.
func (s *Server) TryCreateEntry(e Entry) (string, error) {
	args := []string{"entry", "create", "-output", "json", "-parentID", e.ParentID.String(), "-spiffeID", e.SPIFFEID.String()}
	for _, sel := range e.Selectors {
		args = append(args, "-selector", sel)
	}
	if e.X509SVIDTTL != 0 {
		args = append(args, "-x509SVIDTTL", strconv.Itoa(int(e.X509SVIDTTL/time.Second)))
	}
	out, err := s.CLI(args...)
	if err != nil {
		return "", err
	}
	// protojson of spire.api.server.entry.v1.BatchCreateEntryResponse.
	var resp struct {
		Results []struct {
			Status struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"status"`
			Entry struct {
				ID string `json:"id"`
			} `json:"entry"`
		} `json:"results"`
	}
	if err := json.Unmarshal(out, &resp); err != nil {
		return "", fmt.Errorf("create entry %s: unexpected output %q: %w", e.SPIFFEID, out, err)
	}
	if len(resp.Results) != 1 {
		return "", fmt.Errorf("create entry %s: %d results in %q", e.SPIFFEID, len(resp.Results), out)
	}
	r := resp.Results[0]
	if r.Status.Code != 0 || r.Entry.ID == "" {
		return "", fmt.Errorf("create entry %s: status %d: %s", e.SPIFFEID, r.Status.Code, r.Status.Message)
	}
	return r.Entry.ID, nil
}

// DeleteEntry deletes a registration entry.
func (s *Server) DeleteEntry(t testing.TB, id string) {
	t.Helper()
	if _, err := s.CLI("entry", "delete", "-entryID", id); err != nil {
		t.Fatalf("spire entry: %v", err)
	}
}

// DelegateID is the SPIFFE ID the tests give the caller of the Delegated
// Identity API (the bulkhead agent): spiffe://<td>/bulkhead-agent.
func DelegateID(td spiffeid.TrustDomain) spiffeid.ID {
	return spiffeid.RequireFromPath(td, "/bulkhead-agent")
}

// RegisterDelegate registers this test process (by its effective uid, the
// unix workload attestor's unix:uid selector) as a workload of agent a
// with DelegateID, which agents list in authorized_delegates by default.
// It returns the entry ID.
func (s *Server) RegisterDelegate(t testing.TB, a *Agent) string {
	t.Helper()
	return s.CreateEntry(t, Entry{
		ParentID:  a.ID(),
		SPIFFEID:  DelegateID(s.td),
		Selectors: []string{"unix:uid:" + strconv.Itoa(os.Geteuid())},
	})
}

// AgentConfig configures a test SPIRE agent.
type AgentConfig struct {
	// AuthorizedDelegates are the SPIFFE IDs allowed to use the Delegated
	// Identity API on the admin socket. nil: DelegateID of the trust
	// domain; empty and non-nil: none.
	AuthorizedDelegates []string
}

// StartAgent starts a SPIRE agent that attests with a fresh join token and
// waits until it is healthy.
func (s *Server) StartAgent(t testing.TB, cfg AgentConfig) *Agent {
	t.Helper()
	s.mu.Lock()
	n := len(s.agents)
	s.mu.Unlock()
	base := filepath.Join(s.dir, "a"+strconv.Itoa(n))
	// The admin socket must not be in the folder of the Workload API
	// socket, nor below it (SPIRE refuses to start).
	for _, d := range []string{"w", "adm", "data", "keys"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o700); err != nil {
			t.Fatalf("spire agent: %v", err)
		}
	}
	bundle := filepath.Join(base, "bundle.pem")
	if err := os.WriteFile(bundle, s.BundlePEM(t), 0o600); err != nil {
		t.Fatalf("spire agent: %v", err)
	}
	token := s.JoinToken(t)
	delegates := cfg.AuthorizedDelegates
	if delegates == nil {
		delegates = []string{DelegateID(s.td).String()}
	}
	quoted := make([]string, len(delegates))
	for i, d := range delegates {
		quoted[i] = strconv.Quote(d)
	}
	a := &Agent{
		id:     spiffeid.RequireFromPath(s.td, "/spire/agent/join_token/"+token),
		socket: filepath.Join(base, "w", "api.sock"),
		admin:  filepath.Join(base, "adm", "admin.sock"),
	}
	// The disk key manager keeps the agent's key across a restart, so a
	// restarted agent resumes with its SVID instead of attesting again
	// with its (single-use) join token.
	conf := fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "DEBUG"
  server_address = "127.0.0.1"
  server_port = "%d"
  socket_path = %q
  admin_socket_path = %q
  trust_domain = %q
  trust_bundle_path = %q
  join_token = %q
  authorized_delegates = [%s]
}

plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "disk" {
    plugin_data {
      directory = %q
    }
  }
  WorkloadAttestor "unix" {
    plugin_data {}
  }
}
`, filepath.Join(base, "data"), s.port, a.socket, a.admin, s.td.Name(), bundle, token, strings.Join(quoted, ", "),
		filepath.Join(base, "keys"))
	confPath := filepath.Join(base, "agent.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatalf("spire agent: %v", err)
	}
	a.bin = filepath.Join(s.bin, "spire-agent")
	a.proc = &process{
		name:    fmt.Sprintf("spire-agent %d", n),
		path:    a.bin,
		args:    []string{"run", "-config", confPath},
		logPath: filepath.Join(base, "agent.log"),
	}
	s.mu.Lock()
	s.agents = append(s.agents, a)
	s.mu.Unlock()
	a.Start(t)
	return a
}

// Agent is a running spire-agent owned by one test.
type Agent struct {
	bin    string
	id     spiffeid.ID
	socket string
	admin  string
	proc   *process
}

// ID is the agent's SPIFFE ID, spiffe://<td>/spire/agent/join_token/<token>:
// the parent ID of its workloads' entries.
func (a *Agent) ID() spiffeid.ID { return a.id }

// WorkloadSocket is the agent's Workload API socket.
func (a *Agent) WorkloadSocket() string { return a.socket }

// AdminSocket is the agent's admin socket (Delegated Identity API).
func (a *Agent) AdminSocket() string { return a.admin }

// Start starts the agent (again, after Stop) and waits until it is healthy.
func (a *Agent) Start(t testing.TB) {
	t.Helper()
	if err := a.proc.start(); err != nil {
		t.Fatalf("spire agent: %v", err)
	}
	if err := a.proc.waitHealthy(func() error {
		_, err := run(a.bin, "healthcheck", "-socketPath", a.socket)
		return err
	}); err != nil {
		t.Fatalf("spire agent: %v\n%s", err, a.proc.log())
	}
}

// WaitForSVID waits until the agent's Workload API gives this test process
// an SVID with id: the agent has synced the process's entry (RegisterDelegate
// makes one). Agents sync entries every few seconds.
func (a *Agent) WaitForSVID(t testing.TB, id spiffeid.ID) {
	t.Helper()
	deadline := time.Now().Add(startTimeout)
	var last error
	for time.Now().Before(deadline) {
		out, err := run(a.bin, "api", "fetch", "x509", "-socketPath", a.socket, "-timeout", "5s")
		if err == nil && strings.Contains(string(out), id.String()) {
			return
		}
		last = err
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("spire agent %s: no SVID %s for this process after %v (last error: %v)", a.id, id, startTimeout, last)
}

// Stop stops the agent (SIGTERM): its sockets go away.
func (a *Agent) Stop(t testing.TB) {
	t.Helper()
	if err := a.proc.stop(); err != nil {
		t.Fatalf("spire agent: %v", err)
	}
}

// CreateEntries creates many registration entries with one CLI call
// (`entry create -data`), which is much faster than one call per entry,
// and returns their IDs in order.
func (s *Server) CreateEntries(t testing.TB, entries []Entry) []string {
	t.Helper()
	// The CLI's registration file: SPIFFE IDs as strings, selectors split
	// into type and value, the TTL in seconds.
	type selector struct {
		Type  string `json:"type"`
		Value string `json:"value"`
	}
	type entry struct {
		ParentID    string     `json:"parent_id"`
		SPIFFEID    string     `json:"spiffe_id"`
		Selectors   []selector `json:"selectors"`
		X509SVIDTTL int        `json:"x509_svid_ttl,omitempty"`
	}
	file := struct {
		Entries []entry `json:"entries"`
	}{Entries: make([]entry, len(entries))}
	for i, e := range entries {
		out := entry{ParentID: e.ParentID.String(), SPIFFEID: e.SPIFFEID.String(), X509SVIDTTL: int(e.X509SVIDTTL / time.Second)}
		for _, sel := range e.Selectors {
			typ, val, ok := strings.Cut(sel, ":")
			if !ok {
				t.Fatalf("spire entries: selector %q is not type:value", sel)
			}
			out.Selectors = append(out.Selectors, selector{typ, val})
		}
		file.Entries[i] = out
	}
	data, err := json.Marshal(file)
	if err != nil {
		t.Fatalf("spire entries: %v", err)
	}
	path := filepath.Join(s.dir, "entries-"+strconv.Itoa(os.Getpid())+".json")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatalf("spire entries: %v", err)
	}
	defer os.Remove(path)
	out, err := s.CLI("entry", "create", "-output", "json", "-data", path)
	if err != nil {
		t.Fatalf("spire entries: %v", err)
	}
	ids, err := entryIDs(out, len(entries))
	if err != nil {
		t.Fatalf("spire entries: %v", err)
	}
	return ids
}

// entryIDs reads the CLI's JSON answer to `entry create` (protojson of
// spire.api.server.entry.v1.BatchCreateEntryResponse): want results, each
// successful.
func entryIDs(out []byte, want int) ([]string, error) {
	var resp struct {
		Results []struct {
			Status struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"status"`
			Entry struct {
				ID       string `json:"id"`
				SPIFFEID struct {
					Path string `json:"path"`
				} `json:"spiffe_id"`
			} `json:"entry"`
		} `json:"results"`
	}
	if err := json.Unmarshal(out, &resp); err != nil {
		return nil, fmt.Errorf("unexpected output %q: %w", out, err)
	}
	if len(resp.Results) != want {
		return nil, fmt.Errorf("%d results for %d entries", len(resp.Results), want)
	}
	ids := make([]string, want)
	for i, r := range resp.Results {
		if r.Status.Code != 0 || r.Entry.ID == "" {
			return nil, fmt.Errorf("entry %d (%s): status %d: %s", i, r.Entry.SPIFFEID.Path, r.Status.Code, r.Status.Message)
		}
		ids[i] = r.Entry.ID
	}
	return ids, nil
}
