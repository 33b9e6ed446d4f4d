package agent

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/netns"
)

// The alert benchmarks' pod process: the test binary re-executed, which
// enters the pod's netns on its locked main thread (from the node's: that
// setns is not the pod's), and execs itself again there, so that it is the
// pod's own program (a process that joins a pod from outside is the
// runtime's set-up until it execs: the monitor does not judge it). Then:
// "unshare" and "floor" say "ready", wait for a byte on stdin, take
// CLOCK_MONOTONIC and make their one syscall (or write their one line),
// and print the time; "generate" makes paced unshare calls (see
// generateUnshares).
const (
	alertBenchHelperEnv  = "BULKHEAD_ALERTBENCH_HELPER" // "unshare", "floor" or "generate"
	alertBenchNetnsEnv   = "BULKHEAD_ALERTBENCH_NETNS"
	alertBenchEnteredEnv = "BULKHEAD_ALERTBENCH_ENTERED"
	alertBenchFloorEnv   = "BULKHEAD_ALERTBENCH_FLOOR" // the file "floor" appends its line to
	// "generate": calls per second (0: as fast as it can), for how long,
	// and the first sequence number.
	alertBenchRateEnv = "BULKHEAD_ALERTBENCH_RATE"
	alertBenchDurEnv  = "BULKHEAD_ALERTBENCH_DURATION"
	alertBenchSeqEnv  = "BULKHEAD_ALERTBENCH_SEQ"
)

func init() {
	mode := os.Getenv(alertBenchHelperEnv)
	if mode == "" {
		return
	}
	if err := alertBenchHelper(mode); err != nil {
		fmt.Fprintln(os.Stderr, "alert bench helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func alertBenchHelper(mode string) error {
	goruntime.LockOSThread() // never unlocked: the thread is the pod's
	if os.Getenv(alertBenchEnteredEnv) == "" {
		fd, err := unix.Open(os.Getenv(alertBenchNetnsEnv), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return err
		}
		unix.Close(fd)
		// By /proc/self/exe: the test binary lives under /tmp, whose
		// execs are a rule of their own (BH-RT-013).
		return unix.Exec("/proc/self/exe", os.Args, append(os.Environ(), alertBenchEnteredEnv+"=1"))
	}
	if mode == "generate" {
		rate, err := strconv.Atoi(os.Getenv(alertBenchRateEnv))
		if err != nil {
			return err
		}
		d, err := time.ParseDuration(os.Getenv(alertBenchDurEnv))
		if err != nil {
			return err
		}
		seq, err := strconv.ParseUint(os.Getenv(alertBenchSeqEnv), 10, 64)
		if err != nil {
			return err
		}
		n, took := generateUnshares(rate, d, seq)
		fmt.Println(n, int64(took))
		return nil
	}
	var floor *os.File
	if mode == "floor" {
		var err error
		if floor, err = os.OpenFile(os.Getenv(alertBenchFloorEnv), os.O_WRONLY|os.O_APPEND, 0); err != nil {
			return err
		}
	}
	fmt.Println("ready")
	if _, err := io.ReadFull(os.Stdin, make([]byte, 1)); err != nil {
		return err
	}
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	switch mode {
	case "unshare":
		// BH-RT-002. A process with threads cannot unshare a user
		// namespace (EINVAL): the attempt is what the tracepoint sees.
		unix.RawSyscall(unix.SYS_UNSHARE, unix.CLONE_NEWUSER, 0, 0)
	case "floor":
		// The harness alone: a line the reader must notice, with no kernel
		// hook or agent in between.
		fmt.Fprintf(floor, "{\"floor_pid\":%d}\n", os.Getpid())
	}
	fmt.Println(ts.Nano())
	return nil
}

// alertBenchProc is one started helper.
type alertBenchProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

func startAlertBenchProcs(b *testing.B, n int, mode, nsPath, floor string) []*alertBenchProc {
	b.Helper()
	procs := make([]*alertBenchProc, 0, n)
	for range n {
		cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.bench=^$")
		cmd.Env = append(os.Environ(), alertBenchHelperEnv+"="+mode, alertBenchNetnsEnv+"="+nsPath, alertBenchFloorEnv+"="+floor)
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			b.Fatal(err)
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			b.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		p := &alertBenchProc{cmd: cmd, in: in, out: bufio.NewReader(out)}
		procs = append(procs, p)
		b.Cleanup(func() { p.cmd.Process.Kill(); p.cmd.Wait() })
	}
	for _, p := range procs {
		if l, err := p.out.ReadString('\n'); err != nil || l != "ready\n" {
			b.Fatalf("helper %d: %q, %v", p.cmd.Process.Pid, l, err)
		}
	}
	return procs
}

// fire makes the helper act: its syscall follows at once.
func (p *alertBenchProc) fire(b *testing.B) {
	if _, err := p.in.Write([]byte{1}); err != nil {
		b.Fatal(err)
	}
}

// t0 is the CLOCK_MONOTONIC the helper took just before its syscall; it
// waits for the helper to exit.
func (p *alertBenchProc) t0(b *testing.B) int64 {
	l, err := p.out.ReadString('\n')
	if err != nil {
		b.Fatalf("helper %d: %v", p.cmd.Process.Pid, err)
	}
	t0, err := strconv.ParseInt(strings.TrimSpace(l), 10, 64)
	if err != nil {
		b.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		b.Fatalf("helper %d: %v", p.cmd.Process.Pid, err)
	}
	return t0
}

// tailer follows a file's new lines with inotify, and stamps each with
// CLOCK_MONOTONIC when it reads it.
type tailer struct {
	f       *os.File
	ifd     int
	pending []byte
}

func newTailer(b *testing.B, path string) *tailer {
	b.Helper()
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		b.Fatal(err)
	}
	ifd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := unix.InotifyAddWatch(ifd, path, unix.IN_MODIFY); err != nil {
		b.Fatal(err)
	}
	t := &tailer{f: f, ifd: ifd}
	b.Cleanup(func() { f.Close(); unix.Close(ifd) })
	return t
}

// next returns the next complete line and when it was read; an error
// after timeout without one.
func (t *tailer) next(timeout time.Duration) ([]byte, int64, error) {
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 64<<10)
	for {
		if i := bytes.IndexByte(t.pending, '\n'); i >= 0 {
			var ts unix.Timespec
			unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
			line := slices.Clone(t.pending[:i])
			t.pending = t.pending[i+1:]
			return line, ts.Nano(), nil
		}
		n, err := t.f.Read(buf)
		if n > 0 {
			t.pending = append(t.pending, buf[:n]...)
			continue
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, 0, err
		}
		left := time.Until(deadline)
		if left <= 0 {
			return nil, 0, fmt.Errorf("no line after %v", timeout)
		}
		fds := []unix.PollFd{{Fd: int32(t.ifd), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, int(min(left, 100*time.Millisecond)/time.Millisecond)+1); err != nil && !errors.Is(err, unix.EINTR) {
			return nil, 0, err
		}
		var ev [4096]byte
		unix.Read(t.ifd, ev[:]) // drain; EAGAIN when it woke by timeout
	}
}

// benchRuntimeAgent runs an agent with --runtime-detection and --alert-log
// (never rotated during the run), adds a pod through AddEndpoint, waits
// until its netns is watched, and returns the agent, the alert log and
// the pod's netns path.
func benchRuntimeAgent(b *testing.B, container, ip string) (*Agent, string, string) {
	b.Helper()
	unmountTracefsAfter(b)
	alertLog := filepath.Join(b.TempDir(), "alerts.log")
	a, req, _ := runtimePod(b, container, ip, func(c *Config) {
		c.AlertLog, c.AlertLogMaxSize, c.AlertLogMaxFiles = alertLog, 1<<40, 1
	})
	// The alert log exists once the agent runs with it.
	if _, err := os.Stat(alertLog); err != nil {
		b.Fatal(err)
	}
	return a, alertLog, req.Netns
}

// BenchmarkAlertLatency: from a syscall in a pod (CLOCK_MONOTONIC taken just
// before it) to its alert line in the agent's --alert-log (read by a
// follower woken by inotify). Each event is one unshare(CLONE_NEWUSER)
// (BH-RT-002) by a process of its own, so the aggregator never folds one
// into another, and each waits for the previous one's line. The baseline
// (floor) is the same harness with the helper writing its own line to a
// followed file: what the measurement itself costs. Helpers are started in
// batches between measurements. One op is the whole series.
func BenchmarkAlertLatency(b *testing.B) {
	const events, batch, floorEvents = 200, 20, 50
	a, alertLog, nsPath := benchRuntimeAgent(b, "c0ffee90", "10.213.6.90/32")
	floorLog := filepath.Join(b.TempDir(), "floor.log")
	if err := os.WriteFile(floorLog, nil, 0o644); err != nil {
		b.Fatal(err)
	}
	// wall - monotonic: to place the alert's time (the kernel's stamp at
	// the hook, which the reader made wall-clock) on CLOCK_MONOTONIC.
	var mono unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono)
	wallOff := time.Now().UnixNano() - mono.Nano()
	var lat, floor, hookToLine []time.Duration
	for b.Loop() {
		lat, floor, hookToLine = lat[:0], floor[:0], hookToLine[:0]
		before, err := a.sysmon.mon.Counters()
		if err != nil {
			b.Fatal(err)
		}
		alerts, floors := newTailer(b, alertLog), newTailer(b, floorLog)
		for len(lat) < events {
			procs := startAlertBenchProcs(b, min(batch, events-len(lat)), "unshare", nsPath, "")
			for _, p := range procs {
				pid := uint32(p.cmd.Process.Pid)
				p.fire(b)
				for {
					line, at, err := alerts.next(30 * time.Second)
					if err != nil {
						b.Fatalf("alert of pid %d: %v", pid, err)
					}
					var al detect.Alert
					if err := json.Unmarshal(line, &al); err != nil {
						b.Fatalf("alert line %s: %v", line, err)
					}
					if al.PID == pid && al.RuleID == detect.RuleUnshareNS.ID {
						lat = append(lat, time.Duration(at-p.t0(b)))
						hookToLine = append(hookToLine, time.Duration(at-(al.Time.UnixNano()-wallOff)))
						break
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		for len(floor) < floorEvents {
			for _, p := range startAlertBenchProcs(b, min(batch, floorEvents-len(floor)), "floor", nsPath, floorLog) {
				want := fmt.Sprintf("{\"floor_pid\":%d}", p.cmd.Process.Pid)
				p.fire(b)
				for {
					line, at, err := floors.next(30 * time.Second)
					if err != nil {
						b.Fatalf("floor line of pid %d: %v", p.cmd.Process.Pid, err)
					}
					if string(line) == want {
						floor = append(floor, time.Duration(at-p.t0(b)))
						break
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		after, err := a.sysmon.mon.Counters()
		if err != nil {
			b.Fatal(err)
		}
		if after.Lost != before.Lost {
			b.Fatalf("%d events lost", after.Lost-before.Lost)
		}
	}
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	p50, p99, fp50 := percentile(lat, 50), percentile(lat, 99), percentile(floor, 50)
	b.ReportMetric(ms(p50), "p50-ms")
	b.ReportMetric(ms(p99), "p99-ms")
	b.ReportMetric(ms(slices.Max(lat)), "max-ms")
	b.ReportMetric(ms(percentile(hookToLine, 50)), "hook-to-line-p50-ms")
	b.ReportMetric(ms(fp50), "floor-p50-ms")
	b.ReportMetric(ms(percentile(floor, 99)), "floor-p99-ms")
	b.ReportMetric(float64(p50)/float64(fp50), "p50/floor")
	b.ReportMetric(float64(len(lat)), "events")
}

// percentile is the nearest-rank percentile of ds.
func percentile(ds []time.Duration, p int) time.Duration {
	s := slices.Sorted(slices.Values(ds))
	i := (p*len(s) + 99) / 100
	return s[max(i-1, 0)]
}

// BenchmarkAlertThroughput: the highest rate of events the pipeline carries
// from the kernel to alert lines (one line per event) with none lost, on
// one core: the whole process (agent and generator) is pinned to one CPU.
// The generator is a process of the pod (forked from this one, so pinned
// to the same CPU) calling unshare(CLONE_NEWUSER | seq<<32): every call
// is an alert with arguments of its own (the unknown high bits make it
// fail with EINVAL, after the tracepoint), so none is folded. Each step runs a paced rate for a
// second, then waits for the lines; a step passes when the monitor lost
// nothing, every event has its line, and the generator reached 90% of the
// rate. The baseline is the generator's unpaced rate in an unwatched
// netns on the same core (the kernel drops those events at its filter):
// what one core can offer at all.
func BenchmarkAlertThroughput(b *testing.B) {
	a, alertLog, nsPath := benchRuntimeAgent(b, "c0ffee91", "10.213.6.91/32")
	other := netns.New(b)
	restore := pinProcess(b)
	defer restore()
	var best, offered float64
	var firstFail string
	seq := uint64(1)
	for b.Loop() {
		best, firstFail = 0, ""
		n, d := generateIn(b, other.Path(), 0, 500*time.Millisecond, &seq)
		offered = float64(n) / d.Seconds()
		want := countAlertLines(b, alertLog)
		for _, rate := range []int{1000, 2000, 5000, 10000, 12500, 15000, 17500, 20000, 25000, 30000, 40000, 50000, 100000, 200000} {
			before, err := a.sysmon.mon.Counters()
			if err != nil {
				b.Fatal(err)
			}
			n, d := generateIn(b, nsPath, rate, time.Second, &seq)
			want += n
			got := waitAlertLines(b, alertLog, want)
			after, err := a.sysmon.mon.Counters()
			if err != nil {
				b.Fatal(err)
			}
			achieved := float64(n) / d.Seconds()
			lost := after.Lost - before.Lost
			b.Logf("rate %d/s: sent %d in %v (%.0f/s), lines %d of %d, lost %d", rate, n, d.Round(time.Millisecond), achieved,
				got-(want-n), n, lost)
			if lost != 0 || got != want || achieved < 0.9*float64(rate) {
				firstFail = fmt.Sprintf("%d/s (achieved %.0f/s, lost %d, lines %d of %d)", rate, achieved, lost, got-(want-n), n)
				break
			}
			best = achieved
		}
	}
	b.ReportMetric(best, "max-events/s")
	b.ReportMetric(offered, "offered-events/s")
	b.ReportMetric(best/offered, "max/offered")
	if firstFail != "" {
		b.Logf("first rate that failed: %s", firstFail)
	}
}

// generateUnshares calls unshare(CLONE_NEWUSER | seq<<32), seq counting
// up from seq, at rate per second (0: as fast as it can) for d, and
// returns how many it made and in what time.
func generateUnshares(rate int, d time.Duration, seq uint64) (int, time.Duration) {
	start := time.Now()
	n := 0
	for {
		el := time.Since(start)
		if el >= d {
			break
		}
		target := n + 256
		if rate > 0 {
			target = int(float64(rate) * el.Seconds())
			if n >= target {
				time.Sleep(200 * time.Microsecond)
				continue
			}
		}
		for ; n < target; n++ {
			unix.RawSyscall(unix.SYS_UNSHARE, uintptr(unix.CLONE_NEWUSER|seq<<32), 0, 0)
			seq++
		}
	}
	return n, time.Since(start)
}

// generateIn runs generateUnshares in a process of the netns at nsPath
// (forked from this process's pinned threads: pinned too), and advances
// *seq past the numbers it used.
func generateIn(b *testing.B, nsPath string, rate int, d time.Duration, seq *uint64) (int, time.Duration) {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.bench=^$")
	cmd.Env = append(os.Environ(), alertBenchHelperEnv+"=generate", alertBenchNetnsEnv+"="+nsPath,
		alertBenchRateEnv+"="+strconv.Itoa(rate), alertBenchDurEnv+"="+d.String(), alertBenchSeqEnv+"="+strconv.FormatUint(*seq, 10))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		b.Fatalf("generator: %v", err)
	}
	var n int
	var took int64
	if _, err := fmt.Sscan(string(out), &n, &took); err != nil {
		b.Fatalf("generator printed %q: %v", out, err)
	}
	*seq += uint64(n)
	return n, time.Duration(took)
}

func countAlertLines(b *testing.B, path string) int {
	data, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	return bytes.Count(data, []byte(`"rule_id":"BH-RT-002"`))
}

// waitAlertLines waits until the alert log has want BH-RT-002 lines, or
// until it stops growing for 3 s; it returns how many it has.
func waitAlertLines(b *testing.B, path string, want int) int {
	last, since := -1, time.Now()
	for {
		got := countAlertLines(b, path)
		if got >= want {
			return got
		}
		if got != last {
			last, since = got, time.Now()
		} else if time.Since(since) > 3*time.Second {
			return got
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// pinProcess pins every thread of this process (and so the threads it
// makes later) to its last allowed CPU, and returns what puts the old
// affinity back.
func pinProcess(b *testing.B) func() {
	b.Helper()
	var old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		b.Fatal(err)
	}
	cpu := -1
	for i := range 1024 {
		if old.IsSet(i) {
			cpu = i
		}
	}
	var one unix.CPUSet
	one.Set(cpu)
	each := func(set *unix.CPUSet) {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			b.Fatal(err)
		}
		for _, t := range tasks {
			tid, _ := strconv.Atoi(t.Name())
			unix.SchedSetaffinity(tid, set) // a thread may be gone
		}
	}
	each(&one)
	b.Logf("pinned to CPU %d", cpu)
	return func() { each(&old) }
}
