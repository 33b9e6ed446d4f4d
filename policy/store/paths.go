package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// ParsePaths parses files and folders as the CLI names them: a folder
// contributes its store files (StoreFile, one level, as Load reads it), a
// file named on its own is read whatever its name. It returns the objects
// that decoded, in argument and then file order, and an error (a join of
// *Error, and of read errors) for what did not. It does not validate:
// Build does.
func ParsePaths(paths []string) ([]*Object, error) {
	var objs []*Object
	var errs []error
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			errs = append(errs, fmt.Errorf("read %s: %w", p, err))
			continue
		}
		files := []string{p}
		if fi.IsDir() {
			entries, err := os.ReadDir(p)
			if err != nil {
				errs = append(errs, fmt.Errorf("read %s: %w", p, err))
				continue
			}
			files = files[:0]
			for _, e := range entries {
				if StoreFile(e.Name()) && !e.IsDir() {
					files = append(files, filepath.Join(p, e.Name()))
				}
			}
		}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				errs = append(errs, fmt.Errorf("read %s: %w", f, err))
				continue
			}
			parsed, err := Parse(f, data)
			objs = append(objs, parsed...)
			if err != nil {
				errs = append(errs, err)
			}
		}
	}
	return objs, errors.Join(errs...)
}
