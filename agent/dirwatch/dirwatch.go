// Package dirwatch tells the agent when the YAML files of a `dir:` store
// change. It debounces bursts (an editor's write-rename-chmod, `cp -r` of many
// files) into one reload, so that a half-copied set of files is read once
// after it settles rather than many times while it is inconsistent.
package dirwatch

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Watch calls reload once at start and then after every settled burst of
// changes to *.yaml or *.yml files in dir, until ctx is done. A burst has
// settled when no event arrived for debounce. reload runs on the caller's
// goroutine, never concurrently with itself.
func Watch(ctx context.Context, dir string, debounce time.Duration, reload func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch %s: %w", dir, err)
	}
	defer w.Close()
	if err := w.Add(dir); err != nil {
		return fmt.Errorf("watch %s: %w", dir, err)
	}
	reload()

	timer := time.NewTimer(debounce)
	if !timer.Stop() {
		<-timer.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return fmt.Errorf("watch %s: watcher closed", dir)
			}
			if !relevant(ev) {
				continue
			}
			timer.Reset(debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return fmt.Errorf("watch %s: watcher closed", dir)
			}
			// An overflowed inotify queue loses events: reload to be safe.
			if err == fsnotify.ErrEventOverflow {
				timer.Reset(debounce)
				continue
			}
			return fmt.Errorf("watch %s: %w", dir, err)
		case <-timer.C:
			reload()
		}
	}
}

// relevant ignores editor swap files, hidden files and other extensions.
func relevant(ev fsnotify.Event) bool {
	name := filepath.Base(ev.Name)
	if strings.HasPrefix(name, ".") {
		return false
	}
	ext := filepath.Ext(name)
	return ext == ".yaml" || ext == ".yml"
}
