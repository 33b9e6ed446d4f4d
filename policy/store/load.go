package store

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/bulkhead-io/bulkhead/policy"
	"go.yaml.in/yaml/v3"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// Options controls Load.
type Options struct {
	// AllLocal gives every pod an EndpointID (1, 2, ... in namespace/name
	// order), for offline use: every policy is then enforced somewhere.
	AllLocal bool
	// Cache keeps each file's parsed objects between loads: a file whose
	// content did not change is not parsed again (at 10,000 pods, parsing
	// was seconds of every change). Nil parses everything.
	Cache *ParseCache
	// afterRead, in tests, runs between reading a file and checking that
	// it did not change meanwhile.
	afterRead func(path string)
}

// ParseCache is what Load parsed of each file, by content. The objects are
// shared by every Result built from them: nothing may change them.
type ParseCache struct {
	mu    sync.Mutex
	files map[string]parsedFile
}

type parsedFile struct {
	sum  [sha256.Size]byte
	objs []*Object
	err  error
}

// parse is Parse through the cache.
func (c *ParseCache) parse(path string, data []byte, seen map[string]bool) ([]*Object, error) {
	if c == nil {
		return Parse(path, data)
	}
	sum := sha256.Sum256(data)
	seen[path] = true
	c.mu.Lock()
	defer c.mu.Unlock()
	if f, ok := c.files[path]; ok && f.sum == sum {
		return f.objs, f.err
	}
	objs, err := Parse(path, data)
	if c.files == nil {
		c.files = map[string]parsedFile{}
	}
	c.files[path] = parsedFile{sum: sum, objs: objs, err: err}
	return objs, err
}

// forget drops the files a load did not see (removed from the store).
func (c *ParseCache) forget(seen map[string]bool) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for path := range c.files {
		if !seen[path] {
			delete(c.files, path)
		}
	}
}

// Result is a loaded directory.
type Result struct {
	Snapshot *policy.Snapshot
	// Objects are the valid objects, in file and line order.
	Objects []*Object
	// Rejected are objects that a source left out of this state, or kept
	// at their last valid version, because they are invalid (each an
	// *Error). The dir store never sets it: it rejects a whole state that
	// has an invalid object. The Kubernetes store cannot: the apiserver
	// already holds the invalid version, and the rest of the cluster's
	// changes must not wait for it.
	Rejected []error
}

// ErrChanged says that a file, or the folder's ..data link, changed while
// Load read it: what was read may be half of a write. Read again once the
// folder is quiet.
var ErrChanged = errors.New("changed while being read")

// dataLink is the symlink that kubelet swaps to update a ConfigMap or
// Secret volume in one step: the visible names are links through it.
const dataLink = "..data"

// StoreFile reports whether a folder entry is a store file: *.yaml or
// *.yml, and not hidden (editor lock files, and the ..data and timestamped
// folders of a ConfigMap volume, whose files the visible names already
// link to).
func StoreFile(name string) bool {
	if strings.HasPrefix(name, ".") {
		return false
	}
	ext := filepath.Ext(name)
	return ext == ".yaml" || ext == ".yml"
}

// Load reads every store file (StoreFile) of dir. Objects that fail to
// decode or validate are left out of the snapshot and reported in the error
// (a join of *Error, each with file and line); the caller decides whether a
// partial snapshot is usable (the agent keeps its last good state instead).
// When a file changes while it is read, Load returns no result and an
// error that wraps ErrChanged.
func Load(dir string, opt Options) (*Result, error) {
	gen, err := readDataLink(dir)
	if err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read store: %w", err)
	}
	var objs []*Object
	var errs []error
	seen := map[string]bool{}
	for _, e := range entries { // sorted by name
		if !StoreFile(e.Name()) {
			continue
		}
		f := filepath.Join(dir, e.Name())
		data, err := readStable(f, opt.afterRead)
		if errors.Is(err, ErrChanged) {
			return nil, err
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("read %s: %w", f, err))
			continue
		}
		parsed, err := opt.Cache.parse(f, data, seen)
		objs = append(objs, parsed...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	// kubelet swaps ..data while we read: the files read may be of two
	// versions of the ConfigMap.
	if now, err := readDataLink(dir); err != nil || now != gen {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, dataLink), ErrChanged)
	}
	opt.Cache.forget(seen)
	res, err := Build(objs, opt)
	return res, errors.Join(append(errs, err)...)
}

// readDataLink is the target of dir/..data, or "" when there is none.
func readDataLink(dir string) (string, error) {
	t, err := os.Readlink(filepath.Join(dir, dataLink))
	if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.EINVAL) {
		return "", fmt.Errorf("read store: %w", err)
	}
	return t, nil
}

// readStable reads a file and checks that it did not change while it was
// read: the same inode, size, mtime and ctime before and after, all of it
// read, and the name still naming that inode. A writer that is halfway
// through the file changes at least one of them.
func readStable(path string, afterRead func(string)) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	before, err := f.Stat()
	if err != nil {
		return nil, err
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	if afterRead != nil {
		afterRead(path)
	}
	after, err := f.Stat()
	if err != nil {
		return nil, err
	}
	named, err := os.Stat(path)
	if err != nil || !sameVersion(before, after) || int64(len(data)) != after.Size() || !os.SameFile(after, named) {
		return nil, fmt.Errorf("%s: %w", path, ErrChanged)
	}
	return data, nil
}

func sameVersion(a, b os.FileInfo) bool {
	if a.Size() != b.Size() || !a.ModTime().Equal(b.ModTime()) || !os.SameFile(a, b) {
		return false
	}
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && sa.Ctim == sb.Ctim
}

// Build validates decoded objects and assembles the snapshot.
func Build(objs []*Object, opt Options) (*Result, error) {
	var errs []error
	seen := map[string]*Object{}
	res := &Result{Snapshot: &policy.Snapshot{}}
	s := res.Snapshot
	for _, o := range objs {
		if prev, dup := seen[o.Ref()]; dup {
			errs = append(errs, &Error{File: o.File, Line: o.Line, Err: fmt.Errorf("%s: already defined at %s:%d", o.Ref(), prev.File, prev.Line)})
			continue
		}
		seen[o.Ref()] = o
		if verr := o.Validate(); verr != nil {
			errs = append(errs, &Error{File: o.File, Line: o.lineOf(verr), Err: verr})
			continue
		}
		res.Objects = append(res.Objects, o)
		switch {
		case o.Namespace != nil:
			s.Namespaces = append(s.Namespaces, *o.Namespace)
		case o.Pod != nil:
			s.Pods = append(s.Pods, *o.Pod)
		case o.NetworkPolicy != nil:
			s.NetworkPolicies = append(s.NetworkPolicies, o.NetworkPolicy)
		case o.BulkheadPolicy != nil:
			s.BulkheadPolicies = append(s.BulkheadPolicies, o.BulkheadPolicy)
		case o.RuntimePolicy != nil:
			s.RuntimePolicies = append(s.RuntimePolicies, o.RuntimePolicy)
		}
	}
	if opt.AllLocal {
		slices.SortFunc(s.Pods, func(a, b policy.Pod) int {
			return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
		})
		for i := range s.Pods {
			s.Pods[i].Endpoint = policy.EndpointID(i + 1)
		}
	}
	return res, errors.Join(errs...)
}

// lineOf finds the line of the first field a validation error names.
func (o *Object) lineOf(err error) int {
	var ve *policy.ValidationError
	if !errors.As(err, &ve) || len(ve.Errs) == 0 || o.node == nil {
		return o.Line
	}
	return fieldLine(o.node, ve.Errs[0])
}

func fieldLine(root *yaml.Node, fe *field.Error) int {
	return pathLine(root, splitPath(fe.Field))
}

// pathLine is the line of the deepest node of path that root has: a
// mapping key's own line, or a list element's. A path token that names no
// index in a list (the paths of type errors have none) is looked for in
// each element in turn.
func pathLine(root *yaml.Node, path []string) int {
	line, _ := findPath(root, path)
	if line == 0 {
		return root.Line
	}
	return line
}

// findPath returns the line of the deepest node of path under n (0: none)
// and how many tokens it matched.
func findPath(n *yaml.Node, path []string) (int, int) {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if len(path) == 0 {
		return 0, 0
	}
	tok := path[0]
	switch n.Kind {
	case yaml.SequenceNode:
		if idx, err := strconv.Atoi(tok); err == nil {
			if idx < 0 || idx >= len(n.Content) {
				return 0, 0
			}
			el := n.Content[idx]
			line, depth := findPath(el, path[1:])
			if line == 0 {
				line = el.Line
			}
			return line, depth + 1
		}
		best, bestDepth := 0, 0
		for _, el := range n.Content {
			if line, depth := findPath(el, path); depth > bestDepth {
				best, bestDepth = line, depth
			}
		}
		return best, bestDepth
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == tok {
				line, depth := findPath(n.Content[i+1], path[1:])
				if line == 0 {
					line = n.Content[i].Line
				}
				return line, depth + 1
			}
		}
	}
	return 0, 0
}

// splitPath turns "spec.ingress[0].from" into [spec ingress 0 from].
func splitPath(p string) []string {
	return strings.FieldsFunc(p, func(r rune) bool { return r == '.' || r == '[' || r == ']' })
}
