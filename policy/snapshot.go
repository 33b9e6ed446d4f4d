package policy

import (
	"maps"
	"net/netip"
	"slices"

	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	networkingv1 "k8s.io/api/networking/v1"
)

// Snapshot is everything the compiler needs: the workloads, the namespaces
// they live in, and the policies. The agent builds it from its store (and
// assigns EndpointIDs to the pods that run on this node); the CLI builds it
// from a directory with every pod local.
type Snapshot struct {
	// TrustDomain of the SPIFFE IDs; empty means identity.DefaultTrustDomain.
	TrustDomain string
	// DenyHostIngress turns off the kubelet-probe exception (MapState.AllowHostIngress).
	DenyHostIngress bool
	// HostIPs are this node's own addresses; the ipcache maps them to
	// identity.IDHost. The agent keeps them current (Compiler.SetHostIPs):
	// primary CNIs such as ptp give every host-side veth an address.
	HostIPs []netip.Addr

	Namespaces       []Namespace
	Pods             []Pod
	NetworkPolicies  []*networkingv1.NetworkPolicy
	BulkheadPolicies []*v1alpha1.BulkheadPolicy
	// RuntimePolicies are valid BulkheadRuntimePolicies: the runtime
	// monitor's answers per pod (RuntimeActions). The compiler does not
	// read them.
	RuntimePolicies []*v1alpha1.BulkheadRuntimePolicy
}

// Namespace is a namespace and its labels. Namespaces that pods or policies
// name but the snapshot lacks exist with no labels but the
// kubernetes.io/metadata.name label the API server always sets.
type Namespace struct {
	Name   string
	Labels map[string]string
}

// Pod is the policy-relevant view of a workload.
type Pod struct {
	Namespace string
	Name      string
	Labels    map[string]string
	// ServiceAccount is empty for "default".
	ServiceAccount string
	// Ports are the named container ports, for named ports in policies.
	Ports []NamedPort
	// IPs are the pod's addresses (status.podIPs).
	IPs []netip.Addr
	// HostIPs are the addresses of the node the pod runs on
	// (status.hostIPs, or status.hostIP), first preferred: the mTLS tunnel
	// reaches a remote pod through its node's tunnel endpoint there. Policy
	// does not use them.
	HostIPs []netip.Addr
	// Endpoint is the node-local endpoint ID when the pod runs on this node,
	// zero otherwise.
	Endpoint EndpointID
	// SPIFFEID is the pod's SPIFFE ID when an SVID source issued one that
	// may differ from the derived spiffe://<td>/ns/<ns>/sa/<sa> (empty:
	// derived). Policy matching, flow records and identities use it.
	SPIFFEID string
	// UID and NodeName (metadata.uid, spec.nodeName) place the pod: the
	// agent adopts the running pods of its own node that no CNI ADD told it
	// about. Policy does not use them.
	UID      string
	NodeName string
}

// Equal says whether p and q are the same pod state (reflect.DeepEqual
// without reflection, except that nil and empty are the same: the agent
// compares every pod of the store on every change).
func (p Pod) Equal(q Pod) bool {
	return p.Namespace == q.Namespace && p.Name == q.Name && p.ServiceAccount == q.ServiceAccount &&
		p.Endpoint == q.Endpoint && p.SPIFFEID == q.SPIFFEID && p.UID == q.UID && p.NodeName == q.NodeName &&
		maps.Equal(p.Labels, q.Labels) && slices.Equal(p.Ports, q.Ports) && slices.Equal(p.IPs, q.IPs) &&
		slices.Equal(p.HostIPs, q.HostIPs)
}

// NamedPort is a named container port.
type NamedPort struct {
	Name  string
	Port  uint16
	Proto uint8
}

// IP protocol numbers the policy APIs name.
const (
	ProtoTCP  uint8 = 6
	ProtoUDP  uint8 = 17
	ProtoSCTP uint8 = 132
)

// NamespaceNameLabel is set on every namespace by the API server.
const NamespaceNameLabel = "kubernetes.io/metadata.name"
