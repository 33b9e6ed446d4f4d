package datapath

import (
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

func TestSnapJiffy(t *testing.T) {
	for _, tc := range []struct {
		hz   float64
		want time.Duration
	}{
		{250, 4 * time.Millisecond},
		{243, 4 * time.Millisecond},
		{1012, time.Millisecond},
		{99.2, 10 * time.Millisecond},
		{296, time.Second / 300},
		{400, 2500 * time.Microsecond}, // no common HZ near: as measured
	} {
		if got := snapJiffy(tc.hz); got != tc.want {
			t.Errorf("snapJiffy(%v) = %v, want %v", tc.hz, got, tc.want)
		}
	}
}

// TestMeasureJiffy checks the measurement, which New uses where the
// kernel's configuration is not readable, against the configuration. Where
// it is not readable here either, New used the measurement, and
// TestConntrackClock checks it against wall time.
func TestMeasureJiffy(t *testing.T) {
	privileged.Require(t)
	got, err := measureJiffy()
	if err != nil {
		t.Fatal(err)
	}
	hz, ok := configHZ()
	if !ok {
		if got < time.Millisecond || got > 42*time.Millisecond { // HZ 1000..24
			t.Fatalf("measured jiffy %v: no kernel has such a HZ", got)
		}
		return
	}
	if want := time.Second / time.Duration(hz); got != want {
		t.Fatalf("measured jiffy %v, CONFIG_HZ=%d says %v", got, hz, want)
	}
}

// TestConntrackClock checks the measured jiffy against wall time: the
// conntrack clock BPF uses must advance as CLOCK_MONOTONIC does, or every
// timeout would be off by the same factor.
func TestConntrackClock(t *testing.T) {
	d := newTestDatapath(t, Config{})
	a, err := d.ctNow()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	time.Sleep(300 * time.Millisecond)
	b, err := d.ctNow()
	if err != nil {
		t.Fatal(err)
	}
	wall := time.Since(start)
	got := time.Duration(b - a)
	// Both ends may be off by a tick (at most 10 ms for HZ=100).
	if got < wall-25*time.Millisecond || got > wall+25*time.Millisecond {
		t.Fatalf("conntrack clock advanced %v in %v of wall time", got, wall)
	}
}
