package k8s

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
)

// waitTransport makes a read (GET) that cannot reach the apiserver wait
// for it, polling every interval (with jitter), instead of failing.
//
// Why: a reflector whose list or watch fails backs off exponentially
// (client-go's 0.8 s doubling to 30 s, with as much jitter again). After
// an apiserver restart of a few seconds, the informers came back 5 to 23 s
// after the apiserver did, and a policy written then waited as long to be
// enforced. With this transport the reflector's request is simply slow:
// it returns once the apiserver answers, so the informers resume within
// one poll of its return. Only failures that say nothing reached the
// apiserver, or that it is not serving yet (503), are waited out: any
// other answer (403, 404, 410, ...) goes back to client-go as before.
// GETs carry no body, so sending one again is safe.
//
// The cost: while the apiserver is away each blocked request dials it
// every interval. An agent has five informers, so at 250 ms that is 20
// refused connections a second per node, and none once it is back.
type waitTransport struct {
	next     http.RoundTripper
	interval time.Duration
	// waiting is called (if set) each time a request starts to wait, with
	// the failure that made it.
	waiting func(error)
}

func (t *waitTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Method != http.MethodGet || req.Body != nil && req.Body != http.NoBody {
		return t.next.RoundTrip(req)
	}
	reported := false
	for {
		resp, err := t.next.RoundTrip(req)
		why := err
		switch {
		case err == nil && resp.StatusCode != http.StatusServiceUnavailable:
			return resp, nil
		case err == nil:
			// 503 with a Retry-After is client-go's to honour; without
			// one the apiserver is starting (or draining) and the
			// reflector would back off.
			if resp.Header.Get("Retry-After") != "" {
				return resp, nil
			}
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			why = errors.New("apiserver answered 503 Service Unavailable")
		case !unreachable(err):
			return nil, err
		}
		if !reported && t.waiting != nil {
			t.waiting(why)
			reported = true
		}
		wait := time.NewTimer(t.interval + rand.N(t.interval))
		select {
		case <-req.Context().Done():
			wait.Stop()
			if err == nil {
				err = why
			}
			return nil, errors.Join(req.Context().Err(), err)
		case <-wait.C:
		}
	}
}

// unreachable says whether err means the request never got an answer from
// a running apiserver: refused, reset or unroutable connections, a dial
// timeout, or a connection that ended before the response.
func unreachable(err error) bool {
	for _, e := range []error{syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.EHOSTUNREACH,
		syscall.ENETUNREACH, syscall.EPIPE, io.EOF, io.ErrUnexpectedEOF} {
		if errors.Is(err, e) {
			return true
		}
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	// http2's errors for a connection that went away under the request
	// (GOAWAY on shutdown, a lost connection) have no type to test.
	msg := err.Error()
	for _, s := range []string{"http2: client connection lost", "http2: server sent GOAWAY", "use of closed network connection"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// watchFunc opens a watch.
type watchFunc func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)

// resuming wraps open so that a watch which ends early (the apiserver went
// away or is shutting down) is opened again from the last resource version
// it delivered, unseen by the reflector above it.
//
// Why: whenever a watch ends with an error, or within a second and with no
// event, and whenever the apiserver says 410 Gone (which a restarted
// apiserver does for every version older than its new watch cache), the
// reflector returns from ListAndWatch and sleeps its backoff (0.8 s
// doubling to 30 s, with as much jitter, reset only after two quiet
// minutes) before it lists again, even when the apiserver is already back.
// After a few restarts in a row a policy waited up to 50 s to be enforced.
// Here the reflector never leaves its watch:
//   - the next open waits in waitTransport until the apiserver answers;
//   - on 410, a watch that began with its initial events (watch-list, as
//     client-go does by default) lists again in place: it asks for the
//     initial events once more, passes them on (the informer takes those
//     it has as updates), and then says DELETED for every object it had
//     passed on before that is no longer there.
//
// What still reaches the reflector: a watch that is still sending its
// initial events, one that reached its own timeout (the reflector's guard
// against hung watches), a 410 on a watch that began from a LIST (this
// watch does not know the listed objects), any other error from the
// apiserver, and a failure to open the watch again.
func resuming(open watchFunc, interval time.Duration) watchFunc {
	return func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
		w, err := open(ctx, opts)
		if err != nil {
			return nil, err
		}
		rw := &resumingWatch{open: open, opts: opts, interval: interval,
			out: make(chan watch.Event), stop: make(chan struct{}), cur: w}
		// A watch that streams its initial events first (watch-list)
		// can be resumed only once they have all come, and it is the
		// one that knows every object, to list again in place.
		if opts.SendInitialEvents != nil && *opts.SendInitialEvents {
			rw.initial, rw.keys, rw.seen = true, map[string]struct{}{}, map[string]struct{}{}
		} else if opts.ResourceVersion != "0" {
			rw.rv = opts.ResourceVersion
		}
		if opts.TimeoutSeconds != nil {
			rw.deadline = time.Now().Add(time.Duration(*opts.TimeoutSeconds) * time.Second)
		}
		go rw.run(ctx)
		return rw, nil
	}
}

type resumingWatch struct {
	open     watchFunc
	opts     metav1.ListOptions
	interval time.Duration
	out      chan watch.Event
	stop     chan struct{}
	stopOnce sync.Once

	// Owned by run.
	cur      watch.Interface
	rv       string
	deadline time.Time
	// initial: the current watch is sending its initial events; seen
	// collects their keys. keys are the objects passed on and not deleted
	// (nil: this watch began from a LIST and cannot list again itself).
	initial    bool
	keys, seen map[string]struct{}
	// relisting: the current watch is this wrapper's own list again.
	relisting bool
	// example is an object of the watched type, for DELETED events.
	example runtime.Object
}

func (w *resumingWatch) ResultChan() <-chan watch.Event { return w.out }

func (w *resumingWatch) Stop() { w.stopOnce.Do(func() { close(w.stop) }) }

// pumped is how a watch's pump ended.
type pumped int

const (
	pumpDone    pumped = iota // stopped, or an error passed on: the end
	pumpEnded                 // the watch ended early: resume it
	pumpExpired               // 410: list again in place
)

func (w *resumingWatch) run(ctx context.Context) {
	defer close(w.out)
	for {
		started := time.Now()
		how := w.pump()
		w.cur.Stop()
		if how == pumpDone || (!w.deadline.IsZero() && !time.Now().Before(w.deadline)) {
			return
		}
		if w.initial && !w.relisting {
			return // the reflector's own initial events, cut short
		}
		if w.relisting || how == pumpExpired && w.keys == nil || w.rv == "" {
			// A relist of ours cut short, or one we cannot do: the
			// reflector lists again.
			w.send(watch.Event{Type: watch.Error, Object: &apierrors.NewResourceExpired("watch ended; list again").ErrStatus})
			return
		}
		// A watch that ended at once is an apiserver that accepts and
		// drains: do not spin on it.
		if how == pumpEnded && time.Since(started) < time.Second {
			select {
			case <-w.stop:
				return
			case <-ctx.Done():
				return
			case <-time.After(w.interval):
			}
		}
		opts := w.opts
		opts.ResourceVersion, opts.ResourceVersionMatch, opts.SendInitialEvents = w.rv, "", nil
		opts.AllowWatchBookmarks = true
		if !w.deadline.IsZero() {
			left := int64(time.Until(w.deadline) / time.Second)
			if left < 1 {
				return
			}
			opts.TimeoutSeconds = &left
		}
		if how == pumpExpired {
			yes := true
			opts.ResourceVersion, opts.ResourceVersionMatch, opts.SendInitialEvents = "", metav1.ResourceVersionMatchNotOlderThan, &yes
		}
		next, err := w.open(ctx, opts)
		if err != nil && how == pumpEnded && w.keys != nil && (apierrors.IsResourceExpired(err) || apierrors.IsGone(err)) {
			yes := true
			opts.ResourceVersion, opts.ResourceVersionMatch, opts.SendInitialEvents = "", metav1.ResourceVersionMatchNotOlderThan, &yes
			how = pumpExpired
			next, err = w.open(ctx, opts)
		}
		if err != nil {
			// Said to the reflector, which lists again (410) or backs off.
			status := metav1.Status{Status: metav1.StatusFailure, Reason: metav1.StatusReasonInternalError,
				Message: "resuming the watch: " + err.Error()}
			if se, ok := err.(apierrors.APIStatus); ok {
				status = se.Status()
			}
			w.send(watch.Event{Type: watch.Error, Object: &status})
			return
		}
		w.cur = next
		if how == pumpExpired {
			w.relisting, w.initial = true, true
			clear(w.seen)
		}
	}
}

// send passes ev on, unless the watch is stopped first.
func (w *resumingWatch) send(ev watch.Event) bool {
	select {
	case w.out <- ev:
		return true
	case <-w.stop:
		return false
	}
}

// pump forwards the current watch's events until it ends.
func (w *resumingWatch) pump() pumped {
	for {
		var ev watch.Event
		var ok bool
		select {
		case <-w.stop:
			return pumpDone
		case ev, ok = <-w.cur.ResultChan():
		}
		if !ok {
			return pumpEnded
		}
		if ev.Type == watch.Error {
			st, _ := ev.Object.(*metav1.Status)
			switch {
			case st != nil && st.Reason == metav1.StatusReasonInternalError &&
				strings.Contains(st.Message, "unable to decode an event from the watch stream"):
				// The stream broke: resume.
				return pumpEnded
			case st != nil && st.Code == http.StatusGone && w.keys != nil && !w.initial:
				return pumpExpired
			}
			w.send(ev)
			return pumpDone // the reflector ends this watch
		}
		m, err := meta.Accessor(ev.Object)
		if err != nil {
			w.send(ev)
			continue
		}
		if v := m.GetResourceVersion(); v != "" {
			w.rv = v
		}
		if w.keys != nil && ev.Type != watch.Bookmark {
			key, _ := cache.MetaNamespaceKeyFunc(ev.Object)
			if ev.Type == watch.Deleted {
				delete(w.keys, key)
			} else {
				w.keys[key] = struct{}{}
			}
			if w.initial {
				w.seen[key] = struct{}{}
			}
			if w.example == nil {
				w.example = ev.Object
			}
		}
		if ev.Type == watch.Bookmark && m.GetAnnotations()[metav1.InitialEventsAnnotationKey] == "true" && w.initial {
			w.initial = false
			if w.relisting {
				// What was there before the list and is not now was
				// deleted meanwhile.
				w.relisting = false
				for key := range w.keys {
					if _, ok := w.seen[key]; ok {
						continue
					}
					delete(w.keys, key)
					if !w.send(watch.Event{Type: watch.Deleted, Object: w.tombstone(key, w.rv)}) {
						return pumpDone
					}
				}
			}
			clear(w.seen)
		}
		if !w.send(ev) {
			return pumpDone
		}
	}
}

// tombstone is an object of the watched type that names key.
func (w *resumingWatch) tombstone(key, rv string) runtime.Object {
	o := reflect.New(reflect.TypeOf(w.example).Elem()).Interface().(runtime.Object)
	o.GetObjectKind().SetGroupVersionKind(w.example.GetObjectKind().GroupVersionKind())
	m, _ := meta.Accessor(o)
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	m.SetNamespace(ns)
	m.SetName(name)
	m.SetResourceVersion(rv)
	return o
}
