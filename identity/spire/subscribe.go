package spire

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"

	"github.com/bulkhead-io/bulkhead/identity"
)

// Subscribe follows w's SVIDs. With w.PID set SPIRE attests that process
// (and the subscription ends, reporting no SVID, when it exits); otherwise
// it asks by the pod's k8s selectors. It returns at once; fn is called from
// one goroutine, in order, never after cancel returns. cancel must not be
// called from fn.
func (s *Source) Subscribe(w identity.Workload, fn func(identity.SVIDUpdate)) (cancel func()) {
	log := s.log.With("namespace", w.Namespace, "pod", w.Name)
	if w.PID > 0 {
		log = log.With("pid", w.PID)
	}
	cancel, ok := s.start(func(ctx context.Context) { s.followSVIDs(ctx, log, w, fn) })
	if !ok {
		log.Warn("svid subscription after close: ignored")
	}
	return cancel
}

// followSVIDs is one subscription: a stream, opened again with backoff
// whenever it fails, until ctx ends or the pod's process exits.
func (s *Source) followSVIDs(ctx context.Context, log *slog.Logger, w identity.Workload, fn func(identity.SVIDUpdate)) {
	req := &delegatedidentityv1.SubscribeToX509SVIDsRequest{}
	var emptyReason string
	var proc *pidWatch
	if w.PID > 0 {
		p, err := openPID(w.PID)
		if err != nil {
			log.Info("pod process gone before subscribing", "err", err)
			fn(identity.SVIDUpdate{Reason: fmt.Sprintf("pod process %d is gone: %v", w.PID, err)})
			return
		}
		proc = p
		defer proc.close()
		var cancel context.CancelCauseFunc
		ctx, cancel = context.WithCancelCause(ctx)
		defer cancel(nil)
		proc.watch(func() { cancel(errProcessGone) })
		req.Pid = int32(w.PID)
		emptyReason = fmt.Sprintf("no registration entry matches the selectors SPIRE attested for pod process %d", w.PID)
	} else {
		sels, err := Selectors(w)
		if err != nil {
			log.Error("cannot ask spire for the pod's svid", "err", err)
			fn(identity.SVIDUpdate{Reason: fmt.Sprintf("cannot ask SPIRE for the pod's SVID: %v", err)})
			return
		}
		req.Selectors = sels
		emptyReason = fmt.Sprintf("no registration entry matches the pod's selectors (%s)", selectorsString(sels))
	}
	gone := func() {
		log.Info("pod process exited: svid subscription ends")
		fn(identity.SVIDUpdate{Reason: fmt.Sprintf("pod process %d exited: its SVID is dropped", w.PID)})
	}

	bo := backoff{min: s.cfg.MinBackoff, max: s.cfg.MaxBackoff}
	var out outage
	for {
		err := s.streamSVIDs(ctx, log, req, proc, emptyReason, fn, &bo, &out)
		if errors.Is(err, errProcessGone) || errors.Is(context.Cause(ctx), errProcessGone) {
			gone()
			return
		}
		if ctx.Err() != nil {
			return
		}
		reported := s.streamError(err)
		s.markDown(reported)
		if out.failed(err) {
			log.Warn("svid stream failed, retrying with backoff", "err", err)
			fn(identity.SVIDUpdate{Err: reported})
		} else {
			log.Debug("svid stream failed again", "err", err)
		}
		if !sleep(ctx, bo.next()) {
			if errors.Is(context.Cause(ctx), errProcessGone) {
				gone()
			}
			return
		}
		s.conn.ResetConnectBackoff()
	}
}

// streamSVIDs opens one stream and delivers its responses until it fails.
func (s *Source) streamSVIDs(ctx context.Context, log *slog.Logger, req *delegatedidentityv1.SubscribeToX509SVIDsRequest,
	proc *pidWatch, emptyReason string, fn func(identity.SVIDUpdate), bo *backoff, out *outage) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := s.client.SubscribeToX509SVIDs(sctx, req)
	if err != nil {
		return err
	}
	for {
		resp, err := receive(ctx, s, stream.Recv, bo, out)
		if err != nil {
			return err
		}
		if proc != nil && proc.exited() {
			// SPIRE may have attested another process that took the PID
			// (or none): this response is not the pod's.
			log.Debug("svid response after the pod process exited: discarded")
			return errProcessGone
		}
		svids, err := parseSVIDs(resp)
		if err != nil {
			log.Error("svid response rejected, keeping the previous state", "err", err)
			fn(identity.SVIDUpdate{Err: fmt.Errorf("%w: %w", identity.ErrSourceUnavailable, err)})
			continue
		}
		if len(svids) == 0 {
			log.Info("spire issues the pod no svid", "reason", emptyReason)
			fn(identity.SVIDUpdate{Reason: emptyReason})
			continue
		}
		logSVIDs(log, svids)
		fn(identity.SVIDUpdate{SVIDs: svids})
	}
}

// logSVIDs logs what identifies the SVIDs, never their keys.
func logSVIDs(log *slog.Logger, svids []*x509svid.SVID) {
	if !log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	for _, sv := range svids {
		leaf := sv.Certificates[0]
		log.Debug("svid from spire", "spiffe_id", sv.ID.String(), "serial", leaf.SerialNumber.String(),
			"not_after", leaf.NotAfter, "hint", sv.Hint)
	}
}

// SubscribeBundles follows the X.509 bundles of the agent's trust domain
// and of the federated ones. fn gets the full set on every change, from one
// goroutine, never after cancel returns; a malformed response is logged and
// skipped. cancel must not be called from fn.
func (s *Source) SubscribeBundles(fn func(*x509bundle.Set)) (cancel func()) {
	cancel, ok := s.start(func(ctx context.Context) { s.followBundles(ctx, fn) })
	if !ok {
		s.log.Warn("bundle subscription after close: ignored")
	}
	return cancel
}

func (s *Source) followBundles(ctx context.Context, fn func(*x509bundle.Set)) {
	log := s.log.With("stream", "bundles")
	bo := backoff{min: s.cfg.MinBackoff, max: s.cfg.MaxBackoff}
	var out outage
	for {
		err := s.streamBundles(ctx, log, fn, &bo, &out)
		if ctx.Err() != nil {
			return
		}
		reported := s.streamError(err)
		s.markDown(reported)
		if out.failed(err) {
			log.Warn("bundle stream failed, retrying with backoff", "err", reported)
		}
		if !sleep(ctx, bo.next()) {
			return
		}
		s.conn.ResetConnectBackoff()
	}
}

func (s *Source) streamBundles(ctx context.Context, log *slog.Logger, fn func(*x509bundle.Set), bo *backoff, out *outage) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := s.client.SubscribeToX509Bundles(sctx, &delegatedidentityv1.SubscribeToX509BundlesRequest{})
	if err != nil {
		return err
	}
	for {
		resp, err := receive(ctx, s, stream.Recv, bo, out)
		if err != nil {
			return err
		}
		set, err := parseBundles(resp.GetCaCertificates())
		if err != nil {
			log.Error("bundle response rejected, keeping the previous bundles", "err", err)
			continue
		}
		log.Debug("bundles from spire", "trust_domains", set.Len())
		fn(set)
	}
}

// receive takes one response off a stream and, when there is one, records
// that the agent answered: the source is up, and the backoff and the outage
// start over.
func receive[T any](ctx context.Context, s *Source, recv func() (T, error), bo *backoff, out *outage) (T, error) {
	resp, err := recv()
	if err == nil {
		// Recv returns what gRPC has buffered even after ctx ended:
		// cancel must not wait for a backlog to drain.
		err = ctx.Err()
	}
	if err != nil {
		var zero T
		return zero, err
	}
	s.markUp()
	bo.reset()
	out.ended()
	return resp, nil
}
