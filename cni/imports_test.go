package cni_test

import (
	"os/exec"
	"strings"
	"testing"
)

// deps lists the transitive imports of pkg with whether each is standard.
func deps(t *testing.T, pkg string) map[string]bool {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}} {{.Standard}}", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	m := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		path, std, _ := strings.Cut(line, " ")
		m[path] = std == "true"
	}
	return m
}

// TestImportRules enforces DESIGN.md §2: the plugin binary links no BPF,
// no Kubernetes and nothing of ours but agent/api, and agent/api is
// standard library only. Either would slow every pod's CNI ADD.
func TestImportRules(t *testing.T) {
	const mod = "github.com/bulkhead-io/bulkhead/"
	for path := range deps(t, mod+"cmd/bulkhead-cni") {
		switch {
		case strings.Contains(path, "k8s.io"), strings.Contains(path, "cilium/ebpf"):
			t.Errorf("bulkhead-cni links %s", path)
		case strings.HasPrefix(path, mod) && path != mod+"cmd/bulkhead-cni" && path != mod+"cni" && path != mod+"agent/api":
			t.Errorf("bulkhead-cni links %s; the plugin may only import agent/api", path)
		}
	}
	for path, std := range deps(t, mod+"agent/api") {
		if !std && path != mod+"agent/api" {
			t.Errorf("agent/api imports non-standard %s", path)
		}
	}
}

// TestInstallerImports keeps cni/install runnable as a small init
// container: standard library and golang.org/x/sys only, nothing of ours.
func TestInstallerImports(t *testing.T) {
	const pkg = "github.com/bulkhead-io/bulkhead/cni/install"
	for path, std := range deps(t, pkg) {
		if !std && path != pkg && !strings.HasPrefix(path, "golang.org/x/sys/") {
			t.Errorf("cni/install imports %s", path)
		}
	}
}
