package subnets

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

func TestReserveSkipsHeldAndReclaimsDead(t *testing.T) {
	privileged.Require(t) // lists routes through netlink
	// 10.213.199.0/24 and .198: held by this live process first.
	a, releaseA, err := Reserve([]int{199, 198})
	if err != nil {
		t.Fatal(err)
	}
	defer releaseA()
	b, releaseB, err := Reserve([]int{199, 198})
	if err != nil {
		t.Fatal(err)
	}
	defer releaseB()
	if a == b {
		t.Fatalf("both reservations got %v", a)
	}
	// A lock left by a dead process is taken over.
	lock := filepath.Join(lockDir(), "197")
	if err := os.WriteFile(lock, []byte(strconv.Itoa(1<<22+12345)), 0o600); err != nil {
		t.Fatal(err)
	}
	c, releaseC, err := Reserve([]int{197})
	if err != nil {
		t.Fatalf("dead holder's lock not reclaimed: %v", err)
	}
	defer releaseC()
	if c.String() != "10.213.197.0/24" {
		t.Fatalf("got %v", c)
	}
	if _, _, err := Reserve([]int{197}); err == nil {
		t.Fatal("a held /24 was handed out twice")
	}
}
