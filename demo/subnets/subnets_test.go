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

// TestLockFolderGoesWithTheLastHolder: nothing is left in the temp folder
// once every reservation is released, and a lock is still taken when the
// folder went away after Reserve made it.
func TestLockFolderGoesWithTheLastHolder(t *testing.T) {
	privileged.Require(t)
	t.Setenv("TMPDIR", t.TempDir()) // a folder of our own: other tests reserve too
	_, releaseA, err := Reserve([]int{199, 198})
	if err != nil {
		t.Fatal(err)
	}
	_, releaseB, err := Reserve([]int{199, 198})
	if err != nil {
		t.Fatal(err)
	}
	if err := releaseA(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(lockDir()); err != nil {
		t.Fatalf("the folder went while a lock was held: %v", err)
	}
	if err := releaseB(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(lockDir()); !os.IsNotExist(err) {
		t.Fatalf("%s left behind: %v", lockDir(), err)
	}
	if !tryLock(filepath.Join(lockDir(), "42")) {
		t.Fatal("no lock when the folder is missing")
	}
}
