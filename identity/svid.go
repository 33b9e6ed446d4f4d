package identity

import (
	"errors"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Names of the SVID sources (--identity-source).
const (
	SourceNone    = "none"
	SourceBuiltin = "builtin"
	SourceSPIRE   = "spire"
)

// Workload is a pod on this node, as an SVID source is asked about it. Only
// local pods are ever passed to a source: a source trusts the caller to
// have attested them (selectors) or attests them itself (PID).
type Workload struct {
	Namespace      string
	Name           string
	UID            string
	ServiceAccount string // "" is "default"
	// PID is a process of the pod, 0 when it has none (the dir store's
	// pods). A source that can attest processes asks by PID when it is set
	// and never falls back to selectors for such a workload.
	PID int
	// Derived is spiffe://<td>/ns/<ns>/sa/<sa>, the ID the built-in CA
	// issues and the one a SPIRE-issued ID is compared with.
	Derived spiffeid.ID
}

// SVIDUpdate is one change of a workload's subscription.
type SVIDUpdate struct {
	// SVIDs are the workload's X.509-SVIDs, the first being the one the
	// agent uses. Empty with Err nil means the source issues none (no
	// registration entry matches, or the entry was deleted): a held SVID
	// is dropped at once, and Reason says why.
	SVIDs  []*x509svid.SVID
	Reason string
	// Err reports that the source cannot be asked right now (unreachable,
	// restarting). The SVIDs held so far stay in use until they expire;
	// the source keeps retrying with backoff and sends a fresh update when
	// it is back.
	Err error
}

// SourceHealth is what `bulkhead status` and the metrics say about a source.
type SourceHealth struct {
	Name string
	// Connected is false while the source cannot be reached.
	Connected bool
	// LastError is the last failure, empty when the source is healthy.
	LastError string
	// Since is when Connected last changed.
	Since time.Time
}

// SVIDSource issues X.509-SVIDs for local workloads and follows the trust
// bundles. It is an interface so that the agent can follow SPIRE's
// Delegated Identity API today, the SPIFFE Broker API later, and the
// built-in development CA without SPIRE.
//
// Subscribe and SubscribeBundles return at once and never block on the
// source: a CNI ADD must not wait for SPIRE. Callbacks of one subscription
// are called from one goroutine, in order, and never after cancel returns.
type SVIDSource interface {
	Name() string
	Subscribe(w Workload, fn func(SVIDUpdate)) (cancel func())
	SubscribeBundles(fn func(*x509bundle.Set)) (cancel func())
	Health() SourceHealth
	// Close ends every subscription.
	Close() error
}

// ErrSourceUnavailable wraps the errors a source reports in SVIDUpdate.Err.
var ErrSourceUnavailable = errors.New("svid source unavailable")

// ErrMalformedUpdate marks an SVIDUpdate.Err for an answer the source could
// not read while its connection stayed up: what is held stays, and it is
// not an outage (a withdrawal that follows takes effect at once).
var ErrMalformedUpdate = errors.New("malformed response")
