package k8s

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
)

// scripted answers each request with the next of its steps.
type scripted struct {
	steps []func() (*http.Response, error)
	calls atomic.Int32
}

func (s *scripted) RoundTrip(*http.Request) (*http.Response, error) {
	n := int(s.calls.Add(1)) - 1
	return s.steps[min(n, len(s.steps)-1)]()
}

func answer(code int, header ...string) func() (*http.Response, error) {
	return func() (*http.Response, error) {
		h := http.Header{}
		for i := 0; i+1 < len(header); i += 2 {
			h.Set(header[i], header[i+1])
		}
		return &http.Response{StatusCode: code, Header: h, Body: io.NopCloser(strings.NewReader("x"))}, nil
	}
}

func fail(err error) func() (*http.Response, error) {
	return func() (*http.Response, error) { return nil, err }
}

func TestWaitTransport(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	cases := []struct {
		name      string
		method    string
		steps     []func() (*http.Response, error)
		wantCode  int
		wantErr   bool
		wantCalls int32
		waited    bool
	}{
		{"answer at once", http.MethodGet, []func() (*http.Response, error){answer(200)}, 200, false, 1, false},
		{"refused, then up", http.MethodGet, []func() (*http.Response, error){fail(refused), fail(refused), answer(200)}, 200, false, 3, true},
		{"reset, then up", http.MethodGet, []func() (*http.Response, error){fail(fmt.Errorf("read: %w", syscall.ECONNRESET)), answer(200)}, 200, false, 2, true},
		{"lost http2 connection", http.MethodGet, []func() (*http.Response, error){fail(errors.New("http2: client connection lost")), answer(200)}, 200, false, 2, true},
		{"starting (503), then up", http.MethodGet, []func() (*http.Response, error){answer(503), answer(200)}, 200, false, 2, true},
		{"503 with Retry-After is client-go's", http.MethodGet, []func() (*http.Response, error){answer(503, "Retry-After", "1"), answer(200)}, 503, false, 1, false},
		{"forbidden is an answer", http.MethodGet, []func() (*http.Response, error){answer(403), answer(200)}, 403, false, 1, false},
		{"TLS failure is not waited out", http.MethodGet, []func() (*http.Response, error){fail(errors.New("tls: failed to verify certificate")), answer(200)}, 0, true, 1, false},
		{"writes are never sent twice", http.MethodPatch, []func() (*http.Response, error){fail(refused), answer(200)}, 0, true, 1, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := &scripted{steps: c.steps}
			var waited []error
			tr := &waitTransport{next: s, interval: time.Millisecond, waiting: func(err error) { waited = append(waited, err) }}
			req, _ := http.NewRequest(c.method, "https://apiserver.invalid/api/v1/pods?watch=true", nil)
			resp, err := tr.RoundTrip(req)
			if (err != nil) != c.wantErr {
				t.Fatalf("err %v, want error %v", err, c.wantErr)
			}
			if err == nil && resp.StatusCode != c.wantCode {
				t.Errorf("status %d, want %d", resp.StatusCode, c.wantCode)
			}
			if got := s.calls.Load(); got != c.wantCalls {
				t.Errorf("%d round trips, want %d", got, c.wantCalls)
			}
			if (len(waited) > 0) != c.waited || len(waited) > 1 {
				t.Errorf("waiting reported %v, want once: %v", waited, c.waited)
			}
		})
	}
}

// TestWaitTransportCancel: a request whose context ends stops waiting and
// says why.
func TestWaitTransportCancel(t *testing.T) {
	s := &scripted{steps: []func() (*http.Response, error){fail(syscall.ECONNREFUSED)}}
	tr := &waitTransport{next: s, interval: time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://apiserver.invalid/api", nil)
	_, err := tr.RoundTrip(req)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("err %v, want the deadline and the refusal", err)
	}
}

// TestWaitTransportRealSocket: with the real kernel and net/http, a GET to
// a port where nothing listens waits, and gets its answer once a server
// comes up on that port.
func TestWaitTransportRealSocket(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // refused from now on, until the server below listens
	var waiting atomic.Bool
	tr := &waitTransport{next: &http.Transport{}, interval: 20 * time.Millisecond, waiting: func(error) { waiting.Store(true) }}
	client := &http.Client{Transport: tr}
	done := make(chan error, 1)
	go func() {
		resp, err := client.Get("http://" + addr + "/version")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(b) != "up" {
				err = fmt.Errorf("body %q", b)
			}
		}
		done <- err
	}()
	for !waiting.Load() {
		select {
		case err := <-done:
			t.Fatalf("returned before anything listened: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	l, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s taken meanwhile: %v", addr, err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "up") }))
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	defer srv.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the request did not return once the server listened")
	}
}

// opener hands out fake watches in order and records the options of each
// open.
type opener struct {
	mu      sync.Mutex
	watches []*watch.FakeWatcher
	opts    []metav1.ListOptions
	errs    []error // per open, after the watches run out
	// failNext fails the next open, whatever comes after it.
	failNext error
}

func (o *opener) open(_ context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.opts = append(o.opts, opts)
	if err := o.failNext; err != nil {
		o.failNext = nil
		return nil, err
	}
	if len(o.watches) == 0 {
		if len(o.errs) == 0 {
			return nil, errors.New("no more watches")
		}
		err := o.errs[0]
		o.errs = o.errs[1:]
		return nil, err
	}
	w := o.watches[0]
	o.watches = o.watches[1:]
	return w, nil
}

func (o *opener) opened() []metav1.ListOptions {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.opts)
}

func cm(rv string) *corev1.ConfigMap {
	return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "c" + rv, ResourceVersion: rv}}
}

func endOfInitial(rv string) *corev1.ConfigMap {
	c := cm(rv)
	c.Annotations = map[string]string{metav1.InitialEventsAnnotationKey: "true"}
	return c
}

// recv returns the next event, or closed=true when the channel closed.
func recv(t *testing.T, w watch.Interface) (watch.Event, bool) {
	t.Helper()
	select {
	case ev, ok := <-w.ResultChan():
		return ev, !ok
	case <-time.After(10 * time.Second):
		t.Fatal("no event and no close")
		return watch.Event{}, false
	}
}

func TestResumingWatch(t *testing.T) {
	ctx := context.Background()
	timeout := int64(600)
	yes := true

	t.Run("a watch that ends is opened again from the last version", func(t *testing.T) {
		a, b := watch.NewFake(), watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a, b}}
		w, err := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{ResourceVersion: "3", TimeoutSeconds: &timeout})
		if err != nil {
			t.Fatal(err)
		}
		defer w.Stop()
		go func() { a.Add(cm("4")); a.Modify(cm("5")); a.Stop() }()
		for _, want := range []string{"4", "5"} {
			if ev, closed := recv(t, w); closed || ev.Object.(*corev1.ConfigMap).ResourceVersion != want {
				t.Fatalf("event %v (closed %v), want rv %s", ev, closed, want)
			}
		}
		go b.Delete(cm("7"))
		if ev, closed := recv(t, w); closed || ev.Type != watch.Deleted {
			t.Fatalf("after the resume: %v (closed %v)", ev, closed)
		}
		got := o.opened()
		if len(got) != 2 || got[1].ResourceVersion != "5" || !got[1].AllowWatchBookmarks || got[1].TimeoutSeconds == nil || *got[1].TimeoutSeconds > timeout {
			t.Fatalf("opens: %+v", got)
		}
	})

	t.Run("a broken stream is resumed", func(t *testing.T) {
		a, b := watch.NewFake(), watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a, b}}
		w, _ := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{ResourceVersion: "3"})
		defer w.Stop()
		go func() {
			a.Add(cm("4"))
			a.Error(&metav1.Status{Status: metav1.StatusFailure, Reason: metav1.StatusReasonInternalError,
				Message: "unable to decode an event from the watch stream: http2: client connection lost"})
		}()
		recv(t, w)
		go b.Add(cm("6"))
		if ev, closed := recv(t, w); closed || ev.Type != watch.Added {
			t.Fatalf("after the broken stream: %v (closed %v)", ev, closed)
		}
		if got := o.opened(); len(got) != 2 || got[1].ResourceVersion != "4" {
			t.Fatalf("opens: %+v", got)
		}
	})

	t.Run("the apiserver's own errors reach the reflector", func(t *testing.T) {
		a := watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a, watch.NewFake()}}
		w, _ := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{ResourceVersion: "3"})
		defer w.Stop()
		go func() { a.Error(&apierrors.NewResourceExpired("too old").ErrStatus); a.Stop() }()
		if ev, closed := recv(t, w); closed || ev.Type != watch.Error {
			t.Fatalf("got %v (closed %v), want the 410", ev, closed)
		}
		if _, closed := recv(t, w); !closed {
			t.Fatal("the watch went on after the apiserver's error")
		}
	})

	t.Run("a failed reopen is said, then the watch ends", func(t *testing.T) {
		a := watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a}, errs: []error{apierrors.NewResourceExpired("compacted")}}
		w, _ := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{ResourceVersion: "3"})
		defer w.Stop()
		go func() { a.Add(cm("4")); a.Stop() }()
		recv(t, w)
		ev, closed := recv(t, w)
		if st, ok := ev.Object.(*metav1.Status); closed || ev.Type != watch.Error || !ok || st.Code != 410 {
			t.Fatalf("got %v (closed %v), want the reopen's 410", ev, closed)
		}
		if _, closed := recv(t, w); !closed {
			t.Fatal("not closed after the failed reopen")
		}
	})

	t.Run("initial events: not resumed before their end, resumed after", func(t *testing.T) {
		a := watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a}}
		w, _ := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{SendInitialEvents: &yes})
		defer w.Stop()
		go func() { a.Add(cm("9")); a.Stop() }()
		recv(t, w)
		if _, closed := recv(t, w); !closed {
			t.Fatal("a watch-list cut short was resumed")
		}

		a, b := watch.NewFake(), watch.NewFake()
		o = &opener{watches: []*watch.FakeWatcher{a, b}}
		w, _ = resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{SendInitialEvents: &yes, ResourceVersionMatch: metav1.ResourceVersionMatchNotOlderThan})
		defer w.Stop()
		go func() { a.Add(cm("9")); a.Action(watch.Bookmark, endOfInitial("12")); a.Stop() }()
		recv(t, w)
		recv(t, w)
		go b.Add(cm("13"))
		if ev, closed := recv(t, w); closed || ev.Type != watch.Added {
			t.Fatalf("after the initial events: %v (closed %v)", ev, closed)
		}
		got := o.opened()
		if len(got) != 2 || got[1].ResourceVersion != "12" || got[1].SendInitialEvents != nil || got[1].ResourceVersionMatch != "" {
			t.Fatalf("opens: %+v", got)
		}
	})

	t.Run("410 after the initial events: listed again in place", func(t *testing.T) {
		a, b := watch.NewFake(), watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a, b}}
		w, _ := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{SendInitialEvents: &yes, ResourceVersionMatch: metav1.ResourceVersionMatchNotOlderThan})
		defer w.Stop()
		named := func(name, rv string) *corev1.ConfigMap {
			return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, ResourceVersion: rv}}
		}
		go func() {
			a.Add(named("kept", "5"))
			a.Add(named("gone", "6"))
			a.Action(watch.Bookmark, endOfInitial("7"))
			a.Add(named("later", "8"))
			a.Error(&apierrors.NewResourceExpired("too old resource version: 8 (14)").ErrStatus)
		}()
		for range 4 {
			recv(t, w)
		}
		go func() {
			b.Add(named("kept", "15"))
			b.Add(named("later", "16"))
			b.Add(named("new", "17"))
			b.Action(watch.Bookmark, endOfInitial("18"))
		}()
		var got []string
		for range 5 {
			ev, closed := recv(t, w)
			if closed {
				t.Fatalf("closed after %v", got)
			}
			m, _ := meta.Accessor(ev.Object)
			got = append(got, string(ev.Type)+" "+m.GetNamespace()+"/"+m.GetName())
		}
		want := []string{"ADDED shop/kept", "ADDED shop/later", "ADDED shop/new", "DELETED shop/gone", "BOOKMARK /c18"}
		if !slices.Equal(got, want) {
			t.Fatalf("after the 410:\n got %q\nwant %q", got, want)
		}
		opens := o.opened()
		if len(opens) != 2 || opens[1].SendInitialEvents == nil || !*opens[1].SendInitialEvents || opens[1].ResourceVersion != "" ||
			opens[1].ResourceVersionMatch != metav1.ResourceVersionMatchNotOlderThan {
			t.Fatalf("opens: %+v", opens)
		}
	})

	t.Run("410 when reopening: listed again in place", func(t *testing.T) {
		a, b := watch.NewFake(), watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a}}
		w, _ := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{SendInitialEvents: &yes})
		defer w.Stop()
		go func() { a.Add(cm("5")); a.Action(watch.Bookmark, endOfInitial("7")) }()
		recv(t, w)
		recv(t, w)
		// The reopen fails with 410; the relist then gets b.
		o.mu.Lock()
		o.failNext = apierrors.NewResourceExpired("too old resource version: 7 (14)")
		o.watches = []*watch.FakeWatcher{b}
		o.mu.Unlock()
		go func() { a.Stop(); b.Action(watch.Bookmark, endOfInitial("20")) }()
		ev, closed := recv(t, w)
		if closed || ev.Type != watch.Deleted {
			t.Fatalf("got %v (closed %v), want c5 deleted", ev, closed)
		}
		opens := o.opened()
		if len(opens) != 3 || opens[1].ResourceVersion != "7" || opens[2].SendInitialEvents == nil {
			t.Fatalf("opens: %+v", opens)
		}
	})

	t.Run("a watch from a version that ends with no event resumes from that version", func(t *testing.T) {
		a := watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a, watch.NewFake()}}
		w, _ := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{ResourceVersion: "3"})
		defer w.Stop()
		a.Stop()
		// Ended with no event: resumed from the version it began at.
		waitFor(t, "the second open", func() bool { return len(o.opened()) == 2 })
		if got := o.opened(); got[1].ResourceVersion != "3" {
			t.Fatalf("opens: %+v", got)
		}
	})

	t.Run("a watch past its timeout ends", func(t *testing.T) {
		a := watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a, watch.NewFake()}}
		zero := int64(0)
		w, _ := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{ResourceVersion: "3", TimeoutSeconds: &zero})
		defer w.Stop()
		go func() { a.Add(cm("4")); a.Stop() }()
		recv(t, w)
		if _, closed := recv(t, w); !closed {
			t.Fatal("a watch past its timeout was resumed")
		}
	})

	t.Run("Stop ends it", func(t *testing.T) {
		a := watch.NewFake()
		o := &opener{watches: []*watch.FakeWatcher{a}}
		w, _ := resuming(o.open, time.Millisecond)(ctx, metav1.ListOptions{ResourceVersion: "3"})
		w.Stop()
		if _, closed := recv(t, w); !closed {
			t.Fatal("not closed after Stop")
		}
		if !a.IsStopped() {
			t.Error("the underlying watch was not stopped")
		}
	})
}
