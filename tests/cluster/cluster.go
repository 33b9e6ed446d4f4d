// Package cluster runs a real single-node Kubernetes cluster on this machine
// for tests: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
// containerd with runc, and a kubelet, with ptp and host-local as the primary
// CNI. The binaries come from `make k8s-cluster` ($BULKHEAD_K8S_BIN,
// $BULKHEAD_CONTAINERD_BIN, $BULKHEAD_RUNC_BIN) and `make cni-plugins`
// ($BULKHEAD_CNI_BIN). Everything lives in one temporary folder of the
// test's (containerd's root and state, the kubelet's root, the CNI folders,
// a bpffs of its own) and in cgroups of its own; teardown removes all of it,
// also when the test fails. Only tests import it.
package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/kubeapi"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// The environment variables that name the binaries' folders.
const (
	EnvK8sBin        = "BULKHEAD_K8S_BIN"
	EnvContainerdBin = "BULKHEAD_CONTAINERD_BIN"
	EnvRuncBin       = "BULKHEAD_RUNC_BIN"
	EnvCNIBin        = "BULKHEAD_CNI_BIN"
	EnvHelmBin       = "BULKHEAD_HELM_BIN"
)

const (
	// NodeName is the one node's name.
	NodeName = "bulkhead-node"
	// NodeIP is the node's InternalIP: a /32 on lo (kubelet refuses a
	// loopback node IP).
	NodeIP = "10.249.255.1"
	// PodSubnet is host-local's range; the host side of each ptp veth
	// gets its first address.
	PodSubnet  = "10.249.0.0/24"
	podGateway = "10.249.0.1"
	// PrimaryConflist is the primary CNI's file in CNIConfDir.
	PrimaryConflist = "10-bhc.conflist"
	// NetworkName is the primary conflist's network name.
	NetworkName = "bhc"
	// cniCacheDir is libcni's cache on the host, where containerd keeps
	// its attachments' results (and the agent reads them, for adoption).
	cniCacheDir = "/var/lib/cni"
	// kubeletHostDir holds the kubelet's device-plugin socket whatever its
	// --root-dir.
	kubeletHostDir = "/var/lib/kubelet"
)

// The kubelet sets these; teardown puts the machine's values back.
var kubeletSysctls = []string{"vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"}

// Cluster is the running cluster.
type Cluster struct {
	t testing.TB
	// Dir is the test's folder; every file of the cluster is in it.
	Dir string
	// CNIBinDir and CNIConfDir are the node's CNI folders (the test's,
	// never /opt/cni/bin or /etc/cni/net.d).
	CNIBinDir, CNIConfDir string
	// NetnsDir is where containerd mounts pods' network namespaces.
	NetnsDir string
	// BPFFS is a bpffs mount of the test's own, shared, for the agent.
	BPFFS string
	// Kubeconfig has cluster-admin rights.
	Kubeconfig string
	// APIPort is kube-apiserver's port on 127.0.0.1 (and NodeIP).
	APIPort int
	// Client is a cluster-admin client.
	Client *kubernetes.Clientset

	k8sBin, ctrdBin, runcBin, cniBin string
	ctrdSock                         string
	cgroupName                       string
	apiArgs                          []string
	restCfg                          *rest.Config
	procs                            map[string]*proc
	teardown                         []func()
	sysctls                          map[string]string
	hadCNICache, hadKubeletDir       bool
	hadRunContainerd, hadLogDir      bool
}

// proc is a started process; done is closed once it has exited.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// Start brings the cluster up and waits for the node to be Ready. Without
// BULKHEAD_PRIVILEGED=1 the test is skipped; with it, missing binaries fail
// the test with the make target that builds them.
func Start(t testing.TB) *Cluster {
	t.Helper()
	privileged.Require(t)
	c := &Cluster{t: t, procs: map[string]*proc{}, sysctls: map[string]string{}}
	need := []struct {
		env, make string
		bins      []string
	}{
		{EnvK8sBin, "k8s-cluster", []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl"}},
		{EnvContainerdBin, "k8s-cluster", []string{"containerd", "ctr", "containerd-shim-runc-v2"}},
		{EnvRuncBin, "k8s-cluster", []string{"runc"}},
		{EnvCNIBin, "cni-plugins", []string{"ptp", "host-local"}},
		{EnvHelmBin, "helm", []string{"helm"}},
	}
	dirs := map[string]string{}
	for _, n := range need {
		d := os.Getenv(n.env)
		if d == "" {
			t.Fatalf("%s is not set: run `make %s` (make test sets it)", n.env, n.make)
		}
		for _, b := range n.bins {
			if _, err := os.Stat(filepath.Join(d, b)); err != nil {
				t.Fatalf("%s: run `make %s`: %v", n.env, n.make, err)
			}
		}
		dirs[n.env] = d
	}
	c.k8sBin, c.ctrdBin, c.runcBin, c.cniBin = dirs[EnvK8sBin], dirs[EnvContainerdBin], dirs[EnvRuncBin], dirs[EnvCNIBin]

	// A short path: containerd's and the shims' unix sockets live in it.
	dir, err := os.MkdirTemp("/tmp", "bhc-")
	if err != nil {
		t.Fatal(err)
	}
	c.Dir = dir
	c.cgroupName = filepath.Base(dir)
	t.Cleanup(c.tearDown)
	c.hadRunContainerd = exists("/run/containerd")
	c.hadLogDir = exists("/var/log/containers")
	c.hadCNICache = exists(cniCacheDir)
	c.hadKubeletDir = exists(kubeletHostDir)

	// The folder is a shared mount of its own: containerd requires shared
	// or slave propagation for the agent's HostToContainer and
	// Bidirectional mounts, and the machine's / is private.
	c.must(unix.Mount(dir, dir, "", unix.MS_BIND, ""), "bind-mount the test folder")
	c.must(unix.Mount("", dir, "", unix.MS_SHARED|unix.MS_REC, ""), "make the test folder shared")
	c.BPFFS = filepath.Join(dir, "bpffs")
	c.mkdir(c.BPFFS)
	c.must(unix.Mount("bpf", c.BPFFS, "bpf", 0, "mode=0700"), "mount bpffs")
	c.must(unix.Mount("", c.BPFFS, "", unix.MS_SHARED, ""), "make the bpffs shared")

	for _, s := range kubeletSysctls {
		b, err := os.ReadFile("/proc/sys/" + s)
		if err != nil {
			t.Fatal(err)
		}
		c.sysctls[s] = string(b)
	}
	// The cgroups: the kubelet's --cgroup-root, and one that holds the
	// processes started here (the shims stay in containerd's), so that
	// teardown finds every process, wherever it was reparented to.
	c.makeCgroups()

	c.run("ip", "addr", "replace", NodeIP+"/32", "dev", "lo")

	c.CNIBinDir = filepath.Join(dir, "cni", "bin")
	c.CNIConfDir = filepath.Join(dir, "cni", "net.d")
	c.mkdir(c.CNIBinDir)
	c.mkdir(c.CNIConfDir)
	for _, p := range []string{"ptp", "host-local"} {
		copyFile(t, filepath.Join(c.cniBin, p), filepath.Join(c.CNIBinDir, p), 0o755)
	}
	c.writeFile(filepath.Join(c.CNIConfDir, PrimaryConflist), []byte(fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": %q,
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": %q}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": %q
      }
    }
  ]
}
`, NetworkName, PodSubnet, filepath.Join(dir, "cni", "ipam"))))

	c.startControlPlane()
	c.startContainerd()
	c.ImportImages(PauseImage(t, dir))
	c.startKubelet()
	return c
}

// startControlPlane starts etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler, and waits for the apiserver.
func (c *Cluster) startControlPlane() {
	t := c.t
	dir := c.Dir
	pki := filepath.Join(dir, "pki")
	c.mkdir(pki)
	caCert, caKey := newCA(t)
	c.writeFile(filepath.Join(pki, "ca.crt"), pemCert(caCert))
	serving, servingKey := newServing(t, caCert, caKey)
	c.writeFile(filepath.Join(pki, "apiserver.crt"), pemCert(serving))
	c.writeFile(filepath.Join(pki, "apiserver.key"), pemKey(servingKey))
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	c.writeFile(filepath.Join(pki, "sa.key"), pemKey(saKey))
	c.writeFile(filepath.Join(pki, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}))
	token := randomHex(t)
	c.writeFile(filepath.Join(pki, "tokens.csv"), []byte(token+",admin,admin,system:masters\n"))

	ports := FreePorts(t, 5)
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	c.APIPort = ports[2]
	c.spawn("etcd", filepath.Join(c.k8sBin, "etcd"), nil,
		"--name", "default", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL, "--log-level", "warn")
	c.apiArgs = []string{
		"--etcd-servers", etcdURL,
		"--bind-address", "127.0.0.1", "--advertise-address", NodeIP,
		"--secure-port", strconv.Itoa(c.APIPort),
		"--tls-cert-file", filepath.Join(pki, "apiserver.crt"), "--tls-private-key-file", filepath.Join(pki, "apiserver.key"),
		"--token-auth-file", filepath.Join(pki, "tokens.csv"), "--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(pki, "sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/24",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--endpoint-reconciler-type", "none",
		// Never resolve the node's name (there is no DNS for it).
		"--kubelet-preferred-address-types", "InternalIP",
	}
	c.restCfg = &rest.Config{
		Host: "https://127.0.0.1:" + strconv.Itoa(c.APIPort), BearerToken: token,
		TLSClientConfig: rest.TLSClientConfig{CAData: pemCert(caCert)},
	}
	c.Kubeconfig = filepath.Join(dir, "admin.kubeconfig")
	c.writeFile(c.Kubeconfig, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:%d
    certificate-authority: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
`, c.APIPort, filepath.Join(pki, "ca.crt"), token)))
	cl, err := kubernetes.NewForConfig(c.restCfg)
	if err != nil {
		t.Fatal(err)
	}
	c.Client = cl
	c.StartAPIServer()

	c.spawn("kube-controller-manager", filepath.Join(c.k8sBin, "kube-controller-manager"), nil,
		"--kubeconfig", c.Kubeconfig, "--authentication-kubeconfig", c.Kubeconfig, "--authorization-kubeconfig", c.Kubeconfig,
		"--controllers", "*,-nodeipam",
		"--root-ca-file", filepath.Join(pki, "ca.crt"),
		"--service-account-private-key-file", filepath.Join(pki, "sa.key"),
		"--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", strconv.Itoa(ports[3]),
		"--cert-dir", filepath.Join(dir, "kcm-certs"))
	c.spawn("kube-scheduler", filepath.Join(c.k8sBin, "kube-scheduler"), nil,
		"--kubeconfig", c.Kubeconfig, "--authentication-kubeconfig", c.Kubeconfig, "--authorization-kubeconfig", c.Kubeconfig,
		"--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", strconv.Itoa(ports[4]),
		"--cert-dir", filepath.Join(dir, "scheduler-certs"))
}

// StartAPIServer starts kube-apiserver (again, after StopAPIServer) and
// waits until it is ready.
func (c *Cluster) StartAPIServer() {
	c.t.Helper()
	p := c.spawn("kube-apiserver", filepath.Join(c.k8sBin, "kube-apiserver"), nil, c.apiArgs...)
	c.waitFor("kube-apiserver ready", 3*time.Minute, p, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		body, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && string(body) != "ok" {
			err = fmt.Errorf("readyz: %s", body)
		}
		return err
	})
}

// StopAPIServer stops kube-apiserver; etcd keeps the objects.
func (c *Cluster) StopAPIServer() { c.stop(c.procs["kube-apiserver"]) }

func (c *Cluster) startContainerd() {
	dir := filepath.Join(c.Dir, "containerd")
	c.mkdir(dir)
	c.ctrdSock = filepath.Join(dir, "containerd.sock")
	state := filepath.Join(dir, "state")
	c.NetnsDir = filepath.Join(state, "io.containerd.grpc.v1.cri", "netns")
	cfg := fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = %[3]q

[ttrpc]
  address = "%[3]s.ttrpc"

[plugins.'io.containerd.internal.v1.opt']
  path = %[4]q

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %[5]q

[plugins.'io.containerd.cri.v1.runtime']
  # No CAP_SYS_RESOURCE here: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [%[6]q]
    conf_dir = %[7]q
    max_conf_num = 1
    use_internal_loopback = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = %[8]q
        Root = %[9]q
        SystemdCgroup = false

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`, filepath.Join(dir, "root"), state, c.ctrdSock, filepath.Join(dir, "opt"), PauseRef,
		c.CNIBinDir, c.CNIConfDir, filepath.Join(c.runcBin, "runc"), filepath.Join(dir, "runc"))
	conf := filepath.Join(dir, "config.toml")
	c.writeFile(conf, []byte(cfg))
	env := append(os.Environ(), "PATH="+c.ctrdBin+":"+c.runcBin+":"+os.Getenv("PATH"))
	p := c.spawn("containerd", filepath.Join(c.ctrdBin, "containerd"), env, "--config", conf, "--log-level", "info")
	c.waitFor("containerd", 2*time.Minute, p, func() error {
		_, err := c.Ctr("version")
		return err
	})
}

// Ctr runs ctr against the cluster's containerd in the k8s.io namespace.
func (c *Cluster) Ctr(args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(c.ctrdBin, "ctr"), append([]string{"--address", c.ctrdSock, "-n", "k8s.io"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ctr %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return out, nil
}

// ImportImages imports docker-archives into containerd's k8s.io namespace.
func (c *Cluster) ImportImages(archives ...string) {
	c.t.Helper()
	for _, a := range archives {
		if _, err := c.Ctr("images", "import", a); err != nil {
			c.t.Fatal(err)
		}
	}
}

func (c *Cluster) startKubelet() {
	dir := filepath.Join(c.Dir, "kubelet")
	c.mkdir(dir)
	port := FreePorts(c.t, 1)[0]
	resolv := filepath.Join(c.Dir, "resolv.conf")
	c.writeFile(resolv, []byte("nameserver 127.0.0.1\n"))
	conf := filepath.Join(c.Dir, "kubelet.yaml")
	c.writeFile(conf, []byte(fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /%s
containerRuntimeEndpoint: unix://%s
address: %s
port: %d
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
failSwapOn: false
resolvConf: %s
podLogsDir: %s
volumePluginDir: %s
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%%
  imagefs.available: 1%%
  nodefs.inodesFree: 1%%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
fileCheckFrequency: 0s
syncFrequency: 10s
nodeStatusUpdateFrequency: 2s
`, c.cgroupName, c.ctrdSock, NodeIP, port, resolv, filepath.Join(c.Dir, "pod-logs"), filepath.Join(dir, "volume-plugins"))))
	p := c.spawn("kubelet", filepath.Join(c.k8sBin, "kubelet"), nil,
		"--config", conf, "--kubeconfig", c.Kubeconfig, "--root-dir", dir,
		"--cert-dir", filepath.Join(dir, "pki"),
		"--hostname-override", NodeName, "--node-ip", NodeIP, "--v", "2")
	c.waitFor("node Ready", 3*time.Minute, p, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n, err := c.Client.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status == corev1.ConditionTrue {
					if len(n.Spec.Taints) > 0 {
						return fmt.Errorf("taints %v", n.Spec.Taints)
					}
					return nil
				}
				return fmt.Errorf("%s: %s", cond.Reason, cond.Message)
			}
		}
		return fmt.Errorf("no Ready condition yet")
	})
}

// Kubectl runs kubectl against the cluster.
func (c *Cluster) Kubectl(args ...string) ([]byte, error) {
	return c.tool(filepath.Join(c.k8sBin, "kubectl"), nil, args...)
}

// KubectlStdin runs kubectl with stdin.
func (c *Cluster) KubectlStdin(stdin string, args ...string) ([]byte, error) {
	return c.tool(filepath.Join(c.k8sBin, "kubectl"), []byte(stdin), args...)
}

// Helm runs helm against the cluster.
func (c *Cluster) Helm(args ...string) ([]byte, error) {
	return c.tool(filepath.Join(os.Getenv(EnvHelmBin), "helm"), nil, args...)
}

func (c *Cluster) tool(bin string, stdin []byte, args ...string) ([]byte, error) {
	home := filepath.Join(c.Dir, "home")
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.Kubeconfig, "HOME="+home,
		"XDG_CACHE_HOME="+filepath.Join(home, ".cache"), "XDG_CONFIG_HOME="+filepath.Join(home, ".config"),
		"XDG_DATA_HOME="+filepath.Join(home, ".local"))
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s %s: %v: %s", filepath.Base(bin), strings.Join(args, " "), err, out)
	}
	return out, nil
}

// Log returns a process's log (kubelet, containerd, kube-apiserver...).
func (c *Cluster) Log(name string) string {
	b, _ := os.ReadFile(filepath.Join(c.Dir, name+".log"))
	return string(b)
}

func (c *Cluster) spawn(name, bin string, env []string, args ...string) *proc {
	c.t.Helper()
	logPath := filepath.Join(c.Dir, name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		c.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = env
	// Its own process group, so teardown ends its children too; and
	// should the test binary die, the process goes with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("start %s: %v", name, err)
	}
	c.enterCgroup(cmd.Process.Pid)
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	c.procs[name] = p
	return p
}

// stop ends a process group: SIGTERM, then SIGKILL after 30 s.
func (c *Cluster) stop(p *proc) {
	if p == nil {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
}

// waitFor polls f until it succeeds; it fails the test when p exits or the
// timeout passes, with the tail of p's log.
func (c *Cluster) waitFor(what string, timeout time.Duration, p *proc, f func() error) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		exited := false
		select {
		case <-p.done:
			exited = true
		default:
		}
		if exited || time.Now().After(deadline) {
			c.t.Fatalf("%s: %v (exited: %v); %s log:\n%s", what, err, exited, p.name, tail(c.Log(p.name), 6000))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// cgroupHierarchies lists the cgroup v1 hierarchies' mount points (and the
// v2 one, in hybrid mode).
func cgroupHierarchies() []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		for i, x := range f {
			if x == "-" && i+1 < len(f) && (f[i+1] == "cgroup" || f[i+1] == "cgroup2") {
				out = append(out, unescapeMount(f[4]))
			}
		}
	}
	return out
}

func (c *Cluster) makeCgroups() {
	for _, h := range cgroupHierarchies() {
		for _, name := range []string{c.cgroupName, c.cgroupName + "-procs"} {
			d := filepath.Join(h, name)
			if err := os.Mkdir(d, 0o755); err != nil && !os.IsExist(err) {
				c.t.Fatalf("cgroup %s: %v", d, err)
			}
			// A new v1 cpuset has no CPUs or memory nodes: copy them.
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				if b, err := os.ReadFile(filepath.Join(h, f)); err == nil {
					_ = os.WriteFile(filepath.Join(d, f), b, 0o644)
				}
			}
		}
	}
}

// enterCgroup moves pid into the processes' cgroup of every hierarchy.
func (c *Cluster) enterCgroup(pid int) {
	for _, h := range cgroupHierarchies() {
		_ = os.WriteFile(filepath.Join(h, c.cgroupName+"-procs", "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644)
	}
}

// tearDown removes everything Start made, whatever state the test left.
func (c *Cluster) tearDown() {
	t := c.t
	if t.Failed() {
		for _, n := range []string{"kubelet", "containerd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"} {
			if _, ok := c.procs[n]; ok {
				t.Logf("%s log (tail):\n%s", n, tail(c.Log(n), 4000))
			}
		}
	}
	for i := len(c.teardown) - 1; i >= 0; i-- {
		c.teardown[i]()
	}
	// The kubelet first, so that it restarts nothing; then containerd
	// (its shims and containers are killed with the cgroups below).
	for _, n := range []string{"kubelet", "kube-scheduler", "kube-controller-manager", "containerd", "kube-apiserver", "etcd"} {
		c.stop(c.procs[n])
	}
	var errs []string
	if n := c.killCgroups(); n != "" {
		errs = append(errs, n)
	}
	if err := unmountUnder(c.Dir); err != nil {
		errs = append(errs, err.Error())
	}
	// ptp's host-side veths (they carry the gateway address) go with
	// their pods' namespaces; delete any that stayed.
	if out, err := exec.Command("ip", "-o", "-4", "addr", "show", "to", podGateway+"/32").Output(); err == nil {
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if f := strings.Fields(line); len(f) > 1 {
				name, _, _ := strings.Cut(f[1], "@")
				_ = exec.Command("ip", "link", "del", name).Run()
			}
		}
	}
	_ = exec.Command("ip", "addr", "del", NodeIP+"/32", "dev", "lo").Run()
	for s, v := range c.sysctls {
		if err := os.WriteFile("/proc/sys/"+s, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Sprintf("restore %s: %v", s, err))
		}
	}
	// The kubelet links container logs from /var/log/containers.
	if ents, err := os.ReadDir("/var/log/containers"); err == nil {
		for _, e := range ents {
			p := filepath.Join("/var/log/containers", e.Name())
			if dst, err := os.Readlink(p); err == nil && strings.HasPrefix(dst, c.Dir+"/") {
				_ = os.Remove(p)
			}
		}
		if !c.hadLogDir {
			_ = os.Remove("/var/log/containers")
		}
	}
	// containerd's libcni keeps its result cache in /var/lib/cni whatever
	// the CNI folders: one file per attachment of this network.
	if files, err := filepath.Glob(filepath.Join(cniCacheDir, "results", NetworkName+"-*")); err == nil {
		for _, f := range files {
			_ = os.Remove(f)
		}
	}
	if !c.hadCNICache {
		_ = os.RemoveAll(cniCacheDir)
	}
	// The kubelet's device-plugin socket is in /var/lib/kubelet whatever
	// its --root-dir.
	if c.hadKubeletDir {
		_ = os.Remove(filepath.Join(kubeletHostDir, "device-plugins", "kubelet.sock"))
	} else {
		_ = os.RemoveAll(kubeletHostDir)
	}
	// The shims' sockets are under /run/containerd/s whatever the state
	// folder; they go with the shims.
	if !c.hadRunContainerd {
		_ = os.RemoveAll("/run/containerd")
	}
	if left := mountsUnder(c.Dir); len(left) > 0 {
		errs = append(errs, fmt.Sprintf("mounts left under %s, not removing it: %v", c.Dir, left))
	} else if err := os.RemoveAll(c.Dir); err != nil {
		errs = append(errs, err.Error())
	}
	if len(errs) > 0 {
		t.Errorf("cluster teardown: %s", strings.Join(errs, "; "))
	}
}

// OnTeardown runs f at teardown before the cluster's processes stop (in
// reverse order of registration).
func (c *Cluster) OnTeardown(f func()) { c.teardown = append(c.teardown, f) }

// killCgroups kills every process in the test's cgroups and removes them
// (deepest first, in every hierarchy).
func (c *Cluster) killCgroups() string {
	var problems []string
	for _, h := range cgroupHierarchies() {
		for _, name := range []string{c.cgroupName, c.cgroupName + "-procs"} {
			root := filepath.Join(h, name)
			if !exists(root) {
				continue
			}
			var dirs []string
			_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
			deadline := time.Now().Add(30 * time.Second)
			for _, d := range dirs {
				for {
					pids := cgroupPids(d)
					for _, pid := range pids {
						_ = syscall.Kill(pid, syscall.SIGKILL)
					}
					// The freezer may hold them: thaw.
					_ = os.WriteFile(filepath.Join(d, "freezer.state"), []byte("THAWED"), 0o644)
					err := os.Remove(d)
					if err == nil || os.IsNotExist(err) {
						break
					}
					if time.Now().After(deadline) {
						problems = append(problems, fmt.Sprintf("cgroup %s: %v (pids %v)", d, err, pids))
						break
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		}
	}
	return strings.Join(problems, "; ")
}

func cgroupPids(d string) []int {
	b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// mountsUnder lists the mount points at or below dir, deepest (latest)
// first.
func mountsUnder(dir string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	// mountinfo lists parents before children: reverse it.
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// unmountUnder unmounts everything at or below dir, lazily where a mount
// is busy.
func unmountUnder(dir string) error {
	for range 20 {
		mps := mountsUnder(dir)
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			if err := unix.Unmount(mp, 0); err != nil {
				_ = unix.Unmount(mp, unix.MNT_DETACH)
			}
		}
	}
	if left := mountsUnder(dir); len(left) > 0 {
		return fmt.Errorf("cannot unmount %v", left)
	}
	return nil
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

func (c *Cluster) must(err error, what string) {
	c.t.Helper()
	if err != nil {
		c.t.Fatalf("%s: %v", what, err)
	}
}

func (c *Cluster) mkdir(d string) {
	c.t.Helper()
	c.must(os.MkdirAll(d, 0o755), "mkdir")
}

func (c *Cluster) writeFile(p string, b []byte) {
	c.t.Helper()
	c.must(os.WriteFile(p, b, 0o600), "write "+p)
}

func (c *Cluster) run(name string, args ...string) {
	c.t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		c.t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func copyFile(t testing.TB, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, mode); err != nil {
		t.Fatal(err)
	}
}

func newCA(t testing.TB) (*x509.Certificate, *rsa.PrivateKey) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bulkhead-test-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// newServing is kube-apiserver's serving certificate, for every name the
// node's clients use.
func newServing(t testing.TB, ca *x509.Certificate, caKey *rsa.PrivateKey) (*x509.Certificate, *rsa.PrivateKey) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(NodeIP), net.ParseIP("10.96.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func pemKey(k *rsa.PrivateKey) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
}

// FreePorts picks n ports that are free on loopback now.
func FreePorts(t testing.TB, n int) []int { return kubeapi.FreePorts(t, n) }

func randomHex(t testing.TB) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func tail(s string, n int) string {
	if len(s) > n {
		s = s[len(s)-n:]
	}
	return s
}
