package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/cilium/ebpf"
)

// ErrLoadedOtherwise: the pinned datapath was loaded with a setting that
// differs from the one asked for, and which cannot change without loading
// it anew. Re-opening it would ignore the setting.
var ErrLoadedOtherwise = errors.New("the pinned datapath was loaded with another setting")

// loadRecordPin names the map that keeps the load-time settings that
// re-opening must honour. The programs hold them as constants (.rodata,
// which is not pinned), so they are recorded next to the pinned maps.
const loadRecordPin = "load_record"

// loadRecord is that map's only value.
type loadRecord struct {
	TunnelMark, TunnelMask uint32
}

func (d *Datapath) recordOf() loadRecord {
	return loadRecord{TunnelMark: d.cfg.TunnelMark, TunnelMask: d.cfg.TunnelMask}
}

func loadRecordSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: loadRecordPin, Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1}
}

// pinLoadRecord records the settings a fresh load used.
func (d *Datapath) pinLoadRecord() error {
	m, err := ebpf.NewMap(loadRecordSpec())
	if err != nil {
		return fmt.Errorf("create %s map: %w", loadRecordPin, err)
	}
	defer m.Close()
	if err := m.Update(uint32(0), d.recordOf(), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write %s: %w", loadRecordPin, err)
	}
	// A load that failed after this point left its record: this load
	// supersedes it.
	if err := os.Remove(d.mapPin(loadRecordPin)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("replace %s: %w", loadRecordPin, err)
	}
	if err := m.Pin(d.mapPin(loadRecordPin)); err != nil {
		return fmt.Errorf("pin %s: %w", loadRecordPin, err)
	}
	return nil
}

// checkLoadRecord compares the pinned datapath's settings with the ones
// asked for. Pins from before the record existed cannot be checked: that
// is logged, and they are used as they are.
func (d *Datapath) checkLoadRecord() error {
	m, err := ebpf.LoadPinnedMap(d.mapPin(loadRecordPin), nil)
	if errors.Is(err, fs.ErrNotExist) {
		d.log.Warn("the pinned datapath has no record of its load-time settings (pinned by an older version): "+
			"the tunnel mark it was loaded with cannot be checked", "tunnel_mark", fmt.Sprintf("%#x", d.cfg.TunnelMark))
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned %s: %w", loadRecordPin, err)
	}
	defer m.Close()
	var got loadRecord
	if err := m.Lookup(uint32(0), &got); err != nil {
		return fmt.Errorf("read pinned %s: %w", loadRecordPin, err)
	}
	if want := d.recordOf(); got != want {
		return fmt.Errorf("%w: it steers tunnelled packets with mark %#x/%#x, not %#x/%#x; the mark takes effect "+
			"only when the datapath is loaded: keep %#x, or remove the pins under %s (enforcement stops until the "+
			"datapath is loaded again)", ErrLoadedOtherwise, got.TunnelMark, got.TunnelMask, want.TunnelMark,
			want.TunnelMask, got.TunnelMark, d.cfg.BPFFS)
	}
	return nil
}
