package runtime

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/netns"
)

// benignMixDuration is how long the pod's workload runs (issue 14: about a
// minute of ordinary pod activity must raise nothing).
const benignMixDuration = 50 * time.Second

// benignRoleEnv makes the test binary a program of the benign pod (a DNS
// responder, an HTTP server, a Go client): TestMain runs the role and exits.
const benignRoleEnv = "BULKHEAD_BENIGN_ROLE"

// The pod's services, on its own loopback.
const (
	benignDNSAddr    = "127.0.0.1:53"
	benignGoHTTP     = "127.0.0.1:8081"
	benignPythonHTTP = "127.0.0.1:8080"
)

// TestBenignPodMix is issue 14's false-positive check: a pod (a watched
// netns, every rule at its default Alert, the blocking hooks attached to
// the cgroup2 root as the agent attaches them) runs an ordinary workload
// for benignMixDuration, and no rule may fire. The workload: a Python and
// a Go web server with curl, wget and Go clients; DNS lookups (Go's
// resolver and a Python client) against a responder in the pod; shell
// loops of common binaries, as root and as nobody; package-manager-like
// file churn (many files written, renamed, chmod'ed and removed, tarballs
// made and extracted, scripts written to a scratch folder under /var/tmp
// and run from there). Every process is started from outside with
// `nsenter --net=POD` (so that it runs in the pod from its first
// instruction, and nothing setns's out of it) into a cgroup of the test's
// own; everything is killed through cgroup.kill at the end, whatever
// happened.
func TestBenignPodMix(t *testing.T) {
	for _, bin := range []string{"nsenter", "/usr/bin/python3", "curl", "wget", "tar", "gzip", "ps", "setpriv"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("the benign mix needs %s: %v", bin, err)
		}
	}
	env := newBenignEnv(t)
	p, work := env.p, env.work

	// The pod's files: a Go program (this test binary, copied out of /tmp:
	// exec from /tmp is BH-RT-013's), a site, and scripts.
	app := filepath.Join(work, "app", "pod-app")
	copyFile(t, os.Args[0], app, 0o755)
	writeFile(t, filepath.Join(work, "www", "index.html"), "<html><body>benign</body></html>\n", 0o644)
	for i := range 20 {
		writeFile(t, filepath.Join(work, "www", "static", fmt.Sprintf("asset-%d.js", i)), strings.Repeat("var x = 1;\n", 200), 0o644)
	}
	scripts := filepath.Join(work, "scripts")
	writeFile(t, filepath.Join(scripts, "shell-mix.sh"), benignShellMix, 0o755)
	writeFile(t, filepath.Join(scripts, "pkg-mix.sh"), benignPkgMix, 0o755)
	writeFile(t, filepath.Join(scripts, "web-clients.sh"), benignWebClients, 0o755)
	writeFile(t, filepath.Join(scripts, "dnsq.py"), benignDNSClientPy, 0o755)
	writeFile(t, filepath.Join(scripts, "app.py"), benignAppPy, 0o755)
	secs := strconv.Itoa(int(benignMixDuration / time.Second))

	// Servers first; the clients wait for them.
	servers := []*exec.Cmd{
		p.start("dns-server", []string{benignRoleEnv + "=dns-server"}, app),
		p.start("go-http", []string{benignRoleEnv + "=http-server"}, app),
		p.start("python-http", nil, "/usr/bin/python3", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", filepath.Join(work, "www")),
	}
	clients := []*exec.Cmd{
		p.start("go-client", []string{benignRoleEnv + "=client", "BENIGN_SECONDS=" + secs}, app),
		p.start("web-clients", nil, filepath.Join(scripts, "web-clients.sh"), secs),
		p.start("dns-client", nil, filepath.Join(scripts, "dnsq.py"), secs),
		p.start("shell-mix", nil, "sh", filepath.Join(scripts, "shell-mix.sh"), secs),
		p.start("shell-mix-bash", nil, "bash", filepath.Join(scripts, "shell-mix.sh"), secs),
		// A pod that runs as a non-root user (most do).
		p.start("shell-mix-nobody", nil, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
			"sh", filepath.Join(scripts, "shell-mix.sh"), secs),
		p.start("pkg-mix", nil, filepath.Join(scripts, "pkg-mix.sh"), secs),
		p.start("python-app", nil, "/usr/bin/python3", filepath.Join(scripts, "app.py"), secs),
	}
	// Each client runs for benignMixDuration and exits on its own; a bound
	// on waiting, not a timing assertion.
	var failed []string
	for _, c := range clients {
		if err := p.wait(c, benignMixDuration+3*time.Minute); err != nil {
			failed = append(failed, fmt.Sprintf("%s: %v", p.name(c), err))
		}
	}
	for _, s := range servers {
		if s.ProcessState != nil {
			failed = append(failed, fmt.Sprintf("%s ended early: %v", p.name(s), s.ProcessState))
		}
	}
	col := env.finish(t, failed)
	defer col.mu.Unlock()
	// The mix really ran in the pod: the monitor saw each program exec
	// there (it sends events from watched namespaces only).
	for _, comm := range []string{"pod-app", "python3", "curl", "wget", "sh", "bash", "setpriv", "ls", "cat", "grep", "sed",
		"awk", "sort", "date", "env", "id", "ps", "tar", "gzip", "mv", "chmod", "rm", "dnsq.py", "postinst", "tool"} {
		if col.comms[comm] == 0 {
			t.Errorf("no exec of %s seen in the pod", comm)
		}
	}
	col.reportAlerts(t)
}

// False positives found with the benign mix: ordinary pod activity that
// raised alerts. Each subtest wants 0 alerts. BH-RT-012 on an in-place
// upgrade is fixed (the rule looks at the file's name, see sysmon_exec)
// and always runs; BH-RT-014 under CGI is the rule as documented (a shell
// with a socket as stdio) and runs only with BULKHEAD_BENIGN_KNOWN_FP=1.
func TestBenignKnownFalsePositives(t *testing.T) {
	const secs = "15"
	t.Run("BH-RT-012/exec-during-upgrade", func(t *testing.T) {
		// A package manager (dpkg: write PATH.dpkg-new, rename it over PATH)
		// upgrades a program while the pod keeps running it. An exec that
		// opened the old file just before the rename finds its inode with
		// no link left by the time sched_process_exec runs.
		env := newBenignEnv(t)
		c := env.p.start("upgrade", nil, "sh", "-c", `set -eu
d=$WORK/pkg/bin; mkdir -p $d; cp /usr/bin/true $d/tool; end=$(( $(date +%s) + $1 ))
(while [ "$(date +%s)" -lt "$end" ]; do cp /usr/bin/true $d/tool.dpkg-new; mv -f $d/tool.dpkg-new $d/tool; done) &
n=0; while [ "$(date +%s)" -lt "$end" ]; do $d/tool; n=$((n+1)); done; wait; echo "$n execs"`, "upgrade", secs)
		err := env.p.wait(c, 3*time.Minute)
		var failed []string
		if err != nil {
			failed = append(failed, "upgrade: "+err.Error())
		}
		col := env.finish(t, failed)
		defer col.mu.Unlock()
		col.reportAlerts(t)
	})
	t.Run("BH-RT-014/cgi-script", func(t *testing.T) {
		if os.Getenv("BULKHEAD_BENIGN_KNOWN_FP") != "1" {
			t.Skip("known false positive (BH-RT-014 under CGI, inetd-style services): set BULKHEAD_BENIGN_KNOWN_FP=1 to run")
		}
		// A CGI script (Python's http.server --cgi: the request's socket is
		// the script's stdin and stdout) runs a command through sh -c.
		env := newBenignEnv(t)
		writeFile(t, filepath.Join(env.work, "cgi", "cgi-bin", "status.sh"),
			"#!/bin/sh\necho 'Content-Type: text/plain'\necho\nsh -c 'uname -r'\n", 0o755)
		env.p.start("python-cgi", nil, "/usr/bin/python3", "-m", "http.server", "--cgi", "8082", "--bind", "127.0.0.1",
			"--directory", filepath.Join(env.work, "cgi"))
		c := env.p.start("cgi-client", nil, "sh", "-c", `until curl -fsS http://127.0.0.1:8082/cgi-bin/status.sh; do sleep 0.2; done`)
		var failed []string
		if err := env.p.wait(c, time.Minute); err != nil {
			failed = append(failed, "cgi-client: "+err.Error())
		}
		col := env.finish(t, failed)
		defer col.mu.Unlock()
		col.reportAlerts(t)
	})
}

// benignEnv is a watched pod with the monitor loaded (every rule at Alert,
// the blocking hooks attached to the cgroup2 root as the agent attaches
// them), a reader that judges every event, a scratch folder, and what
// starts processes in the pod.
type benignEnv struct {
	m      *Monitor
	col    *benignCollector
	p      *benignPod
	work   string
	marker string
}

func newBenignEnv(t *testing.T) *benignEnv {
	t.Helper()
	cgDir, cgID := testCgroup(t)
	m := newTestMonitor(t, Config{Cgroup: filepath.Dir(cgDir), RingSize: 4 << 20})
	for hook, err := range m.CgroupHooks() {
		if err != nil {
			t.Fatalf("%s: %v", hook, err)
		}
	}
	pod := netns.New(t)
	// The pod's loopback, up before the pod is watched: the test's own
	// setns back out of the pod would be an escape from a watched one.
	pod.Do(t, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	ino := nsInode(t, pod.Path())
	ep := detect.Endpoint{ID: "benign-1", Namespace: "shop", Pod: "benign-0", SPIFFEID: "spiffe://cluster.local/ns/shop/sa/benign"}
	if err := m.Watch(ino, ep); err != nil {
		t.Fatal(err)
	}
	rd, err := m.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	marker := fmt.Sprintf("bulkhead-benign-marker-%d", time.Now().UnixNano())
	col := &benignCollector{m: m, ino: ino, cgroup: cgID, marker: marker, markerSeen: make(chan struct{}),
		procs: detect.NewProcessCache(ProcessCacheSize), comms: map[string]int{}, kinds: map[detect.Kind]int{}}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		col.read(rd)
	}()
	t.Cleanup(func() {
		rd.Close()
		<-readDone
	})
	work := benignWorkDir(t)
	p := &benignPod{t: t, nsPath: pod.Path(), cgDir: cgDir, work: work}
	p.open()
	t.Cleanup(p.killAll)
	return &benignEnv{m: m, col: col, p: p, work: work, marker: marker}
}

// finish ends the workload: a marker exec from the pod (the ring is FIFO,
// so once its event is read every event before it has been), every
// process killed, the workload's failures reported with their output, and
// the monitor's loss checked. It returns the collector locked.
func (e *benignEnv) finish(t *testing.T, failed []string) *benignCollector {
	t.Helper()
	p, col := e.p, e.col
	// Before cgroup.kill: on this kernel a process cloned into a cgroup
	// (CLONE_INTO_CGROUP) after its cgroup.kill was killed too.
	markerErr := p.wait(p.start("marker", nil, "/usr/bin/true", e.marker), time.Minute)
	p.killAll()
	for _, f := range failed {
		t.Errorf("pod workload: %s\n%s", f, p.output(f))
	}
	if markerErr != nil {
		t.Fatalf("marker: %v", markerErr)
	}
	select {
	case <-col.markerSeen:
	case <-time.After(30 * time.Second):
		t.Fatalf("no exec event from the marker after 30s (read %d events)", col.count())
	}
	c, err := e.m.Counters()
	if err != nil {
		t.Fatal(err)
	}
	col.mu.Lock()
	t.Logf("pod events: %d (%v); counters %+v; execs by comm: %v", col.events, col.kinds, c, col.comms)
	if c.Lost != 0 {
		t.Errorf("%d events lost: the workload was not fully judged", c.Lost)
	}
	for _, ev := range col.foreign {
		t.Errorf("event from outside the pod: %+v", ev)
	}
	return col
}

// reportAlerts fails t with every alert, in full. col is locked.
func (c *benignCollector) reportAlerts(t *testing.T) {
	t.Helper()
	if len(c.alerts) == 0 {
		return
	}
	t.Errorf("the benign workload raised %d alerts:", len(c.alerts))
	for _, a := range c.alerts {
		b, _ := json.MarshalIndent(a, "", "  ")
		t.Errorf("alert: %s", b)
	}
}

// benignCollector judges the pod's events as the agent's Service does
// (exec cache, Detect, Annotate), and keeps every alert.
type benignCollector struct {
	m          *Monitor
	ino        uint32
	cgroup     uint64
	marker     string
	markerSeen chan struct{}
	procs      *detect.ProcessCache

	mu      sync.Mutex
	events  int
	kinds   map[detect.Kind]int
	comms   map[string]int // execs, by the comm after exec
	alerts  []detect.Alert
	foreign []detect.Event
	marked  bool
}

func (c *benignCollector) read(rd *Reader) {
	for {
		ev, err := rd.Read()
		if errors.Is(err, ringbuf.ErrClosed) {
			return
		}
		c.mu.Lock()
		if err != nil {
			c.foreign = append(c.foreign, detect.Event{Comm: "read error: " + err.Error()})
			c.mu.Unlock()
			continue
		}
		c.events++
		c.kinds[ev.Kind]++
		if ev.Netns != c.ino || ev.CgroupID != c.cgroup {
			c.foreign = append(c.foreign, ev)
		}
		if ev.Kind == detect.KindExec {
			c.comms[ev.Comm]++
			if !c.marked && slices.Contains(ev.Argv, c.marker) {
				c.marked = true
				close(c.markerSeen)
			}
		}
		// The pod, as the Service names it: from the watch table.
		ep, ok := c.m.Endpoint(ev.Netns)
		if !ok {
			ep = detect.Endpoint{Netns: ev.Netns}
		}
		c.procs.Exec(ev)
		alerts := detect.Detect(ev, ep)
		c.procs.Annotate(alerts, ev)
		c.alerts = append(c.alerts, alerts...)
		c.mu.Unlock()
	}
}

func (c *benignCollector) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.events
}

// benignPod starts the pod's processes: `nsenter --net=POD` from the
// node (nsenter's setns is the node's, unwatched), into the test's cgroup,
// with a clean environment as a container has.
type benignPod struct {
	t      *testing.T
	nsPath string
	cgDir  string
	work   string
	cgFD   int

	mu    sync.Mutex
	cmds  []*exec.Cmd
	names map[*exec.Cmd]string
	outs  map[string]*benignOutput
	// waited holds each command's Wait result once it was reaped.
	waited map[*exec.Cmd]chan error
}

func (p *benignPod) open() {
	fd, err := unix.Open(p.cgDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		p.t.Fatal(err)
	}
	p.cgFD = fd
	p.names, p.outs, p.waited = map[*exec.Cmd]string{}, map[string]*benignOutput{}, map[*exec.Cmd]chan error{}
}

func (p *benignPod) start(name string, env []string, argv ...string) *exec.Cmd {
	p.t.Helper()
	cmd := exec.Command("nsenter", append([]string{"--net=" + p.nsPath, "--"}, argv...)...)
	cmd.Dir = p.work
	cmd.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + filepath.Join(p.work, "home"),
		"LANG=C.UTF-8", "WORK=" + p.work, "HOSTNAME=benign-0"}, env...)
	out := &benignOutput{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: p.cgFD}
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	p.mu.Lock()
	p.cmds = append(p.cmds, cmd)
	p.names[cmd] = name
	p.outs[name] = out
	p.waited[cmd] = done
	p.mu.Unlock()
	return cmd
}

func (p *benignPod) name(c *exec.Cmd) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.names[c]
}

func (p *benignPod) output(failure string) string {
	name, _, _ := strings.Cut(failure, ":")
	name, _, _ = strings.Cut(name, " ")
	p.mu.Lock()
	out := p.outs[name]
	p.mu.Unlock()
	if out == nil {
		return ""
	}
	return out.String()
}

// wait waits for c to exit by itself, at most d.
func (p *benignPod) wait(c *exec.Cmd, d time.Duration) error {
	p.mu.Lock()
	done := p.waited[c]
	p.mu.Unlock()
	select {
	case err := <-done:
		done <- err // for killAll
		return err
	case <-time.After(d):
		return fmt.Errorf("still running after %v", d)
	}
}

// killAll kills every process in the pod's cgroup (the servers, anything
// a script left behind) and reaps the ones it started.
func (p *benignPod) killAll() {
	if p.cgFD == 0 {
		return
	}
	if err := os.WriteFile(filepath.Join(p.cgDir, "cgroup.kill"), []byte("1"), 0); err != nil {
		p.t.Errorf("cgroup.kill: %v", err)
	}
	p.mu.Lock()
	cmds := slices.Clone(p.cmds)
	p.mu.Unlock()
	for _, c := range cmds {
		select {
		case err := <-p.waited[c]:
			p.waited[c] <- err
		case <-time.After(30 * time.Second):
			p.t.Errorf("%s not reaped 30s after cgroup.kill", p.name(c))
		}
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		b, err := os.ReadFile(filepath.Join(p.cgDir, "cgroup.procs"))
		if err != nil || len(strings.TrimSpace(string(b))) == 0 {
			break
		}
		if time.Now().After(deadline) {
			p.t.Errorf("processes left in the pod's cgroup: %s", b)
			break
		}
	}
}

// benignOutput keeps the first 64 KiB a process prints, for a failure's
// message.
type benignOutput struct {
	mu  sync.Mutex
	buf []byte
}

func (o *benignOutput) Write(b []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if room := 64<<10 - len(o.buf); room > 0 {
		o.buf = append(o.buf, b[:min(room, len(b))]...)
	}
	return len(b), nil
}

func (o *benignOutput) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return string(o.buf)
}

// benignWorkDir is the pod's scratch folder: under /var/tmp (not /tmp,
// /dev/shm nor TMPDIR's default, where an exec is BH-RT-013's), removed at
// the end.
func benignWorkDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/var/tmp", "bulkhead-benign-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	for _, d := range []string{"home", "www", "scripts", "app", "pkg", "out"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The nobody user's loop reads its script and writes here too.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, "out"), 0o1777); err != nil {
		t.Fatal(err)
	}
	return dir
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, to, string(b), mode)
}

// runBenignRole is the pod's Go program (the test binary, re-exec'd in the
// pod through nsenter): every thread of it is in the pod.
func runBenignRole(role string) error {
	switch role {
	case "dns-server":
		return benignDNSServer(benignDNSAddr)
	case "http-server":
		mux := http.NewServeMux()
		mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello from the pod, %s %s\n", r.Method, r.URL.Path)
		})
		mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "%d bytes\n", n)
		})
		return http.ListenAndServe(benignGoHTTP, mux)
	case "client":
		secs, err := strconv.Atoi(os.Getenv("BENIGN_SECONDS"))
		if err != nil {
			return err
		}
		return benignGoClient(time.Duration(secs) * time.Second)
	}
	return fmt.Errorf("unknown role %q", role)
}

// benignGoClient fetches from both web servers and resolves names through
// the pod's DNS responder (Go's own resolver, pointed at it), until d is
// over. Servers that are not up yet are waited for.
func benignGoClient(d time.Duration) error {
	res := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dl net.Dialer
		return dl.DialContext(ctx, "udp", benignDNSAddr)
	}}
	hc := &http.Client{Timeout: 10 * time.Second}
	get := func(url string) error {
		resp, err := hc.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		return nil
	}
	end := time.Now().Add(d)
	for ready := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		if get("http://"+benignGoHTTP+"/") == nil && get("http://"+benignPythonHTTP+"/") == nil {
			break
		}
		if time.Now().After(ready) {
			return errors.New("servers not up after a minute")
		}
	}
	var reqs, lookups int
	for i := 0; time.Now().Before(end); i++ {
		for _, url := range []string{"http://" + benignGoHTTP + "/api/items/" + strconv.Itoa(i), "http://" + benignPythonHTTP + "/static/asset-" + strconv.Itoa(i%20) + ".js"} {
			if err := get(url); err != nil {
				return err
			}
			reqs++
		}
		resp, err := hc.Post("http://"+benignGoHTTP+"/upload", "application/octet-stream", strings.NewReader(strings.Repeat("x", 4096)))
		if err != nil {
			return err
		}
		resp.Body.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		addrs, err := res.LookupHost(ctx, fmt.Sprintf("svc-%d.shop.svc.cluster.local", i%7))
		cancel()
		if err != nil || len(addrs) == 0 {
			return fmt.Errorf("lookup: %v %v", addrs, err)
		}
		lookups++
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Printf("go client: %d requests, %d lookups\n", reqs, lookups)
	return nil
}

// benignDNSServer answers every A question with 10.96.0.<n> and every
// other type with no answer: a cluster DNS, as far as clients can tell.
func benignDNSServer(addr string) error {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	buf := make([]byte, 1500)
	for n := 0; ; n++ {
		l, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		if ans := dnsAnswer(buf[:l], byte(n%250+1)); ans != nil {
			pc.WriteTo(ans, from)
		}
	}
}

// dnsAnswer is the reply to the one-question query q.
func dnsAnswer(q []byte, last byte) []byte {
	if len(q) < 12 || binary.BigEndian.Uint16(q[4:6]) != 1 {
		return nil
	}
	// The question: labels, then type and class.
	i := 12
	for i < len(q) && q[i] != 0 {
		i += int(q[i]) + 1
	}
	if i+5 > len(q) {
		return nil
	}
	qEnd := i + 5
	qtype := binary.BigEndian.Uint16(q[i+1 : i+3])
	out := append([]byte{}, q[:qEnd]...)
	out[2] = 0x81 | q[2]&0x01 // response, recursion desired as asked
	out[3] = 0x80             // recursion available, NOERROR
	binary.BigEndian.PutUint16(out[6:8], 0)
	binary.BigEndian.PutUint16(out[8:10], 0)
	binary.BigEndian.PutUint16(out[10:12], 0)
	if qtype == 1 {
		binary.BigEndian.PutUint16(out[6:8], 1)
		out = append(out, 0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 96, 0, last)
	}
	return out
}

// The shell loop of common binaries. $1: seconds to run.
const benignShellMix = `set -eu
end=$(( $(date +%s) + $1 ))
out="$WORK/out/shell.$$"
mkdir -p "$out"
i=0
while [ "$(date +%s)" -lt "$end" ]; do
	i=$((i + 1))
	ls -la /usr/bin > "$out/ls"
	ls /etc | wc -l > /dev/null
	cat /etc/os-release | grep -c '^ID' > /dev/null
	sed -n 's/^ID=//p' /etc/os-release > /dev/null
	awk -F: '{ print $1 }' /etc/passwd | sort | head -n 3 > /dev/null
	date -u +%Y-%m-%dT%H:%M:%SZ > /dev/null
	env | sort > "$out/env"
	id > /dev/null
	id -un > /dev/null
	ps -eo pid,comm > /dev/null
	uname -a > /dev/null
	find /etc -maxdepth 1 -name '*.conf' | wc -l > /dev/null
	echo "line $i" | tr a-z A-Z | cut -c1-4 | tee -a "$out/log" > /dev/null
	sha256sum /etc/passwd | base64 > /dev/null
	stat /etc/passwd > /dev/null
	readlink -f /proc/self/exe > /dev/null
	tar -C /etc -cf - os-release passwd | gzip -c > "$out/etc.tar.gz"
	gzip -dc "$out/etc.tar.gz" | tar -tf - > /dev/null
	expr "$i" + 1 > /dev/null
	basename "$out" > /dev/null
	dirname "$out" > /dev/null
	seq 1 20 | xargs echo > /dev/null
	perl -e 'print "ok\n"' > /dev/null
	/usr/bin/python3 -c 'import json, os; json.dumps(dict(os.environ))' > /dev/null
	sleep 0.5
done
rm -rf "$out"
echo "shell mix: $i rounds as $(id -un)"
`

// The package-manager-like loop: files written, renamed, chmod'ed and
// removed, a tarball made and extracted, and scripts written into the
// scratch folder and run from there. $1: seconds to run.
const benignPkgMix = `#!/bin/sh
set -eu
end=$(( $(date +%s) + $1 ))
base="$WORK/pkg"
n=0
while [ "$(date +%s)" -lt "$end" ]; do
	n=$((n + 1))
	stage="$base/stage.$n"
	mkdir -p "$stage/usr/share/demo" "$stage/usr/bin" "$stage/etc/demo"
	for f in $(seq 1 60); do
		printf 'file %s of round %s\n' "$f" "$n" > "$stage/usr/share/demo/f$f.txt.dpkg-new"
		mv "$stage/usr/share/demo/f$f.txt.dpkg-new" "$stage/usr/share/demo/f$f.txt"
	done
	chmod -R go-w "$stage"
	chmod 0644 "$stage"/usr/share/demo/*.txt
	printf '#!/bin/sh\necho "tool $*"\n' > "$stage/usr/bin/tool"
	chmod 0755 "$stage/usr/bin/tool"
	printf 'key=value\n' > "$stage/etc/demo/demo.conf"
	tar -C "$stage" -czf "$base/demo_$n.tar.gz" .
	gzip -t "$base/demo_$n.tar.gz"
	tar -tzf "$base/demo_$n.tar.gz" | wc -l > /dev/null
	root="$base/root"
	mkdir -p "$root"
	tar -C "$root" -xzf "$base/demo_$n.tar.gz"
	"$root/usr/bin/tool" --version > /dev/null
	cat > "$base/postinst" <<'EOF'
#!/bin/sh
set -e
case "$1" in
configure)
	find "$2" -type f -name '*.txt' | sort | head -n 5 > /dev/null
	ln -sf "$2/usr/bin/tool" "$2/usr/bin/tool-link"
	touch "$2/etc/demo/.configured"
	;;
esac
exit 0
EOF
	chmod 0755 "$base/postinst"
	"$base/postinst" configure "$root"
	cp -a "$root/etc/demo" "$base/etc-backup.$n"
	sha256sum "$root"/usr/share/demo/*.txt > "$base/md5sums"
	sha256sum -c "$base/md5sums" > /dev/null
	xz -c "$base/md5sums" > "$base/md5sums.xz"
	xz -dc "$base/md5sums.xz" > /dev/null
	rm -rf "$stage" "$root" "$base/etc-backup.$n" "$base/demo_$n.tar.gz" "$base/postinst" "$base/md5sums" "$base/md5sums.xz"
	sleep 0.3
done
echo "pkg mix: $n rounds"
`

// The web clients: curl and wget against both servers. $1: seconds.
const benignWebClients = `#!/bin/sh
set -eu
end=$(( $(date +%s) + $1 ))
until curl -fsS -o /dev/null http://127.0.0.1:8080/ && curl -fsS -o /dev/null http://127.0.0.1:8081/; do
	[ "$(date +%s)" -lt "$end" ] || { echo "servers not up"; exit 1; }
	sleep 0.2
done
n=0
while [ "$(date +%s)" -lt "$end" ]; do
	n=$((n + 1))
	curl -fsS -o /dev/null http://127.0.0.1:8080/index.html
	curl -fsS http://127.0.0.1:8081/healthz | grep -q hello
	curl -fsS -X POST --data-binary @/etc/passwd http://127.0.0.1:8081/upload > /dev/null
	wget -q -O /dev/null http://127.0.0.1:8080/static/asset-$((n % 20)).js
	wget -q -O - http://localhost:8081/ready > /dev/null
	sleep 0.3
done
echo "web clients: $n rounds"
`

// A DNS client in Python, run as a script from the scratch folder. argv[1]:
// seconds.
const benignDNSClientPy = `#!/usr/bin/python3
import socket, struct, sys, time

def query(name, qtype, ident):
    q = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", qtype, 1)
    return q

end = time.time() + int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
n = 0
while time.time() < end:
    for qtype in (1, 28):
        ident = n & 0xFFFF
        s.sendto(query("db-%d.shop.svc.cluster.local" % (n % 5), qtype, ident), ("127.0.0.1", 53))
        while True:
            try:
                data, _ = s.recvfrom(1500)
            except socket.timeout:
                data = None
                if time.time() > end:
                    break
                continue
            if struct.unpack(">H", data[:2])[0] == ident:
                break
        n += 1
    time.sleep(0.1)
print("dns client: %d queries" % n)
`

// A Python app: file work and subprocesses. argv[1]: seconds.
const benignAppPy = `import json, os, shutil, subprocess, sys, tempfile, time
end = time.time() + int(sys.argv[1])
base = os.path.join(os.environ["WORK"], "out", "app")
os.makedirs(base, exist_ok=True)
n = 0
while time.time() < end:
    n += 1
    d = tempfile.mkdtemp(dir=base)
    for i in range(30):
        p = os.path.join(d, "item-%d.json" % i)
        with open(p + ".tmp", "w") as f:
            json.dump({"i": i, "n": n}, f)
        os.replace(p + ".tmp", p)
        os.chmod(p, 0o640)
    subprocess.run(["ls", "-l", d], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["sh", "-c", "cat \"$0\"/*.json | wc -c", d], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["date"], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(d)
    time.sleep(0.3)
print("python app: %d rounds" % n)
`
