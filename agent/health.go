package agent

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/pprof"

	"github.com/bulkhead-io/bulkhead/cni/install"
)

// metricsHandler serves /metrics (and, as before, every other path) with
// the probes next to it: /healthz for liveness, /readyz for readiness.
func (a *Agent) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/healthz", probe(a.liveness))
	mux.Handle("/readyz", probe(a.readiness))
	if a.cfg.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("/", a.metrics.Handler())
	return mux
}

// probe answers 200 "ok" when check passes, else 503 with its reason.
func probe(check func() error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if err := check(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, err)
			return
		}
		fmt.Fprintln(w, "ok")
	})
}

// liveness fails once Run is shutting down. It is only served while Run's
// loops run, and it takes the agent's lock: an agent wedged holding it
// leaves the probe unanswered, and the kubelet restarts it on the timeout.
func (a *Agent) liveness() error {
	select {
	case <-a.stopping:
		return errors.New("stopping")
	default:
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return nil
}

// readiness holds until the datapath is loaded (New), a store state was
// read and its first policy applied (ready), and, with CNIConfDir, the
// plugin is chained into the runtime's CNI config, so that no pod is
// scheduled here before it would be enforced.
func (a *Agent) readiness() error {
	if err := a.liveness(); err != nil {
		return err
	}
	a.mu.Lock()
	ready, reason := a.ready, a.notReady
	a.mu.Unlock()
	if !ready {
		return fmt.Errorf("policy not enforced yet: %s", reason)
	}
	if a.cfg.CNIConfDir == "" {
		return nil
	}
	ok, err := install.Installed(install.Options{ConfDir: a.cfg.CNIConfDir})
	if err != nil {
		return fmt.Errorf("bulkhead-cni not chained: %w", err)
	}
	if !ok {
		return fmt.Errorf("bulkhead-cni is not chained into the primary CNI config in %s", a.cfg.CNIConfDir)
	}
	return nil
}
