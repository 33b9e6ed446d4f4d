package datapath

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/cilium/ebpf"
)

// ErrLoadedOtherwise: the pinned datapath was loaded with a tunnel mark
// other than the one asked for. Migrating would move the programs to the
// new mark while the policy routes of the old one stayed, so it is refused.
var ErrLoadedOtherwise = errors.New("the pinned datapath was loaded with another setting")

// legacyRecordPin names the map in which versions before the version record
// (versionPin) kept the tunnel mark they were loaded with.
const legacyRecordPin = "load_record"

// legacyRecord is that map's only value.
type legacyRecord struct {
	TunnelMark, TunnelMask uint32
}

// legacyVersion describes pins from before the version record: version 0,
// with the tunnel mark of their load_record (none in the oldest).
func (d *Datapath) legacyVersion() (Version, error) {
	v := Version{}
	m, err := ebpf.LoadPinnedMap(d.mapPin(legacyRecordPin), nil)
	if errors.Is(err, fs.ErrNotExist) {
		// The oldest pins: the migration loads the mark asked for.
		v.TunnelMark, v.TunnelMask = d.cfg.TunnelMark, d.cfg.TunnelMask
		return v, nil
	}
	if err != nil {
		return v, fmt.Errorf("open pinned %s: %w", legacyRecordPin, err)
	}
	defer m.Close()
	var got legacyRecord
	if err := m.Lookup(uint32(0), &got); err != nil {
		return v, fmt.Errorf("read pinned %s: %w", legacyRecordPin, err)
	}
	v.TunnelMark, v.TunnelMask = got.TunnelMark, got.TunnelMask
	return v, nil
}

// checkTunnelMark compares the pinned datapath's tunnel mark with the one
// asked for.
func (d *Datapath) checkTunnelMark(pinned Version) error {
	if pinned.TunnelMark == d.cfg.TunnelMark && pinned.TunnelMask == d.cfg.TunnelMask {
		return nil
	}
	return fmt.Errorf("%w: it steers tunnelled packets with mark %#x/%#x, not %#x/%#x; the mark takes effect "+
		"only when the datapath is loaded: keep %#x, or remove the pins under %s (enforcement stops until the "+
		"datapath is loaded again)", ErrLoadedOtherwise, pinned.TunnelMark, pinned.TunnelMask, d.cfg.TunnelMark,
		d.cfg.TunnelMask, pinned.TunnelMark, d.cfg.BPFFS)
}
