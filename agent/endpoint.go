package agent

import (
	"net"
	"net/netip"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/policy"
)

// endpointRecord is what the agent persists per endpoint under --state-dir,
// so that a restarted agent knows its endpoints before any CNI call.
type endpointRecord struct {
	Key         api.EndpointKey     `json:"key"`
	Network     string              `json:"network,omitempty"`
	Netns       string              `json:"netns"`
	HostVeth    string              `json:"hostVeth"`
	HostIfIndex int                 `json:"hostIfIndex"`
	IPs         []netip.Prefix      `json:"ips"`
	Pod         api.PodRef          `json:"pod"`
	ID          policy.EndpointID   `json:"id"`
	CreatedAt   time.Time           `json:"createdAt"`
	Mode        datapath.AttachMode `json:"mode,omitempty"`
	// MAC is the pod interface's MAC, the only one it may send from.
	// Records written before it was kept have none: the agent reads it
	// from the pod's netns when it restores them.
	MAC string `json:"mac,omitempty"`
	// Quarantine is the endpoint's quarantine (agent/quarantine.go); nil
	// when it has none.
	Quarantine *quarantineRecord `json:"quarantine,omitempty"`
	// LinkLocal are the pod interface's IPv6 link-local addresses, the
	// only ones its neighbour discovery may claim. Empty: the pod had
	// none (IPv6 off). Absent (nil, records written before they were
	// kept): the agent reads them when it restores the record.
	LinkLocal []netip.Addr `json:"linkLocal"`
	// Adopted: the pod was found running (agent/adopt), not registered by
	// a CNI ADD.
	Adopted bool `json:"adopted,omitempty"`
}

// recordKey names the record's file. Runtimes use hex container IDs, so the
// key is readable; anything unsafe in a file name is refused by state.Dir.
func recordKey(k api.EndpointKey) string { return k.ContainerID + "_" + k.IfName }

// podRef names a pod in the compiler.
type podRef struct{ ns, name string }

func (r podRef) String() string { return r.ns + "/" + r.name }

// podRefOf is the compiler name of an endpoint's pod. Runtimes that pass no
// K8S_POD_* arguments get a pod named after the container in "default".
func podRefOf(rec *endpointRecord) podRef {
	ns, name := rec.Pod.Namespace, rec.Pod.Name
	if ns == "" {
		ns = "default"
	}
	if name == "" {
		name = "container-" + shortID(rec.Key.ContainerID)
	}
	return podRef{ns, name}
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func (rec *endpointRecord) dpEndpoint() datapath.Endpoint {
	// A MAC that does not parse leaves MAC nil, which Attach refuses.
	mac, _ := net.ParseMAC(rec.MAC)
	return datapath.Endpoint{ID: rec.ID, Ifname: rec.HostVeth, Ifindex: rec.HostIfIndex, MAC: mac, Addrs: rec.addrs(),
		LinkLocal: rec.LinkLocal}
}

func (rec *endpointRecord) addrs() []netip.Addr {
	out := make([]netip.Addr, 0, len(rec.IPs))
	for _, p := range rec.IPs {
		out = append(out, p.Addr())
	}
	return out
}

func (rec *endpointRecord) info(ms *policy.MapState, spiffe func(policy.EndpointID) string) api.EndpointInfo {
	info := api.EndpointInfo{
		EndpointKey: rec.Key, Netns: rec.Netns, HostVeth: rec.HostVeth, HostIfIndex: rec.HostIfIndex,
		IPs: rec.IPs, Pod: rec.Pod, AttachMode: string(rec.Mode), Attached: rec.Mode != "",
		CreatedAt: rec.CreatedAt, Adopted: rec.Adopted,
	}
	if ms != nil {
		info.PolicyRevision = ms.Revision
		if p := ms.Endpoints[rec.ID]; p != nil {
			info.IdentityID = uint32(p.Identity)
			info.SPIFFEID = spiffe(rec.ID)
		}
	}
	return info
}
