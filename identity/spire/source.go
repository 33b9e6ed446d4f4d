package spire

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/bulkhead-io/bulkhead/identity"
)

// Config configures a Source.
type Config struct {
	// AdminSocket is the SPIRE agent's admin_socket_path. The agent must
	// list this process's SPIFFE ID in authorized_delegates.
	AdminSocket string
	// Logger defaults to discarding.
	Logger *slog.Logger
	// MinBackoff and MaxBackoff bound the waits between reconnection
	// attempts; defaults 200 ms and 10 s.
	MinBackoff, MaxBackoff time.Duration
}

// ErrNotAuthorized is reported (wrapped with identity.ErrSourceUnavailable)
// when the SPIRE agent refuses this process the Delegated Identity API.
var ErrNotAuthorized = errors.New("bulkhead-agent is not an authorized delegate of the SPIRE agent (authorized_delegates)")

// Source is an identity.SVIDSource over a SPIRE agent's admin socket. All
// streams share one gRPC connection.
type Source struct {
	cfg    Config
	log    *slog.Logger
	conn   *grpc.ClientConn
	client delegatedidentityv1.DelegatedIdentityClient
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	closed bool
	health identity.SourceHealth
}

var _ identity.SVIDSource = (*Source)(nil)

// New returns a Source for the agent at cfg.AdminSocket. It does not
// connect: streams do, when subscriptions start.
func New(cfg Config) (*Source, error) {
	if cfg.AdminSocket == "" {
		return nil, errors.New("spire source: no admin socket")
	}
	abs, err := filepath.Abs(cfg.AdminSocket)
	if err != nil {
		return nil, fmt.Errorf("spire source: admin socket %s: %w", cfg.AdminSocket, err)
	}
	cfg.AdminSocket = abs
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 200 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 10 * time.Second
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = cfg.MinBackoff
	}
	// gRPC's own reconnection backoff (up to 120 s by default) would keep
	// the connection down long after the agent is back; ours bounds it.
	conn, err := grpc.NewClient("unix://"+abs,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: grpcbackoff.Config{
				BaseDelay:  cfg.MinBackoff,
				Multiplier: 2,
				Jitter:     0.2,
				MaxDelay:   cfg.MaxBackoff,
			},
			MinConnectTimeout: 5 * time.Second,
		}))
	if err != nil {
		return nil, fmt.Errorf("spire source: admin socket %s: %w", abs, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Source{
		cfg:    cfg,
		log:    cfg.Logger.With("source", identity.SourceSPIRE, "admin_socket", abs),
		conn:   conn,
		client: delegatedidentityv1.NewDelegatedIdentityClient(conn),
		ctx:    ctx,
		cancel: cancel,
		health: identity.SourceHealth{Name: identity.SourceSPIRE, Since: time.Now()},
	}, nil
}

// Name is identity.SourceSPIRE.
func (s *Source) Name() string { return identity.SourceSPIRE }

// Health says whether the last stream attempt (of any subscription)
// succeeded. Before the first one it is not connected, without error.
func (s *Source) Health() identity.SourceHealth {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.health
}

func (s *Source) markUp() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.health.Connected {
		s.health.Connected = true
		s.health.Since = time.Now()
	}
	s.health.LastError = ""
}

func (s *Source) markDown(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.health.Connected {
		s.health.Connected = false
		s.health.Since = time.Now()
	}
	s.health.LastError = err.Error()
}

// Close ends every subscription (their last callbacks have returned when
// it returns) and the connection. It must not be called from a callback.
func (s *Source) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	if err := s.conn.Close(); err != nil {
		return fmt.Errorf("spire source: close: %w", err)
	}
	return nil
}

// start runs fn in a goroutine of the source and returns its cancel, which
// returns once fn has. ok is false after Close.
func (s *Source) start(fn func(ctx context.Context)) (cancel func(), ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return func() {}, false
	}
	ctx, stop := context.WithCancel(s.ctx)
	done := make(chan struct{})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(done)
		fn(ctx)
	}()
	return func() {
		stop()
		<-done
	}, true
}

// streamError is what a subscriber is told about a failed stream. Every
// error wraps identity.ErrSourceUnavailable: the source cannot be asked now.
func (s *Source) streamError(err error) error {
	st, _ := status.FromError(err)
	switch st.Code() {
	case codes.PermissionDenied:
		// "caller not configured as an authorized delegate", or "no
		// identity issued" when no entry matches this process at all.
		return fmt.Errorf("%w: %w: spire agent at %s says: %s", identity.ErrSourceUnavailable, ErrNotAuthorized,
			s.cfg.AdminSocket, st.Message())
	case codes.Unavailable:
		return fmt.Errorf("%w: spire agent at %s unreachable: %s", identity.ErrSourceUnavailable, s.cfg.AdminSocket, st.Message())
	default:
		return fmt.Errorf("%w: spire agent at %s: %w", identity.ErrSourceUnavailable, s.cfg.AdminSocket, err)
	}
}

// sleep waits d or until ctx ends; false when ctx ended.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// outage reports a stream failure once per outage: again only when the kind
// of failure (gRPC code) changes, not on every retry.
type outage struct {
	active bool
	code   codes.Code
}

// failed reports whether err starts an outage or changes its kind.
func (o *outage) failed(err error) bool {
	c := status.Code(err)
	report := !o.active || o.code != c
	o.active, o.code = true, c
	return report
}

func (o *outage) ended() { o.active = false }
