package install

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// configExts are the extensions libcni's ConfFiles lists, which containerd
// and CRI-O use to pick the network config.
var configExts = []string{".conf", ".conflist", ".json"}

// candidates returns the config files a runtime would consider, in the
// order it considers them (libcni sorts the names bytewise). Hidden names
// are skipped: they are temporary files (ours and editors') and the state
// folder, and no runtime would pick one on purpose.
func candidates(confDir string) ([]string, error) {
	ents, err := os.ReadDir(confDir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("read CNI config folder: %w", err)
	}
	var names []string
	for _, e := range ents {
		n := e.Name()
		if strings.HasPrefix(n, ".") || e.IsDir() || !slices.Contains(configExts, filepath.Ext(n)) {
			continue
		}
		names = append(names, n)
	}
	slices.Sort(names)
	return names, nil
}

// primary returns the file the runtime uses.
func primary(confDir string) (string, error) {
	names, err := candidates(confDir)
	if err != nil {
		return "", err
	}
	if len(names) == 0 {
		return "", fmt.Errorf("%w (*.conflist, *.conf or *.json) in %s", ErrNoConfig, confDir)
	}
	return names[0], nil
}

func isListName(name string) bool { return filepath.Ext(name) == ".conflist" }

// convertedName is the conflist a single-plugin config becomes. Keeping the
// base name keeps its place in the runtime's order.
func convertedName(name string) string {
	return strings.TrimSuffix(name, filepath.Ext(name)) + ".conflist"
}

// hasEntry says whether a conflist's content holds bulkhead-cni's entry.
func hasEntry(data []byte) bool {
	l, err := parseList(data)
	return err == nil && len(l.ours()) > 0
}

func isNotEmpty(err error) bool { return errors.Is(err, syscall.ENOTEMPTY) }

// Install copies the plugin binary into the CNI bin folder and chains
// bulkhead-cni into the primary network config (converting a single-plugin
// config to a conflist). Run again, it changes nothing: a second Install
// leaves every file byte for byte as it was. When the runtime's primary is
// now another file than the one Install last managed, that one is given back
// first. A malformed or unsupported primary is reported naming the file, and
// nothing is written.
func Install(opts Options) error {
	o := opts.withDefaults()
	unlock, err := lock(o.StateDir)
	if err != nil {
		return err
	}
	defer unlock()
	return o.insertLocked()
}

// insertLocked is Install under the lock.
func (o Options) insertLocked() error {
	rec, err := loadRecord(o.StateDir)
	if err != nil {
		return err
	}
	name, err := primary(o.ConfDir)
	if err != nil {
		return err
	}
	if rec != nil && name != rec.Managed && name != rec.Source {
		// A file now sorts before ours (a new primary CNI came up), or ours
		// is gone: the runtime no longer reads the file we changed, so it
		// goes back to the primary's own.
		o.Logger.Info("primary CNI config changed; restoring the one chained before", "old", rec.Managed, "new", name)
		if err := o.restore(rec); err != nil {
			// The runtime no longer reads that file: an entry left in it
			// does no harm, and must not keep the new primary unchained.
			o.Logger.Warn("could not restore the config chained before", "file", rec.Managed, "error", err)
		}
		if err := clearRecord(o.StateDir); err != nil {
			return err
		}
		rec = nil
		if name, err = primary(o.ConfDir); err != nil {
			return err
		}
	}
	path := filepath.Join(o.ConfDir, name)
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	isList := isListName(name)
	target := name
	if !isList {
		target = convertedName(name)
		if err := o.checkConvertTarget(rec, target); err != nil {
			return fmt.Errorf("convert %s: %w", path, err)
		}
	}
	out, changed, err := insert(data, isList, o.Socket)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	// The binary goes before the entry, and under the lock: a runtime that
	// reads the entry must find it, and a concurrent Uninstall must not
	// remove it in between. It waits for a config that can take the entry,
	// so that a failed install leaves nothing behind.
	if o.PluginBinary != "" {
		if err := copyBinary(o.PluginBinary, o.binaryPath()); err != nil {
			return err
		}
	}
	if !changed {
		if rec == nil || rec.Managed != name {
			// Our entry is there but the record is not (a state folder
			// wiped): only the entry can be taken out later.
			o.Logger.Info("bulkhead-cni entry found in place without an install record", "file", path)
			return saveRecord(o.StateDir, &record{Managed: name, Written: digest(data), Mode: st.Mode().Perm()})
		}
		return nil
	}
	next := &record{Managed: target, Written: digest(out), Mode: st.Mode().Perm()}
	if !isList {
		next.Source = name
	}
	switch {
	case !isList || !hasEntry(data):
		// The primary's own bytes: what Uninstall gives back.
		if err := saveOriginal(o.StateDir, data); err != nil {
			return err
		}
		next.Original = true
	case rec != nil && rec.Managed == target && rec.Written == digest(data):
		// Our own last write, changed again (a new socket): what it
		// was made from stays what Uninstall gives back.
		next.Source, next.Original, next.Mode = rec.Source, rec.Original, rec.Mode
	default:
		// Someone changed the file since we wrote it and kept our entry:
		// the saved original no longer is the primary's file.
		next.Original = false
	}
	// The record first: if the writes below do not happen, it still says
	// which files may hold our entry.
	if err := saveRecord(o.StateDir, next); err != nil {
		return err
	}
	if o.beforeWrite != nil {
		o.beforeWrite()
	}
	if err := writeAtomic(filepath.Join(o.ConfDir, target), out, st.Mode().Perm()); err != nil {
		return err
	}
	if !isList {
		// One config per network: the runtime must not pick the .conf
		// without the entry (it sorts first).
		if err := removeSynced(path); err != nil {
			return fmt.Errorf("remove %s after converting it to %s: %w", path, target, err)
		}
	}
	o.Logger.Info("bulkhead-cni chained into the primary CNI config", "file", filepath.Join(o.ConfDir, target), "converted", next.Source)
	return nil
}

// checkConvertTarget refuses to overwrite a conflist that is not ours.
func (o Options) checkConvertTarget(rec *record, target string) error {
	b, err := os.ReadFile(filepath.Join(o.ConfDir, target))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if (rec != nil && rec.Managed == target) || hasEntry(b) {
		return nil
	}
	return fmt.Errorf("%s exists and is not bulkhead's", target)
}

// clearRecord drops the record and the saved original (not the lock).
func clearRecord(stateDir string) error {
	for _, n := range []string{stateName, originalName} {
		if err := os.Remove(filepath.Join(stateDir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("clear install state: %w", err)
		}
	}
	return nil
}

// restore undoes what rec says Install did: the primary's original bytes
// when the file is still as Install wrote it, otherwise only our entry is
// taken out of what the file holds now.
func (o Options) restore(rec *record) error {
	path := filepath.Join(o.ConfDir, rec.Managed)
	cur, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if rec.Original && digest(cur) == rec.Written {
		orig, err := loadOriginal(o.StateDir)
		if err != nil {
			return err
		}
		if rec.Source == "" {
			return writeAtomic(path, orig, rec.Mode)
		}
		src := filepath.Join(o.ConfDir, rec.Source)
		if _, err := os.Stat(src); errors.Is(err, fs.ErrNotExist) {
			if err := writeAtomic(src, orig, rec.Mode); err != nil {
				return err
			}
		}
		// Else the primary wrote its config again since: that one wins,
		// and the conflist made from the old one goes.
		if err := removeSynced(path); err != nil {
			return fmt.Errorf("remove %s: %w", path, err)
		}
		return nil
	}
	return o.removeEntryFrom(rec.Managed, cur)
}

// removeEntryFrom takes our entry out of a conflist's content cur and
// writes the file back if it held one. A file that does not parse is left
// as it is, and reported.
func (o Options) removeEntryFrom(name string, cur []byte) error {
	if !isListName(name) {
		return nil
	}
	path := filepath.Join(o.ConfDir, name)
	l, err := parseList(cur)
	if err != nil {
		return fmt.Errorf("%s: %w: %w", path, ErrMalformed, err)
	}
	if !l.removeEntry() {
		return nil
	}
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	if err := writeAtomic(path, l.marshal(), st.Mode().Perm()); err != nil {
		return err
	}
	o.Logger.Info("bulkhead-cni entry removed", "file", path)
	return nil
}

// Uninstall removes what Install added: the primary's original file comes
// back byte for byte when nobody changed it since Install wrote it;
// otherwise (the primary rewrote it) only our entry is taken out of the file
// as it is now. Any other config that still holds our entry loses it too,
// then the plugin binary and the state folder go.
func Uninstall(opts Options) error {
	o := opts.withDefaults()
	unlock, err := lock(o.StateDir)
	if err != nil {
		return err
	}
	defer unlock()
	var errs []error
	rec, err := loadRecord(o.StateDir)
	if err != nil {
		// Without a record the sweep below still removes every entry.
		o.Logger.Warn("install state unreadable; removing the entry without restoring the original", "error", err)
	}
	if rec != nil {
		if err := o.restore(rec); err != nil {
			errs = append(errs, err)
		}
	}
	names, err := candidates(o.ConfDir)
	if err != nil {
		errs = append(errs, err)
	}
	for _, n := range names {
		cur, err := os.ReadFile(filepath.Join(o.ConfDir, n))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if isListName(n) && hasEntry(cur) {
			if err := o.removeEntryFrom(n, cur); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		// The record stays, so a retry can still restore the original.
		return errors.Join(errs...)
	}
	if err := os.Remove(o.binaryPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove plugin binary: %w", err)
	}
	return clearState(o.StateDir)
}

// Installed reports whether the runtime's network config (the primary)
// chains bulkhead-cni. With no config at all it returns an error wrapping
// ErrNoConfig.
func Installed(opts Options) (bool, error) {
	o := opts.withDefaults()
	name, err := primary(o.ConfDir)
	if err != nil {
		return false, err
	}
	if !isListName(name) {
		return false, nil
	}
	b, err := os.ReadFile(filepath.Join(o.ConfDir, name))
	if err != nil {
		return false, fmt.Errorf("read %s: %w", name, err)
	}
	return hasEntry(b), nil
}
