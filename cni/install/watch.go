package install

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The watch uses inotify through golang.org/x/sys/unix, which the module
// already links, rather than adding fsnotify for one folder (the agent's
// dirwatch does the same). Polling would either lag behind a primary's
// rewrite (pods created meanwhile go unenforced) or read the folder many
// times a second on every node.
const watchMask = unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_CREATE |
	unix.IN_DELETE | unix.IN_MODIFY | unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// Watch keeps bulkhead-cni chained until ctx is done: it installs at once,
// and again after every settled burst of changes in the config folder (the
// primary CNI rewriting its file, a new primary appearing, our entry or
// binary removed by hand), and every Resync in case an event was lost. A
// folder without a config is waited on; errors (a malformed file, an
// unsupported version) are logged and retried on the next change. Watch
// returns nil when ctx is done, and an error only when the folder cannot be
// watched.
func Watch(ctx context.Context, opts Options) error {
	o := opts.withDefaults()
	if err := os.MkdirAll(o.ConfDir, 0o755); err != nil {
		return fmt.Errorf("create CNI config folder: %w", err)
	}
	w, err := newWatcher(o.ConfDir)
	if err != nil {
		return err
	}
	defer func() { w.close() }()

	var lastErr string
	reconcile := func() {
		err := Install(o)
		switch {
		case err == nil:
			if lastErr != "" {
				o.Logger.Info("bulkhead-cni chained again")
			}
			lastErr = ""
		case err.Error() != lastErr:
			// Logged once per distinct problem: a missing config is
			// normal until the primary CNI starts.
			lvl := o.Logger.Error
			if errors.Is(err, ErrNoConfig) {
				lvl = o.Logger.Info
			}
			lvl("cannot chain bulkhead-cni yet; waiting for the next change", "error", err)
			lastErr = err.Error()
		}
	}
	reconcile()

	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	resync := time.NewTicker(o.Resync)
	defer resync.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-w.errs:
			return fmt.Errorf("watch %s: %w", o.ConfDir, err)
		case <-w.lost:
			// The folder was removed or moved: watch the new one.
			w.close()
			if err := os.MkdirAll(o.ConfDir, 0o755); err != nil {
				return fmt.Errorf("create CNI config folder: %w", err)
			}
			if w, err = newWatcher(o.ConfDir); err != nil {
				return err
			}
			debounce.Reset(o.Debounce)
		case <-w.changed:
			debounce.Reset(o.Debounce)
		case <-debounce.C:
			reconcile()
		case <-resync.C:
			reconcile()
		}
	}
}

// watcher reports changes to config files in one folder.
type watcher struct {
	f       *os.File
	changed chan struct{} // a config file changed (coalesced)
	lost    chan struct{} // the folder itself went away
	errs    chan error
	done    chan struct{}
}

func newWatcher(dir string) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, watchMask); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("watch %s: %w", dir, err)
	}
	// A non-blocking fd in an os.File reads through the runtime poller, so
	// close ends a pending read.
	w := &watcher{f: os.NewFile(uintptr(fd), "inotify"), changed: make(chan struct{}, 1),
		lost: make(chan struct{}, 1), errs: make(chan error, 1), done: make(chan struct{})}
	go w.read()
	return w, nil
}

func (w *watcher) close() {
	w.f.Close()
	<-w.done
}

func (w *watcher) read() {
	defer close(w.done)
	buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				w.errs <- err
			}
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameBytes := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
			name := strings.TrimRight(string(nameBytes), "\x00")
			off += unix.SizeofInotifyEvent + int(ev.Len)
			switch {
			case ev.Mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0:
				signal(w.lost)
				return
			case ev.Mask&unix.IN_Q_OVERFLOW != 0:
				signal(w.changed)
			case name != "" && !strings.HasPrefix(name, "."):
				// Hidden names are temporary files (ours too) and the
				// state folder: the rename that ends a write is the event.
				signal(w.changed)
			}
		}
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
