package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// maxRequestBytes bounds what one request may make the agent buffer; the
// largest legitimate body is a GC list of every attachment on a node.
const maxRequestBytes = 4 << 20

// Backend is what the agent implements to serve the API. Return an *Error
// (see Errorf) to choose the code a client sees; any other error is reported
// as CodeInternal. Methods are called concurrently.
type Backend interface {
	// AddEndpoint returns only once enforcement is live. It is idempotent
	// per EndpointKey and must tolerate a duplicate arriving while the
	// first is still in progress: the plugin retries after a timeout.
	AddEndpoint(ctx context.Context, req EndpointAddRequest) (EndpointAddResponse, error)
	// DeleteEndpoint succeeds with Removed=false for an unknown endpoint.
	DeleteEndpoint(ctx context.Context, req EndpointDelRequest) (EndpointDelResponse, error)
	CheckEndpoint(ctx context.Context, req EndpointCheckRequest) (EndpointCheckResponse, error)
	GCEndpoints(ctx context.Context, req GCRequest) (GCResponse, error)
	Status(ctx context.Context) (StatusResponse, error)
	ListEndpoints(ctx context.Context) (EndpointList, error)
	ListIdentities(ctx context.Context) (IdentityList, error)
	Explain(ctx context.Context, req ExplainRequest) (ExplainResponse, error)
}

// validator is implemented by requests that can reject themselves before
// they reach the Backend.
type validator interface{ Validate() error }

// NewHandler routes the API to b. logger receives one line per failed
// request; pass slog.New(slog.DiscardHandler) to silence it.
func NewHandler(b Backend, logger *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST "+PathEndpointAdd, post(logger, b.AddEndpoint))
	mux.Handle("POST "+PathEndpointDel, post(logger, b.DeleteEndpoint))
	mux.Handle("POST "+PathEndpointCheck, post(logger, b.CheckEndpoint))
	mux.Handle("POST "+PathEndpointGC, post(logger, b.GCEndpoints))
	mux.Handle("POST "+PathExplain, post(logger, b.Explain))
	mux.Handle("GET "+PathStatus, get(logger, b.Status))
	mux.Handle("GET "+PathEndpoints, get(logger, b.ListEndpoints))
	mux.Handle("GET "+PathIdentities, get(logger, b.ListIdentities))
	if fs, ok := b.(FlowStreamer); ok {
		mux.Handle("POST "+PathFlows, flowsHandler(logger, fs))
	}
	if as, ok := b.(AlertStreamer); ok {
		mux.Handle("POST "+PathAlerts, streamHandler(logger, as.ObserveAlerts))
	}
	if q, ok := b.(Quarantiner); ok {
		mux.Handle("GET "+PathQuarantines, get(logger, q.ListQuarantines))
		mux.Handle("POST "+PathQuarantineAdd, post(logger, q.Quarantine))
		mux.Handle("POST "+PathQuarantineRelease, post(logger, q.ReleaseQuarantine))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, logger, r, Errorf(CodeUnsupported, "no such endpoint %s %s", r.Method, r.URL.Path))
	})
	return mux
}

func post[Req, Resp any](logger *slog.Logger, fn func(context.Context, Req) (Resp, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req Req
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequestBytes))
		if err := dec.Decode(&req); err != nil {
			writeError(w, logger, r, Errorf(CodeInvalidRequest, "decode request body: %w", err))
			return
		}
		if v, ok := any(req).(validator); ok {
			if err := v.Validate(); err != nil {
				writeError(w, logger, r, Errorf(CodeInvalidRequest, "%w", err))
				return
			}
		}
		resp, err := fn(r.Context(), req)
		if err != nil {
			writeError(w, logger, r, err)
			return
		}
		writeJSON(w, http.StatusOK, resp)
	})
}

func get[Resp any](logger *slog.Logger, fn func(context.Context) (Resp, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		resp, err := fn(r.Context())
		if err != nil {
			writeError(w, logger, r, err)
			return
		}
		writeJSON(w, http.StatusOK, resp)
	})
}

func writeError(w http.ResponseWriter, logger *slog.Logger, r *http.Request, err error) {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Code: CodeInternal, Message: err.Error()}
	}
	if logger != nil {
		// Client-side errors (unknown endpoint on DEL, bad input) are
		// routine; only agent-side failures deserve a warning.
		level := slog.LevelDebug
		if httpStatus(e.Code) >= 500 {
			level = slog.LevelWarn
		}
		logger.Log(r.Context(), level, "api request failed", "method", r.Method, "path", r.URL.Path, "code", e.Code, "error", e.Message)
	}
	writeJSON(w, httpStatus(e.Code), errorBody{Error: e})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		body, _ = json.Marshal(errorBody{Error: &Error{Code: CodeInternal, Message: "encode response: " + err.Error()}})
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

// Listen creates the agent's unix socket at path with mode 0600, creating
// its directory (0700) if needed. A stale socket left by a dead agent is
// replaced; a socket another process still serves is an error, so a second
// agent cannot steal the first one's clients.
//
// The socket is bound under a temporary name, restricted, and then renamed
// into place, so there is no moment at which it exists at path with a
// looser mode. Closing the listener removes path if it is still ours.
func Listen(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory %s: %w", dir, err)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	tmp := filepath.Join(dir, "."+filepath.Base(path)+"."+strconv.Itoa(os.Getpid())+".tmp")
	_ = os.Remove(tmp)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", tmp, err)
	}
	// The rename below moves the name; unlinking is done by socketListener.
	l.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		_ = l.Close()
		_ = os.Remove(tmp)
		return nil, err
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail(fmt.Errorf("chmod socket %s: %w", tmp, err))
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("move socket into place at %s: %w", path, err))
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(fmt.Errorf("stat socket %s: %w", path, err))
	}
	return &socketListener{UnixListener: l, path: path, fi: fi}, nil
}

// removeStale removes path if it is a socket nobody accepts on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat socket path %s: %w", path, err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("socket path %s exists and is not a socket; refusing to remove it", path)
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		_ = conn.Close()
		return fmt.Errorf("socket %s is in use by another process (is another bulkhead-agent running?)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

type socketListener struct {
	*net.UnixListener
	path string
	fi   os.FileInfo
}

// Close stops accepting and removes the socket, unless a newer agent has
// already replaced it with its own.
func (l *socketListener) Close() error {
	err := l.UnixListener.Close()
	if fi, statErr := os.Lstat(l.path); statErr == nil && os.SameFile(fi, l.fi) {
		if rmErr := os.Remove(l.path); rmErr != nil && err == nil {
			err = fmt.Errorf("remove socket %s: %w", l.path, rmErr)
		}
	}
	return err
}

// drainAndClose lets the client reuse a connection after an error response.
func drainAndClose(rc io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(rc, maxRequestBytes))
	_ = rc.Close()
}
