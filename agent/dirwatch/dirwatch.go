// Package dirwatch tells the agent when the files of a `dir:` store change.
// It reacts only to complete changes: a file closed after writing, a rename
// into the folder, a removal, kubelet's swap of a ConfigMap volume's ..data
// link, and the replacement of the folder itself. A file that is being
// written (modified and not yet closed) holds every reload back until it is
// closed, so a writer that writes a file in pieces is never read halfway.
// Bursts (an editor's write-rename, `cp` of many files) are debounced into
// one reload. It uses inotify directly: fsnotify does not expose
// IN_CLOSE_WRITE, and cannot say whether events are queued right now.
package dirwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Reload reads the folder. quiet reports whether nothing in the folder has
// changed since this reload began; a reload must use what it read only if
// quiet() is true once it has read everything. Reload returns false to be
// called again after the debounce (it read a file that was changing).
type Reload func(quiet func() bool) bool

// Options tunes Watch.
type Options struct {
	// Debounce is how long the folder must be quiet before a reload.
	Debounce time.Duration
	// StoreFile says which names are store files; hidden names never are.
	StoreFile func(name string) bool
	Logger    *slog.Logger
}

// dataLink is the symlink kubelet renames over to update a ConfigMap
// volume in one step.
const dataLink = "..data"

// writingWarnAfter is how long a file may stay open for writing before the
// log says that it holds reloads back.
const writingWarnAfter = 10 * time.Second

const (
	dirMask = unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_CREATE | unix.IN_DELETE |
		unix.IN_MODIFY | unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR
	parentMask = unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_DELETE | unix.IN_ONLYDIR
)

// Watch calls reload once at start and then after every settled burst of
// complete changes, until ctx is done. reload runs on the caller's
// goroutine, never concurrently with itself. Watch fails when dir cannot be
// watched at start; later, a folder that disappears is watched again when
// it reappears (and reload is called, to report it missing meanwhile).
func Watch(ctx context.Context, dir string, opt Options, reload Reload) error {
	if opt.Debounce <= 0 {
		opt.Debounce = 200 * time.Millisecond
	}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	w, err := newWatcher(dir, opt)
	if err != nil {
		return err
	}
	defer w.f.Close()
	// Closing the inotify file ends a blocked Read.
	stop := context.AfterFunc(ctx, func() { _ = w.f.Close() })
	defer stop()
	return w.run(ctx, reload)
}

type watcher struct {
	dir, parent, base string
	opt               Options
	f                 *os.File
	raw               syscall.RawConn
	// dirWD watches dir (-1: dir is missing); parentWD watches its parent
	// for the replacement of dir itself (-1: none).
	dirWD, parentWD int
	// writing holds the files modified and not closed since, and when
	// each was first seen so.
	writing map[string]time.Time
	warned  bool
	// pending says a reload is due at due.
	pending bool
	due     time.Time
	// changed says a relevant event arrived since the current reload
	// began.
	changed bool
	buf     []byte
}

func newWatcher(dir string, opt Options) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("watch %s: inotify: %w", dir, err)
	}
	w := &watcher{
		dir: filepath.Clean(dir), opt: opt, f: os.NewFile(uintptr(fd), "inotify"),
		dirWD: -1, parentWD: -1, writing: map[string]time.Time{},
		buf: make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1)),
	}
	w.parent, w.base = filepath.Dir(w.dir), filepath.Base(w.dir)
	if w.raw, err = w.f.SyscallConn(); err != nil {
		w.f.Close()
		return nil, fmt.Errorf("watch %s: %w", dir, err)
	}
	if w.dirWD, err = w.add(w.dir, dirMask); err != nil {
		w.f.Close()
		return nil, fmt.Errorf("watch %s: %w", dir, err)
	}
	if w.parent != w.dir {
		if w.parentWD, err = w.add(w.parent, parentMask); err != nil {
			w.f.Close()
			return nil, fmt.Errorf("watch %s: %w", w.parent, err)
		}
	}
	return w, nil
}

// add adds an inotify watch; it follows symlinks, so a store path that is
// a symlink to a versioned folder is watched where it points.
func (w *watcher) add(path string, mask uint32) (int, error) {
	var wd int
	var err error
	if cerr := w.raw.Control(func(fd uintptr) { wd, err = unix.InotifyAddWatch(int(fd), path, mask) }); cerr != nil {
		return -1, cerr
	}
	return wd, err
}

func (w *watcher) run(ctx context.Context, reload Reload) error {
	if !reload(w.quiet) {
		w.schedule()
	}
	for {
		deadline := time.Time{}
		if w.pending {
			deadline = w.due
		}
		if err := w.f.SetReadDeadline(deadline); err != nil {
			return w.closed(ctx, err)
		}
		n, err := w.f.Read(w.buf)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			if len(w.writing) > 0 {
				// A file is being written: what it holds now may be
				// half of it. Look again after another debounce.
				w.warnWriting()
				w.schedule()
				continue
			}
			w.pending, w.changed = false, false
			if !reload(w.quiet) {
				w.schedule()
			}
		case err != nil:
			return w.closed(ctx, err)
		default:
			w.handle(w.buf[:n])
		}
	}
}

func (w *watcher) closed(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("watch %s: %w", w.dir, err)
}

// quiet reads every event queued now, without waiting, and reports whether
// none of them (nor any read since the reload began) is relevant. inotify
// queues an event when the change happens, so a change made before the
// reload finished reading is in the queue by now.
func (w *watcher) quiet() bool {
	// The deadline that started this reload has passed, and a read
	// past its deadline would not look at the queue at all.
	if err := w.f.SetReadDeadline(time.Time{}); err != nil {
		return false
	}
	for {
		var n int
		var rerr error
		if err := w.raw.Read(func(fd uintptr) bool {
			n, rerr = unix.Read(int(fd), w.buf)
			return true
		}); err != nil {
			return false
		}
		if rerr != nil || n <= 0 {
			break // EAGAIN: nothing queued
		}
		w.handle(w.buf[:n])
	}
	return !w.changed
}

func (w *watcher) schedule() {
	w.pending = true
	w.due = time.Now().Add(w.opt.Debounce)
}

func (w *watcher) warnWriting() {
	if w.warned {
		return
	}
	for name, since := range w.writing {
		if time.Since(since) > writingWarnAfter {
			w.opt.Logger.Warn("store file open for writing; reloads wait until it is closed (write a temporary file and rename it into place)",
				"file", filepath.Join(w.dir, name), "since", since)
			w.warned = true
			return
		}
	}
}

// handle applies a buffer of inotify events.
func (w *watcher) handle(buf []byte) {
	for off := 0; off+unix.SizeofInotifyEvent <= len(buf); {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
		end := off + unix.SizeofInotifyEvent + int(ev.Len)
		if end > len(buf) {
			// The kernel returns whole events only; treat a short one
			// as lost events.
			w.event(-1, unix.IN_Q_OVERFLOW, "")
			return
		}
		nameBytes := buf[off+unix.SizeofInotifyEvent : end]
		off = end
		name := string(trimNUL(nameBytes))
		w.event(int(ev.Wd), ev.Mask, name)
	}
}

func (w *watcher) event(wd int, mask uint32, name string) {
	switch {
	case mask&unix.IN_Q_OVERFLOW != 0:
		// Events were lost, closes included: start over.
		clear(w.writing)
		w.changed = true
		w.schedule()
	case wd == w.parentWD && w.parentWD >= 0:
		if name == w.base {
			// The store folder itself was replaced, removed or
			// (re)created: watch whatever is there now.
			w.rewatch()
		}
	case wd == w.dirWD && w.dirWD >= 0:
		if mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0 {
			w.rewatch()
			return
		}
		if !w.relevant(name) {
			return
		}
		w.changed = true
		switch {
		case mask&unix.IN_MODIFY != 0:
			if _, ok := w.writing[name]; !ok {
				w.writing[name] = time.Now()
			}
		case mask&unix.IN_CREATE != 0 && w.createdForWriting(name):
			// A file created by open(O_CREAT) is closed later, with
			// IN_CLOSE_WRITE; until then it may hold half its content.
			w.writing[name] = time.Now()
		default:
			// IN_CLOSE_WRITE, IN_MOVED_TO, IN_MOVED_FROM, IN_DELETE,
			// IN_ATTRIB, and IN_CREATE of a symlink or a hard link.
			delete(w.writing, name)
			if len(w.writing) == 0 {
				w.warned = false
			}
			w.schedule()
		}
	}
}

// relevant: store files, and kubelet's ..data link; not editor swap files
// or the hidden folders of a ConfigMap volume.
func (w *watcher) relevant(name string) bool {
	if name == dataLink {
		return true
	}
	if name == "" || name[0] == '.' {
		return false
	}
	if w.opt.StoreFile != nil {
		return w.opt.StoreFile(name)
	}
	return true
}

// createdForWriting reports whether name is a regular file with one link:
// made by open(O_CREAT), as opposed to a symlink or a hard link, which are
// complete when they appear.
func (w *watcher) createdForWriting(name string) bool {
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(w.dir, name), &st); err != nil {
		return false
	}
	return st.Mode&unix.S_IFMT == unix.S_IFREG && st.Nlink == 1
}

// rewatch watches the store folder again after it was replaced, removed or
// renamed, and schedules a reload (which reports a missing folder while the
// last good state stays enforced).
func (w *watcher) rewatch() {
	if w.dirWD >= 0 {
		_ = w.raw.Control(func(fd uintptr) { _, _ = unix.InotifyRmWatch(int(fd), uint32(w.dirWD)) })
	}
	clear(w.writing)
	wd, err := w.add(w.dir, dirMask)
	if err != nil {
		w.dirWD = -1
		w.opt.Logger.Warn("store folder is gone; the last good state stays enforced until it is back", "dir", w.dir, "error", err)
	} else {
		w.dirWD = wd
	}
	w.changed = true
	w.schedule()
}

func trimNUL(b []byte) []byte {
	for i, c := range b {
		if c == 0 {
			return b[:i]
		}
	}
	return b
}
