package detect

import (
	"net/netip"
	"testing"
	"time"
)

func TestScanDetector(t *testing.T) {
	d := NewScanDetector(5, 10*time.Second)
	t0 := time.Unix(1000, 0)
	dst := netip.MustParseAddr("10.0.0.9")
	port := func(p uint16) ScanTarget { return ScanTarget{Addr: dst, Proto: 6, Port: p} }
	// The same destination again and again is one destination.
	for i := range 50 {
		if fired, _ := d.Observe(1, port(80), t0.Add(time.Duration(i)*time.Millisecond)); fired {
			t.Fatal("retries of one destination fired")
		}
	}
	// Four more distinct ones: the fifth in all fires, naming them.
	for p := uint16(1); p <= 3; p++ {
		if fired, _ := d.Observe(1, port(p), t0.Add(time.Second)); fired {
			t.Fatalf("fired at %d destinations", p+1)
		}
	}
	fired, targets := d.Observe(1, port(4), t0.Add(2*time.Second))
	if !fired || len(targets) != 5 {
		t.Fatalf("fifth destination: fired %v, targets %v", fired, targets)
	}
	// Quiet for a window after it fired.
	for p := uint16(100); p < 120; p++ {
		if fired, _ := d.Observe(1, port(p), t0.Add(3*time.Second)); fired {
			t.Fatal("fired again within the window")
		}
	}
	// Another endpoint has its own count.
	for p := uint16(1); p <= 4; p++ {
		if fired, _ := d.Observe(2, port(p), t0.Add(3*time.Second)); fired {
			t.Fatal("endpoint 2 fired on endpoint 1's count")
		}
	}
	// Slow probing, one destination every 3 s, never has 5 in a window.
	for i := range 20 {
		if fired, _ := d.Observe(3, port(uint16(i)), t0.Add(time.Duration(i)*3*time.Second)); fired {
			t.Fatalf("slow probing fired at probe %d", i)
		}
	}
	// After the quiet window, endpoint 1 can fire again.
	var again bool
	for p := uint16(200); p < 210 && !again; p++ {
		again, _ = d.Observe(1, port(p), t0.Add(13*time.Second))
	}
	if !again {
		t.Error("endpoint 1 did not fire again after its quiet window")
	}
	// Idle endpoints are swept.
	d.Observe(9, port(1), t0.Add(time.Hour))
	if len(d.eps) != 1 {
		t.Errorf("%d endpoints kept after an hour, want 1", len(d.eps))
	}
}
