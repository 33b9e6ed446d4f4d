package datapath

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// mapRole says what a migration may do with a pinned map whose layout
// differs from this version's.
type mapRole int

const (
	// roleState maps hold what the agent told the datapath (endpoints,
	// policy, identities, quarantines): their entries are copied into a
	// map of another size; any other change is refused.
	roleState mapRole = iota
	// roleFlows: conntrack. It is carried over as it is, or the migration
	// is refused: established connections would lose their flows, and
	// their replies would be judged as new flows.
	roleFlows
	// roleCache maps are rebuilt from the state maps (the exact-match
	// tables, which BPF reads in front of the tries and may miss).
	roleCache
	// roleScratch maps may start empty: events in flight, reassembly and
	// rate-limit state, counters, the tunnel's sockets (the agent
	// registers them again).
	roleScratch
)

var mapRoles = map[string]mapRole{
	"endpoints_array": roleState, "endpoints": roleState, "ep_configs": roleState, "endpoint_addrs": roleState,
	"ep_quarantine": roleState, "quarantine_dns": roleState, "policy": roleState, "ipcache": roleState,
	"id_flags": roleState, "globals": roleState,
	"conntrack4": roleFlows, "conntrack6": roleFlows,
	"policy_exact": roleCache, "ipcache_hosts": roleCache,
	"fragments": roleScratch, "drop_events": roleScratch, "counters": roleScratch, "events": roleScratch,
	"tunnel_listener": roleScratch, "tunnel_socks": roleScratch,
}

// migration is a datapath being loaded beside the pinned one.
type migration struct {
	from  Version
	start time.Time
	// What happens to each map (see Migration), and the pinned maps the
	// copied ones are filled from.
	reused, copied, created, removed []string
	old                              map[string]*ebpf.Map
}

func (m *migration) close() {
	for _, mp := range m.old {
		mp.Close()
	}
}

// planMigration decides, map by map, how spec takes over the pinned maps:
// a map of the same layout is used as it is (PinByName finds it), a state
// map of another size is copied, a cache or scratch map is made anew, and
// anything else refuses the migration before anything is touched.
func (d *Datapath) planMigration(spec *ebpf.CollectionSpec, from Version) (*migration, error) {
	m := &migration{from: from, start: time.Now(), old: map[string]*ebpf.Map{}}
	names := make([]string, 0, len(mapRoles))
	for name := range d.pinnedMaps() {
		names = append(names, name)
	}
	slices.Sort(names)
	var refused []string
	for _, name := range names {
		ms := spec.Maps[name]
		old, err := ebpf.LoadPinnedMap(d.mapPin(name), nil)
		if errors.Is(err, fs.ErrNotExist) {
			ms.Pinning = ebpf.PinNone
			m.created = append(m.created, name)
			continue
		}
		if err != nil {
			m.close()
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		diff := ms.Compatible(old)
		if diff == nil {
			old.Close()
			ms.Pinning = ebpf.PinByName
			m.reused = append(m.reused, name)
			continue
		}
		ms.Pinning = ebpf.PinNone
		role, ok := mapRoles[name]
		switch {
		case !ok:
			refused = append(refused, fmt.Sprintf("%s (%v; no migration is defined for it)", name, diff))
		case role == roleState && old.Type() == ms.Type && old.KeySize() == ms.KeySize &&
			old.ValueSize() == ms.ValueSize && old.Flags() == ms.Flags:
			m.old[name] = old
			m.copied = append(m.copied, name)
			continue
		case role == roleState:
			refused = append(refused, fmt.Sprintf("%s (%v)", name, diff))
		case role == roleFlows:
			refused = append(refused, fmt.Sprintf("%s (%v: its tracked flows would be lost, and the replies of "+
				"established connections judged as new flows)", name, diff))
		default:
			m.created = append(m.created, name)
		}
		old.Close()
	}
	if len(refused) > 0 {
		m.close()
		return nil, fmt.Errorf("%w from %s: %s; the pinned datapath stays in place and enforcing: run the agent "+
			"version that pinned it, or remove the pins under %s to load this one (enforcement stops until it is loaded)",
			ErrNotMigratable, from, strings.Join(refused, "; "), d.cfg.BPFFS)
	}
	known := map[string]bool{}
	for _, n := range PinnedMapNames() {
		known[n] = true
	}
	entries, err := os.ReadDir(filepath.Join(d.cfg.BPFFS, "maps"))
	if err != nil {
		m.close()
		return nil, fmt.Errorf("list pinned maps: %w", err)
	}
	for _, e := range entries {
		if !known[e.Name()] {
			m.removed = append(m.removed, e.Name())
		}
	}
	return m, nil
}

// copyMaps fills the maps planMigration chose to copy from their pinned
// predecessors.
func (d *Datapath) copyMaps(m *migration) error {
	maps := d.pinnedMaps()
	for name, src := range m.old {
		dst := *maps[name]
		n, err := copyEntries(dst, src)
		if err != nil {
			return fmt.Errorf("copy %s (%d entries copied) into a map of %d entries: %w", name, n, dst.MaxEntries(), err)
		}
		d.log.Info("datapath map copied into its new size", "map", name, "entries", n,
			"from", src.MaxEntries(), "to", dst.MaxEntries())
	}
	return nil
}

// copyEntries copies src's entries into dst, which has the same key and
// value layout. An array's zero values past dst's end are not entries.
func copyEntries(dst, src *ebpf.Map) (int, error) {
	k := make([]byte, src.KeySize())
	v := make([]byte, src.ValueSize())
	zero := make([]byte, src.ValueSize())
	n := 0
	it := src.Iterate()
	for it.Next(&k, &v) {
		if src.Type() == ebpf.Array && bytes.Equal(v, zero) {
			continue
		}
		if err := dst.Update(k, v, ebpf.UpdateAny); err != nil {
			return n, err
		}
		n++
	}
	return n, it.Err()
}

// finishMigration puts the loaded datapath in the pinned one's place: the
// maps it made are pinned (each replacing its predecessor's pin in one
// rename), every attachment moves to the new programs in one atomic update
// each, the programs are pinned, the pins this layout lacks are removed,
// and the version record is written last. Each step is idempotent, so a
// migration cut short is done again by the next start. The programs the
// attachments left are freed by the kernel once nothing holds them.
func (d *Datapath) finishMigration(m *migration) error {
	maps := d.pinnedMaps()
	for _, name := range append(slices.Clone(m.copied), m.created...) {
		if err := pinReplacing(*maps[name], d.mapPin(name)); err != nil {
			return err
		}
	}
	if err := d.migrationStep("maps pinned"); err != nil {
		return err
	}
	swapStart := time.Now()
	swapped, err := d.swapAttachments()
	swapTook := time.Since(swapStart)
	if err != nil {
		return err
	}
	if err := d.migrationStep("attachments swapped"); err != nil {
		return err
	}
	for name, p := range d.pinnedProgs() {
		if err := pinReplacing(*p, d.progPin(name)); err != nil {
			return err
		}
	}
	if err := d.migrationStep("programs pinned"); err != nil {
		return err
	}
	for _, name := range m.removed {
		if err := unlinkPin(d.mapPin(name)); err != nil {
			return err
		}
	}
	v := d.version
	v.Migration = &Migration{From: m.from, At: m.start, Duration: time.Since(m.start), Reused: m.reused,
		Copied: m.copied, Created: m.created, Removed: m.removed, LinksSwapped: swapped, SwapDuration: swapTook}
	v.Migration.From.Migration = nil
	if err := d.pinVersion(v); err != nil {
		return err
	}
	d.version = v
	d.log.Info("datapath migrated", "from", m.from.String(), "to", v.String(), "links", swapped,
		"reused", len(m.reused), "copied", m.copied, "created", m.created, "removed", m.removed,
		"duration", v.Migration.Duration, "swap", swapTook)
	return nil
}

func (d *Datapath) migrationStep(step string) error {
	if d.cfg.migrationFault == nil {
		return nil
	}
	return d.cfg.migrationFault(step)
}

// swapAttachments points every attachment of the pinned datapath at this
// one's programs: the pinned TCX links (one BPF_LINK_UPDATE each, so the
// device is never without a program), and the cls_bpf filters of this
// netns's endpoints that have no TCX link (one filter replace each). Links
// whose device is gone are left for pruneGone.
func (d *Datapath) swapAttachments() (int, error) {
	progs := map[string]*ebpf.Program{bridgeHook.name: d.prog(bridgeHook.prog)}
	for _, h := range hooks() {
		progs[h.name] = d.prog(h.prog)
	}
	entries, err := os.ReadDir(d.linkDir())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("list links: %w", err)
	}
	n := 0
	var errs []error
	for _, e := range entries {
		parts := strings.Split(e.Name(), "_")
		if len(parts) != 3 || progs[parts[2]] == nil {
			continue
		}
		pin := filepath.Join(d.linkDir(), e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("open link pin %s: %w", pin, err))
			continue
		}
		err = l.Update(progs[parts[2]])
		if err != nil {
			if info, ierr := l.Info(); ierr == nil && info.TCX() != nil && info.TCX().Ifindex == 0 {
				err = nil // its device is gone
			}
		} else {
			n++
		}
		l.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("move link %s to the new program: %w", pin, err))
		}
	}
	c, err := d.swapClsact()
	return n + c, errors.Join(append(errs, err)...)
}

// swapClsact replaces the cls_bpf filters of endpoints attached without
// TCX in the calling netns.
func (d *Datapath) swapClsact() (int, error) {
	nsID, err := netnsID()
	if err != nil {
		return 0, err
	}
	links, err := netlink.LinkList()
	if err != nil {
		return 0, fmt.Errorf("list links: %w", err)
	}
	n := 0
	var errs []error
	for _, l := range links {
		idx := l.Attrs().Index
		if id, err := d.endpointOf(idx); err != nil || id == 0 {
			continue
		}
		if _, err := os.Stat(d.linkPin(nsID, idx, hooks()[0])); err == nil {
			continue
		}
		for _, h := range hooks() {
			filters, err := netlink.FilterList(l, h.parent)
			if err != nil {
				if !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
					errs = append(errs, fmt.Errorf("list filters of %s: %w", l.Attrs().Name, err))
				}
				continue
			}
			for _, f := range filters {
				bf, ok := f.(*netlink.BpfFilter)
				if !ok || !strings.HasPrefix(bf.Name, clsactFilterName) {
					continue
				}
				nf := clsactFilter(idx, h)
				nf.Fd = d.prog(h.prog).FD()
				if err := netlink.FilterReplace(nf); err != nil {
					errs = append(errs, fmt.Errorf("replace cls_bpf %s on %s: %w", h.name, l.Attrs().Name, err))
				} else {
					n++
				}
			}
		}
	}
	return n, errors.Join(errs...)
}
