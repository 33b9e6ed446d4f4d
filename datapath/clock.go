package datapath

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// The conntrack clock is jiffies scaled to nanoseconds (ct_now in
// bpf/segment.c): reading it is one load, where the coarse clock costs two
// calls per packet. Conntrack entries' Created and LastSeen, and drop-event
// rate limits, are in this clock. The kernel has no call that tells
// userspace its HZ, so New reads it from the kernel's build configuration or
// measures it when it loads the programs.

// jiffyLength returns the kernel's jiffy (1/HZ): from the kernel's build
// configuration when it is readable, else measured.
func jiffyLength() (time.Duration, error) {
	if hz, ok := configHZ(); ok {
		return time.Second / time.Duration(hz), nil
	}
	return measureJiffy()
}

// configHZ reads CONFIG_HZ from /proc/config.gz or /boot/config-<release>.
func configHZ() (int, bool) {
	var cfg []byte
	if f, err := os.Open("/proc/config.gz"); err == nil {
		defer f.Close()
		if zr, err := gzip.NewReader(f); err == nil {
			cfg, _ = io.ReadAll(zr)
		}
	}
	if cfg == nil {
		var uts unix.Utsname
		if unix.Uname(&uts) == nil {
			cfg, _ = os.ReadFile("/boot/config-" + unix.ByteSliceToString(uts.Release[:]))
		}
	}
	for line := range bytes.Lines(cfg) {
		if v, ok := bytes.CutPrefix(bytes.TrimSpace(line), []byte("CONFIG_HZ=")); ok {
			if hz, err := strconv.Atoi(string(v)); err == nil && hz > 0 {
				return hz, true
			}
		}
	}
	return 0, false
}

// commonHZ are the CONFIG_HZ choices of x86, arm64, powerpc, s390 and
// riscv. A measurement within 10% of one of them is taken to be it.
var commonHZ = []float64{100, 250, 300, 1000}

// measureJiffy times jiffy increments with a program that returns
// bpf_jiffies64 and returns the length of a jiffy. An increment is seen
// between two runs; one whose runs were more than edgeSlack apart (the
// loader was preempted) gives no time and is skipped. Between two usable
// increments at least 50 ms apart, a late tick or the slack is an error of
// a few percent at most.
func measureJiffy() (time.Duration, error) {
	const edgeSlack = 200 * time.Microsecond
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SchedCLS,
		Instructions: asm.Instructions{
			asm.FnJiffies64.Call(),
			asm.Return(),
		},
		License: "Dual BSD/GPL",
	})
	if err != nil {
		return 0, fmt.Errorf("load jiffies probe: %w", err)
	}
	defer prog.Close()
	pkt := make([]byte, 14)
	deadline := time.Now().Add(5 * time.Second)
	// edge waits for jiffies to change and returns the new value and when.
	edge := func() (uint32, time.Time, error) {
		var prev uint32
		var prevStart time.Time
		for {
			start := time.Now()
			j, err := prog.Run(&ebpf.RunOptions{Data: pkt})
			end := time.Now()
			if err != nil {
				return 0, end, fmt.Errorf("run jiffies probe: %w", err)
			}
			if !prevStart.IsZero() && j != prev && end.Sub(prevStart) <= edgeSlack {
				return j, prevStart.Add(end.Sub(prevStart) / 2), nil
			}
			if end.After(deadline) {
				return 0, end, errors.New("measure jiffy: no clean jiffies increment")
			}
			prev, prevStart = j, start
		}
	}
	j0, t0, err := edge()
	if err != nil {
		return 0, err
	}
	time.Sleep(50 * time.Millisecond)
	j1, t1, err := edge()
	if err != nil {
		return 0, err
	}
	return snapJiffy(float64(j1-j0) / t1.Sub(t0).Seconds()), nil
}

// snapJiffy turns a measured HZ into a jiffy's length.
func snapJiffy(hz float64) time.Duration {
	for _, k := range commonHZ {
		if math.Abs(hz-k) <= 0.1*k {
			hz = k
			break
		}
	}
	return time.Duration(math.Round(float64(time.Second) / hz))
}

// ctNow reads the conntrack clock.
func (d *Datapath) ctNow() (uint64, error) {
	out := make([]byte, 64)
	if _, err := d.objs.BulkheadClock.Run(&ebpf.RunOptions{Data: make([]byte, 64), DataOut: out}); err != nil {
		return 0, fmt.Errorf("read conntrack clock: %w", err)
	}
	return binary.NativeEndian.Uint64(out), nil
}
