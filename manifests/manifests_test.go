package manifests_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"
)

const (
	installYAML = "install.yaml"
	chartDir    = "helm/bulkhead"
)

// objects is one rendering of the chart, typed where the tests look inside.
type objects struct {
	kinds        map[string]int
	clusterRole  *rbacv1.ClusterRole
	binding      *rbacv1.ClusterRoleBinding
	daemonSet    *appsv1.DaemonSet
	serviceAccts []string
	crds         []string
}

// parseObjects decodes a multi-document YAML stream as Helm writes it.
func parseObjects(t *testing.T, b []byte) objects {
	t.Helper()
	o := objects{kinds: map[string]int{}}
	for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(b), -1) {
		var meta struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("document %d: %v", i, err)
		}
		if meta.Kind == "" {
			continue // comments only
		}
		o.kinds[meta.Kind]++
		var into any
		switch meta.Kind {
		case "ClusterRole":
			o.clusterRole = &rbacv1.ClusterRole{}
			into = o.clusterRole
		case "ClusterRoleBinding":
			o.binding = &rbacv1.ClusterRoleBinding{}
			into = o.binding
		case "DaemonSet":
			o.daemonSet = &appsv1.DaemonSet{}
			into = o.daemonSet
		case "ServiceAccount":
			o.serviceAccts = append(o.serviceAccts, meta.Metadata.Name)
			continue
		case "CustomResourceDefinition":
			o.crds = append(o.crds, meta.Metadata.Name)
			continue
		default:
			continue
		}
		if err := yaml.UnmarshalStrict([]byte(doc), into); err != nil {
			t.Fatalf("%s %s: %v", meta.Kind, meta.Metadata.Name, err)
		}
	}
	slices.Sort(o.crds)
	if want := []string{"bulkheadpolicies.bulkhead.io", "bulkheadruntimepolicies.bulkhead.io"}; !slices.Equal(o.crds, want) {
		t.Fatalf("CustomResourceDefinitions %v, want %v", o.crds, want)
	}
	for _, k := range []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"} {
		if o.kinds[k] != 1 {
			t.Fatalf("want one %s, have %d (all: %v)", k, o.kinds[k], o.kinds)
		}
	}
	return o
}

func loadInstall(t *testing.T) objects {
	t.Helper()
	b, err := os.ReadFile(installYAML)
	if err != nil {
		t.Fatal(err)
	}
	return parseObjects(t, b)
}

func container(t *testing.T, ds *appsv1.DaemonSet, name string) corev1.Container {
	t.Helper()
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("DaemonSet has no container %q", name)
	return corev1.Container{}
}

// flagArgs maps each --name[=value] argument to its value.
func flagArgs(args []string) map[string]string {
	m := map[string]string{}
	for _, a := range args {
		if name, ok := strings.CutPrefix(a, "--"); ok {
			name, val, _ := strings.Cut(name, "=")
			m[name] = val
		}
	}
	return m
}

// The agent's permissions are exactly these: adding a verb or a resource
// must be a deliberate change to this test, the chart and the README.
func TestClusterRoleLeastPrivilege(t *testing.T) {
	o := loadInstall(t)
	want := []string{
		"/namespaces: get,list,watch",
		"/pods: get,list,watch",
		"bulkhead.io/bulkheadpolicies: get,list,watch",
		"bulkhead.io/bulkheadpolicies/status: patch,update",
		"bulkhead.io/bulkheadruntimepolicies: get,list,watch",
		"networking.k8s.io/networkpolicies: get,list,watch",
	}
	slices.Sort(want)
	if got := flattenRules(t, o.clusterRole.Rules); !slices.Equal(got, want) {
		t.Errorf("ClusterRole grants:\n  %s\nwant exactly:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	if o.clusterRole.AggregationRule != nil {
		t.Error("ClusterRole aggregates other roles")
	}
	b := o.binding
	if b.RoleRef.Kind != "ClusterRole" || b.RoleRef.Name != o.clusterRole.Name {
		t.Errorf("binding refers to %s %q, want ClusterRole %q", b.RoleRef.Kind, b.RoleRef.Name, o.clusterRole.Name)
	}
	sa := o.daemonSet.Spec.Template.Spec.ServiceAccountName
	if len(b.Subjects) != 1 || b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Name != sa ||
		b.Subjects[0].Namespace != "kube-system" {
		t.Errorf("binding subjects %+v, want only the DaemonSet's service account kube-system/%s", b.Subjects, sa)
	}
	if !slices.Contains(o.serviceAccts, sa) {
		t.Errorf("DaemonSet's service account %q is not in the manifests (have %v)", sa, o.serviceAccts)
	}
}

// flattenRules turns rules into sorted "group/resource: verbs" lines, one
// per resource, so that the same grants split differently compare equal
// and anything that widens them (wildcards, names, URLs) shows.
func flattenRules(t *testing.T, rules []rbacv1.PolicyRule) []string {
	t.Helper()
	var out []string
	for _, r := range rules {
		if len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("rule %+v: resourceNames or nonResourceURLs", r)
		}
		verbs := slices.Clone(r.Verbs)
		slices.Sort(verbs)
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				out = append(out, fmt.Sprintf("%s/%s: %s", g, res, strings.Join(verbs, ",")))
			}
		}
	}
	slices.Sort(out)
	return out
}

func TestDaemonSet(t *testing.T) {
	checkDaemonSet(t, loadInstall(t).daemonSet)
}

// checkDaemonSet holds what every rendering must keep, whatever the values.
func checkDaemonSet(t *testing.T, ds *appsv1.DaemonSet) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("not hostNetwork")
	}
	if spec.HostPID {
		t.Error("hostPID is set; nothing in the agent needs the host's PID namespace")
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", spec.PriorityClassName)
	}
	u := ds.Spec.UpdateStrategy
	if u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil ||
		u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.IntValue() != 1 {
		t.Errorf("updateStrategy %+v, want RollingUpdate with maxUnavailable 1", u)
	}
	// A taint of any key: only an empty key with operator Exists matches it.
	tolerates := func(effect corev1.TaintEffect) bool {
		for _, tol := range spec.Tolerations {
			if tol.Key == "" && tol.Operator == corev1.TolerationOpExists && (tol.Effect == "" || tol.Effect == effect) {
				return true
			}
		}
		return false
	}
	for _, e := range []corev1.TaintEffect{corev1.TaintEffectNoSchedule, corev1.TaintEffectNoExecute} {
		if !tolerates(e) {
			t.Errorf("tolerations %+v do not tolerate an arbitrary %s taint", spec.Tolerations, e)
		}
	}

	hostPaths := map[string]string{} // volume name → host path
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	mounts := func(c corev1.Container) map[string]corev1.VolumeMount { // host path → mount
		m := map[string]corev1.VolumeMount{}
		for _, vm := range c.VolumeMounts {
			if p, ok := hostPaths[vm.Name]; ok {
				m[p] = vm
			}
		}
		return m
	}

	agent := container(t, ds, "agent")
	if agent.SecurityContext == nil || agent.SecurityContext.Privileged == nil || !*agent.SecurityContext.Privileged {
		t.Error("agent container is not privileged (it mounts bpffs with Bidirectional propagation)")
	}
	am := mounts(agent)
	for _, p := range []string{"/sys/fs/bpf", "/run/bulkhead", "/var/run/bulkhead", "/proc", "/etc/cni/net.d"} {
		if _, ok := am[p]; !ok {
			t.Errorf("agent does not mount host path %s (mounts: %v)", p, am)
		}
	}
	if m := am["/sys/fs/bpf"]; m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		t.Error("/sys/fs/bpf is not mounted with Bidirectional propagation: a bpffs the agent mounts would stay in its container")
	}
	if m := am["/proc"]; !m.ReadOnly || m.MountPath == "/proc" {
		t.Errorf("host /proc mounted at %q readOnly=%v, want read-only beside the container's own /proc", m.MountPath, m.ReadOnly)
	}
	if m := am["/etc/cni/net.d"]; !m.ReadOnly {
		t.Error("agent mounts the CNI config folder writable; only the installer writes it")
	}

	env := map[string]corev1.EnvVar{}
	for _, e := range agent.Env {
		env[e.Name] = e
	}
	if e := env["NODE_NAME"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("NODE_NAME env %+v, want the downward API's spec.nodeName", e)
	}
	if e := env["GOMEMLIMIT"]; e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil ||
		e.ValueFrom.ResourceFieldRef.Resource != "limits.memory" {
		t.Errorf("GOMEMLIMIT env %+v, want the container's limits.memory", e)
	}

	args := flagArgs(agent.Args)
	if args["store"] != "kubernetes" {
		t.Errorf("agent --store=%q, want kubernetes", args["store"])
	}
	if args["node-name"] != "$(NODE_NAME)" {
		t.Errorf("agent --node-name=%q, want $(NODE_NAME)", args["node-name"])
	}
	_, port, ok := strings.Cut(args["metrics-addr"][strings.LastIndex(args["metrics-addr"], "]")+1:], ":")
	if !ok {
		t.Fatalf("agent --metrics-addr=%q has no port", args["metrics-addr"])
	}
	for _, p := range []struct {
		what  string
		probe *corev1.Probe
		path  string
	}{{"liveness", agent.LivenessProbe, "/healthz"}, {"readiness", agent.ReadinessProbe, "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("agent has no HTTP %s probe", p.what)
			continue
		}
		if p.probe.HTTPGet.Path != p.path || p.probe.HTTPGet.Port.String() != port {
			t.Errorf("%s probe GET %s on port %s, want %s on the metrics port %s", p.what,
				p.probe.HTTPGet.Path, p.probe.HTTPGet.Port.String(), p.path, port)
		}
	}
	if args["cni-conf-dir"] == "" {
		t.Error("agent has no --cni-conf-dir: readiness would not wait for the CNI entry")
	}

	inst := container(t, ds, "install-cni")
	if len(inst.Args) == 0 || inst.Args[0] != "install-cni" {
		t.Fatalf("installer args %q, want the install-cni subcommand first", inst.Args)
	}
	iargs := flagArgs(inst.Args)
	if _, ok := iargs["watch"]; !ok {
		t.Errorf("installer args %q lack --watch: a primary CNI rewriting its config would drop the entry", inst.Args)
	}
	im := mounts(inst)
	for flag, p := range map[string]string{"cni-bin-dir": "/opt/cni/bin", "cni-conf-dir": "/etc/cni/net.d"} {
		m, ok := im[p]
		if !ok || m.ReadOnly {
			t.Errorf("installer does not mount host %s writable", p)
			continue
		}
		if iargs[flag] != m.MountPath {
			t.Errorf("installer --%s=%q, but host %s is mounted at %q", flag, iargs[flag], p, m.MountPath)
		}
	}
	if iargs["cni-conf-dir"] != args["cni-conf-dir"] {
		t.Errorf("installer writes %q, agent's readiness reads %q", iargs["cni-conf-dir"], args["cni-conf-dir"])
	}
}

// Defaults must never unchain the plugin on a rollout.
func TestInstallerKeepsEntryByDefault(t *testing.T) {
	inst := container(t, loadInstall(t).daemonSet, "install-cni")
	if _, ok := flagArgs(inst.Args)["uninstall-on-exit"]; ok {
		t.Errorf("default installer args %q uninstall on exit, so every rollout would unchain bulkhead-cni", inst.Args)
	}
}

// agentFlags builds bulkhead-agent once and reads the flags it defines,
// from its usage text: the agent's and install-cni's.
var agentFlags = sync.OnceValues(func() (map[string]map[string]bool, error) {
	dir, err := os.MkdirTemp("", "bulkhead-manifests-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "bulkhead-agent")
	build := exec.Command("go", "build", "-o", bin, "../cmd/bulkhead-agent")
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build bulkhead-agent: %w\n%s", err, out)
	}
	// --flag, as the agent prints them (one dash: Go's own usage).
	flagLine := regexp.MustCompile(`(?m)^\s+--?([a-z0-9][a-z0-9-]*)`)
	sets := map[string]map[string]bool{}
	for name, args := range map[string][]string{"agent": {"-h"}, "install-cni": {"install-cni", "-h"}} {
		var out bytes.Buffer
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = &out, &out
		var exit *exec.ExitError
		if err := cmd.Run(); err != nil && !errors.As(err, &exit) {
			return nil, fmt.Errorf("run bulkhead-agent %s: %w", strings.Join(args, " "), err)
		}
		set := map[string]bool{}
		for _, m := range flagLine.FindAllStringSubmatch(out.String(), -1) {
			set[m[1]] = true
		}
		if len(set) < 5 {
			return nil, fmt.Errorf("bulkhead-agent %s printed too few flags to be its usage:\n%s", strings.Join(args, " "), out.String())
		}
		sets[name] = set
	}
	return sets, nil
})

// Every flag the DaemonSet passes is one the binary defines: a renamed
// flag must not leave a DaemonSet whose agent exits at start.
func TestDaemonSetFlagsExist(t *testing.T) {
	if testing.Short() {
		t.Skip("builds bulkhead-agent")
	}
	sets, err := agentFlags()
	if err != nil {
		t.Fatal(err)
	}
	checkFlags(t, loadInstall(t).daemonSet, sets)
}

func checkFlags(t *testing.T, ds *appsv1.DaemonSet, sets map[string]map[string]bool) {
	t.Helper()
	for cname, set := range map[string]string{"agent": "agent", "install-cni": "install-cni"} {
		c := container(t, ds, cname)
		if len(c.Command) != 1 || filepath.Base(c.Command[0]) != "bulkhead-agent" {
			t.Errorf("container %s runs %q, want bulkhead-agent", cname, c.Command)
		}
		for _, a := range c.Args {
			if a == "install-cni" && cname == "install-cni" {
				continue
			}
			name, ok := strings.CutPrefix(a, "--")
			if !ok {
				t.Errorf("container %s: argument %q is not a --flag", cname, a)
				continue
			}
			name, _, _ = strings.Cut(name, "=")
			if !sets[set][name] {
				t.Errorf("container %s passes --%s, which bulkhead-agent %s does not define", cname, name, set)
			}
		}
	}
}
