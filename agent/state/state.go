// Package state persists the agent's endpoint registry under --state-dir, so
// that an agent restarted after a crash (kill -9) knows which endpoints it
// manages before any CNI call arrives. Each record is one JSON file written
// atomically (temp file, fsync, rename, fsync of the folder): a crash leaves
// either the old record or the new one, never a torn one.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// ErrNotFound is returned by Get for a key that has no record.
var ErrNotFound = errors.New("record not found")

// Dir is a folder of JSON records of type T, one file per key.
type Dir[T any] struct {
	path string
}

// Open creates the folder if needed (mode 0700: records name pods and
// netns paths) and removes temp files a crash left behind.
func Open[T any](path string) (*Dir[T], error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("open state dir %s: %w", path, err)
	}
	leftovers, err := filepath.Glob(filepath.Join(path, ".tmp-*"))
	if err != nil {
		return nil, fmt.Errorf("open state dir %s: %w", path, err)
	}
	for _, f := range leftovers {
		_ = os.Remove(f)
	}
	return &Dir[T]{path: path}, nil
}

// Put writes the record for key atomically.
func (d *Dir[T]) Put(key string, v T) error {
	name, err := d.file(key)
	if err != nil {
		return err
	}
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode record %q: %w", key, err)
	}
	tmp, err := os.CreateTemp(d.path, ".tmp-*")
	if err != nil {
		return fmt.Errorf("write record %q: %w", key, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write record %q: %w", key, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sync record %q: %w", key, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write record %q: %w", key, err)
	}
	if err := os.Rename(tmp.Name(), name); err != nil {
		return fmt.Errorf("commit record %q: %w", key, err)
	}
	return d.syncDir()
}

// Get reads the record for key.
func (d *Dir[T]) Get(key string) (T, error) {
	var v T
	name, err := d.file(key)
	if err != nil {
		return v, err
	}
	data, err := os.ReadFile(name)
	if errors.Is(err, os.ErrNotExist) {
		return v, fmt.Errorf("record %q: %w", key, ErrNotFound)
	}
	if err != nil {
		return v, fmt.Errorf("read record %q: %w", key, err)
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return v, fmt.Errorf("decode record %q: %w", key, err)
	}
	return v, nil
}

// Delete removes the record for key. Deleting a missing record is not an
// error: CNI DEL is idempotent, and so is this.
func (d *Dir[T]) Delete(key string) error {
	name, err := d.file(key)
	if err != nil {
		return err
	}
	if err := os.Remove(name); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete record %q: %w", key, err)
	}
	return d.syncDir()
}

// Keys lists the keys of all records, sorted.
func (d *Dir[T]) Keys() ([]string, error) {
	ents, err := os.ReadDir(d.path)
	if err != nil {
		return nil, fmt.Errorf("list state dir %s: %w", d.path, err)
	}
	var keys []string
	for _, e := range ents {
		if k, ok := strings.CutSuffix(e.Name(), ".json"); ok && e.Type().IsRegular() {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys, nil
}

// LoadAll reads every record. Records that cannot be decoded are returned
// in bad (key → error) rather than failing the whole load: one corrupt file
// must not make the agent forget every other endpoint.
func (d *Dir[T]) LoadAll() (good map[string]T, bad map[string]error, err error) {
	keys, err := d.Keys()
	if err != nil {
		return nil, nil, err
	}
	good, bad = make(map[string]T, len(keys)), map[string]error{}
	for _, k := range keys {
		v, err := d.Get(k)
		if err != nil {
			bad[k] = err
			continue
		}
		good[k] = v
	}
	return good, bad, nil
}

// file maps a key to its path. Keys come from CNI (container IDs, interface
// names), so they are checked rather than trusted as path elements.
func (d *Dir[T]) file(key string) (string, error) {
	if key == "" || strings.ContainsAny(key, "/\\\x00") || strings.HasPrefix(key, ".") || len(key) > 200 {
		return "", fmt.Errorf("invalid record key %q", key)
	}
	return filepath.Join(d.path, key+".json"), nil
}

func (d *Dir[T]) syncDir() error {
	f, err := os.Open(d.path)
	if err != nil {
		return fmt.Errorf("sync state dir: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync state dir: %w", err)
	}
	return nil
}

// Quarantine moves key's record aside as <key>.json.bad-<time>, where
// Keys and LoadAll no longer see it and an operator can inspect it. A
// record that cannot be read is never deleted: it may be the only trace of
// an endpoint the agent still enforces. It returns the new file's path.
func (d *Dir[T]) Quarantine(key string) (string, error) {
	name, err := d.file(key)
	if err != nil {
		return "", err
	}
	bad := name + ".bad-" + time.Now().UTC().Format("20060102T150405.000000000Z")
	if err := os.Rename(name, bad); err != nil {
		return "", fmt.Errorf("quarantine record %q: %w", key, err)
	}
	return bad, d.syncDir()
}

// Quarantined lists the records that Quarantine moved aside.
func (d *Dir[T]) Quarantined() ([]string, error) {
	matches, err := filepath.Glob(filepath.Join(d.path, "*.json.bad-*"))
	if err != nil {
		return nil, fmt.Errorf("list quarantined records: %w", err)
	}
	slices.Sort(matches)
	return matches, nil
}
