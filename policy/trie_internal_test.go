package policy

import (
	"math/rand/v2"
	"testing"
)

// TestPortBlocks checks the port range decomposition:
// the blocks cover exactly [lo, hi], are aligned, and never exceed 30.
func TestPortBlocks(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	check := func(lo, hi uint32) {
		ps := portBlocks(lo, hi)
		if len(ps) > 30 {
			t.Fatalf("[%d,%d]: %d prefixes", lo, hi, len(ps))
		}
		next := lo
		for _, p := range ps {
			size := uint32(1) << (16 - p.bits)
			if uint32(p.base) != next || uint32(p.base)%size != 0 {
				t.Fatalf("[%d,%d]: block %+v not aligned or not contiguous at %d", lo, hi, p, next)
			}
			next += size
		}
		if next != hi+1 {
			t.Fatalf("[%d,%d]: blocks end at %d", lo, hi, next-1)
		}
	}
	check(0, 65535)
	check(1, 65534)
	check(80, 80)
	for range 20000 {
		a, b := rng.Uint32N(65536), rng.Uint32N(65536)
		if a > b {
			a, b = b, a
		}
		check(a, b)
	}
	if n := len(portBlocks(1, 65534)); n != 30 {
		t.Fatalf("[1,65534] takes %d prefixes, want the worst case 30", n)
	}
}
