package datapath

import (
	"bufio"
	"crypto/sha256"
	_ "embed"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

//go:embed versions.txt
var versionsTxt string

// ErrNewerDatapath: the pinned datapath comes from a newer version of
// Bulkhead than this one. It is left as it is, enforcing; downgrading would
// have to undo a layout this version does not know.
var ErrNewerDatapath = errors.New("the pinned datapath is newer than this agent")

// ErrNotMigratable: the pinned datapath's layout cannot be carried over to
// this version's. It is left as it is, enforcing.
var ErrNotMigratable = errors.New("the pinned datapath cannot be migrated")

// Version identifies a loaded datapath: which BPF object it runs, with
// which load-time settings, and how it came to be. It is pinned next to
// the maps (versionPin) so that the next agent knows what it finds.
type Version struct {
	// Serial is the object's line in versions.txt; 0 is a datapath
	// pinned before versions were recorded.
	Serial int `json:"serial"`
	// Object is the SHA-256 of the BPF object (hex).
	Object string `json:"object,omitempty"`
	// Settings is a digest of the load-time settings the programs hold
	// as constants (timeouts, tunnel mark, table masks, map sizes).
	Settings   string    `json:"settings,omitempty"`
	TunnelMark uint32    `json:"tunnel_mark"`
	TunnelMask uint32    `json:"tunnel_mask"`
	LoadedAt   time.Time `json:"loaded_at,omitzero"`
	// Migration is the last migration that produced this datapath.
	Migration *Migration `json:"migration,omitempty"`
}

// Migration reports how a datapath took over from the one pinned before it.
type Migration struct {
	From     Version       `json:"from"`
	At       time.Time     `json:"at"`
	Duration time.Duration `json:"duration_ns"`
	// Maps carried over as they were (the programs now use them), copied
	// into a map of another size, created anew (empty, or rebuilt from
	// the others), and pins removed because this layout has no such map.
	Reused  []string `json:"reused,omitempty"`
	Copied  []string `json:"copied,omitempty"`
	Created []string `json:"created,omitempty"`
	Removed []string `json:"removed,omitempty"`
	// LinksSwapped counts the attachments (TCX links and cls_bpf
	// filters) moved to the new programs, each in one atomic update.
	LinksSwapped int `json:"links_swapped"`
	// SwapDuration is how long moving them took. The whole Duration is
	// mostly the verifier's; the old programs enforce until each move.
	SwapDuration time.Duration `json:"swap_duration_ns"`
}

// versionPin is the map that records the pinned datapath's Version.
const versionPin = "datapath_version"

// versionValueSize: a 2-byte little-endian length, then that much JSON, so
// that every version reads what the others wrote (JSON, not a struct
// layout).
const versionValueSize = 4096

func versionSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: versionPin, Type: ebpf.Array, KeySize: 4, ValueSize: versionValueSize, MaxEntries: 1}
}

// objectDigest is the SHA-256 of the embedded BPF object.
func objectDigest() string {
	sum := sha256.Sum256(_SegmentBytes)
	return hex.EncodeToString(sum[:])
}

// knownVersions parses versions.txt: serial by object digest, and the
// highest serial.
func knownVersions() (map[string]int, int, error) {
	out := map[string]int{}
	last := 0
	sc := bufio.NewScanner(strings.NewReader(versionsTxt))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 || len(f[1]) != 64 {
			return nil, 0, fmt.Errorf("versions.txt:%d: want \"SERIAL SHA256\", got %q", n, line)
		}
		serial, err := strconv.Atoi(f[0])
		if err != nil || serial != last+1 {
			return nil, 0, fmt.Errorf("versions.txt:%d: serial %q, want %d", n, f[0], last+1)
		}
		out[f[1]] = serial
		last = serial
	}
	return out, last, nil
}

// currentSerial is this build's serial: its object's line, or one past the
// last line for an object not listed yet (a build under development, newer
// than every release).
func currentSerial() int {
	known, last, err := knownVersions()
	if err != nil {
		panic(err) // versions.txt is embedded; TestVersionsListThisObject checks it
	}
	if s, ok := known[objectDigest()]; ok {
		return s
	}
	return last + 1
}

// settingsDigest digests the load-time settings of spec (after loadSpec set
// them): the constants the programs were given and every map's size. The
// kernel's measured tick is left out: it varies by a hair between runs,
// and a re-measured tick is no reason to replace the programs.
func settingsDigest(spec *ebpf.CollectionSpec) (string, error) {
	var lines []string
	for name, v := range spec.Variables {
		if name == "jiffy_ns" || !v.Constant() {
			continue
		}
		b := make([]byte, v.Size())
		if err := v.Get(b); err != nil {
			return "", fmt.Errorf("read %s: %w", name, err)
		}
		lines = append(lines, name+"="+hex.EncodeToString(b))
	}
	for name, m := range spec.Maps {
		lines = append(lines, fmt.Sprintf("map %s=%d", name, m.MaxEntries))
	}
	sort.Strings(lines)
	sum := sha256.Sum256([]byte(strings.Join(lines, "\n")))
	return hex.EncodeToString(sum[:16]), nil
}

func encodeVersion(v Version) ([]byte, error) {
	js, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	if len(js) > versionValueSize-2 {
		return nil, fmt.Errorf("datapath version record of %d bytes does not fit", len(js))
	}
	out := make([]byte, versionValueSize)
	binary.LittleEndian.PutUint16(out, uint16(len(js)))
	copy(out[2:], js)
	return out, nil
}

func decodeVersion(b []byte) (Version, error) {
	var v Version
	if len(b) < 2 {
		return v, errors.New("datapath version record too short")
	}
	n := int(binary.LittleEndian.Uint16(b))
	if n > len(b)-2 {
		return v, fmt.Errorf("datapath version record: length %d of %d", n, len(b)-2)
	}
	if err := json.Unmarshal(b[2:2+n], &v); err != nil {
		return v, fmt.Errorf("datapath version record: %w", err)
	}
	return v, nil
}

// PinnedVersion reads the Version of the datapath pinned under bpffs. ok is
// false when nothing is pinned there, or pins from before versions were
// recorded (then Serial is 0).
func PinnedVersion(bpffs string) (v Version, ok bool, err error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(bpffs, "maps", versionPin), nil)
	if errors.Is(err, fs.ErrNotExist) {
		return Version{}, false, nil
	}
	if err != nil {
		return Version{}, false, fmt.Errorf("open pinned %s: %w", versionPin, err)
	}
	defer m.Close()
	b := make([]byte, m.ValueSize())
	if err := m.Lookup(uint32(0), &b); err != nil {
		return Version{}, false, fmt.Errorf("read pinned %s: %w", versionPin, err)
	}
	v, err = decodeVersion(b)
	return v, err == nil, err
}

// pinVersion records v under the pins, replacing any earlier record in one
// rename: it is written last, so a migration cut short is done again.
func (d *Datapath) pinVersion(v Version) error {
	b, err := encodeVersion(v)
	if err != nil {
		return err
	}
	m, err := ebpf.NewMap(versionSpec())
	if err != nil {
		return fmt.Errorf("create %s map: %w", versionPin, err)
	}
	defer m.Close()
	if err := m.Update(uint32(0), b, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write %s: %w", versionPin, err)
	}
	return pinReplacing(m, d.mapPin(versionPin))
}

// pinner is what pinReplacing pins: maps and programs.
type pinner interface{ Pin(string) error }

// pinReplacing pins obj at path, replacing what is pinned there in one
// rename, so that the path never names nothing.
func pinReplacing(obj pinner, path string) error {
	tmp := path + "-next" // bpffs refuses names with a dot
	if err := unlinkPin(tmp); err != nil {
		return err
	}
	if err := obj.Pin(tmp); err != nil {
		return fmt.Errorf("pin %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = unlinkPin(tmp)
		return fmt.Errorf("pin %s: %w", path, err)
	}
	return nil
}

// unlinkPin removes a pin; one already gone is not an error. (os.Remove
// would report the EPERM of its rmdir fallback on bpffs instead.)
func unlinkPin(path string) error {
	if err := unix.Unlink(path); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// PinnedMapNames are the names of the maps this version pins under
// BPFFS/maps, its version record included.
func PinnedMapNames() []string {
	var d Datapath
	names := []string{versionPin}
	for name := range d.pinnedMaps() {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// Version is the running datapath's version, and the migration that made
// it, if any.
func (d *Datapath) Version() Version {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.version
}

// String names a version for logs and errors.
func (v Version) String() string {
	if v.Serial == 0 {
		return "version 0 (pinned before versions were recorded)"
	}
	obj := v.Object
	if len(obj) > 12 {
		obj = obj[:12]
	}
	return fmt.Sprintf("version %d (object %s, settings %s)", v.Serial, obj, v.Settings)
}
