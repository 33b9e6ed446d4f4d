package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// DefaultSocket is where the agent listens unless --socket says otherwise
// (DESIGN.md §5). The plugin uses it when the conflist has no "socket".
const DefaultSocket = "/run/bulkhead/agent.sock"

// Version is the API version every path below is prefixed with.
const Version = "v1"

// Request paths. The version prefix lets a newer agent keep serving older
// plugins that are still installed on the node during an upgrade.
const (
	PathEndpointAdd   = "/v1/endpoints/add"
	PathEndpointDel   = "/v1/endpoints/del"
	PathEndpointCheck = "/v1/endpoints/check"
	PathEndpointGC    = "/v1/endpoints/gc"
	PathStatus        = "/v1/status"
	PathEndpoints     = "/v1/endpoints"
	PathIdentities    = "/v1/identities"
	PathExplain       = "/v1/explain"
)

// PodRef names the Kubernetes pod behind an endpoint, from CNI_ARGS. All
// fields are empty for runtimes that do not pass them.
type PodRef struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// EndpointKey identifies an attachment the way the CNI runtime does, so GC
// and DEL can name endpoints without any other state.
type EndpointKey struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
}

func (k EndpointKey) validate() error {
	if k.ContainerID == "" {
		return errors.New("containerID is required")
	}
	if k.IfName == "" {
		return errors.New("ifName is required")
	}
	return nil
}

// EndpointAddRequest asks the agent to enforce policy on a new endpoint. The
// agent must treat it as idempotent per EndpointKey: the plugin retries when
// a response is lost, and the runtime may repeat ADD.
type EndpointAddRequest struct {
	EndpointKey
	// Network is the conflist name; GC is scoped to it.
	Network string `json:"network,omitempty"`
	// Netns is the path of the pod's network namespace (CNI_NETNS).
	Netns string `json:"netns"`
	// PodIfIndex is the index of IfName inside Netns.
	PodIfIndex int `json:"podIfIndex"`
	// HostVeth and HostIfIndex name the host-side veth peer, found by
	// following the peer index rather than by name. The agent attaches its
	// programs to HostIfIndex and may use HostVeth to detect index reuse.
	HostVeth    string         `json:"hostVeth"`
	HostIfIndex int            `json:"hostIfIndex"`
	IPs         []netip.Prefix `json:"ips"`
	Pod         PodRef         `json:"pod"`
	// MAC is the pod interface's MAC (prevResult's sandbox interface):
	// the only Ethernet source the pod may send from. Empty: the agent
	// reads it from the pod's netns.
	MAC string `json:"mac,omitempty"`
}

// Validate reports the first missing or malformed field.
func (r EndpointAddRequest) Validate() error {
	if err := r.EndpointKey.validate(); err != nil {
		return err
	}
	if r.Netns == "" {
		return errors.New("netns is required")
	}
	if r.HostVeth == "" || r.HostIfIndex <= 0 {
		return errors.New("hostVeth and a positive hostIfIndex are required")
	}
	for _, p := range r.IPs {
		if !p.IsValid() {
			return fmt.Errorf("invalid ip prefix %v", p)
		}
	}
	return CheckMAC(r.MAC)
}

// CheckMAC accepts an empty MAC (the agent reads it from the pod's netns)
// or a unicast, non-zero Ethernet address: the only source the pod may send
// from.
func CheckMAC(s string) error {
	if s == "" {
		return nil
	}
	mac, err := net.ParseMAC(s)
	if err != nil || len(mac) != 6 || mac[0]&1 != 0 || bytes.Equal(mac, make(net.HardwareAddr, 6)) {
		return fmt.Errorf("mac %q: want a unicast Ethernet address", s)
	}
	return nil
}

// EndpointAddResponse is returned only once enforcement is live: programs
// attached, endpoint config written, ipcache and policy applied.
type EndpointAddResponse struct {
	// Enforced is true when the datapath enforces policy for the endpoint.
	// A plugin must fail ADD when it is false.
	Enforced       bool   `json:"enforced"`
	IdentityID     uint32 `json:"identityID,omitempty"`
	SPIFFEID       string `json:"spiffeID,omitempty"`
	PolicyRevision uint64 `json:"policyRevision,omitempty"`
}

// EndpointDelRequest asks the agent to forget an endpoint. Netns may be empty:
// runtimes call DEL after the namespace is gone.
type EndpointDelRequest struct {
	EndpointKey
	Netns string `json:"netns,omitempty"`
}

// Validate reports the first missing field.
func (r EndpointDelRequest) Validate() error { return r.EndpointKey.validate() }

// EndpointDelResponse reports whether the agent knew the endpoint. An unknown
// endpoint is not an error: DEL is idempotent.
type EndpointDelResponse struct {
	Removed bool `json:"removed"`
}

// EndpointCheckRequest asks the agent whether an endpoint is still enforced
// as the plugin sees it now.
type EndpointCheckRequest struct {
	EndpointKey
	Netns       string         `json:"netns"`
	HostVeth    string         `json:"hostVeth"`
	HostIfIndex int            `json:"hostIfIndex"`
	IPs         []netip.Prefix `json:"ips,omitempty"`
}

// Validate reports the first missing field.
func (r EndpointCheckRequest) Validate() error {
	if err := r.EndpointKey.validate(); err != nil {
		return err
	}
	if r.HostIfIndex <= 0 {
		return errors.New("a positive hostIfIndex is required")
	}
	return nil
}

// EndpointCheckResponse is healthy only when all three booleans are true.
// Problems explains, for a human, what is wrong.
type EndpointCheckResponse struct {
	Known bool `json:"known"`
	// Attached is true when the endpoint's programs are attached to the
	// veth with the requested HostIfIndex.
	Attached bool `json:"attached"`
	// IdentityCurrent is false when the pod's labels changed and the
	// endpoint still carries the old identity.
	IdentityCurrent bool     `json:"identityCurrent"`
	Problems        []string `json:"problems,omitempty"`
}

// Healthy reports whether CHECK should pass.
func (r EndpointCheckResponse) Healthy() bool { return r.Known && r.Attached && r.IdentityCurrent }

// GCRequest lists every attachment the runtime still considers valid
// (cni.dev/valid-attachments). The agent removes endpoints not in it.
type GCRequest struct {
	// Network is the conflist name: only this network's endpoints are
	// collected, so two networks chaining bulkhead-cni do not collect
	// each other's.
	Network          string        `json:"network,omitempty"`
	ValidAttachments []EndpointKey `json:"validAttachments"`
}

// GCResponse lists what the agent removed.
type GCResponse struct {
	Removed []EndpointKey `json:"removed,omitempty"`
}

// StoreConnection is whether the store's server (the apiserver) is
// reachable, and since when.
type StoreConnection struct {
	Connected bool      `json:"connected"`
	Since     time.Time `json:"since,omitzero"`
}

// StoreError is a bad store file that the agent refused to apply.
type StoreError struct {
	File    string `json:"file"`
	Line    int    `json:"line,omitempty"`
	Message string `json:"message"`
}

// StoreHold is a store state that removes every policy, or most policies or
// objects, at once. The agent keeps enforcing the last applied state, and
// applies the held one at Until if the store stays the same until then.
// AppliedObjects and AppliedPolicies are 0 when the agent has no record of
// the state the datapath enforces (Reason says so).
type StoreHold struct {
	Reason          string    `json:"reason"`
	Since           time.Time `json:"since"`
	Until           time.Time `json:"until"`
	AppliedObjects  int       `json:"appliedObjects"`
	AppliedPolicies int       `json:"appliedPolicies"`
	HeldObjects     int       `json:"heldObjects"`
	HeldPolicies    int       `json:"heldPolicies"`
}

// PolicyError is one policy that is not enforced as written.
type PolicyError struct {
	// Policy is "Kind namespace/name".
	Policy  string `json:"policy"`
	Message string `json:"message"`
	// KeptPreviousVersion: the previous version stays in force; otherwise
	// the policy's rules are withheld and its pods stay isolated.
	KeptPreviousVersion bool `json:"keptPreviousVersion,omitempty"`
}

// StatusResponse is the agent's health and summary. Ready is false until
// the agent has restored pinned state and can enforce new endpoints.
type StatusResponse struct {
	Ready          bool         `json:"ready"`
	Reason         string       `json:"reason,omitempty"`
	AgentVersion   string       `json:"agentVersion,omitempty"`
	NodeName       string       `json:"nodeName,omitempty"`
	StartedAt      time.Time    `json:"startedAt,omitzero"`
	Endpoints      int          `json:"endpoints"`
	Identities     int          `json:"identities"`
	PolicyRevision uint64       `json:"policyRevision"`
	Datapath       string       `json:"datapath,omitempty"`
	Store          string       `json:"store,omitempty"`
	StoreErrors    []StoreError `json:"storeErrors,omitempty"`
	// StoreHeld is set while a store state is held back (StoreHold).
	StoreHeld *StoreHold `json:"storeHeld,omitempty"`
	// StoreConnection is set for a store that can lose its connection
	// (kubernetes): while it is lost, the last state stays enforced.
	StoreConnection *StoreConnection `json:"storeConnection,omitempty"`
	// PolicyErrors are the policies the last compile rejected (over their
	// policy-trie budget); the rest of the store applies. They describe
	// the compiled state even while its apply fails (see PolicyApply).
	PolicyErrors []PolicyError `json:"policyErrors,omitempty"`
	// Features are the kernel features the datapath probed.
	Features []Feature `json:"features,omitempty"`
	// DatapathVersion is the running datapath's version, and how it took
	// over from the one pinned before it, if it did.
	DatapathVersion *DatapathVersion `json:"datapathVersion,omitempty"`
	// LostEventsKernel counts flow events the kernel ring buffer had no
	// room for; LostEventsUserspace those the agent dropped for slow
	// consumers.
	LostEventsKernel    uint64 `json:"lostEventsKernel"`
	LostEventsUserspace uint64 `json:"lostEventsUserspace"`
	// PolicyApply is set while the datapath enforces an older policy than
	// the agent compiled, because applying the newer one failed.
	PolicyApply *ApplyStatus `json:"policyApply,omitempty"`
	// EndpointWarnings are lasting problems with endpoint state:
	// quarantined records, endpoints enforced without a record (held at
	// default deny), addresses claimed by more than one pod.
	EndpointWarnings []string `json:"endpointWarnings,omitempty"`
	// IdentitySource is where local pods' SVIDs come from, and its health.
	IdentitySource *IdentitySourceStatus `json:"identitySource,omitempty"`
	// MTLS is the node's mTLS tunnel endpoint.
	MTLS *MTLSStatus `json:"mtls,omitempty"`
	// Unadopted are running pods of this node that no CNI ADD registered
	// and whose sandbox the agent could not find: they are not enforced.
	Unadopted []AdoptionProblem `json:"unadopted,omitempty"`
}

// AdoptionProblem is a running pod the agent could not adopt, and why.
type AdoptionProblem struct {
	Pod    PodRef    `json:"pod"`
	Reason string    `json:"reason"`
	Since  time.Time `json:"since"`
}

// MTLSStatus describes the node's mTLS tunnel endpoint.
type MTLSStatus struct {
	// Enabled is false without an identity source; Reason says what then
	// happens to enrolled pods' traffic.
	Enabled bool   `json:"enabled"`
	Reason  string `json:"reason,omitempty"`
	Port    uint16 `json:"port"`
	// KernelTLS says whether the kernel offers TLS offload (TCP_ULP "tls"),
	// and why not.
	KernelTLS       bool   `json:"kernelTLS"`
	KernelTLSReason string `json:"kernelTLSReason,omitempty"`
	// Open connections: pods' tunnelled connections by side, TLS
	// connections to (pooled) and from other tunnel endpoints.
	ActiveOutbound int64 `json:"activeOutbound"`
	ActiveInbound  int64 `json:"activeInbound"`
	PooledTLS      int   `json:"pooledTLS"`
	InboundTLS     int   `json:"inboundTLS"`
	// Counters since the agent started.
	Forwarded         uint64 `json:"forwarded"`
	Refused           uint64 `json:"refused"`
	Admitted          uint64 `json:"admitted"`
	Denied            uint64 `json:"denied"`
	HandshakeFailures uint64 `json:"handshakeFailures"`
	DialFailures      uint64 `json:"dialFailures"`
	PoolReuses        uint64 `json:"poolReuses"`
}

// ApplyStatus describes a policy apply that keeps failing. The datapath
// publishes a policy in one step, so a failed apply leaves the previous
// policy enforced, whole; the agent retries with backoff.
type ApplyStatus struct {
	LastError    string    `json:"lastError"`
	FailingSince time.Time `json:"failingSince"`
	// Retries counts the retries made since FailingSince.
	Retries   int       `json:"retries"`
	NextRetry time.Time `json:"nextRetry,omitzero"`
}

// Feature is one probed kernel feature: State is "yes", "no" or an error.
type Feature struct {
	Name  string `json:"name"`
	State string `json:"state"`
}

// EndpointInfo is one endpoint as the CLI lists it.
type EndpointInfo struct {
	EndpointKey
	Netns          string         `json:"netns"`
	HostVeth       string         `json:"hostVeth"`
	HostIfIndex    int            `json:"hostIfIndex"`
	IPs            []netip.Prefix `json:"ips"`
	Pod            PodRef         `json:"pod"`
	IdentityID     uint32         `json:"identityID"`
	SPIFFEID       string         `json:"spiffeID,omitempty"`
	Attached       bool           `json:"attached"`
	AttachMode     string         `json:"attachMode,omitempty"`
	PolicyRevision uint64         `json:"policyRevision"`
	CreatedAt      time.Time      `json:"createdAt,omitzero"`
	// Adopted is set for a pod that was running before the agent knew of
	// it (no CNI ADD): the agent found its sandbox and enforces on it.
	Adopted bool `json:"adopted,omitempty"`
}

// EndpointList is the response of GET PathEndpoints.
type EndpointList struct {
	Endpoints []EndpointInfo `json:"endpoints"`
}

// Identity is one security identity as the CLI lists it.
type Identity struct {
	ID             uint32            `json:"id"`
	SPIFFEID       string            `json:"spiffeID,omitempty"`
	Reserved       string            `json:"reserved,omitempty"`
	Namespace      string            `json:"namespace,omitempty"`
	ServiceAccount string            `json:"serviceAccount,omitempty"`
	Labels         map[string]string `json:"labels,omitempty"`
	Endpoints      int               `json:"endpoints"`
}

// IdentityList is the response of GET PathIdentities.
type IdentityList struct {
	Identities []Identity `json:"identities"`
	// Source and SVIDs describe the local pods' X.509-SVIDs (none with
	// --identity-source none).
	Source *IdentitySourceStatus `json:"source,omitempty"`
	SVIDs  []SVIDInfo            `json:"svids,omitempty"`
}

// SVIDInfo is the SVID state of one local pod. Keys never leave the agent.
type SVIDInfo struct {
	// Pod is "namespace/name".
	Pod       string    `json:"pod"`
	SPIFFEID  string    `json:"spiffeID,omitempty"`
	Serial    string    `json:"serial,omitempty"`
	NotBefore time.Time `json:"notBefore,omitzero"`
	NotAfter  time.Time `json:"notAfter,omitzero"`
	// NoSVIDReason says why the pod holds none.
	NoSVIDReason string `json:"noSVIDReason,omitempty"`
	// LastError is the source's last error while a held SVID stays in use.
	LastError string `json:"lastError,omitempty"`
	// CertificatePEM is the SVID's certificate chain (public), leaf first,
	// so that it can be checked against the trust bundle.
	CertificatePEM string `json:"certificatePEM,omitempty"`
}

// IdentitySourceStatus is the health of the SVID source.
type IdentitySourceStatus struct {
	// Name is none, builtin or spire.
	Name      string    `json:"name"`
	Healthy   bool      `json:"healthy"`
	LastError string    `json:"lastError,omitempty"`
	Since     time.Time `json:"since,omitzero"`
	// SVIDs counts distinct SVIDs held (one per SPIFFE ID).
	SVIDs          int       `json:"svids"`
	PodsWithSVID   int       `json:"podsWithSVID"`
	PodsFollowed   int       `json:"podsFollowed"`
	EarliestExpiry time.Time `json:"earliestExpiry,omitzero"`
	Rotations      uint64    `json:"rotations"`
	// BundlePEM is the local trust domain's X.509 bundle (CA certificates).
	BundlePEM string `json:"bundlePEM,omitempty"`
}

// Peer is one side of an explained flow: a pod by name, or an address.
type Peer struct {
	Pod *PodRef    `json:"pod,omitempty"`
	IP  netip.Addr `json:"ip,omitzero"`
}

// ExplainRequest asks why a flow would be allowed or denied by the live state.
type ExplainRequest struct {
	Source      Peer   `json:"source"`
	Destination Peer   `json:"destination"`
	Protocol    string `json:"protocol"`
	Port        uint16 `json:"port,omitempty"`
}

// Validate reports the first missing field.
func (r ExplainRequest) Validate() error {
	if r.Source.Pod == nil && !r.Source.IP.IsValid() {
		return errors.New("source needs a pod or an ip")
	}
	if r.Destination.Pod == nil && !r.Destination.IP.IsValid() {
		return errors.New("destination needs a pod or an ip")
	}
	if r.Protocol == "" {
		return errors.New("protocol is required")
	}
	return nil
}

// ExplainRule is one policy rule that took part in a verdict.
type ExplainRule struct {
	Policy    string `json:"policy"`
	Rule      string `json:"rule,omitempty"`
	Direction string `json:"direction"`
	Verdict   string `json:"verdict"`
}

// ExplainResponse is the verdict and the rules behind it.
type ExplainResponse struct {
	Verdict             string        `json:"verdict"`
	Reason              string        `json:"reason,omitempty"`
	SourceIdentity      uint32        `json:"sourceIdentity"`
	DestinationIdentity uint32        `json:"destinationIdentity"`
	Rules               []ExplainRule `json:"rules,omitempty"`
	PolicyRevision      uint64        `json:"policyRevision"`
	// Detail is the explain engine's full result (both directions, the
	// deciding and the matching rules), for the CLI to render exactly as it
	// renders an offline explain.
	Detail json.RawMessage `json:"detail,omitempty"`
}

// DatapathVersion identifies the loaded BPF datapath.
type DatapathVersion struct {
	// Serial numbers the BPF object's versions (0: pinned before versions
	// were recorded); Object is its SHA-256, Settings a digest of the
	// load-time settings.
	Serial   int       `json:"serial"`
	Object   string    `json:"object,omitempty"`
	Settings string    `json:"settings,omitempty"`
	LoadedAt time.Time `json:"loadedAt,omitzero"`
	// Migration is the last migration from an older pinned datapath.
	Migration *DatapathMigration `json:"migration,omitempty"`
}

// DatapathMigration reports how a datapath took over from the pinned one.
type DatapathMigration struct {
	FromSerial int       `json:"fromSerial"`
	FromObject string    `json:"fromObject,omitempty"`
	At         time.Time `json:"at"`
	// DurationMS is the whole migration (mostly loading the programs:
	// the old ones enforce meanwhile); SwapMS the moving of the
	// attachments, LinksSwapped of them, each one atomic update.
	DurationMS   float64 `json:"durationMs"`
	SwapMS       float64 `json:"swapMs"`
	LinksSwapped int     `json:"linksSwapped"`
	// Maps used as they were, copied into a new size, made anew, and old
	// pins removed.
	Reused  []string `json:"reused,omitempty"`
	Copied  []string `json:"copied,omitempty"`
	Created []string `json:"created,omitempty"`
	Removed []string `json:"removed,omitempty"`
}
