package install

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Files in the state folder.
const (
	stateName    = "state.json"
	originalName = "original"
)

// record is what Install changed in the config folder, so that Uninstall
// can undo exactly that.
type record struct {
	// Managed is the file (a name in ConfDir) that holds our entry.
	Managed string `json:"managed"`
	// Source is the single-plugin config Managed was converted from, which
	// Install removed; empty when Managed is the primary's own conflist.
	Source string `json:"source,omitempty"`
	// Written is the SHA-256 of what Install last wrote to Managed: when
	// the file still has it, nobody else changed the file since.
	Written string `json:"written"`
	// Original says the state folder's "original" file holds the primary's
	// bytes before our entry was added (Source's when converted), and Mode
	// their permissions. False when Install found its entry already there
	// in a file it did not write last: then only the entry can be removed.
	Original bool        `json:"original"`
	Mode     fs.FileMode `json:"mode"`
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func loadRecord(stateDir string) (*record, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, stateName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read install state: %w", err)
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil || r.Managed == "" || filepath.Base(r.Managed) != r.Managed ||
		(r.Source != "" && filepath.Base(r.Source) != r.Source) {
		// A record we cannot trust must not steer a restore; without it
		// Uninstall still removes the entry from every config.
		return nil, fmt.Errorf("install state %s is corrupt; remove it to start over", filepath.Join(stateDir, stateName))
	}
	return &r, nil
}

func saveRecord(stateDir string, r *record) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := writeAtomic(filepath.Join(stateDir, stateName), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save install state: %w", err)
	}
	return nil
}

func saveOriginal(stateDir string, b []byte) error {
	if err := writeAtomic(filepath.Join(stateDir, originalName), b, 0o600); err != nil {
		return fmt.Errorf("save original config: %w", err)
	}
	return nil
}

func loadOriginal(stateDir string) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, originalName))
	if err != nil {
		return nil, fmt.Errorf("read original config: %w", err)
	}
	return b, nil
}

// clearState removes the state folder's files and the folder itself (when
// empty). The lock goes last, while still held.
func clearState(stateDir string) error {
	var errs []error
	for _, n := range []string{stateName, originalName, lockName} {
		if err := os.Remove(filepath.Join(stateDir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(stateDir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		// Something else lives there (a user's file): leave it.
		if !errors.Is(err, fs.ErrExist) && !isNotEmpty(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
