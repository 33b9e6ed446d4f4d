package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	tnetns "github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The chart's image.binDir.
const imageBinDir = "/usr/local/bin"

// TestHelmInstall installs Bulkhead with helm on the running cluster as a
// user does, checks that the installer chained bulkhead-cni into the primary
// conflist and that the agent is Ready in Kubernetes mode, enforces a
// NetworkPolicy on pods the scheduler placed with real traffic, and then
// uninstalls it: the entry and the binary go, and a new pod starts with the
// primary CNI alone.
func TestHelmInstall(t *testing.T) {
	start := time.Now()
	c := Start(t)
	t.Logf("cluster up in %v", time.Since(start).Round(time.Second))
	images := filepath.Join(c.Dir, "images")
	c.mkdir(images)
	// Two tags of the same image: the second is the rollout's.
	c.ImportImages(EchoImage(t, images))
	c.ImportImages(BulkheadImage(t, images, imageBinDir, BulkheadRef, BulkheadRef+"-2")...)

	// kubectl users apply the rendered chart: the apiserver accepts all of
	// it (CRD, RBAC, DaemonSet) on a dry run.
	installYAML := filepath.Join(cnichain.RepoRoot(t), "manifests", "install.yaml")
	if _, err := c.Kubectl("apply", "--dry-run=server", "-f", installYAML); err != nil {
		t.Fatal(err)
	}

	// Pods that run before the install: the agent adopts them, with no
	// restart.
	if _, err := c.KubectlStdin(podsYAML("early", "server", "client"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	earlyServer := waitPodReady(t, c, "early", "server", 3*time.Minute)
	earlyClient := waitPodReady(t, c, "early", "client", 3*time.Minute)

	// helm install, with the node's folders pointing at the test's.
	ports := FreePorts(t, 3)
	runDir, stateDir := filepath.Join(c.Dir, "run-bulkhead"), filepath.Join(c.Dir, "state-bulkhead")
	flowLog := filepath.Join(c.Dir, "flowlog", "flows.json")
	repo, tag, _ := strings.Cut(strings.TrimPrefix(BulkheadRef, "docker.io/"), ":")
	chart := filepath.Join(cnichain.RepoRoot(t), "manifests", "helm", "bulkhead")
	set := []string{
		"image.repository=" + repo, "image.tag=" + tag, "image.pullPolicy=Never", "image.binDir=" + imageBinDir,
		"cni.binDir=" + c.CNIBinDir, "cni.confDir=" + c.CNIConfDir, "netnsDir=" + c.NetnsDir,
		"bpffsDir=" + c.BPFFS, "runDir=" + runDir, "stateDir=" + stateDir,
		"k8sServiceHost=127.0.0.1", "k8sServicePort=" + strconv.Itoa(c.APIPort),
		"metrics.port=" + strconv.Itoa(ports[0]), "tunnel.port=" + strconv.Itoa(ports[1]),
		"tunnel.redirectPort=" + strconv.Itoa(ports[2]), "logLevel=debug",
		"flowLog.enabled=true", "flowLog.path=" + flowLog, "runtimeDetection.enabled=true",
	}
	args := []string{"install", "bulkhead", chart, "-n", "kube-system"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	installed := true
	c.OnTeardown(func() {
		if installed {
			// Unchain first, so that the pods' DELs do not wait for an
			// agent that is gone.
			_, _ = c.Helm("upgrade", "bulkhead", chart, "-n", "kube-system", "--reuse-values", "--set", "cni.uninstall=true")
			_, _ = c.Helm("uninstall", "bulkhead", "-n", "kube-system", "--wait", "--timeout", "2m")
		}
	})
	if out, err := c.Helm(args...); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("%s", firstLines(string(out), 3))
	}
	agentPod := waitAgentReady(t, c, 4*time.Minute)
	t.Logf("agent pod %s Ready %v after start", agentPod, time.Since(start).Round(time.Second))

	// The installer chained bulkhead-cni into the primary conflist, and
	// copied the binary.
	conflist := filepath.Join(c.CNIConfDir, PrimaryConflist)
	types := pluginTypes(t, conflist)
	if len(types) != 2 || types[0] != "ptp" || types[1] != "bulkhead-cni" {
		t.Fatalf("primary conflist's plugins: %v, want [ptp bulkhead-cni]", types)
	}
	if _, err := os.Stat(filepath.Join(c.CNIBinDir, "bulkhead-cni")); err != nil {
		t.Fatalf("bulkhead-cni not installed: %v", err)
	}

	// Adoption: the pods that ran before the install are endpoints of
	// the agent, under containerd's own sandbox IDs (from libcni's cache),
	// and a policy on them is enforced, while their containers run on.
	agentAPI := api.NewClient(api.ClientConfig{Socket: filepath.Join(runDir, "agent.sock"), Timeout: 5 * time.Second})
	defer agentAPI.Close()
	waitAdopted(t, agentAPI, "early", []string{"client", "server"}, 2*time.Minute)
	earlyClientNS := podNetNS(t, c, earlyClient)
	earlyServerIP := netip.MustParseAddr(earlyServer.Status.PodIP)
	waitReach(t, earlyClientNS, earlyServerIP, true, "between adopted pods before any policy", 60*time.Second)
	if _, err := c.KubectlStdin(denyPolicyYAML("early", "deny-server"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, earlyClientNS, earlyServerIP, false, "after a NetworkPolicy on a pod that ran before the install", 60*time.Second)
	for _, before := range []*corev1.Pod{earlyServer, earlyClient} {
		now, err := c.Client.CoreV1().Pods("early").Get(context.Background(), before.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		was, is := before.Status.ContainerStatuses[0], now.Status.ContainerStatuses[0]
		if now.UID != before.UID || is.ContainerID != was.ContainerID || is.RestartCount != was.RestartCount {
			t.Fatalf("early/%s was restarted to be enforced: container %s (%d restarts), was %s (%d)",
				before.Name, is.ContainerID, is.RestartCount, was.ContainerID, was.RestartCount)
		}
	}

	// Pods the scheduler places, through ptp and bulkhead-cni.
	if _, err := c.KubectlStdin(podsYAML("demo", "server", "client"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	server := waitPodReady(t, c, "demo", "server", 3*time.Minute)
	client := waitPodReady(t, c, "demo", "client", 3*time.Minute)
	clientNS := podNetNS(t, c, client)
	serverIP := netip.MustParseAddr(server.Status.PodIP)
	t.Logf("server %s, client %s", serverIP, client.Status.PodIP)

	waitReach(t, clientNS, serverIP, true, "before any policy", 60*time.Second)
	if _, err := c.KubectlStdin(denyPolicyYAML("demo", "deny-server"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, clientNS, serverIP, false, "after a NetworkPolicy that selects the server with no ingress rule", 60*time.Second)
	// An apiserver outage changes nothing enforced; afterwards the agent
	// follows the apiserver again (the next policy).
	c.StopAPIServer()
	for range 5 {
		if reach(clientNS, serverIP) {
			c.StartAPIServer()
			t.Fatal("the server is reachable while the apiserver is down")
		}
		time.Sleep(time.Second)
	}
	c.StartAPIServer()
	waitReach(t, clientNS, serverIP, false, "after the apiserver's restart", 10*time.Second)
	if _, err := c.KubectlStdin(allowPolicyYAML("demo", "allow-client"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, clientNS, serverIP, true, "after a NetworkPolicy that allows the client", 60*time.Second)
	if _, err := c.Kubectl("-n", "demo", "delete", "networkpolicy", "allow-client"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, clientNS, serverIP, false, "after deleting the allowing policy", 60*time.Second)
	if _, err := c.Kubectl("-n", "demo", "delete", "networkpolicy", "deny-server"); err != nil {
		t.Fatal(err)
	}
	// A state that removes every policy at once is held back for
	// --store-shrink-grace (30 s by default) before it is enforced.
	waitReach(t, clientNS, serverIP, true, "after deleting every policy", 90*time.Second)

	// A BulkheadPolicy, created with kubectl, that lets app=client in on
	// the HTTP port only; then the client's relabels take it in and out.
	if _, err := c.KubectlStdin(bulkheadPolicyYAML("demo", "server-http"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, clientNS, serverIP, false, "echo port under a BulkheadPolicy that allows HTTP only", 60*time.Second)
	waitConnect(t, clientNS, serverIP, EchoHTTPPort, true, "HTTP port under that BulkheadPolicy", 60*time.Second)
	if _, err := c.Kubectl("-n", "demo", "label", "pod", "client", "app=other", "--overwrite"); err != nil {
		t.Fatal(err)
	}
	waitConnect(t, clientNS, serverIP, EchoHTTPPort, false, "HTTP port after relabelling the client out of the policy", 60*time.Second)
	if _, err := c.Kubectl("-n", "demo", "label", "pod", "client", "app=client", "--overwrite"); err != nil {
		t.Fatal(err)
	}
	waitConnect(t, clientNS, serverIP, EchoHTTPPort, true, "HTTP port after relabelling the client back", 60*time.Second)
	// The CRD's validation rejects a bad object at the apiserver.
	bad := strings.Replace(bulkheadPolicyYAML("demo", "bad"), "mode: Enforce", "mode: Sometimes", 1)
	if out, err := c.KubectlStdin(bad, "apply", "-f", "-"); err == nil || !strings.Contains(string(out), "Unsupported value") {
		t.Fatalf("a BulkheadPolicy with mode: Sometimes: err %v, output %s", err, out)
	}
	if _, err := c.Kubectl("-n", "demo", "delete", "bulkheadpolicy", "server-http"); err != nil {
		t.Fatal(err)
	}
	// Runtime detection in the cluster (runtimeDetection.enabled): a
	// process in the client pod's network namespace unshares a user
	// namespace (BH-RT-002). A BulkheadRuntimePolicy applied with kubectl
	// that asks Kill for it has it killed, and the alert in the flow log
	// names the pod; once the policy is deleted the same call is only
	// reported. The CRD's CEL rules refuse Kill on a cgroup hook's rule.
	if _, err := c.KubectlStdin(runtimePolicyYAML("demo", "guard", "client", "BH-RT-002", "Kill"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	since := time.Now()
	waitUnshare(t, clientNS.Path(), "signal: killed", "under a runtime policy that asks Kill", 60*time.Second)
	al := waitClusterAlert(t, flowLog, func(al detect.Alert) bool {
		return al.RuleID == "BH-RT-002" && al.Pod.Namespace == "demo" && al.Pod.Pod == "client" && !al.Time.Before(since) && al.Action == "kill"
	})
	t.Logf("alert: %s %s on %s/%s (%s), %s", al.RuleID, al.Rule, al.Pod.Namespace, al.Pod.Pod, al.Pod.SPIFFEID, al.ActionResult)
	if out, err := c.KubectlStdin(runtimePolicyYAML("demo", "bad", "client", "BH-RT-007", "Kill"), "apply", "-f", "-"); err == nil ||
		!strings.Contains(string(out), "Kill is only possible") {
		t.Fatalf("a BulkheadRuntimePolicy with Kill on BH-RT-007: err %v, output %s", err, out)
	}
	if _, err := c.Kubectl("-n", "demo", "delete", "bulkheadruntimepolicy", "guard"); err != nil {
		t.Fatal(err)
	}
	since = time.Now()
	waitUnshare(t, clientNS.Path(), "", "after deleting the runtime policy", 60*time.Second)
	waitClusterAlert(t, flowLog, func(al detect.Alert) bool {
		return al.RuleID == "BH-RT-002" && al.Pod.Pod == "client" && !al.Time.Before(since) && al.Action == "alert"
	})
	// Everything else this cluster did (containerd and runc starting the
	// pods' sandboxes and containers, the kubelet, adoption, the servers)
	// raised no alert: only the test's own unshares.
	b, err := os.ReadFile(flowLog)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(grepLines(string(b), `"event_kind":"alert"`)) {
		var al detect.Alert
		if err := json.Unmarshal([]byte(line), &al); err != nil {
			t.Fatalf("alert line %s: %v", line, err)
		}
		if al.RuleID != "BH-RT-002" || al.Comm != "unshare" {
			t.Errorf("an alert the test did not provoke: %s", line)
		}
	}
	waitReach(t, clientNS, serverIP, true, "after deleting the BulkheadPolicy", 90*time.Second)

	// A NetworkPolicy that lets in pods of namespaces labelled team=a:
	// labelling the client's namespace takes it in, unlabelling takes it
	// out again.
	if _, err := c.KubectlStdin(nsPolicyYAML("demo", "team-a"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, clientNS, serverIP, false, "under a policy for namespaces labelled team=a", 60*time.Second)
	if _, err := c.Kubectl("label", "namespace", "demo", "team=a"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, clientNS, serverIP, true, "after labelling the namespace team=a", 60*time.Second)
	if _, err := c.Kubectl("label", "namespace", "demo", "team-"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, clientNS, serverIP, false, "after removing the namespace's label", 60*time.Second)
	if _, err := c.Kubectl("-n", "demo", "delete", "networkpolicy", "team-a"); err != nil {
		t.Fatal(err)
	}

	// A DaemonSet rollout to a new image tag keeps enforcement throughout:
	// a probe loop sees the denied pair denied and the allowed pair
	// allowed, every time.
	if _, err := c.KubectlStdin(denyPolicyYAML("demo", "deny-server"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, clientNS, serverIP, false, "before the rollout", 60*time.Second)
	serverNS := podNetNS(t, c, server)
	clientIP := netip.MustParseAddr(client.Status.PodIP)
	stop := make(chan struct{})
	probed := make(chan string)
	go func() {
		var n int
		var changes []string
		for {
			select {
			case <-stop:
				probed <- fmt.Sprintf("%d probes; verdict changes: %v", n, changes)
				return
			default:
			}
			n++
			if reach(clientNS, serverIP) {
				changes = append(changes, fmt.Sprintf("client->server allowed at %s", time.Now().Format("15:04:05.000")))
			}
			if !reach(serverNS, clientIP) {
				changes = append(changes, fmt.Sprintf("server->client denied at %s", time.Now().Format("15:04:05.000")))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	oldAgent := agentPod
	if _, err := c.Helm("upgrade", "bulkhead", chart, "-n", "kube-system", "--reuse-values", "--set", "image.tag="+tag+"-2"); err != nil {
		close(stop)
		t.Fatal(err)
	}
	_, rerr := c.Kubectl("-n", "kube-system", "rollout", "status", "daemonset/bulkhead", "--timeout", "4m")
	newAgent := waitAgentReady(t, c, 4*time.Minute)
	time.Sleep(3 * time.Second)
	close(stop)
	result := <-probed
	if rerr != nil {
		t.Fatal(rerr)
	}
	if newAgent == oldAgent {
		t.Fatalf("the rollout did not replace the agent's pod %s", oldAgent)
	}
	t.Logf("rollout %s -> %s: %s", oldAgent, newAgent, result)
	if !strings.HasSuffix(result, "verdict changes: []") {
		t.Errorf("enforcement changed during the rollout: %s", result)
	}
	if _, err := c.Kubectl("-n", "demo", "delete", "networkpolicy", "deny-server"); err != nil {
		t.Fatal(err)
	}
	waitReach(t, clientNS, serverIP, true, "after the rollout and deleting every policy", 90*time.Second)

	// Uninstall as the chart's README says.
	if _, err := c.Helm("upgrade", "bulkhead", chart, "-n", "kube-system", "--reuse-values", "--set", "cni.uninstall=true"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Kubectl("-n", "kube-system", "rollout", "status", "daemonset/bulkhead", "--timeout", "4m"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Helm("uninstall", "bulkhead", "-n", "kube-system", "--wait", "--timeout", "4m"); err != nil {
		t.Fatal(err)
	}
	installed = false
	waitNoAgentPod(t, c, 3*time.Minute)
	if types := pluginTypes(t, conflist); len(types) != 1 || types[0] != "ptp" {
		t.Fatalf("after uninstall the primary conflist's plugins are %v, want [ptp]", types)
	}
	if _, err := os.Stat(filepath.Join(c.CNIBinDir, "bulkhead-cni")); !os.IsNotExist(err) {
		t.Fatalf("bulkhead-cni is still in the CNI bin folder after uninstall (%v)", err)
	}
	// A new pod starts with the primary CNI alone, and answers.
	if _, err := c.KubectlStdin(podsYAML("demo", "after"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	after := waitPodReady(t, c, "demo", "after", 3*time.Minute)
	afterNS := podNetNS(t, c, after)
	waitReach(t, afterNS, netip.MustParseAddr(after.Status.PodIP), true, "a new pod after uninstall, to itself", 30*time.Second)

	// A plain `helm uninstall` (without cni.uninstall=true first) leaves
	// the entry with no agent to answer it: bulkhead-cni fails closed, the
	// pod's events name it, and `bulkhead-agent uninstall-cni` on the node
	// lets the pod start. The DELs of the failed sandboxes went through
	// the chain too: host-local keeps no address for them.
	if out, err := c.Helm(args...); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("%s", firstLines(string(out), 1))
	}
	installed = true
	waitAgentReady(t, c, 4*time.Minute)
	if _, err := c.Helm("uninstall", "bulkhead", "-n", "kube-system", "--wait", "--timeout", "4m"); err != nil {
		t.Fatal(err)
	}
	installed = false
	waitNoAgentPod(t, c, 3*time.Minute)
	if types := pluginTypes(t, conflist); len(types) != 2 || types[1] != "bulkhead-cni" {
		t.Fatalf("after a plain helm uninstall the primary conflist's plugins are %v, want the entry left", types)
	}
	if _, err := c.KubectlStdin(podsYAML("demo", "stranded"), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	ev := waitEvent(t, c, "demo", "stranded", "FailedCreatePodSandBox", `plugin type="bulkhead-cni"`, 4*time.Minute)
	t.Logf("event: %s", firstLines(ev, 1))
	uninstall := exec.Command(filepath.Join(cnichain.RepoRoot(t), "bin", "bulkhead-agent"), "uninstall-cni",
		"--cni-bin-dir", c.CNIBinDir, "--cni-conf-dir", c.CNIConfDir)
	if out, err := uninstall.CombinedOutput(); err != nil {
		t.Fatalf("bulkhead-agent uninstall-cni: %v\n%s", err, out)
	}
	if types := pluginTypes(t, conflist); len(types) != 1 || types[0] != "ptp" {
		t.Fatalf("after uninstall-cni the primary conflist's plugins are %v, want [ptp]", types)
	}
	waitPodReady(t, c, "demo", "stranded", 4*time.Minute)
	checkNoLeakedIPs(t, c)
	t.Logf("whole test %v", time.Since(start).Round(time.Second))
}

// waitEvent waits for an event of the pod with reason whose message
// contains substr, and returns the message.
// waitAdopted waits until the agent lists the pods of namespace as adopted
// endpoints keyed by containerd's sandbox IDs (not synthetic ones).
// waitUnshare runs unshare(CLONE_NEWUSER) from a process in the network
// namespace ns until its outcome is want ("" for success, else the start
// of the error, "signal: killed"): the agent applies a policy change
// within about a second, the loop only bounds a broken run.
func waitUnshare(t *testing.T, ns, want, what string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := exec.Command("nsenter", "--net="+ns, "unshare", "--user", "true").CombinedOutput()
		got := ""
		if err != nil {
			got = err.Error()
		}
		if strings.HasPrefix(got, want) && (want != "" || err == nil) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("unshare --user %s: %q (%s), want %q", what, got, out, want)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// waitClusterAlert returns the first alert line of the flow log at path
// for which want holds, waiting up to a minute for it.
func waitClusterAlert(t *testing.T, path string, want func(detect.Alert) bool) detect.Alert {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		b, _ := os.ReadFile(path)
		for line := range strings.Lines(string(b)) {
			if !strings.Contains(line, `"event_kind":"alert"`) {
				continue
			}
			var al detect.Alert
			if err := json.Unmarshal([]byte(line), &al); err != nil {
				t.Fatalf("alert line %s: %v", line, err)
			}
			if want(al) {
				return al
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no matching alert in %s after a minute; its alerts:\n%s", path, grepLines(string(b), `"event_kind":"alert"`))
		}
	}
}

func grepLines(s, sub string) string {
	var out strings.Builder
	for line := range strings.Lines(s) {
		if strings.Contains(line, sub) {
			out.WriteString(line)
		}
	}
	return out.String()
}

// runtimePolicyYAML is a BulkheadRuntimePolicy on the pods labelled
// app=<app> with one detection.
func runtimePolicyYAML(namespace, name, app, rule, action string) string {
	return fmt.Sprintf(`apiVersion: bulkhead.io/v1alpha1
kind: BulkheadRuntimePolicy
metadata: {name: %s, namespace: %s}
spec:
  selector: {podSelector: {matchLabels: {app: %s}}}
  detections: [{rule: %s, action: %s}]
`, name, namespace, app, rule, action)
}

func waitAdopted(t *testing.T, c *api.Client, namespace string, names []string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for {
		l, err := c.ListEndpoints(context.Background())
		var got []string
		for _, e := range l.Endpoints {
			if e.Pod.Namespace == namespace && e.Adopted && !strings.HasPrefix(e.ContainerID, "adopted-") {
				got = append(got, e.Pod.Name)
			}
		}
		slices.Sort(got)
		if slices.Equal(got, names) {
			return
		}
		last = fmt.Sprintf("adopted %v (error %v)", got, err)
		if time.Now().After(deadline) {
			st, _ := c.Status(context.Background())
			t.Fatalf("pods of %s not adopted after %v: %s; unadopted: %+v", namespace, timeout, last, st.Unadopted)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func waitEvent(t *testing.T, c *Cluster, namespace, pod, reason, substr string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		evs, err := c.Client.CoreV1().Events(namespace).List(context.Background(), metav1.ListOptions{
			FieldSelector: "involvedObject.name=" + pod + ",reason=" + reason})
		if err == nil {
			for _, e := range evs.Items {
				if strings.Contains(e.Message, substr) {
					return e.Message
				}
			}
		}
		time.Sleep(time.Second)
	}
	out, _ := c.Kubectl("-n", namespace, "describe", "pod", pod)
	t.Fatalf("no %s event with %q for %s/%s in %v:\n%s", reason, substr, namespace, pod, timeout, out)
	return ""
}

// checkNoLeakedIPs compares host-local's reservations with the pods' IPs.
func checkNoLeakedIPs(t *testing.T, c *Cluster) {
	t.Helper()
	pods, err := c.Client.CoreV1().Pods("").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	live := map[string]bool{}
	for _, p := range pods.Items {
		if p.Status.PodIP != "" && !p.Spec.HostNetwork {
			live[p.Status.PodIP] = true
		}
	}
	ents, err := os.ReadDir(filepath.Join(c.Dir, "cni", "ipam", NetworkName))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, err := netip.ParseAddr(e.Name()); err == nil && !live[e.Name()] {
			t.Errorf("host-local still reserves %s, which no pod has (a DEL that failed?); pods: %v", e.Name(), live)
		}
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}

// pluginTypes lists the conflist's plugin types, in order.
func pluginTypes(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cl struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &cl); err != nil {
		t.Fatalf("%s: %v\n%s", path, err, b)
	}
	var out []string
	for _, p := range cl.Plugins {
		out = append(out, p.Type)
	}
	return out
}

func podsYAML(namespace string, names ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n", namespace)
	for _, n := range names {
		fmt.Fprintf(&b, `---
apiVersion: v1
kind: Pod
metadata:
  name: %[1]s
  namespace: %[2]s
  labels: {app: %[1]s}
spec:
  terminationGracePeriodSeconds: 2
  automountServiceAccountToken: false
  containers:
  - name: echo
    image: %[3]s
    imagePullPolicy: Never
    ports:
    - containerPort: %[4]d
    - containerPort: %[5]d
    readinessProbe:
      tcpSocket: {port: %[5]d}
      periodSeconds: 2
`, n, namespace, strings.TrimPrefix(EchoRef, "docker.io/"), EchoHTTPPort, EchoTCPPort)
	}
	return b.String()
}

func denyPolicyYAML(namespace, name string) string {
	return fmt.Sprintf(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: %s
  namespace: %s
spec:
  podSelector:
    matchLabels: {app: server}
  policyTypes: [Ingress]
`, name, namespace)
}

func allowPolicyYAML(namespace, name string) string {
	return fmt.Sprintf(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: %s
  namespace: %s
spec:
  podSelector:
    matchLabels: {app: server}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: client}
    ports:
    - {protocol: TCP, port: %d}
`, name, namespace, EchoTCPPort)
}

func nsPolicyYAML(namespace, name string) string {
	return fmt.Sprintf(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: %s
  namespace: %s
spec:
  podSelector:
    matchLabels: {app: server}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {team: a}
`, name, namespace)
}

func bulkheadPolicyYAML(namespace, name string) string {
	return fmt.Sprintf(`apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata:
  name: %s
  namespace: %s
spec:
  selector: {podSelector: {matchLabels: {app: server}}}
  mode: Enforce
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: %d, protocol: TCP}]
`, name, namespace, EchoHTTPPort)
}

// waitAgentReady waits for the DaemonSet's one pod to be Ready and returns
// its name.
func waitAgentReady(t *testing.T, c *Cluster, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		pods, err := c.Client.CoreV1().Pods("kube-system").List(context.Background(),
			metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=bulkhead"})
		if err == nil && len(pods.Items) == 1 && podReady(&pods.Items[0]) {
			return pods.Items[0].Name
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("%d pods", len(pods.Items))
			for _, p := range pods.Items {
				last += fmt.Sprintf("; %s: %s %s", p.Name, p.Status.Phase, containerStates(&p))
			}
		}
		time.Sleep(time.Second)
	}
	out, _ := c.Kubectl("-n", "kube-system", "describe", "pods", "-l", "app.kubernetes.io/name=bulkhead")
	logs, _ := c.Kubectl("-n", "kube-system", "logs", "-l", "app.kubernetes.io/name=bulkhead", "--all-containers", "--tail", "60")
	t.Fatalf("agent not Ready in %v: %s\n%s\nlogs:\n%s", timeout, last, out, logs)
	return ""
}

func waitNoAgentPod(t *testing.T, c *Cluster, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		pods, err := c.Client.CoreV1().Pods("kube-system").List(context.Background(),
			metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=bulkhead"})
		if err == nil && len(pods.Items) == 0 {
			return
		}
		time.Sleep(time.Second)
	}
	t.Fatalf("the agent's pod is still there %v after helm uninstall", timeout)
}

func containerStates(p *corev1.Pod) string {
	var s []string
	for _, cs := range append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
		st := "running"
		switch {
		case cs.State.Waiting != nil:
			st = "waiting " + cs.State.Waiting.Reason + " " + cs.State.Waiting.Message
		case cs.State.Terminated != nil:
			st = fmt.Sprintf("terminated %s (%d)", cs.State.Terminated.Reason, cs.State.Terminated.ExitCode)
		}
		s = append(s, fmt.Sprintf("%s ready=%v %s", cs.Name, cs.Ready, st))
	}
	return strings.Join(s, ", ")
}

func podReady(p *corev1.Pod) bool {
	for _, cond := range p.Status.Conditions {
		if cond.Type == corev1.PodReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

func waitPodReady(t *testing.T, c *Cluster, namespace, name string, timeout time.Duration) *corev1.Pod {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		p, err := c.Client.CoreV1().Pods(namespace).Get(context.Background(), name, metav1.GetOptions{})
		if err == nil && podReady(p) && p.Status.PodIP != "" {
			return p
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("%s %s", p.Status.Phase, containerStates(p))
		}
		time.Sleep(500 * time.Millisecond)
	}
	out, _ := c.Kubectl("-n", namespace, "describe", "pod", name)
	t.Fatalf("pod %s/%s not Ready in %v: %s\n%s", namespace, name, timeout, last, out)
	return nil
}

// podNetNS opens the pod's network namespace through its container's pid.
func podNetNS(t *testing.T, c *Cluster, p *corev1.Pod) ns.NetNS {
	t.Helper()
	if len(p.Status.ContainerStatuses) == 0 {
		t.Fatalf("pod %s has no container status", p.Name)
	}
	id := strings.TrimPrefix(p.Status.ContainerStatuses[0].ContainerID, "containerd://")
	out, err := c.Ctr("tasks", "ls")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == id {
			n, err := ns.GetNS("/proc/" + f[1] + "/ns/net")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { n.Close() })
			return n
		}
	}
	t.Fatalf("no task for container %s of pod %s:\n%s", id, p.Name, out)
	return nil
}

// reach reports whether a TCP echo round trip from inside from to the
// server's echo port works.
func reach(from ns.NetNS, to netip.Addr) bool {
	conn, err := tnetns.Dial(from, "tcp4", to, EchoTCPPort, time.Second)
	if err != nil {
		return false
	}
	defer conn.Close()
	return tnetns.Echo(conn, time.Second)
}

// waitConnect polls until a TCP connect from inside from to to:port
// succeeding is want.
func waitConnect(t *testing.T, from ns.NetNS, to netip.Addr, port int, want bool, what string, timeout time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		conn, err := tnetns.Dial(from, "tcp4", to, port, time.Second)
		if err == nil {
			conn.Close()
		}
		if (err == nil) == want {
			t.Logf("%s: connects=%v after %v", what, want, time.Since(start).Round(10*time.Millisecond))
			return
		}
		if time.Since(start) > timeout {
			t.Fatalf("%s: connects is not %v after %v (%v)", what, want, timeout, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitReach polls until reachability is want, and fails the test after
// timeout.
func waitReach(t *testing.T, from ns.NetNS, to netip.Addr, want bool, what string, timeout time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		if reach(from, to) == want {
			t.Logf("%s: reachable=%v after %v", what, want, time.Since(start).Round(10*time.Millisecond))
			return
		}
		if time.Since(start) > timeout {
			t.Fatalf("%s: reachable is not %v after %v", what, want, timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
