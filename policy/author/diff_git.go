package author

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/bulkhead-io/bulkhead/policy/store"
)

// loadGitStates reads the store folder dir at the two revisions of
// "REV1..REV2" into temporary folders (removed before it returns) and
// loads both.
func loadGitStates(dir, revs string) (*State, *State, error) {
	r1, r2, ok := strings.Cut(revs, "..")
	if !ok || r1 == "" || r2 == "" || strings.HasPrefix(r2, ".") {
		return nil, nil, fmt.Errorf("--git %q: want REV1..REV2", revs)
	}
	prefix, err := git(dir, "rev-parse", "--show-prefix")
	if err != nil {
		return nil, nil, fmt.Errorf("--git: %s is not in a git work tree: %w", dir, err)
	}
	prefix = strings.TrimSpace(prefix)
	var states [2]*State
	for i, rev := range []string{r1, r2} {
		tmp, err := os.MkdirTemp("", "bulkhead-diff-")
		if err != nil {
			return nil, nil, err
		}
		defer os.RemoveAll(tmp)
		if err := exportTree(dir, rev, prefix, tmp); err != nil {
			return nil, nil, err
		}
		res, err := store.Load(tmp, store.Options{AllLocal: true})
		if err != nil {
			// Name the files as they are in the repository, not the temp copy.
			msg := strings.ReplaceAll(err.Error(), tmp+string(filepath.Separator), rev+":"+prefix)
			return nil, nil, &renamedError{msg: fmt.Sprintf("load store %s at %s: %s", dir, rev, msg), err: err}
		}
		if states[i], err = NewState(rev+":"+filepath.Clean(dir), res.Snapshot); err != nil {
			return nil, nil, err
		}
	}
	return states[0], states[1], nil
}

// exportTree writes the store files directly in prefix at rev into out.
// The store reads one folder level, so subfolders are not exported.
func exportTree(dir, rev, prefix, out string) error {
	treeish := rev + ":" + prefix
	// --full-tree: otherwise ls-tree lists only what is under the current
	// directory, and -C makes that dir.
	list, err := git(dir, "ls-tree", "--full-tree", "-z", treeish)
	if err != nil {
		return fmt.Errorf("--git: list %s: %w", treeish, err)
	}
	for _, ent := range strings.Split(list, "\x00") {
		if ent == "" {
			continue
		}
		meta, name, ok := strings.Cut(ent, "\t")
		f := strings.Fields(meta)
		if !ok || len(f) != 3 || !store.StoreFile(name) {
			continue
		}
		switch f[1] {
		case "blob":
		case "tree":
			continue
		default:
			return fmt.Errorf("--git: %s%s at %s is a %s, not a file", prefix, name, rev, f[1])
		}
		if f[0] == "120000" {
			return fmt.Errorf("--git: %s%s at %s is a symlink; a store read from git must hold its files", prefix, name, rev)
		}
		data, err := git(dir, "cat-file", "blob", f[2])
		if err != nil {
			return fmt.Errorf("--git: read %s%s at %s: %w", prefix, name, rev, err)
		}
		if err := os.WriteFile(filepath.Join(out, name), []byte(data), 0o600); err != nil {
			return err
		}
	}
	return nil
}

func git(dir string, args ...string) (string, error) {
	cmd := exec.Command("git", append([]string{"-C", dir}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fmt.Errorf("git %s: %s", strings.Join(args, " "), strings.TrimSpace(stderr.String()))
		}
		return "", fmt.Errorf("git %s: %w", strings.Join(args, " "), err)
	}
	return stdout.String(), nil
}

// renamedError is an error whose text names files by revision instead of
// by their temporary copies; errors.Is still sees the original.
type renamedError struct {
	msg string
	err error
}

func (e *renamedError) Error() string { return e.msg }
func (e *renamedError) Unwrap() error { return e.err }
