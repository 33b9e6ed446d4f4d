package adopt

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// ErrEnforced is what Host.Adopt returns when the pod (or its veth) is
// enforced already: a CNI ADD got there first. It is not a problem.
var ErrEnforced = errors.New("already enforced")

// Host is the agent, as the adopter sees it.
type Host interface {
	// Candidates are the running pods of this node, with addresses, that
	// no endpoint enforces.
	Candidates() []Pod
	// Adopt enforces on a found sandbox as an ADD would, and records the
	// endpoint as adopted.
	Adopt(ctx context.Context, req api.EndpointAddRequest) error
}

// Config configures an Adopter.
type Config struct {
	Finder Finder
	Host   Host
	// Interval is how often a pass runs without a Kick (default 10 s):
	// a pod whose sandbox could not be found is tried again.
	Interval time.Duration
	Logger   *slog.Logger
	// Find replaces Finder.Find (tests).
	Find func(Pod) (Found, error)
}

// Adopter enforces on running pods that no CNI ADD told the agent about,
// and reports those it cannot.
type Adopter struct {
	cfg  Config
	kick chan struct{}

	mu       sync.Mutex
	problems map[string]api.AdoptionProblem
	adopted  int
	passes   int
}

// New returns an Adopter; Run starts it.
func New(cfg Config) *Adopter {
	if cfg.Interval <= 0 {
		cfg.Interval = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Find == nil {
		cfg.Find = cfg.Finder.Find
	}
	return &Adopter{cfg: cfg, kick: make(chan struct{}, 1), problems: map[string]api.AdoptionProblem{}}
}

// Kick asks for a pass soon (a new store state).
func (a *Adopter) Kick() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// Run makes a pass on every Kick and every Interval until ctx ends.
func (a *Adopter) Run(ctx context.Context) {
	t := time.NewTicker(a.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.kick:
		case <-t.C:
		}
		a.Pass(ctx)
	}
}

// Pass tries every candidate once.
func (a *Adopter) Pass(ctx context.Context) {
	seen := map[string]bool{}
	for _, p := range a.cfg.Host.Candidates() {
		if ctx.Err() != nil {
			return
		}
		key := p.String()
		seen[key] = true
		found, err := a.cfg.Find(p)
		req := found.Request
		if err == nil {
			err = a.cfg.Host.Adopt(ctx, req)
			if errors.Is(err, ErrEnforced) {
				a.clear(key)
				continue
			}
		}
		if err != nil {
			a.report(p, err)
			continue
		}
		a.clear(key)
		a.mu.Lock()
		a.adopted++
		a.mu.Unlock()
		a.cfg.Logger.Info("running pod adopted", "pod", key, "container", req.ContainerID, "veth", req.HostVeth,
			"netns", req.Netns, "via", found.Via, "cniCache", !Synthetic(req.ContainerID))
	}
	a.mu.Lock()
	for k := range a.problems {
		if !seen[k] {
			delete(a.problems, k)
		}
	}
	a.passes++
	a.mu.Unlock()
}

func (a *Adopter) report(p Pod, err error) {
	key := p.String()
	a.mu.Lock()
	old, had := a.problems[key]
	pr := api.AdoptionProblem{Pod: api.PodRef{Namespace: p.Namespace, Name: p.Name, UID: p.UID}, Reason: err.Error(), Since: old.Since}
	if !had {
		pr.Since = time.Now()
	}
	a.problems[key] = pr
	a.mu.Unlock()
	if !had || old.Reason != pr.Reason {
		a.cfg.Logger.Warn("running pod not adopted: it is not enforced", "pod", key, "reason", pr.Reason)
	}
}

func (a *Adopter) clear(key string) {
	a.mu.Lock()
	delete(a.problems, key)
	a.mu.Unlock()
}

// Problems are the candidates the last passes could not adopt, by pod.
func (a *Adopter) Problems() []api.AdoptionProblem {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := slices.Collect(maps.Values(a.problems))
	slices.SortFunc(out, func(x, y api.AdoptionProblem) int {
		return strings.Compare(x.Pod.Namespace+"/"+x.Pod.Name, y.Pod.Namespace+"/"+y.Pod.Name)
	})
	return out
}

// Stats are the pods adopted since start and the passes made.
func (a *Adopter) Stats() (adopted, passes int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.adopted, a.passes
}
