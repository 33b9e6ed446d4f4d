package datapath

import (
	"testing"

	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

func TestEventRingSize(t *testing.T) {
	d := newTestDatapath(t, Config{EventRingBytes: 1 << 16})
	if got := d.objs.Events.MaxEntries(); got != 1<<16 {
		t.Fatalf("event ring is %d bytes, want %d", got, 1<<16)
	}
	privileged.Require(t)
	for _, bad := range []uint32{3000, 3 << 12} {
		if _, err := New(Config{BPFFS: testBPFFS(t), EventRingBytes: bad}); err == nil {
			t.Errorf("ring size %d accepted", bad)
		}
	}
}
