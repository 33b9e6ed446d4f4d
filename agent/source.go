package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/dirwatch"
	"github.com/bulkhead-io/bulkhead/agent/k8s"
	"github.com/bulkhead-io/bulkhead/agent/metrics"
	"github.com/bulkhead-io/bulkhead/agent/storeguard"
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

// StoreKubernetes is the --store value of the Kubernetes store.
const StoreKubernetes = "kubernetes"

// NewSource parses --store: dir:PATH, or kubernetes (agent/k8s, with
// --kubeconfig or the in-cluster config).
func NewSource(cfg Config) (Source, error) {
	log := cfg.Logger.With("component", "store")
	if cfg.Store == StoreKubernetes {
		rc, err := k8s.RESTConfig(cfg.Kubeconfig)
		if err != nil {
			return nil, err
		}
		return k8s.NewForConfig(rc, k8s.Config{NodeName: cfg.NodeName, Debounce: cfg.StoreDebounce, Logger: log})
	}
	if dir, ok := strings.CutPrefix(cfg.Store, "dir:"); ok && dir != "" {
		return &DirSource{Dir: dir, Debounce: cfg.StoreDebounce, Logger: log}, nil
	}
	return nil, fmt.Errorf("--store %q: want dir:PATH or kubernetes", cfg.Store)
}

// connectedSource is a source that can lose its connection (the
// Kubernetes store): status and metrics report it.
type connectedSource interface {
	Connected() (bool, time.Time)
}

// storeConnection is the source's connection for status (nil: a source
// that has none).
func storeConnection(src Source) *api.StoreConnection {
	c, ok := src.(connectedSource)
	if !ok {
		return nil
	}
	up, since := c.Connected()
	return &api.StoreConnection{Connected: up, Since: since}
}

// DirSource reads every store file (*.yaml, *.yml) of a folder and reloads
// after complete changes (agent/dirwatch): it never hands over a file that
// is halfway through being written, or a mix of two versions of a
// ConfigMap volume.
type DirSource struct {
	Dir      string
	Debounce time.Duration
	Logger   *slog.Logger
}

func (s *DirSource) String() string { return "dir:" + s.Dir }

// Run watches the folder; a reload happens once a burst of changes settles.
func (s *DirSource) Run(ctx context.Context, update func(*store.Result), fail func([]api.StoreError)) error {
	log := s.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	opt := dirwatch.Options{Debounce: s.Debounce, StoreFile: store.StoreFile, Logger: log}
	cache := &store.ParseCache{}
	return dirwatch.Watch(ctx, s.Dir, opt, func(quiet func() bool) bool {
		res, err := store.Load(s.Dir, store.Options{Cache: cache})
		if errors.Is(err, store.ErrChanged) {
			log.Info("store changed while it was read; reading it again", "error", err)
			return false
		}
		if !quiet() {
			// Something changed after it was read: what was read may
			// be half of a change. The change schedules the next read.
			return true
		}
		if err != nil {
			fail(storeErrors(err))
			return true
		}
		update(res)
		return true
	})
}

// newStoreGuard holds store states back (agent/storeguard) before they
// reach apply, and reports holds in metrics. enforcing says the datapath
// was re-opened with a policy an earlier agent applied that restricts some
// pod (datapath.Restricts).
func newStoreGuard(cfg Config, m *metrics.Metrics, enforcing bool, apply storeguard.ApplyFunc) (*storeguard.Guard, error) {
	return storeguard.New(storeguard.Config{
		Grace:     cfg.StoreShrinkGrace,
		StateDir:  cfg.StateDir,
		Enforcing: enforcing,
		Logger:    cfg.Logger.With("component", "store"),
		OnHold: func(h *storeguard.Hold) {
			if h == nil {
				m.StoreHeld.Set(0)
				return
			}
			m.StoreHeld.Set(1)
			m.StoreHolds.Inc()
		},
	}, apply)
}

// storeHold is the guard's hold for status.
func storeHold(g *storeguard.Guard) *api.StoreHold {
	h := g.Held()
	if h == nil {
		return nil
	}
	return &api.StoreHold{Reason: h.Reason, Since: h.Since, Until: h.Until,
		AppliedObjects: h.AppliedObjects, AppliedPolicies: h.AppliedPolicies,
		HeldObjects: h.HeldObjects, HeldPolicies: h.HeldPolicies}
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
