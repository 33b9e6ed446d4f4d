// Package kubeapi runs a real etcd and kube-apiserver on loopback for tests,
// from the binaries that `make k8s-apiserver` builds into $BULKHEAD_K8S_BIN.
// No controllers, kubelet or scheduler run: objects are only stored and
// watched, which is what the agent's Kubernetes store reads. Only tests
// import it.
package kubeapi

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/privileged"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"
)

// EnvBin names the folder with etcd and kube-apiserver.
const EnvBin = "BULKHEAD_K8S_BIN"

// Server is an etcd and a kube-apiserver in front of it.
type Server struct {
	t       testing.TB
	bin     string
	dir     string
	port    int
	args    []string
	etcd    *proc
	api     *proc
	apiLog  string
	restCfg *rest.Config
}

// Start starts etcd and kube-apiserver and waits until the apiserver is
// ready. Without $BULKHEAD_K8S_BIN the test is skipped, or fails under
// BULKHEAD_PRIVILEGED=1. Both processes and their files go at the test's
// end.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := os.Getenv(EnvBin)
	if bin == "" {
		if privileged.Required() {
			t.Fatalf("%s is not set: run `make k8s-apiserver` and point it at the folder", EnvBin)
		}
		t.Skipf("needs a kube-apiserver: set %s (make k8s-apiserver builds one)", EnvBin)
	}
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			t.Fatalf("%s: %v", EnvBin, err)
		}
	}
	s := &Server{t: t, bin: bin, dir: t.TempDir()}
	ports := FreePorts(t, 3)
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	s.port = ports[2]
	s.etcd = s.spawn("etcd", "etcd",
		"--name", "default", "--data-dir", filepath.Join(s.dir, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL, "--log-level", "warn")
	t.Cleanup(func() { stop(s.etcd) })

	keyFile, pubFile := s.serviceAccountKeys()
	token := randomHex(t)
	tokens := filepath.Join(s.dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(token+",admin,admin,system:masters\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.args = []string{
		"--etcd-servers", etcdURL,
		"--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
		"--secure-port", strconv.Itoa(s.port), "--cert-dir", filepath.Join(s.dir, "certs"),
		"--token-auth-file", tokens,
		// RBAC, as on a cluster: the admin token is in system:masters, and
		// tests can impersonate the agent's service account to check its
		// ClusterRole.
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", pubFile, "--service-account-signing-key-file", keyFile,
		"--service-cluster-ip-range", "10.96.0.0/24",
		// ServiceAccount admission waits for the default service
		// account, which only the controller-manager creates.
		"--disable-admission-plugins", "ServiceAccount",
		"--enable-priority-and-fairness=false",
		// The endpoint reconciler refuses a loopback address, and there
		// is no service network here for the kubernetes Service anyway.
		"--endpoint-reconciler-type", "none",
		// As on every cluster that runs a CNI: the DaemonSet's agent is
		// privileged, and without this the apiserver refuses it.
		"--allow-privileged=true",
	}
	s.restCfg = &rest.Config{
		Host: "https://127.0.0.1:" + strconv.Itoa(s.port), BearerToken: token,
		// The serving certificate is the one the apiserver made itself.
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
	}
	s.StartAPIServer()
	t.Cleanup(s.StopAPIServer)
	return s
}

// Config is a client configuration with cluster-admin rights.
func (s *Server) Config() *rest.Config { return rest.CopyConfig(s.restCfg) }

// StartAPIServer starts kube-apiserver (again, after StopAPIServer) on the
// same port, and waits until it is ready.
func (s *Server) StartAPIServer() {
	s.t.Helper()
	s.api = s.spawn("kube-apiserver", "kube-apiserver", s.args...)
	c, err := kubernetes.NewForConfig(s.Config())
	if err != nil {
		s.t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		body, err := c.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		cancel()
		if err == nil && string(body) == "ok" {
			return
		}
		exited := false
		select {
		case <-s.api.done:
			exited = true
		default:
		}
		if exited || time.Now().After(deadline) {
			log, _ := os.ReadFile(s.apiLog)
			s.t.Fatalf("kube-apiserver not ready: %v %s\n%s", err, body, tail(log, 4000))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// StopAPIServer stops kube-apiserver; etcd keeps the objects.
func (s *Server) StopAPIServer() {
	stop(s.api)
}

// proc is a started process; done is closed once it has exited.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func (s *Server) spawn(name, bin string, args ...string) *proc {
	s.t.Helper()
	logPath := filepath.Join(s.dir, name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		s.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(s.bin, bin), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Should the test binary die, its servers go with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	if name == "kube-apiserver" {
		s.apiLog = logPath
	}
	s.t.Cleanup(func() {
		if s.t.Failed() {
			b, _ := os.ReadFile(logPath)
			s.t.Logf("%s log (tail):\n%s", name, tail(b, 3000))
		}
	})
	return p
}

// stop ends a process and waits for it: SIGTERM, then SIGKILL.
func stop(p *proc) {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (s *Server) serviceAccountKeys() (key, pub string) {
	s.t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		s.t.Fatal(err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		s.t.Fatal(err)
	}
	key, pub = filepath.Join(s.dir, "sa.key"), filepath.Join(s.dir, "sa.pub")
	if err := os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}), 0o600); err != nil {
		s.t.Fatal(err)
	}
	if err := os.WriteFile(pub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o600); err != nil {
		s.t.Fatal(err)
	}
	return key, pub
}

// FreePorts picks n loopback ports that are free now.
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	var out []int
	var lns []net.Listener
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		out = append(out, ln.Addr().(*net.TCPAddr).Port)
	}
	for _, ln := range lns {
		ln.Close()
	}
	return out
}

func randomHex(t testing.TB) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// InstallCRD creates the CustomResourceDefinition in the YAML file at path
// and waits until its resource is served.
func (s *Server) InstallCRD(ctx context.Context, path string) {
	s.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		s.t.Fatal(err)
	}
	var u unstructured.Unstructured
	if err := yaml.Unmarshal(b, &u.Object); err != nil {
		s.t.Fatalf("%s: %v", path, err)
	}
	dyn, err := dynamic.NewForConfig(s.Config())
	if err != nil {
		s.t.Fatal(err)
	}
	crds := dyn.Resource(schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"})
	if _, err := crds.Create(ctx, &u, metav1.CreateOptions{}); err != nil {
		s.t.Fatalf("create the CRD of %s: %v", path, err)
	}
	group, _, _ := unstructured.NestedString(u.Object, "spec", "group")
	plural, _, _ := unstructured.NestedString(u.Object, "spec", "names", "plural")
	versions, _, _ := unstructured.NestedSlice(u.Object, "spec", "versions")
	var version string
	if len(versions) > 0 {
		version, _, _ = unstructured.NestedString(versions[0].(map[string]any), "name")
	}
	gvr := schema.GroupVersionResource{Group: group, Version: version, Resource: plural}
	deadline := time.Now().Add(time.Minute)
	for {
		// Established can come a moment before the resource is served:
		// wait for a list to answer.
		_, err := dyn.Resource(gvr).List(ctx, metav1.ListOptions{})
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s not served: %v", gvr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Kubeconfig writes a kubeconfig with cluster-admin rights for processes
// (bulkhead-agent --kubeconfig) and returns its path.
func (s *Server) Kubeconfig() string {
	s.t.Helper()
	path := filepath.Join(s.dir, "kubeconfig")
	cfg := "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {server: \"" + s.restCfg.Host +
		"\", insecure-skip-tls-verify: true}\nusers:\n- name: admin\n  user: {token: \"" + s.restCfg.BearerToken +
		"\"}\ncontexts:\n- name: test\n  context: {cluster: test, user: admin}\ncurrent-context: test\n"
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		s.t.Fatal(err)
	}
	return path
}
