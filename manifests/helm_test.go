package manifests_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// helm is the binary the Makefile builds into its cache and names in
// BULKHEAD_HELM_BIN (a folder). Under BULKHEAD_PRIVILEGED=1 (make test, CI)
// a missing binary fails the test instead of skipping it.
func helm(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("BULKHEAD_HELM_BIN")
	bin := filepath.Join(dir, "helm")
	if _, err := os.Stat(bin); dir == "" || err != nil {
		if os.Getenv("BULKHEAD_PRIVILEGED") == "1" {
			t.Fatalf("no helm binary at BULKHEAD_HELM_BIN=%q (run make helm)", dir)
		}
		t.Skipf("no helm binary at BULKHEAD_HELM_BIN=%q (run make helm)", dir)
	}
	return bin
}

func runHelm(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(helm(t), args...)
	// Keep helm away from the user's and the machine's helm state.
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.Bytes(), &helmError{err: err, stderr: stderr.String()}
	}
	return stdout.Bytes(), nil
}

type helmError struct {
	err    error
	stderr string
}

func (e *helmError) Error() string { return e.err.Error() + ": " + e.stderr }

func template(t *testing.T, set ...string) ([]byte, error) {
	t.Helper()
	return templateAs(t, "bulkhead", "kube-system", set...)
}

func templateAs(t *testing.T, release, namespace string, set ...string) ([]byte, error) {
	t.Helper()
	args := []string{"template", release, chartDir, "--namespace", namespace, "--include-crds"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	return runHelm(t, args...)
}

func TestHelmLint(t *testing.T) {
	for _, set := range [][]string{nil, nonDefault} {
		args := []string{"lint", "--strict", chartDir}
		for _, s := range set {
			args = append(args, "--set", s)
		}
		if out, err := runHelm(t, args...); err != nil {
			t.Errorf("helm lint %v: %v\n%s", set, err, out)
		}
	}
}

// install.yaml is the default rendering; make check-generated checks the
// same, this says which file to regenerate.
func TestInstallYAMLCurrent(t *testing.T) {
	out, err := template(t)
	if err != nil {
		t.Fatal(err)
	}
	have, err := os.ReadFile(installYAML)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out, have) {
		t.Errorf("%s is not the chart's default rendering: run make generate", installYAML)
	}
	for _, name := range []string{"bulkhead.io_bulkheadpolicies.yaml", "bulkhead.io_bulkheadruntimepolicies.yaml"} {
		a, err := os.ReadFile(filepath.Join("crds", name))
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(chartDir, "crds", name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("%s/crds/%s differs from crds/%s: run make generate", chartDir, name, name)
		}
	}
}

var nonDefault = []string{
	"image.tag=v9.9.9",
	"image.pullPolicy=Never",
	"attachMode=clsact",
	"trustDomain=example.org",
	"flowLog.enabled=true",
	"flowLog.path=/var/log/bh/flows.json",
	"flowLog.maxSize=1048576",
	"runtimeDetection.enabled=true",
	"quarantineDNS={10.96.0.10,fd00::a}",
	"spire.adminSocket=/run/spire/admin/admin.sock",
	"spire.identitySource=spire",
	"metrics.address=0.0.0.0",
	"metrics.port=9970",
	"tunnel.port=15100",
	"cni.uninstall=true",
	"cni.binDir=/opt/k3s/cni/bin",
	"cni.confDir=/var/lib/k3s/cni/net.d",
}

func TestHelmTemplateValues(t *testing.T) {
	out, err := template(t, nonDefault...)
	if err != nil {
		t.Fatal(err)
	}
	ds := parseObjects(t, out).daemonSet
	agent := container(t, ds, "agent")
	args := flagArgs(agent.Args)
	for flag, want := range map[string]string{
		"attach-mode":        "clsact",
		"trust-domain":       "example.org",
		"flow-log":           "/var/log/bh/flows.json",
		"flow-log-max-size":  "1048576",
		"spire-admin-socket": "/run/spire/admin/admin.sock",
		"identity-source":    "spire",
		"metrics-addr":       "0.0.0.0:9970",
		"tunnel-port":        "15100",
		"cni-conf-dir":       "/var/lib/k3s/cni/net.d",
		"quarantine-dns":     "10.96.0.10,fd00::a",
	} {
		if args[flag] != want {
			t.Errorf("agent --%s=%q, want %q", flag, args[flag], want)
		}
	}
	if _, ok := args["runtime-detection"]; !ok {
		t.Errorf("runtimeDetection.enabled=true: agent args %q lack --runtime-detection", agent.Args)
	}
	if agent.Image != "bulkhead/bulkhead:v9.9.9" || agent.ImagePullPolicy != "Never" {
		t.Errorf("agent image %s (%s)", agent.Image, agent.ImagePullPolicy)
	}
	if h := agent.ReadinessProbe.HTTPGet; h.Host != "127.0.0.1" || h.Port.IntValue() != 9970 {
		t.Errorf("readiness probe on %s:%s, want 127.0.0.1:9970 for a wildcard listener", h.Host, h.Port.String())
	}
	mounted := map[string]bool{}
	for _, m := range agent.VolumeMounts {
		mounted[m.MountPath] = true
	}
	for _, p := range []string{"/var/log/bh", "/run/spire/admin"} {
		if !mounted[p] {
			t.Errorf("agent does not mount %s", p)
		}
	}
	inst := container(t, ds, "install-cni")
	iargs := flagArgs(inst.Args)
	if _, ok := iargs["uninstall-on-exit"]; !ok {
		t.Errorf("cni.uninstall=true: installer args %q lack --uninstall-on-exit", inst.Args)
	}
	if iargs["cni-bin-dir"] != "/opt/k3s/cni/bin" {
		t.Errorf("installer --cni-bin-dir=%q", iargs["cni-bin-dir"])
	}

	if !testing.Short() {
		sets, err := agentFlags()
		if err != nil {
			t.Fatal(err)
		}
		checkFlags(t, ds, sets)
	}
}

// Another release name and namespace: the binding still names the
// DaemonSet's own service account, where it is.
func TestHelmTemplateReleaseNamespace(t *testing.T) {
	out, err := templateAs(t, "edge", "bulkhead-system")
	if err != nil {
		t.Fatal(err)
	}
	o := parseObjects(t, out)
	sa := o.daemonSet.Spec.Template.Spec.ServiceAccountName
	if o.daemonSet.Namespace != "bulkhead-system" || !slices.Contains(o.serviceAccts, sa) {
		t.Errorf("DaemonSet in %q with service account %q; service accounts %v", o.daemonSet.Namespace, sa, o.serviceAccts)
	}
	if s := o.binding.Subjects; len(s) != 1 || s[0].Name != sa || s[0].Namespace != "bulkhead-system" {
		t.Errorf("binding subjects %+v, want bulkhead-system/%s", s, sa)
	}
	if o.binding.RoleRef.Name != o.clusterRole.Name || o.clusterRole.Name == "bulkhead" {
		t.Errorf("ClusterRole %q bound as %q: want a name of the release's own", o.clusterRole.Name, o.binding.RoleRef.Name)
	}
}

// values.schema.json rejects what would render a broken DaemonSet.
func TestHelmTemplateRejectsBadValues(t *testing.T) {
	for _, set := range []string{
		"attachMode=xdp",
		"tunnel.port=70000",
		"metrics.port=0",
		"flowLog.path=flows.json",
		"cni.confDir=etc/cni",
		"cni.uninstall=yes",
		"image.pullPolicy=Sometimes",
		"trustDomain=Example Org",
		"spire.identitySource=vault",
		"runtimeDetection.enabled=true", // without flowLog.enabled
		"runtimeDetection.enabled=on",
		"quarantineDNS={kube-dns}",
		"trustdomain=typo.example",
	} {
		_, err := template(t, set)
		if err == nil {
			t.Errorf("--set %s rendered; the schema must reject it", set)
			continue
		}
		if !strings.Contains(err.Error(), "schema") {
			t.Errorf("--set %s failed, but not on the schema: %v", set, err)
		}
	}
}
