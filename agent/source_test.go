package agent

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy/store"
	"github.com/bulkhead-io/bulkhead/tests/kubeletvol"
)

// twoPolicies is a store file whose every strict prefix is either invalid
// or means less than the whole: without its last lines the Deny rule, or
// the second policy, is gone.
const twoPolicies = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: api}}
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: no-untrusted, namespace: shop}
spec:
  selector: {podSelector: {}}
  ingress:
  - from:
    - podSelector: {matchLabels: {tier: untrusted}}
    action: Deny
`

// sourceRecorder runs a DirSource and records what it hands over.
type sourceRecorder struct {
	mu      sync.Mutex
	updates []*store.Result
	fails   [][]api.StoreError
}

func runSource(t *testing.T, dir string, debounce time.Duration) *sourceRecorder {
	t.Helper()
	r := &sourceRecorder{}
	src := &DirSource{Dir: dir, Debounce: debounce}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- src.Run(ctx, func(res *store.Result) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.updates = append(r.updates, res)
		}, func(errs []api.StoreError) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.fails = append(r.fails, errs)
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("source: %v", err)
		}
	})
	return r
}

func (r *sourceRecorder) last() *store.Result {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.updates) == 0 {
		return nil
	}
	return r.updates[len(r.updates)-1]
}

// waitState waits until the last state handed over has exactly refs.
func (r *sourceRecorder) waitState(t *testing.T, what string, refs ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := refsOf(r.last())
		if reflect.DeepEqual(got, refs) || len(got) == 0 && len(refs) == 0 && r.last() != nil {
			return
		}
		if time.Now().After(deadline) {
			r.mu.Lock()
			defer r.mu.Unlock()
			t.Fatalf("%s: last state %v, want %v (fails: %v)", what, got, refs, r.fails)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func refsOf(res *store.Result) []string {
	if res == nil {
		return nil
	}
	var out []string
	for _, o := range res.Objects {
		out = append(out, o.Ref())
	}
	return out
}

// A writer that writes a two-policy file in pieces, keeping it open, while
// other store files change around it, is never read halfway: every state
// handed over has none of the file or all of it. Before the watcher waited
// for close-after-write, about one prefix in ten parsed and was applied,
// without the Deny rule or without the second policy.
func TestDirSourceNeverReadsATornWrite(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
	r := runSource(t, dir, 20*time.Millisecond)
	r.waitState(t, "initial state", "Namespace shop")

	f, err := os.Create(filepath.Join(dir, "policies.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const piece = 24
	for i := 0; i < len(twoPolicies); i += piece {
		if _, err := f.WriteString(twoPolicies[i:min(i+piece, len(twoPolicies))]); err != nil {
			t.Fatal(err)
		}
		// A neighbour changes, complete, in between: reloads are due,
		// and must not read the half-written file.
		write(t, filepath.Join(dir, "ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {n: \""+string(rune('a'+i%26))+"\"}}\n")
		time.Sleep(40 * time.Millisecond)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	full := []string{"Namespace shop", "NetworkPolicy shop/db", "BulkheadPolicy shop/no-untrusted"}
	r.waitState(t, "after the close", full...)

	want, err := store.Parse("policies.yaml", []byte(twoPolicies))
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, res := range r.updates {
		got := res.Snapshot
		switch {
		case len(got.NetworkPolicies) == 0 && len(got.BulkheadPolicies) == 0:
		case len(got.NetworkPolicies) == 1 && len(got.BulkheadPolicies) == 1 &&
			reflect.DeepEqual(got.NetworkPolicies[0], want[0].NetworkPolicy) &&
			reflect.DeepEqual(got.BulkheadPolicies[0], want[1].BulkheadPolicy):
		default:
			t.Errorf("state %d of %d has part of the file being written: %v", i, len(r.updates), refsOf(res))
		}
	}
	for _, errs := range r.fails {
		t.Errorf("a half-written file was read and rejected: %v", errs)
	}
}

// A ConfigMap volume is updated by kubelet's swap of the hidden ..data
// link; its visible names are symlinks through it, and are read once each.
func TestDirSourceFollowsConfigMapUpdates(t *testing.T) {
	dir := t.TempDir()
	ns := "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"
	np := func(name string) string {
		return "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: " + name + ", namespace: shop}\nspec: {podSelector: {}}\n"
	}
	kubeletvol.Write(t, dir, map[string]string{"ns.yaml": ns, "a.yaml": np("a")})
	r := runSource(t, dir, 20*time.Millisecond)
	r.waitState(t, "initial ConfigMap", "NetworkPolicy shop/a", "Namespace shop")

	// A changed key: only ..data changes in the folder.
	kubeletvol.Write(t, dir, map[string]string{"ns.yaml": ns, "a.yaml": np("a2")})
	r.waitState(t, "after a changed key", "NetworkPolicy shop/a2", "Namespace shop")

	// A new key, in a .yml file, and a removed one.
	kubeletvol.Write(t, dir, map[string]string{"ns.yaml": ns, "b.yml": np("b")})
	r.waitState(t, "after a new .yml key", "NetworkPolicy shop/b", "Namespace shop")
}

// The store folder itself may be replaced: renamed away and a new one
// renamed in, removed and created again, or, where it is a symlink,
// pointed at another folder by a rename.
func TestDirSourceFollowsAReplacedFolder(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "store")
	nsFile := func(d, name string) {
		t.Helper()
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(d, "ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: "+name+"}\n")
	}
	nsFile(dir, "one")
	r := runSource(t, dir, 20*time.Millisecond)
	r.waitState(t, "initial folder", "Namespace one")

	nsFile(filepath.Join(root, "new"), "two")
	if err := os.Rename(dir, filepath.Join(root, "old")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(root, "new"), dir); err != nil {
		t.Fatal(err)
	}
	r.waitState(t, "after a rename of a new folder into place", "Namespace two")

	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	nsFile(dir, "three")
	r.waitState(t, "after the folder was removed and made again", "Namespace three")
	r.mu.Lock()
	if len(r.fails) == 0 {
		t.Error("a missing store folder was not reported")
	}
	r.mu.Unlock()

	// The folder becomes a symlink to a versioned folder, swapped by rename.
	nsFile(filepath.Join(root, "v4"), "four")
	nsFile(filepath.Join(root, "v5"), "five")
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("v4", dir); err != nil {
		t.Fatal(err)
	}
	r.waitState(t, "after the folder became a symlink", "Namespace four")
	if err := os.Symlink("v5", filepath.Join(root, "tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(root, "tmp"), dir); err != nil {
		t.Fatal(err)
	}
	r.waitState(t, "after the symlink was swapped", "Namespace five")
	// And the new target is watched.
	nsFile(filepath.Join(root, "v5"), "six")
	r.waitState(t, "after a change in the new target", "Namespace six")
}

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Error(err)
	}
}

func TestNewSourceKubernetes(t *testing.T) {
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	cfgYAML := `apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`
	if err := os.WriteFile(kubeconfig, []byte(cfgYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	src, err := NewSource(Config{Store: StoreKubernetes, Kubeconfig: kubeconfig, NodeName: "n", Logger: log})
	if err != nil {
		t.Fatalf("NewSource: %v", err)
	}
	if src.String() != "kubernetes" {
		t.Errorf("String() = %q", src.String())
	}
	c := storeConnection(src)
	if c == nil || c.Connected {
		t.Errorf("connection before Run = %+v, want reported and not connected", c)
	}
	if storeConnection(&DirSource{Dir: "/x"}) != nil {
		t.Error("a dir store reports a connection")
	}
	if _, err := NewSource(Config{Store: StoreKubernetes, Kubeconfig: filepath.Join(t.TempDir(), "missing"), Logger: log}); err == nil {
		t.Error("NewSource with a missing kubeconfig: no error")
	}
	if _, err := NewSource(Config{Store: "etcd:x", Logger: log}); err == nil || !strings.Contains(err.Error(), "dir:PATH or kubernetes") {
		t.Errorf("NewSource(etcd:x) = %v", err)
	}
}
