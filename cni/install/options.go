package install

import (
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"time"
)

// Defaults of Options.
const (
	DefaultBinDir  = "/opt/cni/bin"
	DefaultConfDir = "/etc/cni/net.d"
	// DefaultStateDirName is the state folder's name inside ConfDir. It is
	// hidden, and a folder: runtimes read only files with a config
	// extension, and not subfolders.
	DefaultStateDirName = ".bulkhead"
	// DefaultDebounce lets a primary CNI finish a burst of writes (flannel
	// writes its file in place, in several writes) before it is read.
	DefaultDebounce = 200 * time.Millisecond
	// DefaultResync re-checks the folder even without events, in case the
	// watch missed one (an inotify queue overflow).
	DefaultResync = time.Minute
)

// ErrNoConfig is returned when the CNI config folder has no network config
// to chain into.
var ErrNoConfig = errors.New("no CNI network config")

// Options says where the CNI files are and what the entry holds.
type Options struct {
	// BinDir is the CNI plugin folder (default /opt/cni/bin).
	BinDir string
	// ConfDir is the CNI network config folder (default /etc/cni/net.d).
	ConfDir string
	// StateDir keeps the primary's original file and the record of what
	// was changed, for Uninstall (default ConfDir/.bulkhead). It must be on
	// the node, not in the installer's container: an uninstall by a later
	// pod needs it.
	StateDir string
	// PluginBinary is the bulkhead-cni binary to copy into BinDir; empty
	// copies nothing (the entry alone is managed).
	PluginBinary string
	// Socket is the entry's "socket" (the agent API socket); empty leaves
	// it out, and the plugin uses its default.
	Socket string
	// Debounce and Resync tune Watch (defaults DefaultDebounce and
	// DefaultResync).
	Debounce time.Duration
	Resync   time.Duration
	Logger   *slog.Logger

	// beforeWrite, when set (tests), runs between saving the record and
	// writing the config, where an unlocked race would do harm.
	beforeWrite func()
}

func (o Options) withDefaults() Options {
	if o.BinDir == "" {
		o.BinDir = DefaultBinDir
	}
	if o.ConfDir == "" {
		o.ConfDir = DefaultConfDir
	}
	if o.StateDir == "" {
		o.StateDir = filepath.Join(o.ConfDir, DefaultStateDirName)
	}
	if o.Debounce <= 0 {
		o.Debounce = DefaultDebounce
	}
	if o.Resync <= 0 {
		o.Resync = DefaultResync
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return o
}

// binaryPath is where the plugin binary goes.
func (o Options) binaryPath() string { return filepath.Join(o.BinDir, PluginType) }
