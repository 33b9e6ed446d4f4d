package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/kubeapi"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"
)

// Scale of BenchmarkAgentAtScale (issue 13): pods in namespaces, and
// NetworkPolicies spread over them. None of the pods is on the agent's node.
const (
	scalePods       = 10000
	scaleNamespaces = 100
	scalePolicies   = 1000
)

// BenchmarkAgentAtScale starts bulkhead-agent on 10,000 pods in 100
// namespaces and 1,000 NetworkPolicies, once from a real kube-apiserver
// (--store kubernetes) and once from the same objects in a dir store, and
// reports for each: seconds from the process's start to enforcing the
// first state (ready-s), the peak RSS (hwm-MiB) and the RSS once settled
// (rss-MiB); for the apiserver, the LIST and WATCH requests the agent made;
// and for both, the time from a policy update to its enforcement over 100
// updates (change-p50-ms, change-p99-ms). kubernetes/dir ratios come from
// the same run.
//
//	BULKHEAD_PRIVILEGED=1 BULKHEAD_K8S_BIN=... go test ./tests/e2e -run '^$' -bench AgentAtScale -benchtime 1x
func BenchmarkAgentAtScale(b *testing.B) {
	srv := kubeapi.Start(b)
	for _, crd := range []string{"bulkhead.io_bulkheadpolicies.yaml", "bulkhead.io_bulkheadruntimepolicies.yaml"} {
		srv.InstallCRD(context.Background(), filepath.Join(cnichain.RepoRoot(b), "manifests", "crds", crd))
	}
	rc := srv.Config()
	rc.QPS, rc.Burst = 2000, 4000
	cs := kubernetes.NewForConfigOrDie(rc)
	objs := scaleObjects()
	start := time.Now()
	populate(b, cs, objs)
	b.Logf("apiserver populated with %d pods, %d namespaces, %d policies in %s", len(objs.pods), len(objs.nss), len(objs.pols), time.Since(start).Round(time.Second))
	ctx := context.Background()

	results := map[string]scaleResult{}
	for _, storeKind := range []string{"kubernetes", "dir"} {
		e := newEnv(b, "ptp")
		if storeKind == "dir" {
			e.writeStore("scale.yaml", objs.yaml(b))
		} else {
			e.extraArgs = []string{"--store", "kubernetes", "--kubeconfig", srv.Kubeconfig()}
		}
		before := apiRequests(b, cs)
		r := measureAgent(b, e, func(p *pod) {
			// The changing policy selects this node's one pod, so every
			// change is a new policy for an endpoint.
			local := &corev1.Pod{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
				ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: map[string]string{"app": "changing"}},
				Spec:       corev1.PodSpec{NodeName: "e2e-node", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
				Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.IPv4.String(), PodIPs: []corev1.PodIP{{IP: p.IPv4.String()}}},
			}
			if storeKind == "dir" {
				out, err := yaml.Marshal(local)
				if err != nil {
					b.Fatal(err)
				}
				e.writeStore("local.yaml", string(out))
				return
			}
			status := local.Status
			created, err := cs.CoreV1().Pods(local.Namespace).Create(ctx, local, metav1.CreateOptions{})
			if err != nil {
				b.Fatal(err)
			}
			created.Status = status
			if _, err := cs.CoreV1().Pods(local.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
				b.Fatal(err)
			}
		}, func(i int) {
			np := changePolicyObject(i)
			if storeKind == "dir" {
				out, err := yaml.Marshal(np)
				if err != nil {
					b.Fatal(err)
				}
				e.writeStore("change.yaml", string(out))
				return
			}
			if i == 0 {
				if _, err := cs.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil {
					b.Fatal(err)
				}
				return
			}
			cur, err := cs.NetworkingV1().NetworkPolicies(np.Namespace).Get(ctx, np.Name, metav1.GetOptions{})
			if err != nil {
				b.Fatal(err)
			}
			cur.Spec = np.Spec
			if _, err := cs.NetworkingV1().NetworkPolicies(np.Namespace).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
				b.Fatal(err)
			}
		})
		prefix := "k8s-"
		if storeKind == "dir" {
			prefix = "dir-"
		} else {
			after := apiRequests(b, cs)
			b.ReportMetric(after["LIST"]-before["LIST"], "k8s-list-requests")
			// Watches are counted in apiserver_request_total only when
			// they end: the open ones are a gauge.
			b.ReportMetric(after["open-WATCH"]-before["open-WATCH"], "k8s-open-watches")
		}
		b.ReportMetric(r.ready.Seconds(), prefix+"ready-s")
		b.ReportMetric(r.hwm, prefix+"hwm-MiB")
		b.ReportMetric(r.rss, prefix+"rss-MiB")
		b.ReportMetric(float64(r.p50.Microseconds())/1000, prefix+"change-p50-ms")
		b.ReportMetric(float64(r.p99.Microseconds())/1000, prefix+"change-p99-ms")
		results[storeKind] = r
		e.stopAgent(syscall.SIGTERM)
	}
	k, d := results["kubernetes"], results["dir"]
	b.ReportMetric(k.hwm/d.hwm, "k8s-hwm-x-dir")
	b.ReportMetric(k.ready.Seconds()/d.ready.Seconds(), "k8s-ready-x-dir")
	b.Logf("kubernetes/dir: ready %.2fx, peak RSS %.2fx (%.1f vs %.1f MiB), settled RSS %.2fx (%.1f vs %.1f MiB), change p50 %.2fx",
		k.ready.Seconds()/d.ready.Seconds(), k.hwm/d.hwm, k.hwm, d.hwm, k.rss/d.rss, k.rss, d.rss, float64(k.p50)/float64(d.p50))
}

type scaleResult struct {
	ready    time.Duration
	hwm, rss float64
	p50, p99 time.Duration
}

// measureAgent starts the agent, times it to its first enforced state, reads
// its memory, then makes 100 policy changes and times each to enforcement.
func measureAgent(b *testing.B, e *env, addLocal func(*pod), change func(int)) scaleResult {
	b.Helper()
	var r scaleResult
	start := time.Now()
	e.launchAgent()
	e.waitReady()
	r.ready = time.Since(start)
	// Settle: the first compile's garbage is collected.
	time.Sleep(5 * time.Second)
	r.hwm, r.rss = procMemory(b, e.agent.cmd.Process.Pid)
	p := e.addPod("ns-000", "local")
	addLocal(p)
	if !eventually(30*time.Second, func() bool {
		l, err := e.client.ListEndpoints(context.Background())
		return err == nil && len(l.Endpoints) == 1 && l.Endpoints[0].IdentityID != 0 &&
			l.Endpoints[0].PolicyRevision > 0 && e.hasLabelledIdentity()
	}) {
		b.Fatal("the local pod did not get its labels from the store")
	}
	var took []time.Duration
	for i := range 100 {
		st, err := e.client.Status(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		change(i)
		for {
			cur, err := e.client.Status(context.Background())
			if err != nil {
				b.Fatal(err)
			}
			if cur.PolicyRevision > st.PolicyRevision {
				break
			}
			if time.Since(t0) > 30*time.Second {
				b.Fatalf("change %d not enforced after 30 s", i)
			}
			time.Sleep(2 * time.Millisecond)
		}
		took = append(took, time.Since(t0))
	}
	slices.Sort(took)
	r.p50, r.p99 = took[len(took)/2], took[len(took)*99/100]
	return r
}

// procMemory is VmHWM and VmRSS of pid in MiB.
func procMemory(b *testing.B, pid int) (hwm, rss float64) {
	b.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(fields[1], 64)
		switch fields[0] {
		case "VmHWM:":
			hwm = kb / 1024
		case "VmRSS:":
			rss = kb / 1024
		}
	}
	return hwm, rss
}

// apiRequests sums apiserver_request_total by verb, and the open watches
// (apiserver_longrunning_requests) as "open-WATCH".
var agentResource = regexp.MustCompile(`resource="(pods|namespaces|networkpolicies|bulkheadpolicies|bulkheadruntimepolicies)"`)

func apiRequests(b *testing.B, cs *kubernetes.Clientset) map[string]float64 {
	b.Helper()
	body, err := cs.Discovery().RESTClient().Get().AbsPath("/metrics").DoRaw(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	out := map[string]float64{}
	for l := range strings.SplitSeq(string(body), "\n") {
		prefix := ""
		switch {
		case strings.HasPrefix(l, "apiserver_request_total{"):
		case strings.HasPrefix(l, "apiserver_longrunning_requests{"):
			prefix = "open-"
		default:
			continue
		}
		// Only the kinds the agent reads: the apiserver's own clients
		// list other things now and then.
		if !agentResource.MatchString(l) {
			continue
		}
		i := strings.Index(l, `verb="`)
		sp := strings.LastIndexByte(l, ' ')
		if i < 0 || sp < 0 {
			continue
		}
		verb := l[i+6:]
		verb = verb[:strings.IndexByte(verb, '"')]
		v, _ := strconv.ParseFloat(l[sp+1:], 64)
		out[prefix+verb] += v
	}
	return out
}

type scaleSet struct {
	nss  []*corev1.Namespace
	pods []*corev1.Pod
	pols []*networkingv1.NetworkPolicy
}

func scaleObjects() scaleSet {
	var s scaleSet
	for n := range scaleNamespaces {
		s.nss = append(s.nss, &corev1.Namespace{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("ns-%03d", n), Labels: map[string]string{"team": fmt.Sprintf("t%d", n%10)}}})
	}
	for i := range scalePods {
		ip := fmt.Sprintf("10.%d.%d.%d", 100+i/65536, (i/256)%256, i%256)
		s.pods = append(s.pods, &corev1.Pod{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("pod-%05d", i), Namespace: fmt.Sprintf("ns-%03d", i%scaleNamespaces),
				Labels: map[string]string{"app": fmt.Sprintf("app%d", i%10), "role": fmt.Sprintf("r%d", i%5), "pod-template-hash": fmt.Sprintf("%08x", i*2654435761%(1<<32))}},
			Spec: corev1.PodSpec{NodeName: fmt.Sprintf("node-%02d", i%50), Containers: []corev1.Container{{Name: "c", Image: "x",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}, HostIP: "192.168.0.1"},
		})
	}
	port := intstr.FromString("http")
	for p := range scalePolicies {
		ns := fmt.Sprintf("ns-%03d", p%scaleNamespaces)
		s.pols = append(s.pols, &networkingv1.NetworkPolicy{TypeMeta: metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"},
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("pol-%04d", p), Namespace: ns},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", p%10)}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From: []networkingv1.NetworkPolicyPeer{
						{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": fmt.Sprintf("r%d", p%5)}}},
						{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprintf("t%d", p%10)}},
							PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "app0"}}},
					},
					Ports: []networkingv1.NetworkPolicyPort{{Port: &port}},
				}},
			}})
	}
	return s
}

// yaml is the set as one multi-document store file.
func (s scaleSet) yaml(b *testing.B) string {
	var sb strings.Builder
	add := func(o any) {
		out, err := yaml.Marshal(o)
		if err != nil {
			b.Fatal(err)
		}
		sb.Write(out)
		sb.WriteString("---\n")
	}
	for _, o := range s.nss {
		add(o)
	}
	for _, o := range s.pods {
		add(o)
	}
	for _, o := range s.pols {
		add(o)
	}
	return sb.String()
}

// populate creates the set in the apiserver, 16 requests at a time.
func populate(b testing.TB, cs *kubernetes.Clientset, s scaleSet) {
	b.Helper()
	ctx := context.Background()
	for _, n := range s.nss {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, n, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	work := make(chan func() error)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range 16 {
		wg.Go(func() {
			for f := range work {
				if err := f(); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
				}
			}
		})
	}
	for _, p := range s.pods {
		work <- func() error {
			status := p.Status
			created, err := cs.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
			if err != nil {
				return err
			}
			created.Status = status
			_, err = cs.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{})
			return err
		}
	}
	for _, np := range s.pols {
		work <- func() error {
			_, err := cs.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{})
			return err
		}
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
}

// changePolicyObject is the i-th version of one policy: its port changes
// every time.
func changePolicyObject(i int) *networkingv1.NetworkPolicy {
	port := intstr.FromInt32(int32(1000 + i))
	return &networkingv1.NetworkPolicy{TypeMeta: metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"},
		ObjectMeta: metav1.ObjectMeta{Name: "changing", Namespace: "ns-000"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "changing"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: &port}},
			}},
		}}
}

// hasLabelledIdentity says whether an identity of the agent carries
// app=changing: the local pod's labels arrived from the store.
func (e *env) hasLabelledIdentity() bool {
	l, err := e.client.ListIdentities(context.Background())
	if err != nil {
		return false
	}
	for _, id := range l.Identities {
		if id.Labels["app"] == "changing" {
			return true
		}
	}
	return false
}
