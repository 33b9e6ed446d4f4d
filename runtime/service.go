package runtime

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// EndpointSource lists the endpoints to watch, each with its netns inode
// (Endpoint.Netns) set. The agent's endpoint table implements it.
type EndpointSource interface {
	RuntimeEndpoints() []detect.Endpoint
}

// ServiceConfig configures a Service.
type ServiceConfig struct {
	Monitor   *Monitor
	Endpoints EndpointSource
	// Emit receives every alert line, one call at a time.
	Emit func(detect.Alert)
	// Resync is how often the watch set is reconciled with Endpoints even
	// without a Changed call; 0 means 5 s.
	Resync time.Duration
	// AggregateWindow folds repeated identical alerts from one process
	// (detect.Aggregator): 0 means 10 s. Repeats go out at the window's
	// end (checked every Resync) as one line with their count.
	AggregateWindow time.Duration
	Logger          *slog.Logger
}

// Service keeps the monitor's watch set equal to the endpoint table and
// turns events into alerts: the agent's runtime-detection component.
type Service struct {
	cfg     ServiceConfig
	log     *slog.Logger
	changed chan struct{}
	// procs are the processes that exec'd in watched pods, for each
	// alert's process and ancestry (read loop only).
	procs *detect.ProcessCache
	agg   *detect.Aggregator
	// emitMu keeps Emit's calls one at a time: the reader and the flush
	// tick both emit.
	emitMu sync.Mutex
}

// ProcessCacheSize bounds the exec cache.
const ProcessCacheSize = 8192

// NewService makes a Service; Run starts it.
func NewService(cfg ServiceConfig) *Service {
	if cfg.Resync <= 0 {
		cfg.Resync = 5 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.AggregateWindow <= 0 {
		cfg.AggregateWindow = 10 * time.Second
	}
	return &Service{cfg: cfg, log: log, changed: make(chan struct{}, 1),
		procs: detect.NewProcessCache(ProcessCacheSize), agg: detect.NewAggregator(cfg.AggregateWindow)}
}

// Changed tells the service that the endpoint table changed. It never
// blocks: changes that arrive while a reconcile is pending fold into it.
func (s *Service) Changed() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// Run reconciles the watch set and reads events until ctx is done. It
// reconciles once before it returns control to the event loop, so the
// endpoints known at start (restored ones) are watched at once.
func (s *Service) Run(ctx context.Context) error {
	rd, err := s.cfg.Monitor.NewReader()
	if err != nil {
		return err
	}
	s.reconcile()
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.readLoop(rd)
	}()
	t := time.NewTicker(s.cfg.Resync)
	defer t.Stop()
	var lastLost uint64
	for {
		select {
		case <-ctx.Done():
			rd.Close()
			<-done
			s.emit(s.agg.FlushAll())
			return nil
		case <-s.changed:
			s.reconcile()
		case <-t.C:
			s.reconcile()
			s.emit(s.agg.Flush(time.Now()))
			// Loss is reported, never silent.
			if c, err := s.cfg.Monitor.Counters(); err == nil && c.Lost != lastLost {
				s.log.Warn("runtime events lost: the ring buffer was full", "lost", c.Lost-lastLost, "lost_total", c.Lost)
				lastLost = c.Lost
			}
		}
	}
}

func (s *Service) readLoop(rd *Reader) {
	for {
		ev, err := rd.Read()
		if errors.Is(err, ringbuf.ErrClosed) {
			return
		}
		if err != nil {
			s.log.Warn("read runtime event", "error", err)
			continue
		}
		ep, ok := s.cfg.Monitor.Endpoint(ev.Netns)
		if !ok {
			// Unwatched after the kernel sent it: still the pod's event.
			ep = detect.Endpoint{Netns: ev.Netns}
		}
		// An exec is recorded before it is judged, so that its own
		// alerts (none yet) and every later one name the program.
		s.procs.Exec(ev)
		alerts := detect.Detect(ev, ep)
		s.procs.Annotate(alerts, ev)
		for _, a := range alerts {
			s.emit(s.agg.Add(a, time.Now()))
		}
	}
}

// Raise emits an alert that something other than the monitor saw (the
// agent's scan detection), folded with its repeats like the monitor's.
func (s *Service) Raise(a detect.Alert) {
	s.emit(s.agg.Add(a, time.Now()))
}

func (s *Service) emit(alerts []detect.Alert) {
	s.emitMu.Lock()
	defer s.emitMu.Unlock()
	for _, a := range alerts {
		s.cfg.Emit(a)
	}
}

// reconcile watches every listed endpoint and unwatches the rest.
func (s *Service) reconcile() {
	want := map[uint32]detect.Endpoint{}
	for _, ep := range s.cfg.Endpoints.RuntimeEndpoints() {
		if ep.Netns != 0 {
			want[ep.Netns] = ep
		}
	}
	m := s.cfg.Monitor
	for ino, ep := range want {
		if cur, ok := m.Endpoint(ino); ok && cur == ep {
			continue
		}
		if err := m.Watch(ino, ep); err != nil {
			s.log.Warn("watch endpoint netns", "netns", ino, "pod", ep.Namespace+"/"+ep.Pod, "error", err)
		}
	}
	for _, ino := range m.watchedInodes() {
		if _, ok := want[ino]; !ok {
			if err := m.Unwatch(ino); err != nil {
				s.log.Warn("unwatch endpoint netns", "netns", ino, "error", err)
			}
		}
	}
}
