package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/dirwatch"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

// Source is where workloads and policies come from. The agent asks it for
// complete states; a source never hands over a partial one: when what it
// reads is invalid it reports the problems and the agent keeps enforcing
// the last good state.
type Source interface {
	// Run delivers the current state and every later one to update, and
	// problems to fail, until ctx is done.
	Run(ctx context.Context, update func(*store.Result), fail func([]api.StoreError)) error
	// String names the source for logs and status ("dir:/etc/bulkhead").
	String() string
}

// NewSource parses --store. Only dir:PATH exists today; a kubernetes
// source implements the same interface.
func NewSource(spec string, debounce time.Duration) (Source, error) {
	if dir, ok := strings.CutPrefix(spec, "dir:"); ok && dir != "" {
		return &DirSource{Dir: dir, Debounce: debounce}, nil
	}
	return nil, fmt.Errorf("--store %q: want dir:PATH", spec)
}

// DirSource reads every *.yaml file of a folder and reloads after changes.
type DirSource struct {
	Dir      string
	Debounce time.Duration
}

func (s *DirSource) String() string { return "dir:" + s.Dir }

// Run watches the folder; a reload happens once a burst of changes settles.
func (s *DirSource) Run(ctx context.Context, update func(*store.Result), fail func([]api.StoreError)) error {
	return dirwatch.Watch(ctx, s.Dir, s.Debounce, func() {
		res, err := store.Load(s.Dir, store.Options{})
		if err != nil {
			fail(storeErrors(err))
			return
		}
		update(res)
	})
}

// storeErrors flattens a load error into file:line problems.
func storeErrors(err error) []api.StoreError {
	var out []api.StoreError
	var walk func(error)
	walk = func(err error) {
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		var se *store.Error
		if errors.As(err, &se) {
			out = append(out, api.StoreError{File: se.File, Line: se.Line, Message: se.Err.Error()})
			return
		}
		out = append(out, api.StoreError{Message: err.Error()})
	}
	walk(err)
	if len(out) == 0 {
		out = append(out, api.StoreError{Message: err.Error()})
	}
	return out
}
